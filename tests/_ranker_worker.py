"""2-rank worker of tests/test_ranker_job.py (launched with torch.distributed.run): builds each ablation of
the stage-2 task sharded over the ranks, loads its frozen satisfaction model g from the stage-1 run, and
records what the task contains, what one forward reports, how often g's history scorer runs during two
pipelined training steps, the untrained validation losses, and whether g's pseudo-labels equal the
satisfaction run's own predictions. Rank 0 writes OUT/result.json.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/_ranker_worker.py DATA RUN_S OUT OVERRIDES_JSON
"""
import dataclasses
import gc
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = {
    "full": [],
    "no_sid": ["model.sid=false"],
    "no_mlse": ["model.mlse=false"],
    "no_mtl": ["model.mtl=false"],
    "no_mlse_no_mtl": ["model.mlse=false", "model.mtl=false"],
    "click_only": ["model.variant=click_only"],
}


def main(data: str, sat_run: str, out: str, overrides: list) -> None:
    import torch.distributed as dist

    from satrank.embeddings.tables import SparseArch
    from satrank.jobs.engine.checkpoint import load_checkpoint
    from satrank.jobs.config import load_config
    from satrank.jobs.engine.checkpoint import checkpoint_config
    from satrank.jobs.engine.runs import build_task, run_checkpoint, satisfaction_teacher
    from satrank.jobs.engine.runtime import init_runtime
    from satrank.jobs.engine.ranker_trainer import RankerTrainer, teacher_map
    from satrank.jobs.engine.readers import evaluation_loader, first_batch, stage_train_config, training_loader
    from satrank.jobs.engine.checkpoint import load_prefixed
    from satrank.models.metrics.ranker_eval import RankerEvaluator
    from satrank.models.ranker.task import needs_teacher
    from satrank.models.stage1.tasks import SatisfactionModel

    torch.set_num_threads(1)
    calls = {"n": 0}
    original = SatisfactionModel.score_history

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    SatisfactionModel.score_history = counting
    rt = init_runtime(seed=0)
    data_dir = Path(data)
    results = {}
    for name, sets in VARIANTS.items():
        cfg = load_config(overrides=[*overrides, *sets])
        train = dataclasses.replace(stage_train_config(cfg, "ranker"), epochs=1, max_steps=2, keep_best=False,
                                    restore_best=False, checkpoint_every=0)
        teacher, path = satisfaction_teacher(sat_run, cfg.data) if needs_teacher(cfg.model) else (None, None)
        task = build_task(cfg, teacher, seed=train.seed)
        trainer = RankerTrainer(rt, task, emb=cfg.embeddings, train=train, out_dir=Path(out) / name, job="train")
        res = {"has_g": task.g is not None, "heads": task.heads,
               "g_state_keys": sum(k.startswith("g.") for k in trainer.dmp.state_dict()),
               "ranker_children": sorted(n for n, _ in task.ranker.ranker.named_children()),
               "fusion_names": task.ranker.ranker.fusion_names}
        if teacher is not None:
            res["g_tensors_loaded"] = len(load_prefixed(path, trainer.dmp, teacher_map(teacher), cfg.data, teacher.emb,
                                                        what="--satisfaction", expect_job="satisfaction"))
        valid = evaluation_loader(cfg, data_dir / "valid")
        batch = first_batch(valid)
        trainer.dmp.eval()
        calls["n"] = 0
        with torch.no_grad():
            loss, outputs = trainer.dmp(batch)
        res["eval_forward_scorer_calls"] = calls["n"]
        res["output_keys"] = sorted(outputs)
        if name == "full":
            res["untrained_valid"] = trainer.evaluate(valid, RankerEvaluator(cfg.loss))
            # g inside the task must reproduce the satisfaction run's own predictions exactly
            scfg = checkpoint_config(run_checkpoint(sat_run))
            g = SatisfactionModel(scfg.data, scfg.embeddings, scfg.pretrain.tower, scfg.satisfaction, scfg.propensity)
            for m in g.modules():
                if isinstance(m, SparseArch):
                    m.materialize(0)
            load_checkpoint(run_checkpoint(sat_run), g)
            g.eval()
            with torch.no_grad():
                _, gout = g(batch)
                hist = g.score_history(batch)
            diff = (gout["sat_prob"] - outputs["pseudo_satisfaction"]).abs().max()
            dist.all_reduce(diff, op=dist.ReduceOp.MAX)
            res["pseudo_label_max_abs_diff"] = float(diff)
            res["history_scores_shape"] = list(hist.shape)
        train_loader = training_loader(cfg, data_dir / "train", train)
        calls["n"] = 0
        fit = trainer.fit(train_loader)
        res["train_steps"] = fit["steps"]
        res["train_scorer_calls"] = calls["n"]  # pipelined forwards of this rank
        results[name] = res
        trainer.close()
        del trainer, task, valid, train_loader, batch
        gc.collect()
    if rt.rank == 0:
        Path(out, "result.json").write_text(json.dumps(results, default=str))
    rt.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))

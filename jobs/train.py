"""`satrank.jobs.train`: the stage-2 ranker of SAQRec (Algorithm 1 lines 8-10), or one of its ablations / the
click-only baseline, trained with a frozen stage-1 satisfaction model g; then evaluated on DIR/test,
the candidate sets and the leave-one-out lists (satrank.jobs.evaluate's logic).

    torchrun --nproc_per_node=N -m satrank.jobs.train --data DIR --satisfaction RUN_S --out RUN
        [--config CFG] [--set k=v ...] [--resume RUN_OLD]

- Model: satrank.models.ranker.task.RankerTask from `model:` / `loss:` (ablations: --set model.sid=false,
  model.mlse=false, model.mtl=false, model.variant=click_only). g is built from RUN_S's own config
  (pretrain.tower, satisfaction, embeddings) and its tables + tower + head are loaded from RUN_S's
  best checkpoint (satrank.jobs.engine.checkpoint.load_prefixed: resharded, fingerprint-checked, must be a
  satrank.jobs.satisfaction run). "Without unbiased pre-training" = pass a RUN_S trained with
  --set satisfaction.loss=naive. With mlse and mtl both off g is neither needed nor loaded and
  --satisfaction may be omitted.
- Loop: satrank.jobs.engine.trainer.Trainer (TrainPipelineSparseDist, uneven ranks padded, evaluation on DIR/valid
  every `eval_every` epochs, early stopping on `monitor`, RUN/checkpoint + RUN/best, --resume at
  any world size); settings `train:` with the `ranker_train:` overrides. Around every training
  epoch the task learns its epoch (L_S vs L_S^mix, eq. 18) and afterwards fits the label-correction
  Beta mixture on every rank's losses of that epoch (satrank.jobs.engine.ranker_trainer); the fit travels in
  the checkpoints.
- Validation (satrank.models.metrics.ranker_eval.RankerEvaluator): loss (total), loss_click, loss_satisfaction
  (eq. 16), loss_watch_time, click_auc, click_gauc, sat_auc_answered, watch_time_mae/xauc.
- At the end the weights the trainer ends with (RUN/best's with train.restore_best, else the last) are
  evaluated: RUN/metrics.json
  holds satrank.models.metrics.ranker_eval.METRIC_KEYS at the top level, plus `valid` (last validation), `fit`
  (schedule, per-epoch records), `label_correction` (per-epoch fits) and timings.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import List, Optional

from satrank.jobs.engine.checkpoint import CheckpointError, load_prefixed
from satrank.jobs.engine.cli import build_parser
from satrank.jobs.engine.evaluation import evaluate_all, format_table
from satrank.jobs.engine.runs import (TEACHER_FILE, build_task, check_resumed_teacher, satisfaction_teacher,
                                     teacher_to_dict)
from satrank.jobs.engine.readers import evaluation_loader, stage_train_config, training_loader
from satrank.jobs.engine.runtime import finite_or_none, get_logger, write_json_atomic
from satrank.jobs.engine.ranker_trainer import RankerTrainer, teacher_map
from satrank.jobs.engine.job import run_job
from satrank.models.metrics.ranker_eval import EvaluationConfig, RankerEvaluator
from satrank.models.ranker.task import find_task, needs_teacher

STAGE = "ranker"  # config section ranker_train:
JOB = "train"
log = get_logger("train")


def precheck(args, cfg) -> None:
    for split in ("train", "valid", "test"):
        if not (args.data / split).is_dir():
            raise CheckpointError(f"--data {args.data}: no {split}/ split")
    if needs_teacher(cfg.model):
        if args.satisfaction is None:
            raise CheckpointError("--satisfaction RUN_S is required: model.mlse / model.mtl use the stage-1 "
                                  "satisfaction model g (set both false, or model.variant=click_only, to train without)")
        args.teacher, args.teacher_path = satisfaction_teacher(args.satisfaction, cfg.data)
    else:
        args.teacher, args.teacher_path = None, None
    if args.resume is not None:  # before any write: the restore loads the resumed run's g
        check_resumed_teacher(args.resume, args.teacher, args.satisfaction)


def run(rt, args, cfg) -> None:
    train = stage_train_config(cfg, STAGE)
    ecfg = getattr(cfg, "evaluate", None) or EvaluationConfig()
    started = time.perf_counter()
    task = build_task(cfg, args.teacher, seed=train.seed)
    trainer = RankerTrainer(rt, task, emb=cfg.embeddings, train=train, out_dir=args.out, job=JOB, run_config=cfg)
    try:
        if rt.is_main:
            write_json_atomic(args.out / TEACHER_FILE, teacher_to_dict(args.teacher, args.teacher_path and str(args.teacher_path)))
        loaded: List[str] = []
        if args.teacher is not None:
            loaded = load_prefixed(args.teacher_path, trainer.dmp, teacher_map(args.teacher), cfg.data, args.teacher.emb,
                                   what="--satisfaction", expect_job="satisfaction")
            log.info("loaded the frozen satisfaction model g from %s (%d tensors)", args.teacher_path, len(loaded))
        elif args.satisfaction is not None:
            log.warning("--satisfaction %s ignored: model.mlse and model.mtl are off, g is not used", args.satisfaction)
        train_loader = training_loader(cfg, args.data / "train", train)
        valid_loader = evaluation_loader(cfg, args.data / "valid")
        if args.resume is not None:
            trainer.restore(args.resume, train_loader)
        fit = trainer.fit(train_loader, valid_loader, RankerEvaluator(cfg.loss, cfg.model))
        restored = fit.get("restored_best")  # the trainer ends on RUN/best's weights when train.restore_best
        evaluated = f"best (epoch {restored['epoch']})" if restored else "last"
        final = evaluate_all(trainer.dmp, cfg, ecfg, args.data, rt)
        m = cfg.model
        metrics = {**final, "job": JOB, "world_size": rt.world_size, "evaluated_checkpoint": evaluated,
                   "model": {"variant": m.variant, "sid": m.use_sid, "mlse": m.use_mlse, "mtl": m.use_satisfaction,
                             "heads": find_task(trainer.dmp).heads},
                   "teacher": None if args.teacher is None else {"run": str(args.satisfaction),
                                                                 "loss": args.teacher.satisfaction.loss,
                                                                 "tensors_loaded": len(loaded)},
                   "valid": fit["eval"], "fit": {k: v for k, v in fit.items() if k not in ("eval", "last_eval")},
                   "label_correction": getattr(trainer, "corrections", []),
                   "evaluation": {"rank_score": ecfg.rank_score, "fusion_sat_weight": ecfg.fusion_sat_weight,
                                  "k": ecfg.k, "loo_negatives": ecfg.loo_negatives, "loo_seed": ecfg.loo_seed},
                   "total_s": round(time.perf_counter() - started, 2)}
        trainer.writer.write_final(finite_or_none(metrics))  # test metrics at the top level, validation under `valid`
        if rt.is_main:
            log.info("test metrics (%s checkpoint):\n%s", evaluated, format_table({m.variant: final}))
    finally:
        trainer.close()


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser("satrank train", __doc__.split("\n\n")[0])
    parser.add_argument("--satisfaction", type=Path, default=None,
                        help="satrank.jobs.satisfaction run directory (RUN_S) holding the frozen satisfaction model g")
    parser.add_argument("--resume", type=Path, default=None, help="continue this satrank.jobs.train run")
    return run_job(parser, argv, run, stage=STAGE, precheck=precheck, job=JOB)


if __name__ == "__main__":
    sys.exit(main())

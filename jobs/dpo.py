"""`satrank.jobs.dpo`: stage 3, EASQ online alignment of a trained stage-2 ranker (docs/easq.md, "The online job").

    torchrun --nproc_per_node=N -m satrank.jobs.dpo --data DIR --init RUN_MAIN --out RUN [--propensity RUN_P]
        [--config CFG] [--set k=v] [--follow --max-wait-s S] [--poll-s S] [--checkpoint-every STEPS]
        [--sat-only] [--log-keys]

RUN_MAIN (a satrank.jobs.train run) rebuilt with the EASQ pathway (satrank.jobs.engine.easq_run) trains on the shared
Trainer: `Trainer.stream` over DIR/train's time-ordered shards, each read once (satrank.jobs.engine.stream; --follow
waits for new ones), one EASQ step per batch (satrank.jobs.engine.easq_step: optimizer groups, pair buffer, DPO ramp,
rho from the frozen --propensity model). RUN/checkpoint carries the stream position (a killed run resumes there).
RUN/metrics.json: `before` / `after`, prequential_sat_auc, backbone_drift, counts, `propensity`. RUN serves like a
satrank.jobs.train run (teacher.json is copied from RUN_MAIN). Details: docs/easq.md.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

from satrank.jobs.config_checks import check_easq_overrides, check_easq_run
from satrank.jobs.engine.checkpoint import CheckpointError, load_prefixed, propensity_run
from satrank.jobs.engine.cli import build_parser
from satrank.jobs.engine.easq_run import (TEACHER_FILE, build_easq, check_continuation, easq_run_config, evaluate_run,
                                          prequential, read_teacher)
from satrank.jobs.engine.easq_step import EasqOptimizers, EasqStep, FrozenPropensity, pair_summary
from satrank.jobs.engine.readers import stage_train_config
from satrank.jobs.engine.runtime import finite_or_none, get_logger, write_json_atomic
from satrank.jobs.engine.stream import ShardStream, timestamp_ordered
from satrank.jobs.engine.job import run_job
from satrank.jobs.engine.trainer import Trainer
from satrank.models.metrics.ranker_eval import EvaluationConfig

JOB = "dpo"
log = get_logger("dpo")


def run(rt, args, cfg_cli) -> None:
    started = time.perf_counter()
    ecfg = getattr(cfg_cli, "evaluate", None) or EvaluationConfig()
    module, cfg, path, mapping = build_easq(args.init, cfg_cli, lambda c: stage_train_config(c, JOB).seed)
    train, e = stage_train_config(cfg, JOB), cfg.easq
    opts = EasqOptimizers(module, cfg.embeddings, e, train)
    trainer = Trainer(rt, module, emb=cfg.embeddings, train=train, out_dir=args.out, job=JOB, run_config=cfg,
                      optimizer=opts)
    try:
        load_prefixed(path, trainer.dmp, mapping, cfg.data, cfg.embeddings, what="--init")
        prop = FrozenPropensity(args.propensity, cfg.data, rt, train.seed) if args.propensity is not None else None
        log.info("no --propensity: rho = 1 for every row (L_sat is the unweighted BCE on answered rows, pair weights 1)"
                 if prop is None else f"rho from the frozen propensity model of {prop.path} ({len(prop.keys)} tensors); "
                 f"IPS clip M = {e.clip}")
        step = EasqStep(trainer.dmp, module, opts, cfg.data, e, batch_rows=cfg.reader.batch_size, device=rt.device,
                        prop=prop, sat_only=args.sat_only, log_keys=args.log_keys)
        source = ShardStream(args.data / "train", cfg.data, cfg.reader, follow=args.follow,
                             max_wait_s=args.max_wait_s, poll_s=args.poll_s)
        teacher, mine_p = read_teacher(args.init), None if args.propensity is None else str(args.propensity)
        if rt.is_main and teacher is not None:
            write_json_atomic(args.out / TEACHER_FILE, teacher)  # satrank.jobs.score / export rebuild g from it
        if args.run_claim.action == "resume":  # this dpo run's own checkpoint in --out (checked by precheck)
            before = trainer.restore_stream(source, step).get("before")
        else:
            before = evaluate_run(trainer.dmp, cfg, ecfg, args.data, rt)
        trainer.stream(source, step, checkpoint_every=args.checkpoint_every,
                       extra={"before": before, "propensity": mine_p})
        drift = step.drift()
        parts, preq_auc, preq_rows = prequential(step)
        after = evaluate_run(trainer.dmp, cfg, ecfg, args.data, rt)
        prop_report = prop.report(e.clip) if prop is not None else None
        if prop_report is not None and (prop_report["tables_changed"] or prop_report["dense_changed"]):
            log.error("the frozen propensity model changed: %s %s", prop_report["tables_changed"], prop_report["dense_changed"])
        if args.log_keys:
            np.save(args.out / f"keys-rank{rt.rank}.npy", step.columns()["keys"].numpy())
        metrics = {"job": JOB, "world_size": rt.world_size, "init": str(args.init), "before": before, "after": after,
                   "prequential_sat_auc": preq_auc, "prequential_answered_rows": preq_rows, "backbone_drift": drift,
                   "rows": sum(p["rows"] for p in parts), "steps": trainer.state.step, "shards": source.done,
                   "timestamp_ordered": timestamp_ordered(source.consumed_files()) if rt.is_main else None,
                   "dpo_ramp": module.loss.ramp.weight, "dpo_pairs": pair_summary(parts),
                   "sat_only": bool(args.sat_only), "pathway": e.pathway,
                   "propensity": prop_report, "total_s": round(time.perf_counter() - started, 2)}
        trainer.writer.write_final(finite_or_none(metrics))
        if rt.is_main:
            for name, m in (("before:", before), ("after:", after)):
                log.info("%-7s %s", name, {k: m.get(k) for k in ("true_sat@10", "click_auc", "sat_auc_answered")})
            log.info("DPO pairs scored: %s", metrics["dpo_pairs"])
            log.info("satisfaction head (%s pathway), answered-row AUC before %s, after %s", e.pathway,
                     {k: v["auc"] for k, v in before.get("sat_head", {}).items()},
                     {k: v["auc"] for k, v in after["sat_head"].items()})
    finally:
        trainer.close()


def precheck(args, cfg) -> None:
    """Every argument, the model this run builds (RUN_MAIN's config with this `easq:`) and, continuing the run in
    --out, its checkpoint: checked before any process group exists and before anything is written."""
    if not (args.data / "train").is_dir():
        raise CheckpointError(f"--data {args.data}: no train/ split")
    if args.follow and args.max_wait_s is None:
        raise CheckpointError("--follow needs --max-wait-s S (stop after S seconds without a new shard)")
    if args.checkpoint_every < 0:
        raise CheckpointError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    run_cfg, _, teacher = easq_run_config(args.init, cfg)
    check_easq_overrides(args.overrides, cfg, run_cfg, str(args.init))
    if args.propensity is not None:
        propensity_run(args.propensity, run_cfg.data)
    check_easq_run(run_cfg, teacher, str(args.init))
    if args.run_claim.action == "resume":
        check_continuation(args.out, run_cfg, args.propensity)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser("satrank dpo", __doc__.split("\n\n")[0])
    parser.add_argument("--init", type=Path, required=True, help="satrank.jobs.train run directory (RUN_MAIN)")
    parser.add_argument("--propensity", type=Path, default=None,
                        help="satrank.jobs.propensity run (RUN_P): rho for L_sat's IPS weights and the pair weights")
    parser.add_argument("--follow", action="store_true", help="wait for new shards in DIR/train")
    parser.add_argument("--max-wait-s", type=float, default=None, help="--follow: stop after this long without new data")
    parser.add_argument("--poll-s", type=float, default=1.0, help="--follow: polling interval")
    parser.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (0: end only)")
    parser.add_argument("--sat-only", action="store_true", help="behaviour losses off (L_sat + DPO only)")
    parser.add_argument("--log-keys", action="store_true",
                        help="write RUN/keys-rank<r>.npy: (user_id, item_id, timestamp) of every consumed row")
    return run_job(parser, argv, run, stage=None, precheck=precheck, job=JOB, resume_in_place=True)


if __name__ == "__main__":
    sys.exit(main())

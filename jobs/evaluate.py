"""`satrank.jobs.evaluate`: score a trained stage-2 ranker on DIR/test, the candidate sets and the leave-one-out lists.

    torchrun --nproc_per_node=N -m satrank.jobs.evaluate --config CFG --data DIR --model RUN --out OUT

RUN is a satrank.jobs.train or satrank.jobs.dpo run directory: its checkpoint (RUN/best when kept, else
RUN/checkpoint; written by any world size, resharded on load) and RUN/teacher.json (how its frozen satisfaction
model g was built); a dpo run is rebuilt with its EASQ pathway, as its own `after` figures were measured.
The model's architecture and features come from the checkpoint's config.yaml, so every ablation evaluates as it
was trained; --config/--set supply the reader and `evaluate:` settings.
With --propensity RUN_P also `offline_top_k` (satrank.jobs.engine.offline_eval: the top-k satisfaction among logged
impressions estimated from the answers, with intervals; the truth beside it where it exists).
Writes OUT/metrics.json (satrank.models.metrics.ranker_eval.METRIC_KEYS, <head>_auc of every other binary head,
row counts and timings; a metric the model cannot produce, e.g. watch time without a watch-time head, is null).
The loops are satrank.jobs.engine.evaluation's; loading runs is satrank.jobs.engine.runs'.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from satrank.jobs.engine.cli import build_parser
from satrank.jobs.engine.evaluation import evaluate_all, format_table, load_trained
from satrank.jobs.engine.runtime import get_logger, write_json_atomic
from satrank.jobs.engine.easq_step import FrozenPropensity
from satrank.jobs.engine.job import run_job
from satrank.jobs.engine.offline_eval import evaluate_offline_top_k
from satrank.models.metrics.ranker_eval import EvaluationConfig

log = get_logger("evaluate")


def run(rt, args, cfg_cli) -> None:
    ecfg = getattr(cfg_cli, "evaluate", None) or EvaluationConfig()
    started = time.perf_counter()
    dmp, cfg = load_trained(args.model, rt, cfg_cli)
    metrics = evaluate_all(dmp, cfg, ecfg, args.data, rt, split=args.split)
    if args.propensity is not None:  # unbiased offline estimate of the top-k satisfaction (no truth needed)
        prop = FrozenPropensity(args.propensity, cfg.data, rt, seed=0)
        metrics["offline_top_k"] = evaluate_offline_top_k(dmp, prop, cfg, ecfg, args.data / args.split, rt,
                                                          clip=cfg.satisfaction.resolved_estimate_clip)
    metrics["wall_s"] = round(time.perf_counter() - started, 2)
    metrics["world_size"] = rt.world_size
    metrics["job"] = "evaluate"  # the owner of --out (satrank.jobs.engine.run_dir)
    if rt.is_main:
        write_json_atomic(args.out / "metrics.json", metrics)
        log.info("metrics:\n%s", format_table({str(args.model): metrics}))
    del dmp


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser("satrank evaluate", __doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True,
                        help="satrank.jobs.train or satrank.jobs.dpo run directory (or a checkpoint)")
    parser.add_argument("--propensity", type=Path, default=None,
                        help="satrank.jobs.propensity run: adds `offline_top_k`, naive / IPS / SNIPS / DR estimates of "
                             "the top-k's satisfaction among logged impressions (satrank.jobs.engine.offline_eval)")
    parser.add_argument("--split", default="test",
                        help="labelled split of the impression metrics and the leave-one-out ground truths")
    return run_job(parser, argv, run, job="evaluate")  # bad input: one line naming the problem, exit 1 (2 for config)


if __name__ == "__main__":
    sys.exit(main())

"""`satrank.jobs.score`: batch-score candidate sets with a trained model; one scored Parquet shard per input shard.

    torchrun --nproc_per_node=N -m satrank.jobs.score --model RUN --candidates DIR --out OUT_DIR
        [--config CFG] [--set score.key=value ...] [--kind ranker|easq|click|satisfaction] [--overwrite]

- Model: RUN is a satrank.jobs.train run (RUN/best, else RUN/checkpoint; RUN/teacher.json for g), a satrank.jobs.dpo
  run (EASQ: the main heads serve, adapters folded in) or any checkpoint of satrank.jobs.engine.checkpoint (stage-1
  click / satisfaction models too); its kind is read from the checkpoint's meta.json. Each rank loads it UNSHARDED
  (satrank.jobs.engine.runs.load_model) and scores, fused by satrank.models.common.fusion: ranker / easq models
  request-level by default (score.request_level: the user side once per request of a batch, RequestBatchScorer),
  others and score.request_level=false with the model's own eval forward per row (satrank.models.serving.score
  does the work; see there for the shape).
- Output OUT_DIR/part-XXXXX.parquet (XXXXX = index of the input shard in sorted order): request_id, user_id,
  item_id, one column per served head (p_click, p_satisfied, watch_time_pred, then p_<name> of any other head of
  satrank.models.ranker.heads; null where the model lacks it), score, rank; rows ordered by (request_id, rank).
  Rows out == rows in per shard (rows rejected under score.on_bad_row=skip are counted, not scored), checked and
  recorded in OUT_DIR/_shards/ and OUT_DIR/_manifest.json.
- Checked up front on every rank alike: schemas, that each shard has request_id, and that no request spans two
  shards: DataError naming them. Resume: rerunning the same command skips shards whose output and record are
  intact; a different model, fusion or input list in the same OUT_DIR is refused (or replaced with --overwrite).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from satrank.jobs.config.serve import ServeConfig, load_serve_config
from satrank.jobs.engine import checkpoint as ckpt
from satrank.jobs.engine.collectives import all_gather_objects, together
from satrank.jobs.engine.runs import load_model, run_checkpoint
from satrank.jobs.engine.runtime import Runtime, init_runtime
from satrank.models.serving.module import KINDS
from satrank.models.serving.score import score_candidates
from satrank.pipeline.config import ConfigError
from satrank.pipeline.errors import DataError
from satrank.pipeline.score_writer import ScoreOutputError

KNOWN_ERRORS = (DataError, ckpt.CheckpointError, ConfigError, ScoreOutputError)


def run(rt: Runtime, args: argparse.Namespace, serve: ServeConfig) -> Dict[str, Any]:
    loaded = together(lambda: load_model(args.model, args.kind), KNOWN_ERRORS)
    return score_candidates(rt, loaded, args.candidates, args.out, serve.score, args.overwrite, all_gather_objects,
                            lambda fn: together(fn, KNOWN_ERRORS))


def one_line(exc: BaseException) -> str:
    """The message of a known error; a DataLoader worker's re-raise carries the worker traceback in its
    message, of which only the last line (the original error) is kept."""
    msg = str(exc)
    if "Original Traceback" in msg:
        last = [ln for ln in msg.strip().splitlines() if ln.strip()][-1]
        msg = last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith("Error") else last
    return msg.replace("reader.on_bad_row", "score.on_bad_row")


def build_arg_parser() -> argparse.ArgumentParser:
    from satrank.jobs.engine.cli import build_parser

    parser = build_parser("satrank score", __doc__.split("\n\n")[0], data=False, out=True)
    parser.add_argument("--model", type=Path, required=True,
                        help="satrank.jobs.train or satrank.jobs.dpo run directory, or a checkpoint directory")
    parser.add_argument("--candidates", type=Path, required=True, help="candidate Parquet shards (a directory or one file)")
    parser.add_argument("--kind", choices=list(KINDS), default=None,
                        help="model task (default: from the checkpoint's meta.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace scores of another run in --out")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        if args.config is not None and not args.config.is_file():
            raise ConfigError(f"--config {str(args.config)!r}: no such file")
        serve = load_serve_config(args.config, args.overrides)
        if not args.candidates.exists():
            raise DataError(f"--candidates {str(args.candidates)!r}: no such file or directory")
        run_checkpoint(args.model)  # fail fast (before any process group) when it is not a checkpoint
    except KNOWN_ERRORS as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    rt = init_runtime(seed=0, device=serve.score.device, debug=args.debug)
    try:
        run(rt, args, serve)
    except KNOWN_ERRORS as exc:
        print(f"{prog}: error (rank {rt.rank}): {one_line(exc)}", file=sys.stderr, flush=True)
        if rt.world_size > 1:
            os._exit(2 if isinstance(exc, ConfigError) else 1)
        rt.close()
        return 2 if isinstance(exc, ConfigError) else 1
    rt.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

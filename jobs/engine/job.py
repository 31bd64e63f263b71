"""The shared `main` of the training jobs (and jobs.evaluate): parse (and check the whole config), claim --out,
check --resume, precheck, then run under a process group, with one-line errors for bad input. Every check comes
before the first write, so a refused job (a refused --resume included) leaves --out as it was. Kept apart from
the Trainer: it is the job's entry, not the training loop."""
from __future__ import annotations

import argparse
import gc
import os
import sys
from typing import Any, Callable, Optional

from satrank.jobs.engine.checkpoint import CheckpointError, check_checkpoint
from satrank.jobs.engine.readers import stage_train_config
from satrank.jobs.engine.runtime import Runtime
from satrank.pipeline.errors import DataError


def run_job(parser: Any, argv: Optional[List[str]], run: Callable[[Runtime, Any, Any], None], *,
            stage: Optional[str] = None, precheck: Optional[Callable[[Any, Any], None]] = None,
            job: Optional[str] = None, resume_in_place: bool = False) -> int:
    """Shared `main` of the training jobs: parse (satrank.jobs.engine.cli: the whole config checked), resolve
    `<stage>_train`, claim --out, check `--resume RUN` (a checkpoint of this job for these features:
    fingerprint), run `precheck(args, cfg)` before any process group exists (fast, identical failures on every
    rank), then `run(rt, args, cfg)`. Nothing is written before all of these pass.

    Bad input (DataError, CheckpointError, ConfigError, FloatingPointError) prints one line naming the
    problem and exits 1 (2 for config errors). With several ranks the failing process ends at once
    (os._exit): a barrier in Runtime.close could wait forever for ranks busy in another collective, and
    torchrun stops the other ranks when one exits non-zero.

    `job` names the run the job writes: `--out` is claimed first (satrank.jobs.engine.run_dir.claim_run_dir; a
    directory owned by another job or an existing run is refused unless --resume / --overwrite say what to
    do), on every rank before the process group exists, so no rank has written anything yet. A job that
    torchrun restarted (TORCHELASTIC_RESTART_COUNT > 0, set by the launcher) resumes its own last checkpoint
    without --resume; `resume_in_place` jobs (satrank.jobs.dpo) always continue the run in --out.
    """
    from satrank.jobs.engine.cli import parse
    from satrank.jobs.engine.run_dir import RunDirError, claim_run_dir
    from satrank.jobs.engine.runtime import init_runtime
    from satrank.pipeline.config import ConfigError

    if job is not None:
        try:
            parser.add_argument("--overwrite", action="store_true",
                                help="write into --out although it holds a run (its outputs are replaced)")
        except argparse.ArgumentError:
            pass  # the job declares its own
    args, cfg = parse(parser, argv)
    prog = parser.prog
    known = (DataError, CheckpointError, ConfigError, FloatingPointError)
    try:
        train = stage_train_config(cfg, stage) if stage else None
        if job is not None and getattr(args, "out", None) is not None:
            restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
            claim = claim_run_dir(args.out, job, resume=getattr(args, "resume", None), overwrite=args.overwrite,
                                  restart_count=restarts, resume_in_place=resume_in_place)
            args.run_claim = claim
            if claim.action == "resume" and getattr(args, "resume", None) is None and hasattr(args, "resume"):
                args.resume = claim.resume_from
                print(f"{prog}: restart {restarts}: resuming {claim.resume_from}", file=sys.stderr, flush=True)
        if getattr(args, "resume", None) is not None and job is not None:  # Trainer.restore's check, before any write
            check_checkpoint(args.resume, cfg.data, cfg.embeddings, what="--resume", expect_job=job)
        if precheck is not None:
            precheck(args, cfg)
    except RunDirError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except known as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    rt = init_runtime(seed=train.seed if train else 0, debug=args.debug)
    code = 0
    try:
        run(rt, args, cfg)
    except known as exc:
        print(f"{prog}: error (rank {rt.rank}): {exc}", file=sys.stderr, flush=True)
        code = 2 if isinstance(exc, ConfigError) else 1
        if rt.world_size > 1:
            sys.stdout.flush()
            os._exit(code)
    gc.collect()  # outside the except clause: the traceback's frames (and their models) are gone now
    rt.close()
    return code

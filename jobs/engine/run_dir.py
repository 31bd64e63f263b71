"""Run directories with an owner: a job writes into `--out` only when it may, decided before anything is written.

Why: a training job pointed at another job's run directory used to replace its checkpoint, best weights
and metrics with exit 0. `claim_run_dir` reads who owns RUN (the `job` recorded in RUN/checkpoint/meta.json,
else in RUN/metrics.json) and returns what this job may do there:

    RUN absent or empty                         -> "new"
    RUN owned by this job, --resume given       -> "resume" (from --resume)
    RUN owned by this job, restarted by torchrun
        (`restart_count` > 0) with a checkpoint -> "resume" from RUN itself (elastic self-resume)
    RUN holding no recorded run, restarted by
        torchrun (the attempt died before its first checkpoint) -> "new"
    RUN owned by this job, `resume_in_place`
        (satrank.jobs.dpo, whose stream resumes in RUN) -> "resume" from RUN itself
    --overwrite                                 -> "overwrite" (the job replaces RUN's outputs)
    anything else                               -> RunDirError, one line naming RUN, its owner and the way out

`--resume OTHER` into a NEW RUN is allowed (a continued run written elsewhere). RUN (or, when it does not exist
yet, its nearest existing parent) must be a directory this process may write into. Nothing here writes.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional


class RunDirError(ValueError):
    """--out cannot be used by this job (owned by another job, or an existing run without --resume/--overwrite)."""


@dataclass(frozen=True)
class RunDirClaim:
    action: Literal["new", "resume", "overwrite"]
    resume_from: Optional[Path] = None  # the run to continue (action "resume")


def run_owner(run: Path) -> Optional[str]:
    """The job that wrote `run` (from its checkpoint's meta.json, else its metrics.json); None if unrecorded."""
    for path, key in ((run / "checkpoint" / "meta.json", ("extra", "job")), (run / "metrics.json", ("job",))):
        if not path.is_file():
            continue
        try:
            node = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RunDirError(f"--out {run}: {path.name} is unreadable ({exc}); choose a new --out or pass --overwrite") \
                from None
        for k in key:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, str):
            return node
    return None


def check_writable(run: Path) -> None:
    """RunDirError unless this process can create / write `run`: RUN itself, or its nearest existing parent."""
    where = run
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir():
        raise RunDirError(f"--out {run}: {where} is not a directory")
    if not os.access(where, os.W_OK | os.X_OK):
        raise RunDirError(f"--out {run}: cannot write into {where} (permission denied); choose another --out")


def claim_run_dir(run: Path, job: str, *, resume: Optional[Path] = None, overwrite: bool = False,
                  restart_count: int = 0, resume_in_place: bool = False) -> RunDirClaim:
    """What `job` may do with `--out run` (see the module doc); raises RunDirError when it may not."""
    run = Path(run)
    if run.exists() and not run.is_dir():
        raise RunDirError(f"--out {run}: exists and is not a directory")
    if resume is not None and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other: continue a run, or replace it")
    check_writable(run)
    if not run.exists() or not any(run.iterdir()):
        return RunDirClaim("resume", Path(resume)) if resume is not None else RunDirClaim("new")
    owner = run_owner(run)
    if overwrite:
        return RunDirClaim("overwrite")
    if owner is not None and owner != job:
        raise RunDirError(f"--out {run}: holds a satrank.jobs.{owner} run, not a satrank.jobs.{job} run; "
                          f"choose a new --out (or pass --overwrite to replace it)")
    if owner is None and restart_count > 0:
        return RunDirClaim("new")  # this launcher's own earlier attempt, killed before it recorded anything
    if owner is None:
        raise RunDirError(f"--out {run}: is not empty and holds no satrank run; choose a new --out "
                          f"(or pass --overwrite to write into it)")
    if resume is not None:
        return RunDirClaim("resume", Path(resume))
    if (restart_count > 0 or resume_in_place) and (run / "checkpoint" / "meta.json").is_file():
        return RunDirClaim("resume", run)
    raise RunDirError(f"--out {run}: already holds a satrank.jobs.{job} run; pass --resume {run} to continue it, "
                      f"--overwrite to replace it, or choose a new --out")

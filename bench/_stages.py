"""One torchrun stage as a user runs it, reused by the benches that run the pipeline's jobs
(bench/alignment.py, bench/estimate_coverage.py, bench/ratings_baseline.py).

A stage writes into RUN/NAME; when RUN/NAME/metrics.json exists (jobs write it atomically at their end) the
stage is reused, so an interrupted bench resumes. Its output goes to RUN/NAME.log: a bench prints one JSON line.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parent.parent
WORLDS = {"default": ROOT / "configs" / "sim.yaml", "alt": ROOT / "configs" / "sim_alt.yaml"}


def torchrun(nproc: int, module: str, args: List[str], log: Path) -> None:
    """One stage as a user runs it; its output goes to `log`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--monitor-interval=0.5", "-m", module, *args]
    with open(log, "w") as fh:
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"bench: {module} failed (exit {done.returncode}); see {log}")


def stage(run: Path, name: str, nproc: int, module: str, args: List[str], common: List[str]) -> dict:
    """Run one stage into run/name unless its metrics.json exists; return that metrics.json."""
    out = run / name
    metrics = out / "metrics.json"
    if not metrics.is_file():
        if out.exists():
            shutil.rmtree(out)  # an unfinished earlier attempt (no metrics.json): redo it
        started = time.time()
        torchrun(nproc, module, [*args, "--out", str(out), *common], run / f"{name}.log")
        print(f"[bench] {run.name}/{name}: {time.time() - started:.0f}s", file=sys.stderr, flush=True)
    return json.loads(metrics.read_text())

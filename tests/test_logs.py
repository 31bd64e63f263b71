"""Clean logs: a default 2-rank training job prints no third-party warning, only its own lines.

Why a test: each of these came back silently before (issue 14): torch.fx's is_fx_tracing notice from every
DataLoader worker every epoch, FBGEMM's "autograd kernel was not registered" from data_parallel tables,
TorchRec's deprecated collectives and broadcast_buffers, the planner's Topology/storage notices, DCP's
ShardedTensor deprecations on save and load. The job runs as a user runs it: torchrun, 2 gloo ranks, the
default config (reader workers on, so workers start every epoch and every evaluation), then a --resume that
loads the checkpoint back. Its whole output (stdout + stderr) must hold no line saying "warning".
"""
from __future__ import annotations

import dataclasses
import io
import os
import re
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
NOISE = re.compile(r"warning|is_fx_tracing", re.IGNORECASE)


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--monitor-interval=0.2", "-m", "satrank.jobs.pretrain", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def test_a_default_two_rank_training_job_and_its_resume_print_no_warning(tmp_path):
    from satrank.jobs.config import load_config
    from satrank.pipeline.sim.simulate import simulate

    cfg = load_config()
    assert cfg.reader.num_workers > 0  # the default reads in DataLoader worker processes
    world, run = tmp_path / "world", tmp_path / "pretrain"
    simulate(world, dataclasses.replace(cfg.simulate, users=200, items=150, impressions=6000, seed=0))
    first = _torchrun("--data", str(world), "--out", str(run), "--set", "train.epochs=2")
    resumed = _torchrun("--data", str(world), "--out", str(run), "--resume", str(run / "checkpoint"),
                        "--set", "train.epochs=3")
    for proc in (first, resumed):
        lines = (proc.stdout + proc.stderr).splitlines()
        noise = [line for line in lines if NOISE.search(line)]
        assert not noise, "\n".join(noise[:20])
    # the job's own lines are still there: exactly one per epoch, with its rows/s
    epochs = [line for line in (first.stderr + resumed.stderr).splitlines() if re.search(r"epoch \d+ done:", line)]
    assert len(epochs) == 3 and all("rows/s" in line for line in epochs), epochs


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_draw_on_rank_0_of_a_terminal_only(monkeypatch):
    from satrank.jobs.engine.progress import bar

    for stream, main, drawn in ((_Terminal(), True, True), (_Terminal(), False, False), (io.StringIO(), True, False)):
        monkeypatch.setattr(sys, "stderr", stream)
        with bar("epoch 0", total=10, main=main) as b:
            b.update(4)
        assert bool(stream.getvalue()) == drawn, (type(stream).__name__, main, stream.getvalue())
        if drawn:
            assert "epoch 0" in stream.getvalue() and "rows" in stream.getvalue()

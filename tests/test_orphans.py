"""A rank killed with SIGKILL takes its reader processes with it (issue 17, satrank.pipeline.lifeline).

Before the fix a `kill -9` of one rank reading with reader.num_workers >= 1 left its DataLoader workers,
its multiprocessing forkserver and its resource tracker alive, reparented to init (~1.1 GB), until someone
killed them. Each run here marks its processes with an environment variable (inherited by every process it
starts: ranks, forkserver, workers, resource tracker), which is how they are found afterwards in /proc. Also each start method on its own, and the race the kernel
cannot see (a rank gone before its worker asked to die with it).

Also a script: `python tests/test_orphans.py child METHOD` starts a 2-worker DataLoader the reader's way
(lifeline.worker_context(METHOD), lifeline.worker_init_fn()), prints "ready" and waits to be killed.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from contextlib import contextmanager
from typing import Dict, Iterator, List, Tuple

import pytest
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

ROOT = Path(__file__).resolve().parent.parent
MARK = "SATRANK_TEST_RUN_MARK"  # identifies a run's processes in /proc; no code reads it


def marked(mark: str) -> Dict[int, Tuple[int, str]]:
    """pid -> (parent pid, command line) of every live (non-zombie) process whose environment has MARK=mark."""
    want = f"{MARK}={mark}".encode()
    out: Dict[int, Tuple[int, str]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as fh:
                if want not in fh.read().split(b"\0"):
                    continue
            with open(f"/proc/{d}/stat") as fh:
                state, ppid = fh.read().rsplit(")", 1)[1].split()[:2]
            with open(f"/proc/{d}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if state not in ("Z", "X"):
            out[int(d)] = (int(ppid), cmd)
    return out


def below(procs: Dict[int, Tuple[int, str]], pid: int) -> List[int]:
    """Descendants of `pid` among `procs`."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for p, (pp, _) in procs.items():
            if pp == parent:
                out.append(p)
                todo.append(p)
    return out


@contextmanager
def launched(cmd: List[str], log: Path, **popen) -> Iterator[Tuple[subprocess.Popen, str]]:
    """(process, mark): `cmd` started with a fresh MARK in its environment; on the way out, it and every
    process carrying the mark is killed, so a failing test leaves nothing either."""
    mark = uuid.uuid4().hex
    env = {**os.environ, "OMP_NUM_THREADS": "1", MARK: mark}
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=fh, **({"stdout": fh} | popen))
    try:
        yield proc, mark
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in marked(mark):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def assert_all_gone(mark: str, seconds: float = 15) -> None:
    """Every process of the run has exited within `seconds` (names what is left)."""
    deadline = time.time() + seconds
    left = marked(mark)
    while left and time.time() < deadline:
        time.sleep(0.2)
        left = marked(mark)
    assert not left, {p: c[:160] for p, (_, c) in left.items()}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from satrank.jobs.config import load_config
    from satrank.pipeline.sim.simulate import simulate

    out = tmp_path_factory.mktemp("orphans") / "world"
    cfg = load_config().simulate
    cfg.users, cfg.items, cfg.impressions, cfg.seed = 300, 400, 30000, 0
    simulate(out, cfg)
    return out


def test_a_rank_killed_with_sigkill_leaves_no_worker_forkserver_or_resource_tracker(world, tmp_path):
    run = tmp_path / "run"
    sets = ["train.epochs=4", "reader.batch_size=512", "reader.num_workers=2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=0",
           "--monitor-interval=0.2", "-m", "satrank.jobs.pretrain", "--data", str(world), "--out", str(run),
           *[x for s in sets for x in ("--set", s)]]
    with launched(cmd, tmp_path / "run.log") as (proc, mark):
        deadline = time.time() + 240
        while True:  # until both ranks read with their 2 workers (forkserver children)
            procs = marked(mark)
            ranks = sorted(p for p, (pp, _) in procs.items() if pp == proc.pid)
            servers = {r: [p for p in procs if procs[p][0] == r and "forkserver" in procs[p][1]] for r in ranks}
            workers = {r: [p for p in procs if procs[p][0] in servers[r]] for r in ranks}
            if len(ranks) == 2 and all(len(w) == 2 for w in workers.values()):
                break
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            assert time.time() < deadline, f"no rank started its reader workers in time: {procs}"
            time.sleep(0.1)
        victim = ranks[0]
        family = {p: procs[p][1] for p in below(procs, victim)}
        kinds = {k for c in family.values() for k in ("forkserver", "resource_tracker") if k in c}
        assert kinds == {"forkserver", "resource_tracker"} and len(family) >= 4, family  # the test sees them all
        os.kill(victim, signal.SIGKILL)
        proc.wait(timeout=120)
        assert proc.returncode != 0  # no restarts: torchrun gives up and stops the other rank
        assert_all_gone(mark)


@pytest.mark.parametrize("method", ["forkserver", "spawn", "fork"])
def test_reader_workers_die_with_their_process_whatever_the_start_method(method, tmp_path):
    cmd = [sys.executable, __file__, "child", method]
    with launched(cmd, tmp_path / "child.log", stdout=subprocess.PIPE, text=True) as (proc, mark):
        assert proc.stdout.readline().strip() == "ready", (tmp_path / "child.log").read_text()[-3000:]
        family = below(marked(mark), proc.pid)
        assert len(family) >= 2, family  # 2 workers (and the forkserver, the resource tracker where started)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert_all_gone(mark)


def test_a_worker_whose_rank_is_already_gone_kills_itself_at_start():
    """The race PR_SET_PDEATHSIG cannot see: the parent died before the request was made."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    code = ("import sys; from satrank.pipeline.lifeline import die_with_parent; "
            f"die_with_parent(watch=int(sys.argv[1])); print('survived')")
    for pid, rc, out in ((gone.pid, -signal.SIGKILL, ""), (os.getpid(), 0, "survived\n")):
        res = subprocess.run([sys.executable, "-c", code, str(pid)], cwd=ROOT, capture_output=True, text=True,
                             timeout=60)
        assert (res.returncode, res.stdout) == (rc, out), res.stderr[-2000:]


class _Forever(IterableDataset):
    """Stands in for the reader's dataset: yields its worker id, then keeps the worker busy forever."""

    def __iter__(self):
        yield get_worker_info().id
        while True:
            time.sleep(1)


def _child(method: str) -> None:
    from satrank.pipeline.lifeline import worker_context, worker_init_fn

    loader = DataLoader(_Forever(), batch_size=None, num_workers=2, worker_init_fn=worker_init_fn(),
                        multiprocessing_context=worker_context(method, ["torch"]))
    it = iter(loader)
    got = {int(next(it)), int(next(it))}
    assert got == {0, 1}, got
    print("ready", flush=True)
    time.sleep(600)


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "child":
    _child(sys.argv[2])

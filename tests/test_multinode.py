"""Multi-node launch on one machine (issue 17): two `torchrun --nnodes 2 --nproc_per_node 1` launchers meeting
at a c10d rendezvous run satrank.jobs.train and satrank.jobs.score, and give what one `--nproc_per_node 2`
launcher gives. Each rank then has LOCAL_RANK 0 and LOCAL_WORLD_SIZE 1 while RANK is 0 or 1 (c10d hands out
the node ranks in order of arrival).

World: test_score's (300 users, 400 items, 6k impressions; 60 candidate requests in 6 shards); a click-only
ranker (no stage-1 run needed), 1 epoch. The multi-node training reads with a reader worker per rank
(reader.num_workers=1: the same 2 slots as the baseline's 0, so the same rows in the same order).
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import List

import pyarrow.parquet as pq
import pytest

from test_score import CAND_SHARD_ROWS, RUN_OVERRIDES, SIM, _reshard, env, read_scores, score_cmd

ROOT = Path(__file__).resolve().parent.parent
TRAIN_SETS = [*RUN_OVERRIDES, "model.variant=click_only", "ranker_train.epochs=1"]


def sets(items: List[str]) -> List[str]:
    return [x for s in items for x in ("--set", s)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def one_launcher(args: List[str], log: Path) -> None:
    """`torchrun --standalone --nproc_per_node 2 ARGS`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--monitor-interval=0.5", *args]
    with open(log, "w") as fh:
        res = subprocess.run(cmd, cwd=ROOT, env=env(), stdout=fh, stderr=subprocess.STDOUT, timeout=300)
    assert res.returncode == 0, log.read_text()[-4000:]


def two_launchers(args: List[str], log: Path) -> None:
    """`torchrun --nnodes 2 --nproc_per_node 1 --rdzv-backend c10d ... --node-rank N ARGS` for N = 0, 1, at once."""
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}", f"--node-rank={node}",
               "--rdzv-conf=join_timeout=120", "--monitor-interval=0.5", *args]
        with open(f"{log}.node{node}", "w") as fh:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=fh, stderr=subprocess.STDOUT))
    try:
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    tails = "\n".join(Path(f"{log}.node{n}").read_text()[-3000:] for n in (0, 1))
    assert [p.returncode for p in procs] == [0, 0], tails


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from satrank.pipeline.sim.simulate import simulate
    from satrank.pipeline.sim.world import SimulateConfig

    data = tmp_path_factory.mktemp("multinode") / "data"
    simulate(data, SimulateConfig(**SIM), overwrite=True)
    _reshard(data / "candidates", CAND_SHARD_ROWS)
    return data


@pytest.fixture(scope="module")
def trained(world) -> dict:
    """The same click-only training run from one launcher (2 ranks) and from two (1 rank each)."""
    runs = {}
    for name, launch, workers in (("one", one_launcher, 0), ("two", two_launchers, 1)):
        run = world.parent / f"train_{name}"
        launch(["-m", "satrank.jobs.train", "--data", str(world), "--out", str(run),
                *sets([*TRAIN_SETS, f"reader.num_workers={workers}"])], world.parent / f"train_{name}.log")
        runs[name] = {"run": run, "metrics": json.loads((run / "metrics.json").read_text())}
    return runs


def test_two_launchers_train_like_one_with_every_row_read_once(world, trained):
    one, two = trained["one"]["metrics"], trained["two"]["metrics"]
    assert two["world_size"] == one["world_size"] == 2
    epochs = two["fit"]["train_epochs"]
    assert two["fit"]["epochs_completed"] == 1 and [e["finished"] for e in epochs] == [True]
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in sorted((world / "train").glob("*.parquet")))
    e = epochs[0]  # the reader's accounting: every training row once, trained or counted out
    assert e["rows"] + e["rows_dropped_last"] + e["dropped_rows"] + e["rows_rejected"] + e["rows_filtered"] == rows
    keep = ("rows", "steps", "rows_dropped_last", "padding_steps", "loss")
    assert [{k: x[k] for k in keep} for x in epochs] == [{k: x[k] for k in keep} for x in one["fit"]["train_epochs"]]
    for key in ("click_auc", "click_gauc", "hr@10", "ndcg@10", "true_click@10"):  # same plan, same batches
        assert two[key] == pytest.approx(one[key], abs=1e-6), key


def test_two_launchers_score_exactly_like_one(world, trained, tmp_path):
    model, cands = trained["one"]["run"], world / "candidates"
    one_launcher(score_cmd(model, cands, tmp_path / "one"), tmp_path / "one.log")
    two_launchers(score_cmd(model, cands, tmp_path / "two"), tmp_path / "two.log")
    manifests = {n: json.loads((tmp_path / n / "_manifest.json").read_text()) for n in ("one", "two")}
    assert manifests["two"]["complete"] and manifests["two"]["runs"][-1]["world_size"] == 2
    assert manifests["two"]["totals"] == manifests["one"]["totals"] == {
        "shards": 6, "rows_in": 1200, "rows_out": 1200, "rows_rejected": 0, "requests": 60}
    who = {n: [(s["input"], s["output"], s["rank"], s["rows_out"]) for s in m["shards"]] for n, m in manifests.items()}
    assert who["two"] == who["one"] and {r for _, _, r, _ in who["two"]} == {0, 1}
    assert read_scores(tmp_path / "two").equals(read_scores(tmp_path / "one"))  # scores and ranks, bit for bit

"""Exactly-once reading across a real 2-rank gloo job with 2 DataLoader workers per rank, and
mid-epoch resume in a new process group (torchrun --standalone --nproc_per_node=2)."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from satrank.pipeline.sim.testdata import dataset_keys

WORKER = Path(__file__).resolve().parent / "_reader_worker.py"


def _torchrun(*args) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"


def _keys(out: Path, tag: str):
    per_rank = [json.loads((out / f"{tag}-rank{r}.json").read_text()) for r in range(2)]
    return [tuple(k) for d in per_rank for k in d["keys"]], per_rank


def _assert_exactly_once(keys, expected):
    dup = [k for k, c in Counter(keys).items() if c > 1]
    assert not dup, f"{len(dup)} keys read twice, e.g. {dup[:3]}"
    assert sorted(keys) == sorted(expected)


@pytest.fixture(scope="module", params=[True, False], ids=["shuffle", "no_shuffle"])
def runs(request, dataset_dir, tmp_path_factory):
    """Launch 1: read epoch 0 whole, then half of epoch 1, and save the merged state.
    Launch 2: a new process group restores that state and reads the rest of epoch 1."""
    out = tmp_path_factory.mktemp("dist")
    state = out / "reader_state.json"
    shuffle = ["--shuffle"] if request.param else []
    _torchrun("--data", dataset_dir, "--out", out, "--tag", "first", "--full-epoch-first", "--epoch", 1,
              "--stop-after", 700, "--state-out", state, *shuffle)
    _torchrun("--data", dataset_dir, "--out", out, "--tag", "rest", "--epoch", 1, "--state-in", state, *shuffle)
    return out, state


def test_two_ranks_two_workers_read_every_row_exactly_once(runs, dataset_dir):
    out, _ = runs
    keys, per_rank = _keys(out, "full")
    _assert_exactly_once(keys, dataset_keys(dataset_dir))
    assert all(d["keys"] for d in per_rank)  # both ranks got work
    assert sum(d["stats"]["rows_read"] for d in per_rank) == 3000
    assert [d["stats"]["rows_emitted"] for d in per_rank] == [len(d["keys"]) for d in per_rank]


def test_resume_in_a_new_process_group_neither_skips_nor_repeats(runs, dataset_dir):
    out, state = runs
    first, _ = _keys(out, "first")
    rest, per_rank = _keys(out, "rest")
    assert 1400 <= len(first) < 1500 and rest  # each rank stopped after ~700 of its ~1500 rows
    _assert_exactly_once(first + rest, dataset_keys(dataset_dir))
    assert sum(d["stats"]["rows_emitted"] for d in per_rank) == 3000  # counts carried over in the state
    assert json.loads(state.read_text())["epoch"] == 1

"""Issue 21: the reader spreads any Parquet layout evenly over (rank, worker) slots by reading row
ranges of row groups. Real torchrun gloo ranks (2 ranks x 2 workers) and real Parquet: one file
with ONE row group, and files of very different sizes; every slot gets its N/4 rows, every row
exactly once, and a mid-epoch save/restore in a new process group stays exact. Plus the planner's
invariants, the old whole-row-group behaviour where it was already balanced, and old states."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from satrank.pipeline.reader import STATE_FORMAT, BatchLoader
from satrank.pipeline.sim.testdata import dataset_keys, make_table, write_dataset, write_table
from satrank.pipeline.work_units import (ROW_GROUPS, ROW_RANGES, Fragment, choose_plan, cut_row_ranges,
                                         deal_row_groups, layout_warning)
from test_reader_distributed import _assert_exactly_once, _keys, _torchrun  # noqa: E402

N = 3000
BATCH = 64  # tests/_reader_worker.py: batch_size 64, shuffle_buffer_rows 128, 2 workers, seed 11


def _one_row_group(root: Path) -> Path:
    write_table(make_table(N, seed=21), root / "part-00000.parquet")  # one row group of 3000 rows
    return root


def _very_different_sizes(root: Path) -> Path:
    """2200 rows in one row group, 600 rows in 128-row groups, 150 and 50 rows in one group each."""
    for i, (first, rows, group) in enumerate([(0, 2200, None), (2200, 600, 128), (2800, 150, None),
                                              (2950, 50, None)]):
        write_table(make_table(rows, seed=30 + i, first_row=first), root / f"part-{i:05d}.parquet", group)
    return root


LAYOUTS = {"one_row_group": _one_row_group, "very_different_sizes": _very_different_sizes}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def layout_runs(request, tmp_path_factory):
    """Launch 1: epoch 0 whole, then epoch 1 until each rank has ~300 rows, state saved (merged).
    Launch 2: a new process group restores the state and reads the rest of epoch 1."""
    data = LAYOUTS[request.param](tmp_path_factory.mktemp(request.param) / "train")
    assert sum(pq.ParquetFile(p).metadata.num_rows for p in data.glob("*.parquet")) == N
    out = tmp_path_factory.mktemp("balance")
    state = out / "reader_state.json"
    _torchrun("--data", data, "--out", out, "--tag", "first", "--full-epoch-first", "--epoch", 1,
              "--stop-after", 300, "--state-out", state, "--shuffle")
    _torchrun("--data", data, "--out", out, "--tag", "rest", "--epoch", 1, "--state-in", state, "--shuffle")
    return data, out, state


def _slot_rows(per_rank) -> dict:
    return {int(s): n for d in per_rank for s, n in d["slot_rows"].items()}


def test_every_slot_gets_a_quarter_and_every_row_once(layout_runs):
    data, out, _ = layout_runs
    keys, per_rank = _keys(out, "full")
    _assert_exactly_once(keys, dataset_keys(data))
    assert _slot_rows(per_rank) == {0: N // 4, 1: N // 4, 2: N // 4, 3: N // 4}  # exact: 750 each
    assert [d["stats"]["rows_read"] for d in per_rank] == [N // 2, N // 2]


def test_mid_epoch_save_and_restore_in_a_new_process_group_is_exact(layout_runs):
    data, out, state = layout_runs
    first, first_ranks = _keys(out, "first")
    rest, rest_ranks = _keys(out, "rest")
    assert [len(d["keys"]) for d in first_ranks] == [320, 320]  # 5 batches of 64 per rank, then saved
    _assert_exactly_once(first + rest, dataset_keys(data))
    assert sum(d["stats"]["rows_emitted"] for d in rest_ranks) == N  # counts carried over in the state
    # slots keep their shares across the restart: what each read before plus after is its quarter
    both = _slot_rows(first_ranks)
    for s, n in _slot_rows(rest_ranks).items():
        both[s] = both.get(s, 0) + n
    assert both == {0: N // 4, 1: N // 4, 2: N // 4, 3: N // 4}
    saved = json.loads(state.read_text())
    assert (saved["format"], saved["plan"], saved["epoch"]) == (STATE_FORMAT, ROW_RANGES, 1)


# ---------------------------------------------------------------- the planner, in process

def _fragments(sizes):
    frags, first = [], 0
    for i, n in enumerate(sizes):
        frags.append(Fragment(i, f"f{i % 3}.parquet", i, first, n))
        first += n
    return frags


@pytest.mark.parametrize("seed", range(20))
def test_row_ranges_cover_every_row_once_with_shares_one_row_apart(seed):
    rng = random.Random(seed)
    sizes = [rng.choice([1, 7, 128, 1000, 250_000]) for _ in range(rng.randint(1, 12))]
    frags = _fragments(sizes)
    n_slots = rng.choice([1, 2, 3, 4, 8, 13])
    plan = cut_row_ranges(frags, epoch=rng.randint(0, 5), n_slots=n_slots, shuffle=bool(seed % 2), seed=seed)
    covered = sorted((u.fragment.index, u.lo, u.hi) for units in plan for u in units)
    by_fragment: dict = {}
    for index, lo, hi in covered:
        assert hi > lo and lo == by_fragment.get(index, 0)  # contiguous, no gap, no overlap
        by_fragment[index] = hi
    assert by_fragment == {f.index: f.num_rows for f in frags}
    rows = [sum(u.num_rows for u in units) for units in plan]
    assert sum(rows) == sum(sizes) and max(rows) - min(rows) <= 1


def test_a_layout_already_balanced_keeps_whole_row_groups_as_before():
    frags = _fragments([300] * 12)
    for epoch in range(3):
        assert choose_plan(frags, epoch, n_slots=4, shuffle=True, seed=3, batch_size=64) == ROW_GROUPS
    assert choose_plan(_fragments([300] * 11 + [100]), 0, 4, True, 3, batch_size=256) == ROW_GROUPS
    assert choose_plan(_fragments([300] * 11 + [100]), 0, 4, True, 3, batch_size=64) == ROW_RANGES
    assert choose_plan(_fragments([3000]), 0, 4, True, 3, batch_size=64) == ROW_RANGES
    units = deal_row_groups(frags, 1, 4, True, 3)
    assert all(u.lo == 0 and u.hi == 300 for slot in units for u in slot)


def test_state_saved_before_work_units_still_loads_and_continues_exactly(tmp_path, data_cfg, reader_cfg):
    write_dataset(tmp_path / "d", n_files=2, rows_per_file=512, row_group_rows=128, seed=4)  # 8 x 128: balanced
    cfg = reader_cfg(batch_size=64, num_workers=2, shuffle=True, shuffle_buffer_rows=64, seed=2)
    first = BatchLoader(tmp_path / "d", data_cfg, cfg)
    assert first.plan == ROW_GROUPS
    seen = [t for _, batch in zip(range(5), first) for t in batch.ids["timestamp"].tolist()]  # 5 batches
    state = first.state_dict()
    # what a checkpoint written before issue 21 holds: the same format, no "plan"
    old = json.loads(json.dumps({k: v for k, v in state.items() if k != "plan"}))
    second = BatchLoader(tmp_path / "d", data_cfg, cfg)
    second.load_state_dict(old)
    rest = [t for b in second for t in b.ids["timestamp"].tolist()]
    assert len(seen) == 320 and sorted(seen + rest) == sorted(k[2] for k in dataset_keys(tmp_path / "d"))
    with pytest.raises(ValueError, match="unknown work-unit plan 'by_magic'"):
        second.load_state_dict({**state, "plan": "by_magic"})
    with pytest.raises(ValueError, match="not a reader state"):
        second.load_state_dict({**state, "format": "satrank.reader.v0"})


def test_one_row_group_in_process_two_ranks_read_disjoint_halves(tmp_path, data_cfg, reader_cfg):
    _one_row_group(tmp_path / "d")
    cfg = reader_cfg(batch_size=64, num_workers=0, shuffle=True, shuffle_buffer_rows=128, seed=1)
    shares = []
    for rank in range(2):
        loader = BatchLoader(tmp_path / "d", data_cfg, cfg, rank=rank, world_size=2)
        assert loader.plan == ROW_RANGES and loader.slot_rows() == {rank: N // 2}
        shares.append([tuple(k) for b in loader for k in zip(b.ids["user_id"].tolist(), b.ids["item_id"].tolist(),
                                                                b.ids["timestamp"].tolist())])
    assert [len(s) for s in shares] == [N // 2, N // 2]
    _assert_exactly_once(shares[0] + shares[1], dataset_keys(tmp_path / "d"))


def test_check_data_warns_in_one_line_when_a_big_row_group_forces_uneven_read_work(tmp_path, data_cfg,
                                                                                     reader_cfg):
    table = make_table(20_000, seed=5)
    write_table(table, tmp_path / "one" / "part-00000.parquet")  # one row group of 20000 rows
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
           "satrank.jobs.check_data", "--data", str(tmp_path / "one"), "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "uneven layout" in ln]
    assert len(lines) == 1 and "WARNING" in lines[0], lines
    assert "part-00000.parquet row group 0, 20000 rows" in lines[0] and "slot 1 decodes 10000 rows" in lines[0]
    assert "row_group_size=8192" in lines[0]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["rows_per_rank"] == [20_000] and metrics["work_units"]["rows_per_slot"] == [10_000, 10_000]
    assert "row_group_size=8192" in metrics["layout_advice"]
    # the same rows in 8192-row groups: still cut into row ranges, but the drop is small: no warning
    write_table(table, tmp_path / "small" / "part-00000.parquet", row_group_rows=8192)
    loader = BatchLoader(tmp_path / "small", data_cfg, reader_cfg(num_workers=2))
    assert loader.plan == ROW_RANGES and layout_warning(loader.work_units(), "small") is None
    assert [sum(u.num_rows for u in s) for s in loader.work_units()] == [10_000, 10_000]

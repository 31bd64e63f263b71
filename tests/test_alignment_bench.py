"""bench/alignment.py's reading of DPO against its control's fusion-weight curve (dpo_vs_frontier), by hand."""
from __future__ import annotations

import pytest

from _bench_module import load_bench

alignment = load_bench("alignment")


def test_frontier_at_interpolates_between_the_two_weights_around_the_click_level():
    curve = [(0.60, 0.59), (0.62, 0.58), (0.64, 0.56)]  # (true_sat@10, true_click@10) at weights 1, 1.25, 1.5
    assert alignment.frontier_at(curve, 0.585) == pytest.approx(0.61)
    assert alignment.frontier_at(curve, 0.57) == pytest.approx(0.63)
    assert alignment.frontier_at(curve, 0.58) == pytest.approx(0.62)
    assert alignment.frontier_at(curve, 0.60) is None and alignment.frontier_at(curve, 0.55) is None


def test_vs_frontier_is_dpos_satisfaction_minus_the_controls_at_dpos_click_level():
    seed = {"dpo_off": {"true_sat@10": 0.60, "true_click@10": 0.59},
            "dpo_off_fusion1.5": {"true_sat@10": 0.64, "true_click@10": 0.55},
            "dpo": {"true_sat@10": 0.625, "true_click@10": 0.57}}  # the curve gives 0.62 at 0.57
    below = {**seed, "dpo": {"true_sat@10": 0.61, "true_click@10": 0.57}}
    outside = {**seed, "dpo": {"true_sat@10": 0.70, "true_click@10": 0.50}}
    got = alignment.vs_frontier({0: seed, 1: below, 2: outside}, [1.5])
    assert got["per_seed"] == [0.005, -0.01, None]
    assert got["mean"] == pytest.approx(-0.0025) and got["seeds_above"] == 1 and got["seeds"] == 3


def test_time_windows_hold_out_the_last_train_shards_for_the_online_job(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    (data / "train").mkdir(parents=True)
    for name in ("valid", "test", "candidates", "items"):
        (data / name).mkdir()
    (data / "world.json").write_text("{}")
    for k in range(5):
        (data / "train" / f"part-{k:05d}.parquet").write_bytes(b"x")
    past, online = alignment.time_windows(data, run, 2)
    assert sorted(p.name for p in (past / "train").iterdir()) == [f"part-{k:05d}.parquet" for k in range(3)]
    assert sorted(p.name for p in (online / "train").iterdir()) == ["part-00003.parquet", "part-00004.parquet"]
    for view in (past, online):
        assert (view / "test").resolve() == (data / "test").resolve() and (view / "world.json").is_file()
    assert alignment.time_windows(data, run, 2) == (past, online)  # idempotent: a resumed bench reuses the views
    with pytest.raises(SystemExit, match="has 5 shards"):
        alignment.time_windows(data, run, 5)

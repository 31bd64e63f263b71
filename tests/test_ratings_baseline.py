"""bench/ratings_baseline.py without torchrun: its simulated rating files are Yahoo! R3 triplets the converter reads,
self-selected (the MNAR training ratings are higher than the MAR test's), and its logistic MF baseline learns the
MAR test ratings above chance on a small set (a few seconds)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from _bench_module import load_bench


def _triplets(path: Path) -> np.ndarray:
    return np.array([[int(x) for x in line.split("\t")] for line in path.read_text().splitlines()])


def test_simulated_ratings_convert_and_mf_learns(tmp_path):
    rb = load_bench("ratings_baseline")
    world = rb.simulate_triplets(tmp_path / "raw", seed=0, users=120, items=100, train_per_user=20, test_per_user=10)
    train, test = _triplets(tmp_path / "raw" / rb.TRAIN_FILE), _triplets(tmp_path / "raw" / rb.TEST_FILE)
    assert train.shape[1] == test.shape[1] == 3 and set(np.unique(train[:, 2])) <= {1, 2, 3, 4, 5}
    assert len(test) == 120 * 10 and world["train_ratings"] == len(train)
    # self-selection on the rating: the MNAR training ratings are clearly higher than the randomly assigned ones
    assert train[:, 2].mean() > test[:, 2].mean() + 0.5
    report = rb.convert(tmp_path / "raw", tmp_path / "data", seed=0)
    assert report["rows_rejected"] == 0 and (tmp_path / "data" / "satrank.yaml").is_file()
    assert report["satisfied_rate"]["train"] > report["satisfied_rate"]["mar"]
    assert rb.side_features(tmp_path / "data") == []
    mf = rb.logistic_mf(tmp_path / "data", seed=0, epochs=30)
    assert mf["train_rows"] == len(train) and mf["test_rows"] == report["rows_written_by_split"]["test"]
    assert mf["test_auc"] > 0.6, json.dumps(mf)

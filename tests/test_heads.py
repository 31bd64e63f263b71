"""An extra head declared in ONE place (the HEAD overrides below: its label column in the data contract and its
entry in model.extra_heads) trains, is evaluated, scored and exported with no other file edited.

The world: test_score's small world plus a binary `like` column the test writes itself into every labelled split:
like = 1 for items of an even category_id, flipped for a seeded 10% of rows. It is learnable from the candidate's
category embedding (part of v_i), so the like head must rank it: its AUC (jobs.evaluate on DIR/test, and on the
scored candidates against the same rule without noise) must clear 0.5 by MARGIN. The ranker is trained without
the stage-1 teacher (mlse and mtl off) so that the test needs no stage-1 runs.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from test_score import RUN_OVERRIDES, SIM, env, torchrun  # noqa: E402

HEAD = ["data.labels.extra=[like]", "model.extra_heads=[{name: like, label: like, weight: 1.0}]"]
TRAIN = ["model.mlse=false", "model.mtl=false", "ranker_train.epochs=3", "ranker_train.patience=0",
         "train.dense_lr=0.01", "evaluate.loo_negatives=20"]
MARGIN = 0.25  # like AUC must exceed 0.5 + MARGIN; measured: 0.905 valid, 0.895 test (10% label noise), 1.0 candidates


def sets(*overrides: str) -> list:
    return [x for o in overrides for x in ("--set", o)]


def like_rule(category: np.ndarray) -> np.ndarray:
    return (category % 2 == 0).astype(np.int64)


def add_like(split: Path, seed: int) -> None:
    """Write the `like` label column into every shard of a labelled split."""
    rng = np.random.default_rng(seed)
    for f in sorted(split.glob("part-*.parquet")):
        t = pq.read_table(f)
        like = like_rule(t.column("category_id").to_numpy())
        flip = rng.random(len(like)) < 0.1
        t = t.append_column("like", pa.array(np.where(flip, 1 - like, like).astype(np.int64)))
        pq.write_table(t, f)


def run(cmd: list, timeout: int = 600) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))}\n{res.stdout[-2000:]}\n{res.stderr[-5000:]}"
    return res


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    from satrank.pipeline.sim.simulate import simulate
    from satrank.pipeline.sim.world import SimulateConfig

    root = tmp_path_factory.mktemp("heads")
    data = root / "data"
    simulate(data, SimulateConfig(**SIM), overwrite=True)
    for i, split in enumerate(("train", "valid", "test")):
        add_like(data / split, seed=i)
    run(torchrun(2, "-m", "satrank.jobs.train", "--data", str(data), "--out", str(root / "run"),
                 *sets(*RUN_OVERRIDES, *HEAD, *TRAIN)))
    run(torchrun(2, "-m", "satrank.jobs.evaluate", "--data", str(data), "--model", str(root / "run"),
                 "--out", str(root / "eval"), *sets(*RUN_OVERRIDES, *HEAD, *TRAIN)))
    run([sys.executable, "-m", "satrank.jobs.score", "--model", str(root / "run"), "--candidates",
         str(data / "candidates"), "--out", str(root / "scores")])
    run([sys.executable, "-m", "satrank.jobs.export", "--model", str(root / "run"), "--out", str(root / "artifact"),
         "--data", str(data)])
    return {"root": root, "data": data}


def test_the_head_is_trained_and_evaluated(world):
    train = json.loads((world["root"] / "run" / "metrics.json").read_text())
    assert train["model"]["heads"] == ["click", "watch_time", "like"]
    assert "loss_like" in train["valid"] and train["valid"]["like_auc"] > 0.5 + MARGIN, train["valid"]
    evaluated = json.loads((world["root"] / "eval" / "metrics.json").read_text())
    assert evaluated["like_auc"] > 0.5 + MARGIN, evaluated["like_auc"]
    assert evaluated["click_auc"] is not None  # the built-in heads are reported as before


def test_the_head_is_scored_into_its_own_column(world):
    from satrank.models.metrics.ranking import auc

    scores = pa.concat_tables([pq.read_table(p) for p in sorted((world["root"] / "scores").glob("part-*.parquet"))])
    assert scores.column_names == ["request_id", "user_id", "item_id", "p_click", "p_satisfied", "watch_time_pred",
                                   "p_like", "score", "rank"]
    assert scores.column("p_satisfied").null_count == scores.num_rows  # mtl off: no satisfaction tower
    p_like = scores.column("p_like").to_numpy()
    assert np.isfinite(p_like).all() and ((p_like > 0) & (p_like < 1)).all()
    cands = pa.concat_tables([pq.read_table(p) for p in sorted((world["data"] / "candidates").glob("part-*.parquet"))])
    category = dict(zip(cands.column("item_id").to_pylist(), cands.column("category_id").to_pylist()))
    truth = like_rule(np.array([category[i] for i in scores.column("item_id").to_pylist()]))
    assert auc(p_like, truth) > 0.5 + MARGIN
    manifest = json.loads((world["root"] / "scores" / "_manifest.json").read_text())
    assert manifest["identity"]["fusion"]["effective_weights"]["w_like"] == 0.0  # reported, not ranked by


def test_the_head_is_exported_and_served(world):
    from test_export import serve_check

    manifest = json.loads((world["root"] / "artifact" / "manifest.json").read_text())
    assert manifest["model"]["heads"] == ["click", "watch_time", "like"]
    assert [o["name"] for o in manifest["interface"]["outputs"]] == ["p_click", "p_satisfied", "watch_time_pred",
                                                                    "p_like", "score"]
    rc, report, err, _ = serve_check(str(world["root"] / "artifact"), str(world["data"] / "candidates"),
                                     "--compare", str(world["root"] / "scores"), "--atol", "1e-5")
    assert rc == 0, err
    assert report["compare"]["ok"] and report["compare"]["max_abs_diff"]["p_like"] <= 1e-5

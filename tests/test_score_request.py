"""Request-level batch scoring (score.request_level, satrank.models.serving.request.RequestBatchScorer) against
the per-row path, through the real job (torchrun, 2 gloo ranks) on tests/test_score.py's serving world: the same
scores within 1e-5 and the same ranks, wherever batches cut requests; a request whose rows disagree on the user
side is refused naming the file, the request, the rows and the feature; stage-1 kinds keep the per-row path."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from test_score import RUN_OVERRIDES, SCORE_SET, env, read_scores, score_cmd, torchrun, world  # noqa: F401

ATOL = 1e-5


def _job(world, out: Path, *extra: str, nproc: int = 2) -> dict:
    """Run satrank.jobs.score on the world's candidates into `out`; the manifest's last run record."""
    res = subprocess.run(torchrun(nproc, *score_cmd(world["run"], world["data"] / "candidates", out, *extra)),
                         env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / "_manifest.json").read_text())["runs"][-1]


def test_request_level_scores_equal_the_per_row_path_through_the_job(world, tmp_path):
    # request-level with batches of 32 rows (requests of 20 candidates: most batches cut a request in two)
    # against per row with the default batch size (whole shards of 200 rows per batch)
    req = _job(world, tmp_path / "request", *SCORE_SET)
    row = _job(world, tmp_path / "per_row", "--set", "score.request_level=false")
    assert req["request_level"] is True and row["request_level"] is False
    assert req["rows_scored"] == row["rows_scored"] == 1200
    a, b = read_scores(tmp_path / "request"), read_scores(tmp_path / "per_row")
    assert a.schema == b.schema
    for col in ("request_id", "user_id", "item_id"):
        assert a.column(col).equals(b.column(col)), col
    for col in ("p_click", "p_satisfied", "watch_time_pred", "score"):
        x, y = a.column(col).to_numpy(), b.column(col).to_numpy()
        assert np.isfinite(x).all() and np.abs(x - y).max() <= ATOL, (col, np.abs(x - y).max())
    assert a.column("rank").equals(b.column("rank"))


def _tampered(world, tmp_path: Path, *changed: int) -> Path:
    """Candidate shard part-00000 (10 requests x 20 rows) with one id appended to the click history of the rows
    `changed` (of one request: they stay equal among themselves)."""
    src = world["data"] / "candidates" / "part-00000.parquet"
    t = pq.read_table(src)
    rows = t.to_pylist()
    for row in changed:
        rows[row]["hist_click"] = [*rows[row]["hist_click"][-49:], 7]
    (tmp_path / "cands").mkdir(exist_ok=True)
    out = tmp_path / "cands" / "part-00000.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=t.schema), out)
    return out


def test_a_request_whose_rows_disagree_on_the_user_side_is_refused_naming_it(world, tmp_path):
    path = _tampered(world, tmp_path, 25)  # request 2 = rows 20..39
    rid = pq.read_table(path).column("request_id")[25].as_py()
    res = subprocess.run([sys.executable, *score_cmd(world["run"], tmp_path / "cands", tmp_path / "out", *SCORE_SET)],
                         env=env(), capture_output=True, text=True, timeout=180)
    assert res.returncode == 1, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert "Traceback" not in res.stderr and "part-00000.parquet" in last
    assert f"request_id {rid}: rows 20 and 25 differ in the user-side feature 'hist_click'" in last, last


def test_a_disagreement_across_a_batch_boundary_is_refused_and_the_per_row_path_scores_it(world, tmp_path):
    """Rows 32.. are the second batch of 32: request 2 (rows 20..39) is cut there; its rows 32..39 agree with each
    other but not with rows 20..31 of the first batch. score.request_level=false scores the file row by row."""
    from satrank.jobs.config.serve import load_serve_config
    from satrank.jobs.engine.runs import load_model
    from satrank.models.serving.module import ModelScorer
    from satrank.models.serving.request import RequestBatchScorer
    from satrank.models.serving.score import make_scorer, score_file
    from satrank.pipeline.errors import DataError

    path = _tampered(world, tmp_path, *range(32, 40))
    loaded = load_model(world["run"])
    score = load_serve_config(None, ["score.batch_size=32", "score.num_workers=0"]).score
    scorer = make_scorer(loaded, score, "cpu")
    assert isinstance(scorer, RequestBatchScorer)
    with pytest.raises(DataError, match=r"part-00000.parquet: request_id \d+: rows 20 and 32 differ in the "
                                        r"user-side feature 'hist_click'"):
        score_file(scorer, str(path), loaded.cfg.data, score)
    clean, _ = score_file(scorer, str(world["data"] / "candidates" / "part-00000.parquet"), loaded.cfg.data, score)
    assert clean.num_rows == 200  # begin_file forgets the tampered file's requests
    per_row = load_serve_config(None, ["score.batch_size=32", "score.num_workers=0", "score.request_level=false"]).score
    scorer = make_scorer(loaded, per_row, "cpu")
    assert isinstance(scorer, ModelScorer)
    table, _ = score_file(scorer, str(path), loaded.cfg.data, per_row)
    assert table.num_rows == 200


def test_stage1_kinds_score_per_row_under_request_level():
    from types import SimpleNamespace

    from satrank.jobs.config import load_config
    from satrank.jobs.config.serve import load_serve_config
    from satrank.models.ranker.heads import serving_specs
    from satrank.models.serving.module import ModelScorer, Stage1Heads, build_model
    from satrank.models.serving.score import make_scorer

    cfg = load_config(overrides=RUN_OVERRIDES)
    loaded = SimpleNamespace(kind="click", cfg=cfg, model=Stage1Heads(build_model("click", cfg)),
                             specs=serving_specs(cfg.model, cfg.loss))
    score = load_serve_config().score
    assert score.request_level is True
    assert isinstance(make_scorer(loaded, score, "cpu"), ModelScorer)

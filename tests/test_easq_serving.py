"""A satrank.jobs.dpo (EASQ) run served like a stage-2 run: satrank.models.serving.module recognises its checkpoint (kind `easq`),
satrank.jobs.score scores it with the adapters folded into the main path (the satisfaction head is not served), and
satrank.jobs.export publishes a TorchScript artifact whose scores match satrank.jobs.score's. The run is tests/test_dpo_job.py's
cached `dpo_with_propensity` on tests/test_score.py's serving world."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

from tests.test_dpo_job import dpo_with_propensity  # noqa: E402
from tests.test_score import SCORE_SET, build_world, env, read_scores, score_cmd  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    return build_world(tmp_path_factory.getbasetemp() / "serving_world")


@pytest.fixture(scope="module")
def dpo_run(world) -> Path:
    return dpo_with_propensity(world)


def _candidates(world, cfg, rows: int = 200):
    from satrank.pipeline.reader import BatchLoader
    from satrank.pipeline.reader_config import ReaderConfig

    rcfg = ReaderConfig(batch_size=rows, num_workers=0, shuffle=False)
    return next(iter(BatchLoader(world["data"] / "candidates", cfg.data, rcfg, with_labels=False)))


def test_dpo_checkpoint_is_recognised_and_served_with_the_adapters_folded(world, dpo_run):
    from satrank.jobs.engine import checkpoint as ckpt
    from satrank.jobs.engine.runs import kind_of, load_model
    from satrank.models.easq.pathway import SAT_HEAD
    from satrank.models.common.fusion import FusionConfig
    from satrank.models.ranker.saqrec import ranker_inputs
    from satrank.models.serving.module import ModelScorer, build_model

    path = ckpt.resolve(dpo_run)
    assert kind_of(ckpt.read_meta(path), path) == "easq"  # from meta.json's job (dpo), not parameter names
    loaded = load_model(dpo_run)
    assert loaded.kind == "easq" and loaded.lora["easq"]["targets"] == ["item"]
    assert loaded.lora["easq"]["id_targets"] == ["user_id", "item_id"]  # the run trains per-id adapters too
    assert loaded.lora["unmerged_branches"] == []  # nothing left to compute at serving time
    cfg = loaded.cfg
    batch = _candidates(world, cfg)
    served = ModelScorer(loaded.model, FusionConfig(), cfg.data)(batch)

    # the unmerged EASQ model (as trained): main path with sg(h_lora) injected, plus the satisfaction head
    easq = build_model("easq", cfg, loaded.teacher)
    ckpt.load_checkpoint(path, easq)
    easq.eval()
    lora_b = easq.easq.lora["item"].B
    assert float(lora_b.abs().max()) > 0  # L_sat trained the adapter: folding it matters
    assert all(float(m.B.abs().max()) > 0 for m in easq.easq.id_lora.values())  # trained, and never served:
    with torch.no_grad():
        _, out = easq(batch)
        t = easq.task
        signals = t.teacher(t.g.sparse_arch(batch.sparse), batch.dense, t.g) if t.g is not None else {}
        x = ranker_inputs(t.sparse_arch(batch.sparse), batch.dense, easq.easq.cfg, t.data, signals)
        no_adapter = torch.sigmoid(easq.easq.ranker(x)["click"])  # the same weights, adapters off
    torch.testing.assert_close(served["p_click"], torch.sigmoid(out["click"]).float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(served["p_satisfied"], torch.sigmoid(out["satisfaction"]).float(), rtol=0, atol=1e-5)
    assert float((served["p_click"] - no_adapter).abs().max()) > 1e-5  # the fold is not the identity
    assert SAT_HEAD not in dict(loaded.model.ranker.ranker.named_children())  # main heads only
    assert not [n for n, _ in loaded.model.named_parameters() if "id_lora" in n]

    # the stage-2 run it started from scores differently (DPO moved the backbone and the adapter)
    base = ModelScorer(load_model(world["run"]).model, FusionConfig(), cfg.data)(batch)
    assert float((base["p_click"] - served["p_click"]).abs().max()) > 1e-4


def test_dpo_run_scores_with_jobs_score_and_exports_a_matching_artifact(world, dpo_run, tmp_path):
    from satrank.jobs.export import export
    from satrank.jobs.config.serve import load_serve_config
    from satrank.models.serving.check import Features, load_module, score_features, verify_artifact

    out = tmp_path / "scores"
    res = subprocess.run([sys.executable, *score_cmd(dpo_run, world["data"] / "candidates", out, *SCORE_SET)],
                         env=env(), capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["complete"] and manifest["totals"]["rows_out"] == manifest["totals"]["rows_in"] == 1200
    scores = read_scores(out)

    art = tmp_path / "artifact"
    m = export(dpo_run, art, load_serve_config(), world["data"])
    assert m["model"]["kind"] == "easq" and m["model"]["lora"]["unmerged_branches"] == []
    assert m["model"]["heads"] == ["click", "satisfaction", "watch_time"]
    assert m["metrics"]["job"] == "dpo" and m["export_check"]["source"] == "candidates+synthetic"
    manifest = verify_artifact(art)
    module = load_module(art, manifest)
    got = []
    for f in sorted((world["data"] / "candidates").glob("part-*.parquet")):
        t = pq.read_table(f)
        res = score_features(module, Features(t, manifest["features"], f.name))
        got.append((t.column("request_id").to_numpy(), t.column("item_id").to_numpy(), res["score"], res["p_click"]))
    rid, iid, score, p_click = (np.concatenate(c) for c in zip(*got))
    order = np.lexsort((iid, rid))
    assert np.array_equal(rid[order], scores.column("request_id").to_numpy())
    assert np.array_equal(iid[order], scores.column("item_id").to_numpy())
    assert np.allclose(score[order], scores.column("score").to_numpy(), atol=1e-5)
    assert np.allclose(p_click[order], scores.column("p_click").to_numpy(), atol=1e-6)

"""satrank.jobs.export + satrank.jobs.serve_check: the TorchScript artifact of a ranker trained on 2 ranks, checked in a
fresh process that imports no project code, against the eager batch scorer (satrank.jobs.score)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from test_score import SCORE_SET, build_world, env, score_cmd  # noqa: E402

PROJECT = ("satrank", "torchrec", "fbgemm_gpu")
# what the serve_check process may import of the project: its entry point and the dependency-free checker
ALLOWED = ["satrank", "satrank.jobs", "satrank.jobs.serve_check", "satrank.models", "satrank.models.serving",
           "satrank.models.serving.check"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    return build_world(tmp_path_factory.getbasetemp() / "serving_world")


@pytest.fixture(scope="module")
def artifact(world, tmp_path_factory) -> Path:
    from satrank.jobs.export import export
    from satrank.jobs.config.serve import load_serve_config

    out = tmp_path_factory.mktemp("export") / "artifact"
    export(world["run"], out, load_serve_config(None, ["export.int8=true"]), world["data"])
    return out


@pytest.fixture(scope="module")
def scored(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scored")
    res = subprocess.run([sys.executable, *score_cmd(world["run"], world["data"] / "candidates", out, *SCORE_SET)],
                         env=env(), capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def serve_check(*args: str) -> tuple:
    """Run satrank.jobs.serve_check in a fresh interpreter; report which project modules it imported."""
    code = ("import json, runpy, sys\n"
            f"sys.argv = ['serve_check', *{list(args)!r}]\n"
            "try:\n    runpy.run_module('satrank.jobs.serve_check', run_name='__main__')\n"
            "except SystemExit as e:\n    rc = e.code\n"
            f"print(json.dumps({{'rc': rc, 'imported': sorted(m for m in sys.modules if m.split('.')[0] in {PROJECT!r})}}))\n")
    res = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=120)
    lines = res.stdout.strip().splitlines()
    tail = json.loads(lines[-1])
    report = json.loads(lines[0]) if len(lines) > 1 else None
    return tail["rc"], report, res.stderr, tail["imported"]


def test_fp32_artifact_matches_the_eager_scores_in_a_fresh_process_without_project_code(artifact, scored, world):
    rc, report, err, imported = serve_check(str(artifact), str(world["data"] / "candidates"), "--compare", str(scored),
                                            "--atol", "1e-5", "--batch-size", "333")
    assert rc == 0, err
    assert set(imported) <= set(ALLOWED)  # no other models/, embeddings/, pipeline/, TorchRec or FBGEMM in the serving process
    cmp = report["compare"]
    assert report["rows"] == cmp["rows"] == 1200 and report["requests"] == 60
    assert cmp["ok"] and max(cmp["max_abs_diff"].values()) <= 1e-5 and cmp["rank_mismatches"] == 0


def test_int8_artifact_is_close_but_not_identical(artifact, scored, world):
    rc, report, err, _ = serve_check(str(artifact), str(world["data"] / "candidates" / "part-00002.parquet"),
                                     "--compare", str(scored), "--model-file", "model_int8.pt", "--atol", "0.05")
    assert rc == 0, err
    diffs = report["compare"]["max_abs_diff"]
    assert 0 < diffs["p_click"] < 0.01 and report["rows"] == 200


def test_manifest_holds_schema_fusion_training_range_metrics_and_int8_auc_change(artifact, world):
    m = json.loads((artifact / "manifest.json").read_text())
    f = m["features"]
    assert f["keys"] == ["user_id", "item_id", "author_id", "category_id", "user_activity", "hist_click",
                         "hist_satisfied", "hist_dissatisfied", "hist_skip"]
    assert {x["name"]: x["out_of_range"] for x in f["sparse"]}["author_id"] == "hash"
    assert {x["name"]: (x["vocab_size"], x["max_len"]) for x in f["sequence"]}["hist_click"] == (400, 50)
    assert f["dense"] == [{"name": "duration_s", "column": "duration_s", "transform": "log1p"}]
    assert m["model"]["kind"] == "ranker" and m["model"]["written_by_world_size"] == 2
    assert m["model"]["heads"] == ["click", "satisfaction", "watch_time"]  # head names; columns in interface.outputs
    assert m["fusion"]["weights"] == {"w_click": 1.0, "w_sat": 1.0, "w_watch_time": 0.0}
    world_json = json.loads((world["data"] / "world.json").read_text())["splits"]["train"]
    tr = m["training_data"]["train_split"]
    assert (tr["min_timestamp"], tr["max_timestamp"], tr["rows"]) == (world_json["min_ts"], world_json["max_ts"],
                                                                      world_json["rows"])
    assert m["metrics"]["click_auc"] == 0.5  # RUN/metrics.json of the run
    assert m["export_check"]["source"] == "candidates+synthetic" and max(m["export_check"]["max_abs_diff"].values()) <= 1e-5
    held = m["quantization"]["int8"]["held_out"]
    assert held["rows"] == 600 and abs(held["click_auc"]["delta"]) < 0.02
    assert held["click_auc"]["delta"] == pytest.approx(held["click_auc"]["int8"] - held["click_auc"]["fp32"])
    for name, rec in m["files"].items():
        assert len(rec["sha256"]) == 64 and (artifact / name).stat().st_size == rec["bytes"]


def test_a_tampered_artifact_is_refused(artifact, world, tmp_path):
    for victim, change in (("model.pt", lambda b: b[:-64] + bytes([b[-64] ^ 1]) + b[-63:]),
                           ("manifest.json", lambda b: b.replace(b'"w_sat": 1.0', b'"w_sat": 9.0'))):
        bad = tmp_path / victim
        shutil.copytree(artifact, bad)
        (bad / victim).write_bytes(change((bad / victim).read_bytes()))
        rc, report, err, _ = serve_check(str(bad), str(world["data"] / "candidates"))
        assert rc == 2 and report is None
        assert f"{bad / victim}: checksum mismatch" in err and "refusing it" in err


def test_vocabulary_policies_and_truncation_match_the_reader(artifact, world, tmp_path):
    """Hashed / out-of-vocabulary ids and over-long histories: serve_check's own conversion gives the
    scores the project's reader + eager model give on the same file."""
    from satrank.jobs.engine.runs import load_model
    from satrank.models.serving.check import Features, load_module, score_features, verify_artifact
    from satrank.models.serving.score import score_file
    from satrank.jobs.config.serve import load_serve_config
    from satrank.models.serving.module import ModelScorer

    t = pq.read_table(world["data"] / "candidates" / "part-00004.parquet")
    n = t.num_rows
    author = pc.add(t.column("author_id"), pa.array(np.where(np.arange(n) % 2 == 0, 64 * 3, 0)))  # hash: mod 64
    category = pa.array(np.where(np.arange(n) % 3 == 0, 100 + np.arange(n), t.column("category_id").to_numpy()))
    long_hist = pa.array([list(range(1, 61)) + h for h in t.column("hist_click").to_pylist()],
                         type=pa.list_(pa.int64()))  # > max_len 50: only the last 50 ids count
    t = t.set_column(t.schema.get_field_index("author_id"), "author_id", author)
    t = t.set_column(t.schema.get_field_index("category_id"), "category_id", category.cast(pa.int64()))
    t = t.set_column(t.schema.get_field_index("hist_click"), "hist_click", long_hist)
    (tmp_path / "c").mkdir()
    pq.write_table(t, tmp_path / "c" / "part-00000.parquet")

    manifest = verify_artifact(artifact)
    ours = score_features(load_module(artifact, manifest), Features(t, manifest["features"], "x"), batch_size=7)
    loaded = load_model(world["run"])
    serve = load_serve_config()
    scorer = ModelScorer(loaded.model, serve.score.fusion, loaded.cfg.data, specs=loaded.specs)
    table, stats = score_file(scorer, str(tmp_path / "c" / "part-00000.parquet"), loaded.cfg.data, serve.score)
    assert stats["oov_hits"]["author_id"] == (n + 1) // 2 and stats["oov_hits"]["category_id"] == (n + 2) // 3
    ref = table.sort_by([("request_id", "ascending"), ("item_id", "ascending")])
    order = np.lexsort((ours["item_id"], ours["request_id"]))
    for c in ("p_click", "p_satisfied", "watch_time_pred", "score"):
        assert np.abs(ours[c][order] - ref.column(c).to_numpy()).max() <= 1e-5, c
    assert (ours["rank"][order] == ref.column("rank").to_numpy()).all()


def test_bad_candidates_are_refused_naming_column_and_problem(artifact, world, tmp_path):
    t = pq.read_table(world["data"] / "candidates" / "part-00000.parquet")
    cases = {
        "missing": (t.drop_columns(["duration_s"]),
                    "column 'duration_s' (dense feature duration_s) required by the artifact's manifest is missing"),
        "vocab": (t.set_column(t.schema.get_field_index("user_id"), "user_id", pc.add(t.column("user_id"), 300)),
                  "column 'user_id', row 0: id outside the vocabulary: >= vocab_size 300 of feature 'user_id' "
                  "(out_of_range: error)"),
        "negative_history": (t.set_column(t.schema.get_field_index("hist_satisfied"), "hist_satisfied",
                                          pa.array([[-4]] + [[]] * (t.num_rows - 1), type=pa.list_(pa.int64()))),
                             "column 'hist_satisfied', row 0: negative id (value -4)"),
    }
    for name, (table, message) in cases.items():
        pq.write_table(table, tmp_path / f"{name}.parquet")
        rc, report, err, _ = serve_check(str(artifact), str(tmp_path / f"{name}.parquet"))
        assert rc == 2 and message in err, (name, err)


def test_export_refuses_a_non_checkpoint_and_an_existing_out(world, artifact, tmp_path):
    from satrank.jobs.engine.checkpoint import CheckpointError
    from satrank.jobs.export import export
    from satrank.jobs.config.serve import load_serve_config
    from satrank.pipeline.config import ConfigError

    with pytest.raises(CheckpointError, match="is not a satrank checkpoint"):
        export(world["data"] / "train", tmp_path / "a", load_serve_config())
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        export(world["run"], artifact, load_serve_config())
    with pytest.raises(ConfigError, match="export.int8 needs --data"):
        export(world["run"], tmp_path / "b", load_serve_config(None, ["export.int8=true"]))


def test_int8_rows_dequantise_like_fbgemm():
    import fbgemm_gpu  # noqa: F401

    from satrank.models.serving.module import quantize_rows_int8

    w = torch.randn(50, 16) * torch.logspace(-3, 1, 50).unsqueeze(1)
    q, scale, bias = quantize_rows_int8(w)
    ours = q.float() * scale.unsqueeze(1) + bias.unsqueeze(1)
    theirs = torch.ops.fbgemm.Fused8BitRowwiseQuantizedToFloat(torch.ops.fbgemm.FloatToFused8BitRowwiseQuantized(w))
    assert q.dtype == torch.uint8 and torch.allclose(ours, theirs, rtol=0, atol=1e-6 * float(w.abs().max()))
    assert float((ours - w).abs().max()) <= float(((w.max(1).values - w.min(1).values) / 255).max()) * 0.51


def test_click_model_exports_without_data_and_serves_null_satisfaction(world, tmp_path):
    from satrank.jobs.engine.checkpoint import save_checkpoint
    from satrank.jobs.config import load_config
    from satrank.jobs.export import export
    from satrank.jobs.config.serve import load_serve_config
    from satrank.models.serving.check import Features, load_module, score_features, verify_artifact
    from satrank.models.serving.module import build_model
    from test_score import RUN_OVERRIDES

    cfg = load_config(overrides=RUN_OVERRIDES)
    save_checkpoint(tmp_path / "click", build_model("click", cfg), extra={"job": "pretrain"}, config=cfg)
    m = export(tmp_path / "click", tmp_path / "art", load_serve_config())
    assert m["model"]["heads"] == ["click"] and m["fusion"]["effective_weights"]["w_sat"] == 0.0
    assert m["export_check"]["source"] == "synthetic" and m["training_data"]["train_split"] is None
    manifest = verify_artifact(tmp_path / "art")
    t = pq.read_table(world["data"] / "candidates" / "part-00000.parquet")
    out = score_features(load_module(tmp_path / "art", manifest), Features(t, manifest["features"], "x"))
    assert np.isnan(out["p_satisfied"]).all() and np.isnan(out["watch_time_pred"]).all()
    assert np.allclose(out["score"], np.log(out["p_click"]), atol=1e-5)

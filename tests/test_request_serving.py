"""The request-level artifact (satrank.models.serving.request, model_request.pt): one request = the user once
and C candidates batched; its scores equal the per-candidate model.pt's, the user side runs once per request,
and malformed requests are refused with one-line errors. The trained run is tests/test_score.py's serving world."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from test_export import artifact, world  # noqa: F401,E402  (the serving world's trained run and its export)
from test_score import RUN_OVERRIDES  # noqa: E402

ATOL = 1e-5


@pytest.fixture(scope="module")
def modules(artifact):
    from satrank.models.serving.check import load_module, verify_artifact

    manifest = verify_artifact(artifact)
    return manifest, load_module(artifact, manifest), load_module(artifact, manifest, manifest["request_interface"]["file"])


def _diff(a, b) -> float:
    return max(float((torch.as_tensor(x).double() - torch.as_tensor(y).double()).abs().nan_to_num(0.0).max()) for x, y in zip(a, b))


def _requests(world, manifest):
    """(request inputs) of several candidate requests, one with its user's histories emptied, one cut to 1 candidate."""
    from satrank.models.serving.check import Features, request_inputs, request_rows

    path = world["data"] / "candidates" / "part-00001.parquet"
    feats = Features(pq.read_table(path), manifest["features"], str(path))
    iface = manifest["request_interface"]
    groups = request_rows(feats.ids["request_id"])
    reqs = [request_inputs(feats, rows, iface) for rows in groups[:4]]
    user, hv, hl, items, dense = reqs[0]
    reqs.append((user, hv[:0], torch.zeros_like(hl), items, dense))  # a user with empty histories
    user, hv, hl, items, dense = reqs[1]
    reqs.append((user, hv, hl, items[:, :1], dense[:1]))  # a request of one candidate
    assert all(r[3].shape[1] == 20 for r in reqs[:4]) and int(reqs[1][2].sum()) > 0
    return reqs


def test_request_level_scores_equal_the_per_candidate_artifact(world, modules):
    from satrank.models.serving.check import per_candidate_inputs

    manifest, per, req = modules
    iface = manifest["request_interface"]
    assert iface["user_keys"] == ["user_id", "user_activity"] and iface["item_keys"] == ["item_id", "author_id", "category_id"]
    assert iface["history_keys"] == ["hist_click", "hist_satisfied", "hist_dissatisfied", "hist_skip"]
    with torch.no_grad():
        for inputs in _requests(world, manifest):
            got = req(*inputs)
            want = per(*per_candidate_inputs(inputs, iface, manifest["features"]["keys"]))
            assert len(got) == 4 and got[0].shape == (inputs[3].shape[1],)
            assert _diff(got, want) <= ATOL
            assert torch.isfinite(got[-1]).all()


def test_export_check_and_serve_check_report_the_request_level_equality(world, artifact):
    from satrank.models.serving.check import check

    m = json.loads((artifact / "manifest.json").read_text())
    rl = m["export_check"]["request_level"]
    assert rl["source"] == "candidates+synthetic" and rl["requests"] >= 60 + 3 and rl["against"] == "model.pt"
    assert max(rl["max_abs_diff"].values()) <= ATOL and m["files"]["model_request.pt"]["bytes"] > 0
    report = check(artifact, world["data"] / "candidates", atol=ATOL)
    assert report["ok"] and report["request_level"]["requests"] == 60 and report["request_level"]["rows"] == 1200
    assert max(report["request_level"]["max_abs_diff"].values()) <= ATOL
    assert rl["over_atol"] == [] and report["request_level"]["over_atol"] == []  # no request used the MLSE allowance


def test_the_user_side_runs_once_per_request(world, modules):
    """Hooks on the eager request core: each history encoder and g's history scorer see ONE row for a request
    of 20 candidates, the towers see 20; and the eager core scores like the published module."""
    from satrank.jobs.config.serve import load_serve_config
    from satrank.jobs.engine.runs import load_model
    from satrank.models.serving.request import RequestCore

    manifest, _, req = modules
    loaded = load_model(world["run"])
    core = RequestCore(loaded.model, loaded.kind, loaded.cfg.data, load_serve_config().score.fusion, loaded.specs).eval()
    seen = {}
    r = core.ranker
    watched = {"enc_click": r.enc_click, "enc_sat": r.enc_sat, "enc_dis": r.enc_dis, "mlse": r.mlse,
               "fusion": r.fusion, "g_tower": core.task.g.arch.tower, "sat_tower": r.sat_tower}

    def rows(x) -> int:  # batch size of a module's first input (a tensor, a list or a dict of tensors)
        x = next(iter(x.values())) if isinstance(x, dict) else x[0] if isinstance(x, (list, tuple)) else x
        return int(x.shape[0])

    for name, m in watched.items():
        m.register_forward_hook(lambda mod, args, out, name=name: seen.setdefault(name, []).append(rows(args[0])))
    inputs = _requests(world, manifest)[1]
    with torch.no_grad():
        got = core(*inputs)
    for name in ("enc_click", "enc_sat", "enc_dis", "mlse"):
        assert seen[name] == [1], (name, seen[name])
    # g's user half: once for MLSE's history scores, once for the served satisfaction of the 20 candidates
    # (model.served_satisfaction: teacher), each on the request's one row
    assert seen["g_tower"] == [1, 1], seen["g_tower"]
    assert seen["sat_tower"] == [20]
    assert _diff(got, req(*inputs)) <= ATOL


def test_a_malformed_request_is_refused_with_one_line(world, modules):
    from satrank.models.serving.check import ServeCheckError, check_request

    manifest, _, req = modules
    iface = manifest["request_interface"]
    user, hv, hl, items, dense = _requests(world, manifest)[0]
    with pytest.raises(ServeCheckError) as exc:
        check_request((user, hv, hl, items, dense[:7]), iface)
    assert "\n" not in str(exc.value) and "dense has shape [7, 1] but item_ids has 20 candidates" in str(exc.value)
    cases = {"dense must be [C=20, 1] like item_ids' 20 candidates, got [7, 1]": (user, hv, hl, items, dense[:7]),
             "history_values has 3 ids but history_lengths sum to": (user, hv[:3], hl, items, dense),
             "item_ids must be int64 [3, C]": (user, hv, hl, items[:2], dense)}
    for message, bad in cases.items():
        with pytest.raises(Exception) as exc:
            req(*bad)
        last = str(exc.value).strip().splitlines()[-1]
        assert last.startswith("builtins.ValueError: request: ") and message in last, last


def _small_cfg(*overrides):
    from satrank.jobs.config import load_config

    return load_config(overrides=[*RUN_OVERRIDES, *overrides])


def _equal_on_examples(model, kind, cfg, outputs=None) -> float:
    """Max |request-level - per-candidate| over three example requests; `outputs`: the expected output names."""
    from satrank.models.common.fusion import FusionConfig
    from satrank.models.ranker.heads import serving_specs
    from satrank.models.serving.check import per_candidate_inputs
    from satrank.models.serving.module import ServingModule, trace
    from satrank.models.serving.request import build_request_module, example_request

    specs = serving_specs(cfg.model, cfg.loss)
    req = build_request_module(model, kind, cfg.data, FusionConfig(), specs)
    per = trace(ServingModule(model, cfg.data, FusionConfig(), specs=specs), cfg.data)
    iface = {**req.keys, "dense": cfg.data.dense_names}
    assert outputs is None or list(req.outputs) == outputs
    worst = 0.0
    with torch.no_grad():
        for seed, (c, fill) in enumerate(((1, "empty"), (33, "full"), (5, "half"))):
            inputs = example_request(cfg.data, req.keys, c, seed=seed + 10, history=fill)
            worst = max(worst, _diff(req(*inputs), per(*per_candidate_inputs(inputs, iface, cfg.data.sparse_names))))
    return worst


def test_click_only_and_easq_variants_are_request_level_stage1_is_refused():
    from satrank.models.ranker.task import TeacherSpec
    from satrank.models.serving.module import Stage1Heads, build_model
    from satrank.models.serving.request import RequestLevelError, build_request_module

    cfg = _small_cfg("model.variant=click_only", "model.attention=fused")
    torch.manual_seed(0)
    assert _equal_on_examples(build_model("ranker", cfg), "ranker", cfg) <= ATOL

    # no teacher g (MLSE and MTL off), the skip history's encoder, the skip head and an extra head
    cfg = _small_cfg("data.labels.extra=[like]", "model.extra_heads=[{name: like, label: like, weight: 1.0}]",
                     "model.mlse=false", "model.mtl=false", "model.use_skip_history=true", "model.skip_head=true")
    torch.manual_seed(0)
    assert _equal_on_examples(build_model("ranker", cfg), "ranker", cfg,
                              ["p_click", "p_satisfied", "watch_time_pred", "p_skip", "p_like", "score"]) <= ATOL

    cfg = _small_cfg("easq.targets=[item,user]")
    torch.manual_seed(0)
    easq = build_model("easq", cfg, TeacherSpec(cfg.embeddings, cfg.pretrain.tower, cfg.satisfaction))
    with torch.no_grad():
        for branch in easq.easq.lora.values():  # a trained adapter: non-zero B, so folding changes the scores
            for p in branch.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    assert _equal_on_examples(easq.serving_task(), "easq", cfg) <= ATOL

    click = Stage1Heads(build_model("click", cfg))
    with pytest.raises(RequestLevelError, match="model kind 'click' .* per-candidate model.pt serves this one"):
        build_request_module(click, "click", cfg.data, None, [])


def test_the_served_satisfaction_is_g_s_estimate_and_the_tower_is_the_ablation(world):
    """model.served_satisfaction: teacher (default) -> the ranker's `satisfaction` output on candidate rows is
    exactly g(u, i), the stage-1 model scoring the same rows by itself, and s_f is reported as
    satisfaction_tower; with `tower` the served value is s_f again."""
    import dataclasses

    from satrank.jobs.engine.runs import load_model
    from satrank.pipeline.reader import BatchLoader

    loaded = load_model(world["run"])
    task = loaded.model.eval()
    assert loaded.cfg.model.served_satisfaction == "teacher"
    loader = BatchLoader(world["data"] / "test", loaded.cfg.data, dataclasses.replace(loaded.cfg.reader, shuffle=False,
                                                                                          num_workers=0))
    batch = next(iter(loader))
    with torch.no_grad():
        _, out = task(batch)
        _, g_out = task.g(batch)  # g alone, as satrank.jobs.score --kind satisfaction runs it
        task.loss_fn.served_teacher = False  # what model.served_satisfaction: tower builds
        _, tower_out = task(batch)
    assert torch.allclose(out["satisfaction"], g_out["sat_logit"], atol=1e-6)
    assert torch.equal(out["satisfaction_tower"], tower_out["satisfaction"])
    assert "satisfaction_tower" not in tower_out
    assert (out["satisfaction"] - tower_out["satisfaction"]).abs().max() > 1e-3  # two different estimates


def test_serve_check_refuses_zero_rows_with_exit_2_and_one_line(world, artifact, tmp_path):
    import subprocess
    import sys

    path = world["data"] / "candidates" / "part-00001.parquet"
    pq.write_table(pq.read_table(path).slice(0, 0), tmp_path / "empty.parquet")
    proc = subprocess.run([sys.executable, "-m", "satrank.jobs.serve_check", str(artifact), str(tmp_path / "empty.parquet")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == "", (proc.returncode, proc.stdout, proc.stderr)
    last = proc.stderr.strip().splitlines()[-1]
    assert "empty.parquet: 0 candidate rows in 1 file(s); nothing to check" in last and "Traceback" not in proc.stderr


def test_the_mlse_flip_allowance_counts_requests_and_bounds_each_difference():
    """export.check_flip_*: at most int(share x requests) requests over check_atol, each <= flip_atol; one rule for
    the export and serve_check (satrank.models.serving.check.within_flip_allowance)."""
    from satrank.models.serving.check import within_flip_allowance

    over = [{"request_id": 1, "max_abs_diff": 0.004}, {"request_id": 2, "max_abs_diff": 0.009}]
    assert within_flip_allowance([], 10, 0.0, 0.01)  # nothing over: always within
    assert within_flip_allowance(over, 200, 0.01, 0.01)  # int(0.01 x 200) = 2 allowed
    assert not within_flip_allowance(over, 199, 0.01, 0.01)  # int(1.99) = 1 allowed, 2 over
    assert not within_flip_allowance(over, 500, 0.01, 0.005)  # request 2 differs by more than flip_atol
    assert not within_flip_allowance(over[:1], 500, 0.0, 0.01)  # no share: synthetic-strict

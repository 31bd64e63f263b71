"""Stage 2 end to end (satrank.jobs.train, satrank.jobs.evaluate, satrank.models.ranker.task, satrank.models.metrics.ranker_eval) on 2 gloo ranks.

One small simulated world per module and its stage-1 runs (satrank.jobs.pretrain -> satrank.jobs.propensity ->
satrank.jobs.satisfaction), then the full SAQRec and the click-only baseline trained with satrank.jobs.train, and one
worker (tests/_ranker_worker.py) that builds every ablation sharded. The world is small and tilted so
that something is learnable in seconds: answers at ~45% (not ~2%: the satisfaction model g needs
labels), and clicks dominated by click-bait (click_w_attractiveness 2) while satisfaction follows
interest (sat_w_interest 2), so satisfaction-aware ranking has something to win. Measured on this
world (seed 0) before fixing the threshold: true_sat@10 full - click_only = 0.043, 0.042, 0.056 for
training seeds 0, 1, 2 (a second world seed gave 0.017: the margin depends on how much g learns).
Stage 3 on top: satrank.jobs.dpo on the full run at its defaults (online pairs ordered by g) against its DPO-off
control: DPO raises true_sat@10 at a bounded click-AUC cost (margins measured at three training seeds).
"""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

from satrank.jobs.config import load_config  # noqa: E402
from satrank.models.metrics.protocol import interactions_by_user, last_clicks  # noqa: E402
from satrank.models.metrics.ranker_eval import (METRIC_KEYS, EvaluationConfig, build_loo_plan, impression_metrics,  # noqa: E402
                               item_side_columns, ranking_score)
from satrank.pipeline.rows import read_columns  # noqa: E402

WORLD = {"users": 300, "items": 500, "impressions": 40000, "seed": 0, "click_w_attractiveness": 2.0,
         "sat_w_interest": 2.0, "answer_bias": -2.0, "candidate_requests": 200, "candidates_per_request": 50,
         # the answer mechanism MARGIN was measured on (label MNAR, before answer_w_watch), with rho(u, i)
         "answer_w_satisfied": 1.0, "sat_w_activity": 0.0, "answer_w_click": 2.0, "answer_w_watch": 0.0}
COMMON = ["reader.num_workers=0", "propensity.behaviour=[]", "reader.batch_size=512", "pretrain_train.epochs=3",
          "satisfaction_train.epochs=20", "satisfaction_train.eval_every=5", "satisfaction_train.checkpoint_every=0",
          "satisfaction_train.dense_lr=0.003", "satisfaction_train.batch_size=256",
          "ranker_train.epochs=3", "ranker_train.patience=0"]
MARGIN = 0.02  # true_sat@10: full SAQRec must beat click-only by at least this (measured 0.042-0.056)
# EASQ's DPO over its DPO-off control, measured with train.seed 0, 1, 2 set for every stage of the fixtures:
# true_sat@10 +0.0166, +0.0081, +0.0183 (an earlier measurement, varying the seed otherwise: +0.0160, +0.0173 at 1, 2);
# click AUC cost 0.0066, 0.0042, 0.0070; share of online pairs the click head orders as g does +0.0116, +0.0274, +0.0226
AGREEMENT_MARGIN = 0.004
DPO_MARGIN = 0.006
DPO_CLICK_COST = 0.015  # click AUC, the control's minus DPO's (measured above; earlier 0.0066, 0.0056, 0.0095)


def torchrun(target, *args, module=True, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--monitor-interval=0.5", *(["-m"] if module else []), str(target), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def sets(*extra):
    return [x for s in [*COMMON, *extra] for x in ("--set", s)]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    from satrank.pipeline.sim.simulate import simulate

    root = tmp_path_factory.mktemp("stage2")
    data = root / "data"
    cfg = dataclasses.replace(load_config().simulate, **WORLD)
    simulate(data, cfg)
    torchrun("satrank.jobs.pretrain", "--data", data, "--out", root / "pretrain", *sets())
    torchrun("satrank.jobs.propensity", "--data", data, "--out", root / "propensity", *sets())
    torchrun("satrank.jobs.satisfaction", "--data", data, "--init", root / "pretrain", "--propensity", root / "propensity",
             "--out", root / "satisfaction", *sets())
    return {"root": root, "data": data, "sat": root / "satisfaction"}


@pytest.fixture(scope="module")
def runs(stage1):
    out = {}
    for name, extra in (("full", []), ("click_only", ["model.variant=click_only"])):
        run = stage1["root"] / name
        torchrun("satrank.jobs.train", "--data", stage1["data"], "--satisfaction", stage1["sat"], "--out", run, *sets(*extra))
        out[name] = {"run": run, "metrics": json.loads((run / "metrics.json").read_text())}
    return out


@pytest.fixture(scope="module")
def worker(stage1):
    out = stage1["root"] / "worker"
    torchrun(ROOT / "tests" / "_ranker_worker.py", stage1["data"], stage1["sat"], out, json.dumps(COMMON),
             module=False)
    return json.loads((out / "result.json").read_text())


# ------------------------------------------------------------------------------------------ training
def test_training_lowers_validation_loss_for_every_tower(runs, worker):
    before = worker["full"]["untrained_valid"]
    after = runs["full"]["metrics"]["valid"]
    for tower in ("loss_click", "loss_satisfaction", "loss_watch_time"):
        assert after[tower] < before[tower] - 0.01, (tower, before[tower], after[tower])
    assert after["click_auc"] > before["click_auc"] + 0.1


def test_full_saqrec_beats_click_only_on_true_satisfaction_of_its_top_10(runs):
    full, base = runs["full"]["metrics"], runs["click_only"]["metrics"]
    assert full["true_sat@10"] > base["true_sat@10"] + MARGIN, (full["true_sat@10"], base["true_sat@10"])
    assert full["evaluation"]["rank_score"] == "fusion"  # the configured ranking (log P(click) + log P(sat))


def test_metrics_json_has_every_key_and_absent_heads_are_null(runs):
    for name, r in runs.items():
        m = r["metrics"]
        assert set(METRIC_KEYS) <= set(m), (name, sorted(set(METRIC_KEYS) - set(m)))
        assert m["loo_users"] > 100 and m["candidate_requests"] == WORLD["candidate_requests"]
        assert 0.5 < m["click_auc"] <= 1 and 0 < m["hr@1"] <= m["hr@5"] <= m["hr@10"] <= 1
        assert m["ndcg@5"] <= m["ndcg@10"] and m["mrr"] >= m["hr@1"]
        assert (r["run"] / "best").is_dir() and (r["run"] / "teacher.json").is_file()
    assert runs["click_only"]["metrics"]["watch_time_mae"] is None
    assert runs["full"]["metrics"]["watch_time_mae"] > 0
    assert runs["full"]["metrics"]["teacher"]["loss"] == "ips"
    # label correction (n_mix = 2) is fitted after epoch 1 and used from epoch 2 on
    assert [c["epoch"] for c in runs["full"]["metrics"]["label_correction"]] == [1, 2]


def test_evaluate_reloads_the_two_rank_checkpoint_in_one_process_with_the_same_figures(stage1, runs, tmp_path):
    run = runs["full"]["run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    data = run.parent / "data"
    proc = subprocess.run([sys.executable, "-m", "satrank.jobs.evaluate", "--data", str(data), "--model", str(run),
                           "--propensity", str(stage1["root"] / "propensity"), "--out", str(tmp_path), *sets()],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    again = json.loads((tmp_path / "metrics.json").read_text())
    first = runs["full"]["metrics"]
    assert again["world_size"] == 1 and first["world_size"] == 2
    share = "true_sat@10_headroom_share"
    for key in METRIC_KEYS:
        if key != share:
            assert again[key] == pytest.approx(first[key], abs=2e-4), key
    # the oracles rank by the truth columns: the same figures whoever scored, and ceilings of the model's
    for key in ("true_sat@10_oracle_sat", "true_click@10_oracle_sat", "true_sat@10_oracle_click",
                "true_click@10_oracle_click"):
        assert again[key] == first[key], key
    assert again["true_sat@10"] <= again["true_sat@10_oracle_sat"]
    assert again["true_click@10"] <= again["true_click@10_oracle_click"]
    span = again["true_sat@10_oracle_sat"] - again["true_sat@10_oracle_click"]
    assert span > 0.05 and again[share] == pytest.approx((again["true_sat@10"] - again["true_sat@10_oracle_click"]) / span)
    assert again[share] == pytest.approx(first[share], abs=2e-4 / span)
    # --propensity: the top-3 satisfaction among each user's logged test impressions, estimated from the answers
    off = again["offline_top_k"]
    assert (off["k"], off["group"], off["rows"]) == (3, "user_id", again["impression_rows"])
    for form in ("naive", "ips", "snips", "dr"):
        est = off["estimates"][form]
        assert 0 < est["value"] < 1.5 and est["lo"] <= est["value"] <= est["hi"], (form, est)
    assert 0 < off["truth"] < 1 and off["estimates"]["answered_rows_in_top_k"] > 0


# ------------------------------------------------------------------------------------------ stage 3 on top
@pytest.fixture(scope="module")
def easq_runs(stage1, runs):
    """satrank.jobs.dpo on the full SAQRec run at the embedded defaults (DPO with the online pairs ordered by g,
    easq.reward_pairs teacher) and its DPO-off control (easq.dpo_weight 0), the same run otherwise."""
    out = {}
    for name, extra in (("dpo", []), ("dpo_off", ["easq.dpo_weight=0.0"])):
        run = stage1["root"] / name
        torchrun("satrank.jobs.dpo", "--data", stage1["data"], "--init", runs["full"]["run"], "--propensity",
                 stage1["root"] / "propensity", "--out", run, *sets(*extra))
        out[name] = json.loads((run / "metrics.json").read_text())
    return out


def test_dpo_raises_true_satisfaction_of_the_top_10_over_its_control_at_a_bounded_click_cost(easq_runs):
    on, off = easq_runs["dpo"], easq_runs["dpo_off"]
    assert on["before"]["true_sat@10"] == off["before"]["true_sat@10"]  # the same start
    assert on["dpo_ramp"] > 0  # the gate opened by itself (the satisfaction head's prequential AUC; 32 updates here)
    gain = on["after"]["true_sat@10"] - off["after"]["true_sat@10"]
    cost = off["after"]["click_auc"] - on["after"]["click_auc"]
    print(f"DPO vs its control: true_sat@10 {on['after']['true_sat@10']:.4f} vs {off['after']['true_sat@10']:.4f}, "
          f"click AUC {on['after']['click_auc']:.4f} vs {off['after']['click_auc']:.4f}")
    assert gain > DPO_MARGIN, gain
    # the pairs each run scored (RUN/metrics.json dpo_pairs): the same batches, so the same online pairs; DPO acted
    # only in the DPO run, and its policy came to order the online pairs as g does more often than the control's
    p_on, p_off = on["dpo_pairs"], off["dpo_pairs"]
    print(f"DPO pairs: {p_on} vs control {p_off}")
    assert p_on["online"] == p_off["online"] > 0 and p_on["answered"] == p_off["answered"]
    assert p_on["dpo_steps"] > 0 and p_off["dpo_steps"] == 0
    assert p_on["online_agreement"] > p_off["online_agreement"] + AGREEMENT_MARGIN
    # the click cost as measured (above; earlier 0.0066, 0.0056, 0.0095) is above the 0.005 on this click-bait-
    # heavy world (docs/alignment.md); a DPO that wrecked the click head (weight 10 x this: -0.03 on the default world) fails
    assert cost < DPO_CLICK_COST, cost


def test_evaluate_takes_a_dpo_run_and_reproduces_its_after_figures_in_one_process(stage1, easq_runs, tmp_path):
    """satrank.jobs.evaluate rebuilds a dpo run as it trained (the ranker with its EASQ pathway), so a user can
    re-read a DPO run under other `evaluate:` settings; at the run's own settings it gives the run's `after`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "satrank.jobs.evaluate", "--data", str(stage1["data"]), "--model",
                           str(stage1["root"] / "dpo"), "--out", str(tmp_path), *sets()],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    again, after = json.loads((tmp_path / "metrics.json").read_text()), easq_runs["dpo"]["after"]
    for key in ("click_auc", "true_sat@10", "true_click@10", "hr@10", "ndcg@10"):
        assert again[key] == pytest.approx(after[key], abs=2e-4), key


def test_evaluate_refuses_a_stage_1_run_in_one_line_naming_its_checkpoint(stage1, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "satrank.jobs.evaluate", "--data", str(stage1["data"]), "--model",
                           str(stage1["root"] / "pretrain"), "--out", str(tmp_path / "out"), *sets()],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    lines = [x for x in proc.stderr.splitlines() if "a click model (stage 1) is not a stage-2 ranker" in x]
    assert len(lines) == 1 and str(stage1["root"] / "pretrain") in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "out" / "metrics.json").exists()


# ------------------------------------------------------------------------------------------ ablations
def test_each_ablation_switch_removes_its_part(worker):
    full, no_sid, no_mlse, no_mtl = worker["full"], worker["no_sid"], worker["no_mlse"], worker["no_mtl"]
    both, click = worker["no_mlse_no_mtl"], worker["click_only"]
    # full: g scores the click history once per forward (one eval forward, two pipelined training steps)
    assert full["eval_forward_scorer_calls"] == 1 and full["train_scorer_calls"] == full["train_steps"] == 2
    assert {"satisfaction", "pseudo_satisfaction", "loss/satisfaction", "watch_time"} <= set(full["output_keys"])
    assert full["fusion_names"] == ["u_sat", "u_dis", "h_r", "u_mlse", "v_u"]
    # without MLSE g's history scorer is never called (g still gives the pseudo-labels of MTL)
    assert no_mlse["eval_forward_scorer_calls"] == 0 and no_mlse["train_scorer_calls"] == 0
    assert no_mlse["has_g"] and "pseudo_satisfaction" in no_mlse["output_keys"] and "mlse" not in no_mlse["ranker_children"]
    # without MTL: no satisfaction tower, no satisfaction loss, no pseudo-labels; MLSE still scores
    assert "sat_tower" not in no_mtl["ranker_children"] and no_mtl["heads"] == ["click", "watch_time"]
    assert not {"satisfaction", "loss/satisfaction", "pseudo_satisfaction"} & set(no_mtl["output_keys"])
    assert no_mtl["train_scorer_calls"] == 2
    # without SID: no satisfied / dissatisfied encoders
    assert not {"sid", "enc_sat", "enc_dis"} & set(no_sid["ranker_children"]) and "u_sat" not in no_sid["fusion_names"]
    # neither MLSE nor MTL: g is not built, not loaded, not called
    assert not both["has_g"] and both["g_state_keys"] == 0 and "g_tensors_loaded" not in both
    # click-only baseline: click tower only, no g
    assert click["heads"] == ["click"] and not click["has_g"] and "sat_tower" not in click["ranker_children"]
    assert click["fusion_names"] == ["h_r", "v_u"] and "loss/satisfaction" not in click["output_keys"]


def test_frozen_teacher_inside_the_task_reproduces_the_satisfaction_run(worker):
    full = worker["full"]
    assert full["g_tensors_loaded"] > 10
    assert full["pseudo_label_max_abs_diff"] < 1e-5
    assert full["history_scores_shape"][1] == 50  # hist_click max_len


def test_train_without_satisfaction_run_is_a_one_line_error(stage1, tmp_path, capsys):
    from satrank.jobs.train import main

    assert main(["--data", str(stage1["data"]), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "--satisfaction RUN_S is required" in err
    assert main(["--data", str(stage1["data"]), "--out", str(tmp_path / "y"), "--satisfaction",
                 str(stage1["root"] / "pretrain")]) == 1
    assert "satisfaction" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ evaluation protocol
def test_leave_one_out_lists_rank_each_users_last_click_against_never_interacted_items(stage1):
    cfg = load_config()
    data = stage1["data"]
    cols = item_side_columns(cfg.data, ["item_id", "author_id", "category_id"])
    plan = build_loo_plan(data, cfg.data, cols, EvaluationConfig())
    t = read_columns(data / "test", ["user_id", "item_id", "timestamp", "click"])
    truth = last_clicks(*(t.column(c).to_numpy() for c in ("user_id", "item_id", "timestamp", "click")))
    assert plan.users.tolist() == sorted(truth) and plan.items.shape == (len(truth), 100)
    assert [truth[u] for u in plan.users.tolist()] == plan.items[:, 0].tolist()
    seen_u, seen_i = [], []
    for s in ("train", "valid", "test"):
        h = read_columns(data / s, ["user_id", "item_id"])
        seen_u.append(h.column("user_id").to_numpy())
        seen_i.append(h.column("item_id").to_numpy())
    seen = interactions_by_user(np.concatenate(seen_u), np.concatenate(seen_i))
    for r, u in enumerate(plan.users.tolist()):
        neg = plan.items[r, 1:]
        assert len(set(neg.tolist())) == 99 and not set(neg.tolist()) & set(seen[u].tolist())
    # a scoring batch repeats the ground-truth row (user side) with each candidate's item attributes
    batch = plan.batch_for(np.array([0, 1]))
    assert batch.size == 200
    kjt = batch.sparse.to_dict()
    assert kjt["user_id"].values()[:100].unique().tolist() == [plan.users[0]]
    assert kjt["item_id"].values()[:100].tolist() == plan.items[0].tolist()
    attrs = plan.attrs.lookup(plan.items[0])
    assert kjt["category_id"].values()[:100].tolist() == attrs["category_id"].tolist()
    torch.testing.assert_close(batch.dense[:100, 0], torch.log1p(torch.tensor(attrs["duration_s"], dtype=torch.float32)))
    lens = kjt["hist_click"].lengths()[:100]
    assert (lens == lens[0]).all() and plan.attrs.conflicts == {"author_id": 0, "category_id": 0, "duration_s": 0}


def test_fusion_score_is_log_p_click_plus_weighted_log_p_satisfied():
    out = {"click": torch.tensor([0.0, 2.0]), "satisfaction": torch.tensor([1.0, -1.0])}
    fused = ranking_score(out, EvaluationConfig(fusion_sat_weight=0.5))
    expect = torch.tensor([np.log(0.5) + 0.5 * np.log(1 / (1 + np.exp(-1.0))),
                           np.log(1 / (1 + np.exp(-2.0))) + 0.5 * np.log(1 / (1 + np.exp(1.0)))], dtype=torch.float64)
    torch.testing.assert_close(fused, expect)
    assert torch.equal(ranking_score(out, EvaluationConfig(rank_score="click")), out["click"])
    torch.testing.assert_close(ranking_score({"click": out["click"]}, EvaluationConfig()),
                               torch.nn.functional.logsigmoid(out["click"].double()))


def test_impression_metrics_use_answered_rows_only_and_seconds_for_watch_time():
    t = {"click_pred": torch.tensor([0.1, 0.9, 0.3, 0.8], dtype=torch.float64),
         "click": torch.tensor([0.0, 1.0, 0.0, 1.0]), "user": torch.tensor([1, 1, 2, 2]),
         "answered": torch.tensor([1.0, 1.0, 0.0, 1.0]), "satisfied": torch.tensor([1.0, 0.0, 0.0, 1.0]),
         "sat_pred": torch.tensor([0.9, 0.1, 5.0, 0.2], dtype=torch.float64),  # row 2 unanswered: ignored
         "watch_time_s": torch.tensor([0.0, 10.0, 1.0, 3.0], dtype=torch.float64),
         "wt_log1p": torch.log1p(torch.tensor([1.0, 10.0, 1.0, 1.0], dtype=torch.float64))}
    m = impression_metrics(t)
    assert m["sat_answered_rows"] == 3 and m["sat_auc_answered"] == 1.0
    assert m["click_auc"] == 1.0 and m["click_gauc"] == 1.0
    assert m["watch_time_mae"] == pytest.approx((1 + 0 + 0 + 2) / 4)


def test_label_correction_state_round_trips_through_the_state_dict():
    from satrank.models.ranker.config import ModelConfig, MultiTaskLossConfig
    from satrank.models.ranker.task import RankerLoss

    cfg = MultiTaskLossConfig()
    a, b = (RankerLoss(cfg, ModelConfig()) for _ in range(2))
    losses = torch.cat([torch.rand(500) * 0.3, 0.5 + torch.rand(500)]).double()
    a.mtl.corrector.fit(losses, epoch=1)
    state = a.get_extra_state()
    assert state.dtype == torch.float64 and state.numel() == 4 + cfg.bmm_lookup_size + 7
    b.set_extra_state(state.clone())
    probe = torch.linspace(0, 1.5, 20, dtype=torch.float64)
    torch.testing.assert_close(b.mtl.corrector.lam(probe), a.mtl.corrector.lam(probe))
    assert b.mtl.corrector.fitted_epoch == 1
    with pytest.raises(ValueError, match="bmm_lookup_size"):
        b.set_extra_state(state[:-1])


# ------------------------------------------------------------------------------------------ the report
def test_the_report_holds_every_figure_and_the_runs_own_numbers(stage1, runs, tmp_path, capsys):
    """satrank.jobs.report on this module's runs (the stage-1 runs, SAQRec and click-only): every figure is there
    as an inline PNG, and every number it plots or tabulates equals the one in the runs' metrics files."""
    import re

    from satrank.jobs.report import main

    out = tmp_path / "report.html"
    assert main([str(stage1["root"]), "--out", str(out)]) == 0
    page = out.read_text()
    figures = dict(re.findall(r'<figure id="([^"]+)">.*?<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]{500,})"',
                              page, re.S))
    expected = {"fig-tradeoff", "fig-estimates-satisfaction", "fig-reliability-propensity", "fig-reliability-satisfaction",
                *(f"fig-curves-{r}" for r in ("pretrain", "propensity", "satisfaction", "full", "click_only"))}
    assert set(figures) == expected, sorted(figures)
    data = json.loads(re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S).group(1))
    full, base = runs["full"]["metrics"], runs["click_only"]["metrics"]
    assert data["fig-tradeoff"]["curves"] == {"full": full["tradeoff"]}
    assert data["fig-tradeoff"]["points"] == {"click_only": [base["true_click@10"], base["true_sat@10"]]}
    assert data["fig-tradeoff"]["oracles"]["sat"] == [full["true_click@10_oracle_sat"], full["true_sat@10_oracle_sat"]]
    sat = json.loads((stage1["sat"] / "metrics.json").read_text())
    assert data["fig-estimates-satisfaction"]["loss"] == {f: sat["estimates"]["loss"][f] for f in ("naive", "ips", "snips", "dr")}
    assert data["fig-estimates-satisfaction"]["truth"] == sat["estimates"]["truth"]["loss"]
    assert sat["estimates"]["truth"]["loss"] == pytest.approx(sat["ideal_loss_all"], abs=1e-9)  # numpy vs torch sums
    history = [json.loads(line) for line in (runs["full"]["run"] / "metrics.jsonl").read_text().splitlines()]
    assert data["fig-curves-full"]["train_loss"] == [[e["epoch"], e["loss"]] for e in history if e["event"] == "train_epoch"]
    assert data["fig-curves-full"]["validation_metric"] == "click_auc"
    assert data["fig-curves-full"]["validation_metric_values"] == [[e["epoch"], e["click_auc"]] for e in history
                                                                   if e["event"] == "eval"]
    cells = re.findall(r'<td class="num" data-key="([^"]+)" data-value="([^"]+)">', page)
    by_run = {"full: saqrec": full, "click_only: click_only (w/o sid, mlse, mtl)": base}
    checked = 0
    for key, value in cells:
        name, metric = key.rsplit("/", 1)
        if name in by_run:
            assert float(value) == by_run[name][metric], key
            checked += 1
    assert checked >= 2 * 6  # both rankers' rows in the stage-2 table and SAQRec's in the headroom table
    assert f'data-key="oracle by true_p_satisfied/true_sat@10" data-value="{full["true_sat@10_oracle_sat"]!r}"' in page
    with pytest.raises(SystemExit) as exc:  # an existing report is not replaced by accident
        main([str(stage1["root"]), "--out", str(out)])
    assert exc.value.code == 2 and "already exists; pass --overwrite" in capsys.readouterr().err

"""Exact evaluation metrics: leave-one-out ranks with ties, AUC/GAUC, XAUC, top-k truth, and the
accumulator gathering across two real gloo ranks."""
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from satrank.models.metrics.ranking import (MetricAccumulator, auc, auc_or_nan, click_metrics, gauc, headroom_share,
                                    loo_ranks, mae, metrics_from_ranks, oracle_topk_metrics, rank_metrics,
                                    standard_metrics, topk_true_mean, truth_topk_metrics, watch_time_metrics, xauc)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------- rank metrics
def test_rank_metrics_hand_example_counts_half_of_each_tie():
    scores = torch.tensor([
        [0.9, 0.1, 0.2, 0.3, 0.4],   # 0 higher, 0 ties          -> rank 1
        [0.5, 0.5, 0.7, 0.1, 0.5],   # 1 higher (0.7), 2 ties     -> rank 1 + 1 + 2/2 = 3
        [0.2, 0.2, 0.9, 0.8, 0.3],   # 3 higher, 1 tie            -> rank 1 + 3 + 1/2 = 4.5
    ])
    m = rank_metrics(scores, ks=(1, 3, 5), ndcg_ks=(3, 5))
    assert m["ranks"].tolist() == [1.0, 3.0, 4.5]
    assert m["hr@1"] == pytest.approx(1 / 3)            # only row 0
    assert m["hr@3"] == pytest.approx(2 / 3)            # rows 0, 1
    assert m["hr@5"] == pytest.approx(1.0)
    # ndcg@3: row0 1/log2(2) = 1, row1 1/log2(4) = 0.5, row2 rank 4.5 > 3 -> 0; mean 0.5
    assert m["ndcg@3"] == pytest.approx(0.5)
    # ndcg@5 adds row2: 1/log2(5.5) = 1/2.4594316 = 0.4065980
    assert m["ndcg@5"] == pytest.approx((1 + 0.5 + 0.4065980) / 3, abs=1e-7)
    # mrr: (1 + 1/3 + 1/4.5) / 3 = (9/9 + 3/9 + 2/9) / 3 = 14/27
    assert m["mrr"] == pytest.approx(14 / 27)


def test_rank_metrics_default_keys_are_the_papers_six_plus_ranks():
    m = rank_metrics(torch.rand(4, 100))
    assert set(m) == {"hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr", "ranks"}


def test_constant_model_gets_the_middle_rank_never_the_first():
    m = rank_metrics(torch.zeros(2, 100))                # 99 tied negatives
    assert m["ranks"].tolist() == [50.5, 50.5]
    assert m["hr@1"] == 0.0 and m["hr@10"] == 0.0 and m["ndcg@10"] == 0.0
    assert m["mrr"] == pytest.approx(1 / 50.5)
    assert loo_ranks(torch.zeros(1, 100), ties="worst").tolist() == [100.0]


def test_metrics_from_accumulated_ranks_equal_whole_split_metrics():
    s = torch.rand(50, 100, generator=torch.Generator().manual_seed(0))
    parts = torch.cat([rank_metrics(s[:20])["ranks"], rank_metrics(s[20:])["ranks"]])
    whole = rank_metrics(s)
    assert metrics_from_ranks(parts) == {k: v for k, v in whole.items() if k != "ranks"}


def test_rank_metrics_rejects_nan_and_bad_shapes():
    with pytest.raises(ValueError, match="scores: 1 non-finite"):
        rank_metrics(torch.tensor([[0.1, float("nan")]]))
    with pytest.raises(ValueError, match="scores: expected"):
        rank_metrics(torch.rand(5))
    with pytest.raises(ValueError, match="ties"):
        loo_ranks(torch.rand(2, 3), ties="best")


# -------------------------------------------------------------------------------- AUC / GAUC
def test_auc_counts_tied_pairs_half():
    # positives {0.5, 0.9} vs negatives {0.5, 0.2}: 0.5 + 1 + 1 + 1 = 3.5 of 4 pairs
    assert auc(torch.tensor([0.5, 0.5, 0.2, 0.9]), torch.tensor([1, 0, 0, 1])) == pytest.approx(0.875)


def test_auc_keeps_large_logits_apart():
    # torchmetrics would sigmoid these in float32 (30 and 20 both -> 1.0, AUC 0.75); order says 1.0
    assert auc(torch.tensor([30.0, 20.0, -5.0]), torch.tensor([1, 0, 0])) == 1.0


def test_auc_needs_both_classes_where_auc_or_nan_gives_nan():
    with pytest.raises(ValueError, match="both classes"):
        auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]))
    assert math.isnan(auc_or_nan(torch.tensor([0.1, 0.2]), torch.tensor([1, 1])))
    assert math.isnan(auc_or_nan(torch.tensor([]), torch.tensor([])))
    assert auc_or_nan(torch.tensor([0.5, 0.5, 0.9]), torch.tensor([1, 0, 1])) == 0.75  # tie counts 1/2
    with pytest.raises(ValueError, match="labels must be 0/1"):
        auc_or_nan(torch.tensor([0.1, 0.2]), torch.tensor([0.3, 1.0]))


def test_gauc_weights_groups_by_size_and_skips_single_class_groups():
    # group 7: pos 0.9 above both negatives                           -> AUC 1,     3 rows
    # group 8: pos {0.2, 0.6} vs neg {0.6, 0.1}: 0 + 1 + 0.5 + 1 = 2.5/4 -> AUC 0.625, 4 rows
    # group 9: positives only                                          -> skipped
    # gauc = (3 * 1 + 4 * 0.625) / 7 = 5.5 / 7
    rows = [(7, 0.9, 1), (8, 0.2, 1), (9, 0.4, 1), (7, 0.3, 0), (8, 0.6, 1),
            (8, 0.6, 0), (7, 0.5, 0), (9, 0.7, 1), (8, 0.1, 0)]
    g, p, y = (torch.tensor(c) for c in zip(*rows))
    r = gauc(p, y, g)
    assert r.gauc == pytest.approx(5.5 / 7)
    assert (r.groups_used, r.groups_skipped) == (2, 1)
    m = click_metrics(p, y, g)
    assert m["click_gauc"] == pytest.approx(5.5 / 7) and m["click_gauc_skipped"] == 1
    assert m["click_auc"] == pytest.approx(auc(p, y))


def test_gauc_matches_per_group_torchmetrics_on_random_data():
    rng = np.random.default_rng(3)
    p, y, g = rng.integers(0, 6, 400) / 6, rng.integers(0, 2, 400), rng.integers(0, 12, 400)
    num = den = 0.0
    for k in np.unique(g):
        m = g == k
        if 0 < y[m].sum() < m.sum():
            num += auc(p[m], y[m]) * m.sum()
            den += m.sum()
    assert gauc(p, y, g).gauc == pytest.approx(num / den, abs=1e-6)


def test_gauc_errors_when_no_group_has_both_classes():
    with pytest.raises(ValueError, match="none of the 2 group"):
        gauc(torch.tensor([0.1, 0.2]), torch.tensor([1, 0]), torch.tensor([1, 2]))


# --------------------------------------------------------------------------------- XAUC / MAE
def _xauc_brute(p, t):
    hi = t[:, None] > t[None, :]
    win = (p[:, None] > p[None, :]) + 0.5 * (p[:, None] == p[None, :])
    return float((win * hi).sum() / hi.sum())


def test_xauc_hand_example():
    # pairs with target_i > target_j: (30 vs 10): 3>1, (30 vs 20): 3>2, (30 vs 10'): 3>2,
    # (20 vs 10): 2>1, (20 vs 10'): 2=2 -> 1/2; the two 10s are excluded. 4.5 / 5
    assert xauc(torch.tensor([1.0, 3.0, 2.0, 2.0]), torch.tensor([10.0, 30.0, 20.0, 10.0])) == pytest.approx(0.9)


def test_xauc_equals_brute_force_on_random_data_with_ties():
    rng = np.random.default_rng(0)
    for n in (2, 3, 17, 300):
        p = np.round(rng.random(n), 1)               # many tied predictions
        t = rng.integers(0, 6, n).astype(float)      # many tied targets
        t[0], t[-1] = 0.0, 5.0                       # at least two distinct targets
        assert xauc(p, t) == pytest.approx(_xauc_brute(p, t), abs=1e-12)


def test_xauc_is_subquadratic():
    rng = np.random.default_rng(1)
    n = 300_000                                      # 4.5e10 pairs: brute force would take minutes
    t = rng.exponential(size=n)
    start = time.perf_counter()
    v = xauc(t + rng.normal(size=n), t)
    assert time.perf_counter() - start < 10 and 0.5 < v < 1


def test_xauc_needs_two_distinct_targets_and_mae_is_exact():
    with pytest.raises(ValueError, match="distinct target"):
        xauc(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 3.0]))
    assert mae(torch.tensor([1.0, 4.0]), torch.tensor([2.0, 2.0])) == pytest.approx(1.5)
    assert set(watch_time_metrics(torch.tensor([1.0, 4.0]), torch.tensor([2.0, 3.0]))) == \
        {"watch_time_xauc", "watch_time_mae"}


# ------------------------------------------------------------------------------ top-k truth
def test_topk_true_mean_hand_example_with_straddling_tie_and_short_request():
    rows = [  # (request, score, truth)
        (1, 0.9, 0.2), (1, 0.1, 0.9), (1, 0.5, 0.6), (1, 0.3, 0.4),   # top2 = 0.9, 0.5 -> (0.2 + 0.6)/2 = 0.4
        (2, 0.8, 0.5), (2, 0.4, 0.1), (2, 0.4, 0.7), (2, 0.1, 1.0),   # 0.8, then one slot in the 0.4 tie:
                                                                      # (0.5 + (0.1 + 0.7)/2) / 2 = 0.45
        (3, 0.2, 0.8),                                                # 1 item < k: uses it -> 0.8
    ]
    g, s, t = (torch.tensor(c) for c in zip(*rows))
    assert topk_true_mean(s, t, g, k=2) == pytest.approx((0.4 + 0.45 + 0.8) / 3)
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))
    assert topk_true_mean(s[perm], t[perm], g[perm], k=2) == pytest.approx((0.4 + 0.45 + 0.8) / 3)


def test_truth_topk_metrics_key_names():
    s, t, g = torch.rand(30), torch.rand(30), torch.arange(30) // 15
    m = truth_topk_metrics(s, {"true_p_satisfied": t, "true_p_click": 1 - t}, g)
    assert set(m) == {"true_sat@10", "true_click@10"}
    with pytest.raises(ValueError, match="unknown column 'p_sat'"):
        truth_topk_metrics(s, {"p_sat": t}, g)


# 2 requests x 4 candidates; dyadic truths, so every figure below is exact in float32 and float64
ORACLE_ROWS = [  # (request, true_p_satisfied, true_p_click, model score)
    (0, 0.875, 0.125, 0.2), (0, 0.75, 0.25, 0.9), (0, 0.25, 0.875, 0.8), (0, 0.375, 0.625, 0.1),
    (1, 0.5, 0.75, 0.3), (1, 0.5, 0.25, 0.4), (1, 0.625, 0.375, 0.5), (1, 0.125, 0.875, 0.6),
]


def _oracle_batch(rows):
    from types import SimpleNamespace
    g, sat, click, score = zip(*rows)
    batch = SimpleNamespace(ids={"request_id": torch.tensor(g)},
                            truth={"true_p_satisfied": torch.tensor(sat, dtype=torch.float32),
                                   "true_p_click": torch.tensor(click, dtype=torch.float32)})
    return batch, {"click": torch.tensor(score, dtype=torch.float64)}


def test_candidate_metrics_report_both_oracles_and_the_headroom_share_exactly():
    from satrank.models.metrics.ranker_eval import CandidateMetrics, EvaluationConfig

    acc = CandidateMetrics(EvaluationConfig(k=2, rank_score="click"))
    batch, out = _oracle_batch(ORACLE_ROWS[:3])  # two batches: the metric sees gathered columns
    acc.update(batch, out)
    batch, out = _oracle_batch(ORACLE_ROWS[3:])
    acc.update(batch, out)
    m = acc.compute()
    # model top-2: request 0 {0.9, 0.8} -> sat (0.75 + 0.25)/2, click (0.25 + 0.875)/2; request 1 {0.6, 0.5}
    assert m["true_sat@2"] == (0.5 + 0.375) / 2 and m["true_click@2"] == (0.5625 + 0.625) / 2
    # satisfaction oracle: request 0 {0.875, 0.75}; request 1 0.625 then ONE place for the 0.5 tie of two
    # rows whose click truths are 0.75 and 0.25: the tie contributes its mean (0.5), whatever the row order
    assert m["true_sat@2_oracle_sat"] == (0.8125 + 0.5625) / 2
    assert m["true_click@2_oracle_sat"] == (0.1875 + (0.375 + 0.5) / 2) / 2
    # click oracle: request 0 {0.875, 0.625}, request 1 {0.875, 0.75}
    assert m["true_sat@2_oracle_click"] == (0.3125 + 0.3125) / 2
    assert m["true_click@2_oracle_click"] == (0.75 + 0.8125) / 2
    assert m["true_sat@2_headroom_share"] == pytest.approx((0.4375 - 0.3125) / (0.6875 - 0.3125), abs=1e-15)  # 1/3
    assert m["true_sat@2_oracle_sat"] >= m["true_sat@2"] and m["true_click@2_oracle_click"] >= m["true_click@2"]
    # the same figures whatever the row order
    perm = [7, 2, 4, 0, 5, 1, 6, 3]
    again = CandidateMetrics(EvaluationConfig(k=2, rank_score="click"))
    again.update(*_oracle_batch([ORACLE_ROWS[i] for i in perm]))
    assert again.compute() == m


def test_headroom_share_is_none_without_headroom_and_oracles_need_both_truths():
    g, sat, click, _ = (torch.tensor(c) for c in zip(*ORACLE_ROWS))
    m = oracle_topk_metrics({"true_p_satisfied": sat, "true_p_click": click}, g, k=4)  # whole requests
    assert m["true_sat@4_oracle_sat"] == m["true_sat@4_oracle_click"] == (0.5625 + 0.4375) / 2
    assert headroom_share(0.5, m["true_sat@4_oracle_click"], m["true_sat@4_oracle_sat"]) is None
    assert headroom_share(0.25, 0.0, 1.0) == 0.25 and headroom_share(-0.5, 0.0, 1.0) == -0.5
    with pytest.raises(ValueError, match="truth lacks \\['true_p_click'\\]"):
        oracle_topk_metrics({"true_p_satisfied": sat}, g, k=2)


# ------------------------------------------------------------------------------ accumulator
def test_accumulator_concatenates_batches_without_a_process_group():
    acc = MetricAccumulator()
    acc.update(a=torch.tensor([1, 2]), b=torch.zeros(2, 3))
    acc.update(a=torch.tensor([3]), b=torch.ones(1, 3))
    out = acc.compute()
    assert out["a"].tolist() == [1, 2, 3] and out["b"].shape == (3, 3)
    with pytest.raises(ValueError, match="'b' row shape"):
        acc.update(b=torch.zeros(1, 4))


def test_accumulator_gathers_identical_figures_on_two_gloo_ranks(tmp_path):
    from _metrics_dist import rank_batches
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "_metrics_dist.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == 2 and r0 == {**r1, "local_rows": r0["local_rows"]}
    # reference: one process over rank 0's batches then rank 1's
    ref = MetricAccumulator()
    for rank in (0, 1):
        for b in rank_batches(rank):
            ref.update(**b)
    want = ref.compute()
    assert r0["local_rows"] + r1["local_rows"] == len(want["row"])
    assert r0["tensors"]["row"] == want["row"].tolist()              # every row exactly once, in rank order
    assert len(set(r0["tensors"]["row"])) == len(want["row"])
    expect = standard_metrics(want)
    assert set(expect) >= {"hr@1", "mrr", "click_auc", "click_gauc", "watch_time_xauc", "true_sat@10"}
    assert r0["metrics"] == pytest.approx(expect)


def test_the_tradeoff_curve_runs_from_the_click_ranking_to_the_satisfaction_ranking():
    from satrank.models.metrics.ranker_eval import CandidateMetrics, EvaluationConfig

    batch, out = _oracle_batch(ORACLE_ROWS)
    sat_p = batch.truth["true_p_satisfied"].double().clamp(1e-6, 1 - 1e-6)
    out = {**out, "satisfaction": torch.log(sat_p / (1 - sat_p))}  # a satisfaction tower that knows the truth
    acc = CandidateMetrics(EvaluationConfig(k=2, rank_score="fusion", fusion_sat_weight=1.0,
                                            tradeoff_sat_weights=[0.0, 1.0, 1000.0]))
    acc.update(batch, out)
    m = acc.compute()
    at = {p["w_sat"]: p for p in m["tradeoff"]}
    assert at[0.0]["true_sat@2"] == m["true_sat@2_by_click"] and at[0.0]["true_click@2"] == m["true_click@2_by_click"]
    assert at[1.0]["true_sat@2"] == m["true_sat@2"] and at[1.0]["true_click@2"] == m["true_click@2"]  # the configured w
    assert at[1000.0]["true_sat@2"] == pytest.approx(m["true_sat@2_oracle_sat"])  # ranks by the truth itself
    assert at[0.0]["true_sat@2"] < at[1000.0]["true_sat@2"]
    click_only = CandidateMetrics(EvaluationConfig(k=2, rank_score="click"))
    click_only.update(*_oracle_batch(ORACLE_ROWS))
    assert click_only.compute()["tradeoff"] is None  # no satisfaction tower: no curve


def test_a_split_where_every_row_is_clicked_declares_click_metrics_undefined_and_selects_on_satisfaction():
    """A rating set's missing-at-random validation: every row clicked and answered. The ranker's click AUC and
    GAUC are undefined there (GAUC used to raise and stop jobs.train); selection falls back to sat_auc_answered."""
    from satrank.jobs.engine.selection import choose
    from satrank.models.metrics.ranker_eval import RankerEvaluator
    from satrank.models.ranker.config import MultiTaskLossConfig

    n = 40
    g = torch.Generator().manual_seed(0)
    t = {"click_pred": torch.randn(n, generator=g, dtype=torch.float64), "click": torch.ones(n, dtype=torch.float64),
         "user": torch.arange(n) // 4, "answered": torch.ones(n), "satisfied": (torch.arange(n) % 3 == 0).double(),
         "sat_pred": torch.rand(n, generator=g, dtype=torch.float64)}
    ev = RankerEvaluator(MultiTaskLossConfig())
    m = {**ev.metrics(t, {}), "loss": 0.4}
    assert m["click_auc"] is None and m["click_gauc"] is None and m["click_gauc_skipped"] == 10
    assert m["undefined"] == {"click_auc": "click has one class on the 40 rows (all 1)",
                              "click_gauc": "click has one class on the 40 rows (all 1)"}
    sel = choose("click_auc", "max", m, ev.fallbacks)
    assert (sel.metric, sel.mode) == ("sat_auc_answered", "max") and "click has one class" in sel.reason
    t["click"] = (torch.arange(n) % 2 == 0).double()  # both classes: the monitor itself
    both = {**ev.metrics(t, {}), "loss": 0.4}
    assert both["undefined"] == {} and choose("click_auc", "max", both, ev.fallbacks).reason is None

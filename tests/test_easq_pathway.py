"""Issue 5 on the simulated world W2: with the questionnaire answers made ten times sparser, EASQ's isolated
satisfaction pathway beats a plain auxiliary satisfaction tower on shared parameters; and with every answer, DPO at the
default weight raises the true satisfaction of the top 10 over its DPO-off control at a bounded click-AUC cost.

Regime (bench/easq_isolation.py, one seed of it; docs/easq.md, "Isolated vs shared"): world W2 (300 users, 60 items,
40,000 impressions, fixed seed, common questionnaires so that a thinned item still has a few answers), a stage-2
ranker trained on it (satrank.jobs.train, 2 epochs, MLSE/MTL off), then the training split's answers thinned to 10 %
(`sparsify`, seed 0) and streamed four times by satrank.jobs.dpo, once per arm, with DPO off: the arms differ only in where
L_sat's gradient goes. Both arms at the default optimizer settings (the backbone's Adam and the pathway's at 1e-3):
  * isolated: LoRA + satisfaction head behind stop-gradients, in their own parameter group;
  * plain: `easq.pathway: shared`, the same head (same initial weights) on the ranker's features with their graph,
    so L_sat also trains the backbone and the tables; its Adam has the backbone's settings, i.e. one optimizer.
The satisfaction head is scored on every row of DIR/valid and DIR/test against a label drawn from the simulator's
true satisfaction probability (the answered rows alone are ~400 a split and biased towards watched items).

Measured over 5 seeds (docs/easq.md): isolated ahead in 5 of 5 on both splits, by +0.013 / +0.015 on average
(+0.021 / +0.023 at seed 0, the seed run here). The test asserts that order at seed 0 with a margin of 0.01 on the
mean of the two splits. What wins is the pathway's LoRA branch (the head alone behind the stop-gradient is 0.006
behind the plain tower); where the order does not hold (the per-id-starved world W1, a shared head given its own
faster optimizer) is documented there too.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

from bench.easq_isolation import KEEP, PASSES, build_world, head_aucs, run_arms, sparsify  # noqa: E402

SEED = 0


@pytest.fixture(scope="module")
def w2(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("pathway")
    return {"base": base, **build_world(base)}


@pytest.fixture(scope="module")
def comparison(w2) -> dict:
    base = w2["base"]
    counts = sparsify(w2["world"], base / "thinned", KEEP, seed=SEED, passes=PASSES)
    runs = run_arms(base / "thinned", w2["main"], base / "runs", SEED, ["isolated", "plain"])
    return {"counts": counts, **runs}


@pytest.fixture(scope="module")
def dpo_runs(w2) -> dict:
    """Every answer kept, the stream passed four times: the satisfaction head clears the ramp's gate (0.6) by itself;
    DPO at the default weight against its DPO-off control (the same run otherwise)."""
    base = w2["base"]
    sparsify(w2["world"], base / "full", 1.0, seed=SEED, passes=PASSES)
    return run_arms(base / "full", w2["main"], base / "dpo_runs", SEED, ["isolated_fast", "isolated_fast_dpo"])


def test_arms_are_compared_like_for_like_on_ten_times_sparser_answers(comparison):
    iso, plain, counts = comparison["isolated"], comparison["plain"], comparison["counts"]
    assert 0.07 * counts["answered"] < counts["kept"] < 0.13 * counts["answered"]  # ten times sparser
    assert iso["pathway"] == "isolated" and plain["pathway"] == "shared"
    # the same stream, steps and start (the satisfaction head's initial weights included)
    assert iso["steps"] == plain["steps"] and iso["rows"] == plain["rows"] == PASSES * counts["train_rows"]
    assert iso["prequential_answered_rows"] == plain["prequential_answered_rows"] == PASSES * counts["kept"]
    assert iso["before"]["sat_head"] == plain["before"]["sat_head"]
    assert iso["before"]["click_auc"] == plain["before"]["click_auc"]
    assert iso["propensity"] is None and plain["propensity"] is None  # rho = 1 in both
    for m in (iso, plain):
        assert m["after"]["sat_head"]["valid"]["rows_all"] == m["before"]["sat_head"]["valid"]["rows_all"] > 1000


def test_isolated_pathway_beats_a_plain_auxiliary_tower_on_sparse_answers(comparison):
    iso, plain = head_aucs(comparison["isolated"]), head_aucs(comparison["plain"])
    print("isolated", iso, "\nplain   ", plain)
    fresh = comparison["isolated"]["before"]["sat_head"]
    for split in ("valid", "test"):  # both heads learned something from ~350 kept answers
        assert min(iso[f"all_{split}"], plain[f"all_{split}"]) > fresh[split]["auc_true_all"] + 0.03
        assert iso[f"all_{split}"] > plain[f"all_{split}"], split
    gain = (iso["all_valid"] - plain["all_valid"] + iso["all_test"] - plain["all_test"]) / 2
    assert gain > 0.01, gain  # measured +0.022 at this seed, +0.008 to +0.022 over five seeds


def test_dpo_raises_true_satisfaction_of_the_top_10_against_its_control_at_a_bounded_click_cost(dpo_runs):
    off, on = dpo_runs["isolated_fast"], dpo_runs["isolated_fast_dpo"]
    for k in ("true_sat@10", "click_auc", "sat_head"):  # the same start (`before` also holds timings)
        assert on["before"][k] == off["before"][k], k
    assert on["steps"] == off["steps"]
    assert off["dpo_ramp"] > 0 and on["dpo_ramp"] == 1.0  # the gate opened by itself (prequential AUC >= 0.6)
    gain = on["after"]["true_sat@10"] - off["after"]["true_sat@10"]
    cost = off["after"]["click_auc"] - on["after"]["click_auc"]
    print(f"true_sat@10 {on['before']['true_sat@10']:.4f} -> off {off['after']['true_sat@10']:.4f}, "
          f"DPO {on['after']['true_sat@10']:.4f}; click AUC {on['before']['click_auc']:.4f} -> off "
          f"{off['after']['click_auc']:.4f}, DPO {on['after']['click_auc']:.4f}")
    assert on["after"]["true_sat@10"] > on["before"]["true_sat@10"]
    # measured at seeds 0-4: gain +0.0046, +0.0096, +0.0061, +0.0064, +0.0051; cost 0.0027, 0.0003, 0.0007, 0.0006,
    # 0.0001 (docs/easq.md, "What DPO buys"); a DPO that did nothing would give exactly 0 (the runs are deterministic)
    assert gain > 0.002, gain
    assert cost < 0.005, cost

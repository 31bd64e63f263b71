"""Metrics (models/metrics/calibration.py): exact AUC (with ties), log loss, ECE and reliability tables on hand
examples, and the streaming collector gathering every row exactly once across 2 gloo ranks."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from satrank.models.metrics.calibration import (
    StreamingCollector,
    auc,
    binary_metrics,
    expected_calibration_error,
    log_loss,
    reliability_table,
    satisfaction_metrics,
)
from satrank.models.stage1.losses import ideal_loss

ROOT = Path(__file__).resolve().parent.parent


def test_auc_matches_pair_count_with_ties_half():
    # positives {0.35, 0.4}, negatives {0.1, 0.4}: pairs won 1 + 1, tie 0.5 -> 2.5 / 4
    preds = torch.tensor([0.1, 0.4, 0.35, 0.4])
    labels = torch.tensor([0, 0, 1, 1])
    assert auc(preds, labels) == pytest.approx(0.625)
    assert auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), labels) == pytest.approx(0.75)


def test_auc_single_class_is_nan_and_logits_rank_like_their_probabilities():
    assert math.isnan(auc(torch.tensor([0.2, 0.3]), torch.tensor([1, 1])))
    logits, labels = torch.tensor([-2.0, 3.0, 0.5, 0.5, 40.0]), torch.tensor([0, 1, 0, 1, 1])
    assert auc(logits, labels) == auc(torch.sigmoid(logits.double()), labels) == pytest.approx(11 / 12)  # 5 wins + 1 tie of 6


def test_log_loss_exact_and_accepts_soft_labels():
    p = torch.tensor([0.8, 0.25])
    assert log_loss(p, torch.tensor([1.0, 0.0])) == pytest.approx(-(math.log(0.8) + math.log(0.75)) / 2, rel=1e-6)
    soft = log_loss(torch.tensor([0.5]), torch.tensor([0.3]))
    assert soft == pytest.approx(math.log(2), rel=1e-6)


def test_reliability_table_and_ece_on_hand_example():
    preds = torch.tensor([0.05, 0.15, 0.15, 0.55, 0.95], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 1], dtype=torch.float64)
    table = reliability_table(preds, labels, n_bins=10)
    assert [r["count"] for r in table] == [1, 2, 0, 0, 0, 1, 0, 0, 0, 1]
    assert table[1]["mean_pred"] == pytest.approx(0.15) and table[1]["observed_rate"] == pytest.approx(0.5)
    assert math.isnan(table[2]["mean_pred"])
    # (1*.05 + 2*.35 + 1*.45 + 1*.05) / 5
    assert expected_calibration_error(preds, labels, n_bins=10) == pytest.approx(0.25)
    # 2 bins: [0,.5): preds .05,.15,.15 rate 1/3; [.5,1]: .55,.95 rate 1 -> (3*|.11667-.3333| + 2*|.75-1|)/5
    assert expected_calibration_error(preds, labels, n_bins=2) == pytest.approx((3 * (1 / 3 - 0.35 / 3) + 2 * 0.25) / 5)


def test_prediction_of_exactly_one_lands_in_last_bin_and_perfect_calibration_is_zero():
    table = reliability_table(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]), n_bins=4)
    assert table[3]["count"] == 1 and table[0]["count"] == 1
    assert expected_calibration_error(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]), 4) == 0.0
    m = binary_metrics(torch.tensor([0.2, 0.8]), torch.tensor([0, 1]), prefix="sat_")
    assert m["sat_auc"] == 1.0 and m["sat_n"] == 2


def test_satisfaction_metrics_split_answered_rows_from_truth_over_all_rows():
    prob = torch.tensor([0.8, 0.25, 0.5, 0.6], dtype=torch.float64)
    sat = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    ans = torch.tensor([1, 1, 0, 0])
    truth = torch.tensor([0.7, 0.2, 0.5, 0.9], dtype=torch.float64)
    m = satisfaction_metrics(prob, sat, ans, truth, n_bins=10)
    assert m["answered_n"] == 2 and m["answered_auc"] == 1.0 and m["n_all"] == 4
    assert m["answered_logloss"] == pytest.approx(-(math.log(0.8) + math.log(0.75)) / 2, rel=1e-9)
    # ideal_loss_all is eq. 2 on all rows: the training-side ideal_loss on logits gives the same number
    assert m["ideal_loss_all"] == pytest.approx(ideal_loss(torch.logit(prob), truth).item(), rel=1e-9)
    # every row in its own bin: ECE vs truth = mean |s_hat - p| = (.1 + .05 + 0 + .3) / 4
    assert m["ece_truth_all"] == pytest.approx(0.1125)


def test_collector_concatenates_batches_and_checks_columns():
    c = StreamingCollector()
    c.update(pred=torch.tensor([0.1, 0.2]), label=torch.tensor([0, 1]), uid=torch.tensor([2**60, 3]))
    c.update(pred=torch.tensor([0.3]), label=torch.tensor([1]), uid=torch.tensor([5]))
    out = c.gather()
    assert out["pred"].tolist() == pytest.approx([0.1, 0.2, 0.3]) and out["uid"][0].item() == 2**60
    with pytest.raises(ValueError, match="differ"):
        c.update(pred=torch.tensor([0.3]), label=torch.tensor([1]))
    with pytest.raises(ValueError, match="equal length"):
        c.update(pred=torch.tensor([0.3]), label=torch.tensor([1, 0]), uid=torch.tensor([1]))


def _worker() -> None:  # run under torchrun: each rank collects its own rows, gather returns all exactly once
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    c = StreamingCollector()
    n_batches = 3 if rank == 0 else 1  # uneven ranks
    for b in range(n_batches):
        ids = torch.arange(b * 4, b * 4 + 4) + 1000 * rank
        c.update(pred=torch.full((4,), 0.1 * (rank + 1)), label=(ids % 2).float(), row_id=ids)
    out = c.gather()
    expect = sorted(list(range(12)) + [1000, 1001, 1002, 1003])
    assert sorted(out["row_id"].tolist()) == expect, out["row_id"]
    assert out["row_id"][:12].tolist() == list(range(12))  # rank 0 first
    assert out["pred"].shape == (16,)
    dist.barrier()
    dist.destroy_process_group()


def test_collector_gathers_every_row_exactly_once_across_two_gloo_ranks(tmp_path):
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


if __name__ == "__main__":
    _worker()

"""Evaluation metrics for stage-1 models: AUC, log loss, expected calibration error and reliability tables,
plus `StreamingCollector`, which gathers (pred, label, extras) over batches and across ranks.

Why: the satisfaction model is a reward model whose *probabilities* are consumed downstream
(SAQRec sec. 4.3-4.4 uses s_hat as features and pseudo-labels), so calibration matters as much as
ranking. All functions take 1-D tensors of probabilities in [0, 1] (not logits; `auc` takes any score);
labels may be hard 0/1 or soft (e.g. the simulator's true_p_satisfied) for log loss and ECE. Metrics are computed on
the full concatenated predictions (gathered across ranks), never averaged per rank.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from satrank.models.metrics.ranking import auc_or_nan


def _check(name: str, preds: torch.Tensor, labels: torch.Tensor) -> None:
    if preds.dim() != 1 or preds.shape != labels.shape:
        raise ValueError(
            f"{name}: preds and labels must be 1-D of equal length, got {tuple(preds.shape)} and {tuple(labels.shape)}"
        )
    if preds.numel() and (not bool(torch.isfinite(preds).all()) or preds.min() < 0 or preds.max() > 1):
        raise ValueError(f"{name}: preds must be finite probabilities in [0, 1] (pass sigmoid(logits), not logits)")


def auc(preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Exact ROC AUC of any score (ties count 1/2), `satrank.models.metrics.ranking.auc_or_nan`: NaN when only one class
    is present."""
    if preds.dim() != 1 or preds.shape != labels.shape:
        raise ValueError(f"auc: preds and labels must be 1-D of equal length, got {tuple(preds.shape)} and "
                         f"{tuple(labels.shape)}")
    return auc_or_nan(preds, labels)


def log_loss(preds: torch.Tensor, labels: torch.Tensor, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities (clamped to [eps, 1-eps]); labels may be soft."""
    _check("log_loss", preds, labels)
    if preds.numel() == 0:
        return float("nan")
    p = preds.detach().double().clamp(eps, 1 - eps)
    y = labels.detach().double()
    return float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())


def _bin_index(preds: torch.Tensor, n_bins: int) -> torch.Tensor:
    if n_bins <= 0:
        raise ValueError(f"n_bins must be > 0, got {n_bins}")
    # Equal-width bins [k/n, (k+1)/n), the last one closed at 1.0.
    return (preds.detach().double() * n_bins).floor().long().clamp_(0, n_bins - 1)


def reliability_table(preds: torch.Tensor, labels: torch.Tensor, n_bins: int = 10) -> List[Dict[str, float]]:
    """Per equal-width bin: lo, hi, count, mean_pred, observed_rate (NaN for empty bins)."""
    _check("reliability_table", preds, labels)
    idx = _bin_index(preds, n_bins)
    p = preds.detach().double().cpu()
    y = labels.detach().double().cpu()
    idx = idx.cpu()
    count = torch.bincount(idx, minlength=n_bins).double()
    sum_p = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, p)
    sum_y = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, y)
    rows = []
    for k in range(n_bins):
        c = float(count[k])
        rows.append(
            {
                "lo": k / n_bins,
                "hi": (k + 1) / n_bins,
                "count": c,
                "mean_pred": float(sum_p[k] / c) if c else math.nan,
                "observed_rate": float(sum_y[k] / c) if c else math.nan,
            }
        )
    return rows


def expected_calibration_error(preds: torch.Tensor, labels: torch.Tensor, n_bins: int = 10) -> float:
    """ECE = sum_b (n_b / N) |mean_pred_b - observed_rate_b| over equal-width bins (empty bins skipped)."""
    table = reliability_table(preds, labels, n_bins)
    n = sum(r["count"] for r in table)
    if n == 0:
        return float("nan")
    return float(sum(r["count"] / n * abs(r["mean_pred"] - r["observed_rate"]) for r in table if r["count"]))


def binary_metrics(preds: torch.Tensor, labels: torch.Tensor, n_bins: int = 10, prefix: str = "") -> Dict[str, float]:
    """{prefix}auc, logloss, ece, n, mean_pred, mean_label in one dict."""
    return {
        f"{prefix}auc": auc(preds, labels),
        f"{prefix}logloss": log_loss(preds, labels),
        f"{prefix}ece": expected_calibration_error(preds, labels, n_bins),
        f"{prefix}n": float(preds.numel()),
        f"{prefix}mean_pred": float(preds.double().mean()) if preds.numel() else math.nan,
        f"{prefix}mean_label": float(labels.double().mean()) if labels.numel() else math.nan,
    }


def satisfaction_metrics(
    sat_prob: torch.Tensor,
    satisfied: torch.Tensor,
    answered: torch.Tensor,
    true_p: Optional[torch.Tensor] = None,
    n_bins: int = 10,
) -> Dict[str, float]:
    """Evaluation of a satisfaction model g (SAQRec sec. 4.2) on gathered predictions.

    On answered rows (the only observed labels; biased sample): answered_{auc,logloss,ece,n,...}.
    With the simulator's truth p = true_p_satisfied over ALL rows:
      ideal_loss_all = -mean_D [p log s_hat + (1-p) log(1-s_hat)]  (eq. 2; s_hat clamped to [1e-7, 1-1e-7]),
      ece_truth_all  = ECE of s_hat against p (soft labels), mean_pred_all, mean_true_all.
    """
    o = answered > 0.5
    out = binary_metrics(sat_prob[o], satisfied[o], n_bins, prefix="answered_")
    out["n_all"] = float(sat_prob.numel())
    out["mean_pred_all"] = float(sat_prob.double().mean()) if sat_prob.numel() else math.nan
    if true_p is not None:
        out["ideal_loss_all"] = log_loss(sat_prob, true_p)
        out["ece_truth_all"] = expected_calibration_error(sat_prob, true_p, n_bins)
        out["mean_true_all"] = float(true_p.double().mean()) if true_p.numel() else math.nan
    return out


class StreamingCollector:
    """Collects named 1-D columns batch by batch (detached, moved to CPU) and gathers them across ranks.

    update(pred=..., label=..., any_extra=...) must be called with the same column names every time
    and on every rank. `gather()` returns the concatenation over batches and ranks (rank 0's rows
    first, then rank 1's, ...) on every rank; with no process group (or world size 1) it is local.
    Uses all_gather_object, so it works for gloo and NCCL (NCCL needs torch.cuda.set_device done,
    as any NCCL job does) and for any dtype (int64 ids survive exactly).
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None) -> None:
        self.group = group
        self._cols: Dict[str, List[torch.Tensor]] = {}
        self._names: Optional[List[str]] = None

    def update(self, **columns: torch.Tensor) -> None:
        names = sorted(columns)
        if self._names is None:
            self._names = names
            self._cols = {k: [] for k in names}
        elif names != self._names:
            raise ValueError(f"StreamingCollector.update: columns {names} differ from the first batch's {self._names}")
        lens = {k: int(v.shape[0]) if v.dim() else -1 for k, v in columns.items()}
        if len(set(lens.values())) != 1 or any(v.dim() != 1 for v in columns.values()):
            raise ValueError(f"StreamingCollector.update: columns must be 1-D of equal length, got lengths {lens}")
        for k, v in columns.items():
            self._cols[k].append(v.detach().cpu())

    def local(self) -> Dict[str, torch.Tensor]:
        return {k: torch.cat(v) if v else torch.empty(0) for k, v in self._cols.items()}

    def gather(self) -> Dict[str, torch.Tensor]:
        mine = self.local()
        if not (dist.is_available() and dist.is_initialized()):
            return mine
        world = dist.get_world_size(self.group)
        if world == 1:
            return mine
        payload = {"names": self._names, "cols": mine}
        everyone: List[Optional[dict]] = [None] * world
        dist.all_gather_object(everyone, payload, group=self.group)
        names = [p["names"] for p in everyone if p["names"] is not None]
        if any(n != names[0] for n in names):
            raise ValueError(f"StreamingCollector.gather: ranks collected different columns: {names}")
        if not names:
            return {}
        return {k: torch.cat([p["cols"][k] for p in everyone if p["names"] is not None]) for k in names[0]}

    def reset(self) -> None:
        self._cols = {}
        self._names = None

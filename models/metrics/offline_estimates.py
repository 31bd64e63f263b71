"""Offline estimates of satisfaction from self-selected answers, with bootstrap 95% confidence intervals.

Why: real logs have no `true_*` columns, and metrics on answered rows describe a self-selected sample (users
answer when they watch long, when they are active, ...). SAQRec's argument for the IPS loss (eq. 6; Theorem
4.1: with the answer propensity rho it is unbiased for the loss on all impressions, eq. 2) gives estimates a
user can read instead. For each quantity this module returns the naive answered-only figure beside its
IPS, SNIPS and DR estimates, each as {"value", "lo", "hi"} (percentile bootstrap, 95%):

(a) the satisfaction model's loss on all impressions (eq. 2), q = its prediction, l_i = BCE(s_i, q_i):
    naive  sum(o l) / sum(o)
    ips    sum(o l / rho) / N                                   (eq. 6 at the evaluation split)
    snips  sum(o l / rho) / sum(o / rho)                         (self-normalised: lower variance, small bias)
    dr     (1/N) sum(lhat + o (l - lhat) / rho)                  lhat_i = BCE(m_i, q_i), m = an imputed
           satisfaction (default the model's own q, so lhat is q's entropy): unbiased if rho OR m is right.
(a') its AUC on all impressions: naive = AUC on answered rows; snips = the 1/rho-weighted AUC on answered rows
    (pairs weighted 1/(rho_i rho_j): a ratio estimator, so IPS and SNIPS coincide; no DR form).
(b) the mean true satisfaction of a ranker's top K among the logged impressions of each request
    (mean over requests of the mean over its top K):
    naive  the answered rows' satisfied rate inside the top K sets
    ips    (1/R) sum_r (1/|T_r|) sum_{T_r} o s / rho
    snips  the same with the weights' sum in place of the counts
    dr     (1/R) sum_r (1/|T_r|) sum_{T_r} (m + o (s - m) / rho), m = g's satisfaction estimate.

rho is clipped below at `clip` (satisfaction.estimate_clip, default 1e-5: not the training loss's M) so one
tiny propensity cannot own an estimate. The bootstrap resamples requests (rows of one request together) when request ids are given,
else rows. `truth_*` functions give the same quantities from simulator truth p = true_p_satisfied, the
target the estimates are checked against (docs/stage1.md, tests/test_offline_estimates.py).
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np

EPS = 1e-7  # the clamp of calibration.log_loss, so the loss estimates and ideal_loss_all agree
LEVEL = 0.95


def _bce(label: np.ndarray, q: np.ndarray) -> np.ndarray:
    q = np.clip(q, EPS, 1 - EPS)
    return -(label * np.log(q) + (1 - label) * np.log(1 - q))


def _interval(point: float, boot: np.ndarray) -> Dict[str, float]:
    boot = boot[np.isfinite(boot)]
    if not np.isfinite(point) or boot.size == 0:
        return {"value": float(point), "lo": float("nan"), "hi": float("nan")}
    lo, hi = np.quantile(boot, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return {"value": float(point), "lo": float(lo), "hi": float(hi)}


def _clusters(n: int, groups: Optional[np.ndarray]) -> np.ndarray:
    """Cluster index (0..C-1) of each row: its request, or the row itself."""
    if groups is None:
        return np.arange(n)
    return np.unique(np.asarray(groups), return_inverse=True)[1].reshape(-1)


def _boot_counts(n_clusters: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n_clusters] multiplicities of a bootstrap resample of the clusters."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_clusters, np.full(n_clusters, 1.0 / n_clusters), size=n_boot).astype(np.float64)


def _sums(counts: np.ndarray, cluster: np.ndarray, values: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Per-resample sums of each row value: [n_boot] each (the point estimate's sums are row sums)."""
    c = counts.shape[1]
    return {k: counts @ np.bincount(cluster, weights=v, minlength=c) for k, v in values.items()}


def weighted_auc(score: np.ndarray, pos_w: np.ndarray, neg_w: np.ndarray, exclude_self: bool = False) -> float:
    """sum over pairs (i, j) of pos_w[i] neg_w[j] [score_i > score_j] (ties 1/2) over the sum of pos_w[i] neg_w[j].

    With 0/1 labels times weights this is a weighted AUC; with pos_w = p, neg_w = 1 - p (soft labels, and
    `exclude_self` dropping i = j) it is the AUC expected when labels are drawn from p."""
    order = np.argsort(score, kind="stable")
    s, pw, nw = score[order], pos_w[order].astype(np.float64), neg_w[order].astype(np.float64)
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    tie_pos = np.add.reduceat(pw, starts)
    tie_neg = np.add.reduceat(nw, starts)
    below = np.cumsum(tie_neg) - tie_neg  # negative weight strictly below each tie group
    num = float(np.sum(tie_pos * (below + 0.5 * tie_neg)))
    den = float(pw.sum() * nw.sum())
    if exclude_self:
        self_pairs = pw * nw
        num, den = num - 0.5 * float(self_pairs.sum()), den - float(self_pairs.sum())
    return num / den if den > 0 else float("nan")


def loss_estimates(pred: np.ndarray, answered: np.ndarray, satisfied: np.ndarray, rho: np.ndarray, *,
                   clip: float, imputed: Optional[np.ndarray] = None, groups: Optional[np.ndarray] = None,
                   n_boot: int = 200, seed: int = 0) -> Dict[str, Dict[str, float]]:
    """(a): naive / ips / snips / dr estimates of the loss of `pred` on all rows (module docstring)."""
    q = np.asarray(pred, np.float64)
    o = np.asarray(answered, np.float64) > 0.5
    s = np.where(o, np.asarray(satisfied, np.float64), 0.0)
    w = np.where(o, 1.0 / np.maximum(np.asarray(rho, np.float64), clip), 0.0)
    m = q if imputed is None else np.asarray(imputed, np.float64)
    loss = np.where(o, _bce(s, q), 0.0)
    lhat = _bce(m, q)
    values = {"n": np.ones_like(q), "o": o.astype(np.float64), "ol": loss, "w": w, "wl": w * loss,
              "dr": lhat + w * (loss - lhat)}
    cluster = _clusters(len(q), groups)
    point = {k: np.array([v.sum()]) for k, v in values.items()}
    boot = _sums(_boot_counts(int(cluster.max()) + 1, n_boot, seed), cluster, values)

    def forms(t: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        with np.errstate(invalid="ignore", divide="ignore"):
            return {"naive": t["ol"] / t["o"], "ips": t["wl"] / t["n"], "snips": t["wl"] / t["w"],
                    "dr": t["dr"] / t["n"]}

    p, b = forms(point), forms(boot)
    out = {k: _interval(float(p[k][0]), b[k]) for k in p}
    out["answered_rows"] = int(o.sum())
    return out


def auc_estimates(pred: np.ndarray, answered: np.ndarray, satisfied: np.ndarray, rho: np.ndarray, *,
                  clip: float, groups: Optional[np.ndarray] = None, n_boot: int = 200,
                  seed: int = 0) -> Dict[str, Dict[str, float]]:
    """(a'): the answered rows' AUC (naive) and its 1/rho-weighted form (snips), bootstrapped like the loss."""
    o = np.asarray(answered, np.float64) > 0.5
    q = np.asarray(pred, np.float64)[o]
    s = np.asarray(satisfied, np.float64)[o]
    w = 1.0 / np.maximum(np.asarray(rho, np.float64)[o], clip)
    cluster = _clusters(int(o.sum()), None if groups is None else np.asarray(groups)[o])
    counts = _boot_counts(int(cluster.max()) + 1, n_boot, seed) if o.any() else np.zeros((0, 0))
    out = {}
    for name, wt in (("naive", np.ones_like(w)), ("snips", w)):
        point = weighted_auc(q, wt * s, wt * (1 - s)) if o.any() else float("nan")
        boot = np.array([weighted_auc(q, c[cluster] * wt * s, c[cluster] * wt * (1 - s)) for c in counts])
        out[name] = _interval(point, boot)
    return out


def top_k_sets(score: np.ndarray, requests: np.ndarray, k: int) -> np.ndarray:
    """Bool mask of each request's top `k` rows by `score` (ties: the earlier row first)."""
    order = np.lexsort((np.arange(len(score)), -np.asarray(score, np.float64), requests))
    req_sorted = np.asarray(requests)[order]
    starts = np.flatnonzero(np.r_[True, req_sorted[1:] != req_sorted[:-1]])
    position = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    mask = np.zeros(len(score), bool)
    mask[order[position < k]] = True
    return mask


def top_k_satisfaction_estimates(score: np.ndarray, requests: np.ndarray, answered: np.ndarray,
                                 satisfied: np.ndarray, rho: np.ndarray, imputed: np.ndarray, *, k: int,
                                 clip: float, n_boot: int = 200, seed: int = 0) -> Dict[str, Dict[str, float]]:
    """(b): naive / ips / snips / dr estimates of the mean satisfaction of each request's top `k` logged rows."""
    top = top_k_sets(score, requests, k)
    cluster = _clusters(len(score), requests)
    size = np.bincount(cluster, weights=top.astype(np.float64))  # |T_r|
    per = np.where(top, 1.0 / size[cluster], 0.0)  # each top row's share of its request's mean
    o = np.asarray(answered, np.float64) > 0.5
    s = np.where(o, np.asarray(satisfied, np.float64), 0.0)
    w = np.where(o, 1.0 / np.maximum(np.asarray(rho, np.float64), clip), 0.0)
    m = np.asarray(imputed, np.float64)
    one_per_request = np.zeros(len(score))
    one_per_request[np.unique(cluster, return_index=True)[1]] = 1.0  # sums to the request count R
    values = {"r": one_per_request, "to": top * o, "tos": top * o * s, "pw": per * w, "pws": per * w * s,
              "dr": per * (m + w * (s - m))}
    point = {kk: np.array([v.sum()]) for kk, v in values.items()}
    boot = _sums(_boot_counts(int(cluster.max()) + 1, n_boot, seed), cluster, values)

    def forms(t: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        with np.errstate(invalid="ignore", divide="ignore"):
            return {"naive": t["tos"] / t["to"], "ips": t["pws"] / t["r"],
                    "snips": t["pws"] / t["pw"], "dr": t["dr"] / t["r"]}

    p, b = forms(point), forms(boot)
    out = {kk: _interval(float(p[kk][0]), b[kk]) for kk in p}
    out["answered_rows_in_top_k"] = int((top & o).sum())
    return out


def truth_loss(pred: np.ndarray, true_p: np.ndarray) -> float:
    """Eq. 2 on every row with simulator truth: -mean(p log q + (1 - p) log(1 - q)) (= ideal_loss_all)."""
    return float(np.mean(_bce(np.asarray(true_p, np.float64), np.asarray(pred, np.float64))))


def truth_auc(pred: np.ndarray, true_p: np.ndarray) -> float:
    """The AUC on every row expected when satisfaction is drawn from p (pairs i != j)."""
    p = np.asarray(true_p, np.float64)
    return weighted_auc(np.asarray(pred, np.float64), p, 1 - p, exclude_self=True)


def truth_top_k_satisfaction(score: np.ndarray, requests: np.ndarray, true_p: np.ndarray, k: int) -> float:
    """Mean over requests of the mean true satisfaction probability of its top `k` rows."""
    top = top_k_sets(score, requests, k)
    cluster = _clusters(len(score), requests)
    size = np.bincount(cluster, weights=top.astype(np.float64))
    sat = np.bincount(cluster, weights=np.where(top, np.asarray(true_p, np.float64), 0.0))
    return float(np.mean(sat / size))


def satisfaction_estimates(pred: np.ndarray, answered: np.ndarray, satisfied: np.ndarray, rho: np.ndarray, *,
                           clip: float, groups: Optional[np.ndarray] = None, true_p: Optional[np.ndarray] = None,
                           n_boot: int = 200, seed: int = 0) -> Dict[str, object]:
    """(a) and (a') for the satisfaction job's evaluation (metrics.json `estimates`), with the truth beside
    them when the split has simulator truth (null on real data)."""
    kw = dict(clip=clip, groups=groups, n_boot=n_boot, seed=seed)
    return {"loss": loss_estimates(pred, answered, satisfied, rho, **kw),
            "auc": auc_estimates(pred, answered, satisfied, rho, **kw),
            "truth": None if true_p is None else {"loss": truth_loss(pred, true_p), "auc": truth_auc(pred, true_p)},
            "clip": clip, "bootstrap": {"resamples": n_boot, "unit": "request" if groups is not None else "row",
                                         "level": LEVEL}}

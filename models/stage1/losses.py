"""Stage-1 losses of SAQRec (sec. 4.2): propensity BCE (eq. 5), satisfaction losses (eqs. 3, 6 + SNIPS, DR)
and the ideal loss against the true satisfaction probability (eq. 2).

Pure torch, no TorchRec. Every satisfaction loss takes the same inputs:

    logits     [B] float  satisfaction logits, s_hat = sigmoid(logits)
    satisfied  [B] float  observed label s; 0 (a placeholder) where the questionnaire was not answered
    answered   [B] 0/1    o: questionnaire answered (the observation indicator)
    propensity [B] float  rho_hat = P(o = 1 | u, i) from the propensity model (ips / snips / dr)

and returns a `LossOut(loss, stats)`. `stats` are detached tensors (no host sync) that make every
edge case visible and countable: `rows`, `answered`, `empty` (1.0 when no row was answered: the loss
is then an exact zero that still carries the graph, so backward and DDP all-reduce stay uniform
across ranks), `clipped` (rows with rho_hat < M whose weight was capped at 1/M) and `weight_sum`.
Accumulate them with `LossCounters`.

Non-finite values are never silent: weights are asserted finite (clipping M > 0 makes rho_hat = 0 safe)
and a non-finite loss raises FloatingPointError naming the loss and the batch statistics. These two
checks cost one host sync each; pass `check_finite=False` to skip them (then NaN goes unnoticed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Literal, Optional

import torch
import torch.nn.functional as F

SatLossKind = Literal["naive", "ips", "snips", "dr"]
IpsNormalizer = Literal["all", "answered"]
SAT_LOSS_KINDS = ("naive", "ips", "snips", "dr")


@dataclass
class LossOut:
    """A loss plus detached per-batch statistics (see module docstring)."""

    loss: torch.Tensor
    stats: Dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------ helpers
def _check_shapes(name: str, logits: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    if logits.dim() != 1:
        raise ValueError(f"{name}: logits must be 1-D [B], got shape {tuple(logits.shape)}")
    for arg, t in others.items():
        if t is not None and t.shape != logits.shape:
            raise ValueError(
                f"{name}: argument {arg!r} has shape {tuple(t.shape)}, expected {tuple(logits.shape)} like logits"
            )


def _describe(t: Optional[torch.Tensor]) -> str:
    if t is None or t.numel() == 0:
        return "n/a"
    t = t.detach().float()
    fin = t[torch.isfinite(t)]
    rng = f"[{fin.min().item():.4g}, {fin.max().item():.4g}]" if fin.numel() else "[none finite]"
    return f"range {rng}, nan={int(torch.isnan(t).sum())}, inf={int(torch.isinf(t).sum())}"


def _raise_non_finite(
    name: str,
    what: str,
    logits: torch.Tensor,
    answered: Optional[torch.Tensor],
    propensity: Optional[torch.Tensor],
    value: torch.Tensor,
) -> None:
    n_ans = int((answered > 0.5).sum()) if answered is not None else logits.numel()
    raise FloatingPointError(
        f"{name} loss: {what} is not finite ({value.detach().flatten()[:4].tolist()}); batch stats: "
        f"rows={logits.numel()}, answered={n_ans}, logits {_describe(logits)}, propensity {_describe(propensity)}"
    )


def _check_finite(name, what, value, logits, answered=None, propensity=None) -> None:
    if not bool(torch.isfinite(value).all()):
        _raise_non_finite(name, what, logits, answered, propensity, value)


def clipped_inverse_propensity(propensity: torch.Tensor, clip: float) -> torch.Tensor:
    """w = 1 / max(rho_hat, M), the clipped IPS weight of eq. 6; M must lie in (0, 1]."""
    if not 0.0 < clip <= 1.0:
        raise ValueError(f"propensity clip M must be in (0, 1], got {clip} (M = 0 makes rho_hat = 0 infinite)")
    return 1.0 / propensity.clamp_min(clip)


def _stats(logits, mask, rows_weight=None, clipped=None) -> Dict[str, torch.Tensor]:
    n_ans = mask.sum().to(torch.float32)
    z = torch.zeros((), device=logits.device)
    return {
        "rows": torch.tensor(float(logits.numel()), device=logits.device),
        "answered": n_ans.detach(),
        "empty": (n_ans == 0).to(torch.float32).detach(),
        "clipped": (clipped.sum().to(torch.float32) if clipped is not None else z).detach(),
        "weight_sum": (rows_weight.sum() if rows_weight is not None else n_ans).detach().to(torch.float32),
    }


def _graph_zero(logits: torch.Tensor) -> torch.Tensor:
    """An exact 0 that depends on `logits`, so backward still reaches every parameter (with zero grads)."""
    return logits.sum() * 0.0


# ------------------------------------------------------------------------------------------ BCE
def bce_with_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    name: str = "bce",
    check_finite: bool = True,
) -> LossOut:
    """Weighted, masked binary cross-entropy on logits: the propensity loss (eq. 5) and click loss (eq. 15).

    loss = sum_k m_k w_k BCE(x_k, y_k) / sum_k m_k w_k, with m = mask (default all ones) and w = weights
    (default ones), so without weights/mask it is the plain mean over the batch of eq. 5. Targets may
    be soft probabilities. A batch whose mask selects nothing returns an exact graph-carrying zero and
    stats['empty'] = 1.
    """
    _check_shapes(name, logits, targets=targets, weights=weights, mask=mask)
    targets = targets.to(logits.dtype)
    m = (mask > 0.5) if mask is not None else torch.ones_like(logits, dtype=torch.bool)
    w = weights.to(logits.dtype) if weights is not None else torch.ones_like(logits)
    if check_finite and weights is not None:
        _check_finite(name, "weights", w, logits)
    w = torch.where(m, w, torch.zeros_like(w))
    per = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    per = torch.where(m, per, torch.zeros_like(per))  # where, not *: inf/NaN outside the mask cannot leak
    denom = w.sum()
    loss = torch.where(denom > 0, (per * w).sum() / denom.clamp_min(torch.finfo(w.dtype).tiny), torch.zeros_like(denom))
    loss = loss + _graph_zero(logits)
    if check_finite:
        _check_finite(name, "loss", loss, logits, mask)
    return LossOut(loss, _stats(logits, m, rows_weight=w))


def ideal_loss(logits: torch.Tensor, true_p: torch.Tensor, name: str = "ideal") -> torch.Tensor:
    """Eq. 2 with the TRUE satisfaction probability p as soft target, over ALL impressions:

    L_ideal = -1/|D| sum_D [ p log s_hat + (1 - p) log(1 - s_hat) ],  s_hat = sigmoid(logits).

    This is the quantity `ideal_loss_all` reports in evaluation (it is >= the mean binary entropy of p,
    with equality iff s_hat = p). It needs no observed labels, only the simulator's ground truth.
    """
    _check_shapes(name, logits, true_p=true_p)
    if logits.numel() == 0:
        raise ValueError(f"{name}: empty batch, the ideal loss is undefined")
    return F.binary_cross_entropy_with_logits(logits, true_p.to(logits.dtype), reduction="mean")


# ------------------------------------------------------------------------------------------ satisfaction
def satisfaction_loss(
    kind: SatLossKind,
    logits: torch.Tensor,
    satisfied: torch.Tensor,
    answered: torch.Tensor,
    propensity: Optional[torch.Tensor] = None,
    clip: float = 0.05,
    imputed_error: Optional[torch.Tensor] = None,
    ips_normalizer: IpsNormalizer = "all",
    check_finite: bool = True,
) -> LossOut:
    """Dispatch to one satisfaction objective; see the functions below for each formula.

    `naive` (eq. 3) needs no propensity; `ips` (eq. 6), `snips` and `dr` need `propensity`; `dr`
    also needs `imputed_error` (the imputation model's e_hat, see `dr_loss`).
    """
    name = f"satisfaction[{kind}]"
    if kind == "naive":
        return naive_loss(logits, satisfied, answered, check_finite=check_finite)
    if kind not in SAT_LOSS_KINDS:
        raise ValueError(f"satisfaction loss kind must be one of {SAT_LOSS_KINDS}, got {kind!r}")
    if propensity is None:
        raise ValueError(f"{name}: needs the propensity rho_hat for every row, got None")
    if kind == "ips":
        return ips_loss(logits, satisfied, answered, propensity, clip, ips_normalizer, check_finite)
    if kind == "snips":
        return snips_loss(logits, satisfied, answered, propensity, clip, check_finite)
    if imputed_error is None:
        raise ValueError(f"{name}: needs imputed_error (e_hat from the imputation head), got None")
    return dr_loss(logits, satisfied, answered, propensity, imputed_error, clip, check_finite)


def _observed_bce(logits, satisfied, answered):
    """(mask o, per-row BCE of s_hat against s with 0 on unanswered rows)."""
    m = answered > 0.5
    per = F.binary_cross_entropy_with_logits(logits, satisfied.to(logits.dtype), reduction="none")
    return m, torch.where(m, per, torch.zeros_like(per))


def naive_loss(logits, satisfied, answered, check_finite: bool = True) -> LossOut:
    """Eq. 3: L_naive = -1/|O| sum_O [ s log s_hat + (1-s) log(1-s_hat) ], the mean BCE over answered rows.

    Biased for eq. 2 whenever answering depends on (u, i). No answered rows -> graph-carrying 0, empty=1.
    """
    name = "satisfaction[naive]"
    _check_shapes(name, logits, satisfied=satisfied, answered=answered)
    m, per = _observed_bce(logits, satisfied, answered)
    n = m.sum()
    loss = per.sum() / n.clamp_min(1).to(per.dtype) + _graph_zero(logits)
    if check_finite:
        _check_finite(name, "loss", loss, logits, answered)
    return LossOut(loss, _stats(logits, m))


def ips_loss(
    logits,
    satisfied,
    answered,
    propensity,
    clip: float,
    normalizer: IpsNormalizer = "all",
    check_finite: bool = True,
) -> LossOut:
    """Eq. 6 (clipped IPS): sum_O BCE(s_hat, s) / max(rho_hat, M), divided by a normaliser N.

    normalizer="all" (default): N = |D|, the number of impressions in the batch, answered or not.
    This is the estimator of Theorem 4.1: E_o[ 1/|D| sum_D o_k l_k / rho_k ] = 1/|D| sum_D l_k = eq. 2,
    so it is unbiased (without clipping) with a scale that does not depend on how many rows happened
    to be answered in the batch.
    normalizer="answered": N = |O| exactly as eqs. 4/6 are printed. That equals the "all" loss times
    |D|/|O|, a per-batch random factor (about 1/mean(rho)): the same minimiser in expectation but a
    loss ~1/mean(rho) times larger and a batch weighting that depends on |O|; kept to reproduce the paper.
    No answered rows -> graph-carrying 0, empty=1 (for "all" this is also the exact value of the sum).
    """
    name = "satisfaction[ips]"
    _check_shapes(name, logits, satisfied=satisfied, answered=answered, propensity=propensity)
    if normalizer not in ("all", "answered"):
        raise ValueError(f"{name}: normalizer must be 'all' or 'answered', got {normalizer!r}")
    m, per = _observed_bce(logits, satisfied, answered)
    w_all = clipped_inverse_propensity(propensity.to(logits.dtype), clip)
    w = torch.where(m, w_all, torch.zeros_like(w_all))
    if check_finite:
        _check_finite(name, "weights 1/max(rho, M)", w, logits, answered, propensity)
    n = torch.tensor(float(logits.numel()), device=logits.device) if normalizer == "all" else m.sum().clamp_min(1)
    loss = (w * per).sum() / n.to(per.dtype) + _graph_zero(logits)
    if check_finite:
        _check_finite(name, "loss", loss, logits, answered, propensity)
    return LossOut(loss, _stats(logits, m, rows_weight=w, clipped=m & (propensity < clip)))


def snips_loss(logits, satisfied, answered, propensity, clip: float, check_finite: bool = True) -> LossOut:
    """Self-normalised IPS: sum_O w_k l_k / sum_O w_k with w = 1/max(rho_hat, M) and l the BCE.

    Consistent rather than unbiased; its scale is that of a mean BCE regardless of the propensities,
    which removes most of the variance from the random normaliser. No answered rows -> 0, empty=1.
    """
    name = "satisfaction[snips]"
    _check_shapes(name, logits, satisfied=satisfied, answered=answered, propensity=propensity)
    m, per = _observed_bce(logits, satisfied, answered)
    w_all = clipped_inverse_propensity(propensity.to(logits.dtype), clip)
    w = torch.where(m, w_all, torch.zeros_like(w_all))
    if check_finite:
        _check_finite(name, "weights 1/max(rho, M)", w, logits, answered, propensity)
    ws = w.sum()
    loss = (w * per).sum() / ws.clamp_min(torch.finfo(w.dtype).tiny) + _graph_zero(logits)
    if check_finite:
        _check_finite(name, "loss", loss, logits, answered, propensity)
    return LossOut(loss, _stats(logits, m, rows_weight=w, clipped=m & (propensity < clip)))


def dr_loss(
    logits, satisfied, answered, propensity, imputed_error, clip: float, check_finite: bool = True
) -> LossOut:
    """Doubly robust (Wang et al. 2019, "Doubly Robust Joint Learning for Recommendation on Data MNAR"):

    L_DR = 1/|D| sum_D [ e_hat_k + o_k (e_k - e_hat_k) / max(rho_hat_k, M) ]

    over ALL impressions, with e_k = BCE(s_hat_k, s_k) the prediction error (only used where o_k = 1)
    and e_hat_k >= 0 the imputation model's estimate of that error. Unbiased if either rho_hat or
    e_hat is correct. As in the joint-learning algorithm, e_hat is DETACHED here (it is a fixed
    imputation while the prediction model learns); the imputation model trains on
    `dr_imputation_loss`. With no answered rows the value is mean(e_hat) (a constant for the
    prediction model) plus a graph-carrying 0; empty=1.
    """
    name = "satisfaction[dr]"
    _check_shapes(
        name, logits, satisfied=satisfied, answered=answered, propensity=propensity, imputed_error=imputed_error
    )
    m, per = _observed_bce(logits, satisfied, answered)
    e_hat = imputed_error.detach().to(per.dtype)
    w_all = clipped_inverse_propensity(propensity.to(logits.dtype), clip)
    w = torch.where(m, w_all, torch.zeros_like(w_all))
    if check_finite:
        _check_finite(name, "weights 1/max(rho, M)", w, logits, answered, propensity)
    corr = torch.where(m, (per - e_hat) * w, torch.zeros_like(per))
    loss = (e_hat + corr).mean() + _graph_zero(logits)
    if check_finite:
        _check_finite(name, "loss", loss, logits, answered, propensity)
    return LossOut(loss, _stats(logits, m, rows_weight=w, clipped=m & (propensity < clip)))


def dr_imputation_loss(
    logits, satisfied, answered, propensity, imputed_error, clip: float, check_finite: bool = True
) -> LossOut:
    """Loss of the DR imputation model (Wang et al. 2019, eq. for L_e):

    L_e = 1/|D| sum_D o_k (e_k - e_hat_k)^2 / max(rho_hat_k, M)

    with e_k = BCE(s_hat_k, s_k) DETACHED (the prediction model is fixed while the imputation model
    learns), so its gradient reaches only the imputation head. Normalised by |D| like `dr_loss`.
    """
    name = "dr_imputation"
    _check_shapes(
        name, logits, satisfied=satisfied, answered=answered, propensity=propensity, imputed_error=imputed_error
    )
    m, per = _observed_bce(logits.detach(), satisfied, answered)
    w_all = clipped_inverse_propensity(propensity.to(per.dtype), clip)
    w = torch.where(m, w_all, torch.zeros_like(w_all))
    if check_finite:
        _check_finite(name, "weights 1/max(rho, M)", w, logits, answered, propensity)
    sq = torch.where(m, (per - imputed_error) ** 2 * w, torch.zeros_like(per))
    loss = sq.mean() + _graph_zero(imputed_error)
    if check_finite:
        _check_finite(name, "loss", loss, logits, answered, propensity)
    return LossOut(loss, _stats(logits, m, rows_weight=w, clipped=m & (propensity < clip)))


class LossCounters:
    """Sums LossOut.stats over batches on-device (no host sync until `as_dict`).

    `empty` then counts the batches that had no answered row; `clipped` the rows whose weight was capped.
    """

    def __init__(self) -> None:
        self._sums: Dict[str, torch.Tensor] = {}
        self.batches = 0

    def update(self, stats: Dict[str, torch.Tensor]) -> None:
        self.batches += 1
        for k, v in stats.items():
            v = v.detach().to(torch.float64)
            self._sums[k] = self._sums[k] + v if k in self._sums else v.clone()

    def as_dict(self) -> Dict[str, float]:
        out = {k: float(v) for k, v in self._sums.items()}
        out["batches"] = float(self.batches)
        return out

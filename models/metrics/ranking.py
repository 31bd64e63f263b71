"""Exact, vectorised evaluation metrics: SAQRec's leave-one-out ranking metrics (sec. 5.1.2: HR@{1,5,10},
NDCG@{5,10}, MRR over the ground truth + 99 sampled negatives), click AUC / GAUC, watch-time XAUC / MAE,
the ground-truth quality of each request's top-k, and a rank-gathering accumulator.

Why exact: evaluation figures are compared across runs and ranks, so nothing here is approximated
(no histogram AUC, no O(n^2) fallbacks, no dropped rows); ties are resolved by documented rules that
never favour the model. Inputs are torch tensors (or numpy arrays); figures come back as Python floats.

Metric key names (used by `standard_metrics`):
    hr@1 hr@5 hr@10 ndcg@5 ndcg@10 mrr | click_auc click_gauc | watch_time_xauc watch_time_mae |
    true_sat@10 true_click@10 | true_sat@10_oracle_sat true_click@10_oracle_sat true_sat@10_oracle_click
    true_click@10_oracle_click true_sat@10_headroom_share (`oracle_topk_metrics`, `headroom_share`)
"""
from __future__ import annotations

from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

TRUTH_KEYS = {"true_p_satisfied": "true_sat", "true_p_click": "true_click", "true_p_answered": "true_answered"}


# ------------------------------------------------------------------------------------------ helpers
def _np1d(x, name: str, dtype=np.float64) -> np.ndarray:
    """1-D numpy copy of a tensor / array, checked finite (NaN would silently reorder a sort)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D tensor, got shape {tuple(a.shape)}")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ValueError(f"{name}: {int((~np.isfinite(a)).sum())} non-finite value(s)")
    return a.astype(dtype, copy=False)


def _same_len(**arrays: np.ndarray) -> int:
    lens = {k: len(v) for k, v in arrays.items()}
    if len(set(lens.values())) != 1:
        raise ValueError(f"length mismatch: {lens}")
    n = next(iter(lens.values()))
    if n == 0:
        raise ValueError(f"empty input: {sorted(lens)} have no rows")
    return n


def _binary(a: np.ndarray, name: str) -> np.ndarray:
    if not np.isin(a, (0, 1)).all():
        raise ValueError(f"{name}: labels must be 0/1, got values {np.unique(a)[:5].tolist()}")
    return a.astype(np.int64)


def _run_starts(*keys: np.ndarray) -> np.ndarray:
    """Boolean flags marking where any of the (already sorted) key arrays changes value."""
    n = len(keys[0])
    start = np.zeros(n, dtype=bool)
    start[0] = True
    for k in keys:
        start[1:] |= k[1:] != k[:-1]
    return start


def _tie_pairs(start: np.ndarray) -> int:
    """Number of unordered pairs inside the runs delimited by `start` flags."""
    sizes = np.diff(np.append(np.flatnonzero(start), len(start)))
    return int((sizes * (sizes - 1) // 2).sum())


# ---------------------------------------------------------------------- leave-one-out rank metrics
def loo_ranks(scores: torch.Tensor, ties: str = "mid") -> torch.Tensor:
    """Rank of the ground truth (column 0) among its row: float64 [N].

    rank = 1 + #{negatives scoring strictly higher} + c * #{negatives scoring exactly equal}, with
    c = 1/2 for `ties="mid"` (the expected rank under uniform random tie-breaking, so a constant
    model gets rank 1 + K/2, not 1) or c = 1 for `ties="worst"` (every tie counted as a loss).
    """
    if not isinstance(scores, torch.Tensor):
        scores = torch.as_tensor(scores)
    if scores.dim() != 2 or scores.shape[1] < 2 or scores.shape[0] == 0:
        raise ValueError(f"scores: expected [N >= 1, 1 + K >= 2] (column 0 = ground truth), "
                         f"got shape {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError(f"scores: {int((~torch.isfinite(scores)).sum())} non-finite value(s)")
    if ties not in ("mid", "worst"):
        raise ValueError(f"ties: expected 'mid' or 'worst', got {ties!r}")
    s = scores.detach().to("cpu", torch.float64)
    gt, neg = s[:, :1], s[:, 1:]
    higher = (neg > gt).sum(1).to(torch.float64)
    equal = (neg == gt).sum(1).to(torch.float64)
    return 1.0 + higher + (0.5 if ties == "mid" else 1.0) * equal


def metrics_from_ranks(ranks: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                       ndcg_ks: Sequence[int] = (5, 10)) -> Dict[str, float]:
    """HR@k = mean[rank <= k]; NDCG@k = mean[rank <= k] / log2(rank + 1) (one relevant item, so
    IDCG = 1); MRR = mean 1 / rank. Fractional (mid) ranks enter the formulas as they are."""
    r = torch.as_tensor(ranks).detach().to("cpu", torch.float64).reshape(-1)
    if r.numel() == 0:
        raise ValueError("ranks: empty")
    if not bool((r >= 1).all()):
        raise ValueError("ranks: every rank must be >= 1")
    if any(int(k) != k or k < 1 for k in (*ks, *ndcg_ks)):
        raise ValueError(f"ks / ndcg_ks: every k must be an integer >= 1, got {list(ks)} / {list(ndcg_ks)}")
    out: Dict[str, float] = {}
    for k in ks:
        out[f"hr@{int(k)}"] = float((r <= k).to(torch.float64).mean())
    for k in ndcg_ks:
        out[f"ndcg@{int(k)}"] = float(torch.where(r <= k, 1.0 / torch.log2(r + 1.0), torch.zeros_like(r)).mean())
    out["mrr"] = float((1.0 / r).mean())
    return out


def rank_metrics(scores: torch.Tensor, ks: Sequence[int] = (1, 5, 10), ndcg_ks: Sequence[int] = (5, 10),
                 ties: str = "mid") -> dict:
    """SAQRec sec. 5.1.2 on `scores` [N, 1 + K] (column 0 the ground truth, 1.. the sampled negatives).

    Returns {"hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr"} as floats (means over rows) plus
    "ranks": the float64 [N] per-row ranks (see `loo_ranks` for the tie rule). Accumulate "ranks"
    across batches and call `metrics_from_ranks` once to get the same figures over a whole split.
    """
    ranks = loo_ranks(scores, ties=ties)
    out: dict = metrics_from_ranks(ranks, ks, ndcg_ks)
    out["ranks"] = ranks
    return out


# ---------------------------------------------------------------------------------- AUC and GAUC
def auc(pred, label) -> float:
    """Exact ROC AUC via torchmetrics `BinaryAUROC(thresholds=None)`; tied predictions count 1/2. Any score
    (logits, probabilities, ranks): only the order matters. Raises when a class is missing (`auc_or_nan` doesn't).

    torchmetrics applies a sigmoid to predictions outside [0, 1]; in float32 that saturates large
    logits into ties, so predictions are first replaced by their dense ranks scaled to [0, 1]
    (float64, order- and tie-preserving: AUC depends on order only). The project's one AUC: the stage-1
    calibration report, the EASQ ramp and prequential monitor and the evaluation all call it."""
    from torchmetrics.classification import BinaryAUROC

    p = _np1d(pred, "pred")
    y = _binary(_np1d(label, "label"), "label")
    _same_len(pred=p, label=y)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        raise ValueError(f"label: AUC needs both classes, got {n_pos} positive(s) of {len(y)}")
    _, dense = np.unique(p, return_inverse=True)
    scaled = torch.from_numpy(dense.reshape(-1).astype(np.float64) / max(1, int(dense.max())))
    return float(BinaryAUROC(thresholds=None)(scaled, torch.from_numpy(y)))


def auc_or_nan(pred, label) -> float:
    """`auc`, but NaN instead of an error when there are no rows or one class is missing: for monitors over
    small windows and for splits that may hold no answered row."""
    p, y = _np1d(pred, "pred"), _binary(_np1d(label, "label"), "label")
    if len(p) != len(y):
        raise ValueError(f"length mismatch: pred {len(p)}, label {len(y)}")
    if len(y) == 0 or y.min() == y.max():
        return float("nan")
    return auc(p, y)


class GaucResult(NamedTuple):
    gauc: float
    groups_used: int       # groups holding both classes
    groups_skipped: int    # single-class groups (AUC undefined), left out of the average


def gauc(pred, label, group, *, none_ok: bool = False) -> GaucResult:
    """Group AUC: per-group exact AUC (Mann-Whitney with mid-ranks, i.e. tied predictions count 1/2),
    averaged over the groups that hold both classes, WEIGHTED BY GROUP SIZE (impressions in the
    group, positives and negatives together). Single-class groups are skipped and counted. With no group
    holding both classes: ValueError, or with `none_ok` NaN (a split where every row is clicked)."""
    p = _np1d(pred, "pred")
    y = _binary(_np1d(label, "label"), "label")
    g = _np1d(group, "group", dtype=np.int64)
    n = _same_len(pred=p, label=y, group=g)
    order = np.lexsort((p, g))
    p, y, g = p[order], y[order], g[order]
    gstart = _run_starts(g)
    gid = np.cumsum(gstart) - 1
    gpos = np.flatnonzero(gstart)                       # first position of each group
    bstart = _run_starts(g, p)                          # tie blocks inside groups
    bid = np.cumsum(bstart) - 1
    bpos = np.flatnonzero(bstart)
    bend = np.append(bpos[1:], n)                       # exclusive
    # 1-based ranks inside the group of a block spanning [s, e): (s - gs + 1 + e - gs) / 2
    mid = (bpos[bid] + bend[bid] + 1) / 2.0 - gpos[gid]
    size = np.bincount(gid).astype(np.float64)
    npos = np.bincount(gid, weights=y.astype(np.float64))
    nneg = size - npos
    rpos = np.bincount(gid, weights=mid * y)
    ok = (npos > 0) & (nneg > 0)
    if not ok.any():
        if none_ok:
            return GaucResult(float("nan"), 0, len(size))
        raise ValueError(f"gauc: none of the {len(size)} group(s) holds both classes")
    auc_g = (rpos[ok] - npos[ok] * (npos[ok] + 1) / 2) / (npos[ok] * nneg[ok])
    value = float((auc_g * size[ok]).sum() / size[ok].sum())
    return GaucResult(value, int(ok.sum()), int((~ok).sum()))


def click_metrics(pred, label, group) -> Dict[str, float]:
    """{"click_auc", "click_gauc", "click_gauc_groups", "click_gauc_skipped"}; NaN AUCs where one class only."""
    g = gauc(pred, label, group, none_ok=True)
    return {"click_auc": auc_or_nan(pred, label), "click_gauc": g.gauc,
            "click_gauc_groups": g.groups_used, "click_gauc_skipped": g.groups_skipped}


# -------------------------------------------------------------------------------- watch time
def _count_inversions(r: np.ndarray) -> int:
    """#{a < b : r[a] > r[b]} for non-negative ints, exactly, in O(n log max r) vectorised passes.

    Wavelet-style: from the top bit down, elements are kept stably grouped by their higher bits;
    a pair is counted at its highest differing bit, where the earlier element has a 1 and the later
    a 0 inside the same group. Each pass is a stable in-group partition by the current bit (O(n))."""
    n = len(r)
    if n < 2:
        return 0
    cur = r.astype(np.int64)
    idx = np.arange(n)
    total = 0
    for b in range(max(1, int(cur.max()).bit_length()) - 1, -1, -1):
        start = _run_starts(cur >> (b + 1))
        gs = np.maximum.accumulate(np.where(start, idx, 0))
        gid = np.cumsum(start) - 1
        bit = (cur >> b) & 1
        c1 = np.cumsum(bit) - bit
        ones_before = c1 - c1[gs]
        zero = bit == 0
        total += int(ones_before[zero].sum())
        zeros_before = (idx - gs) - ones_before
        nzero = np.bincount(gid, weights=zero.astype(np.float64)).astype(np.int64)
        newpos = np.where(zero, gs + zeros_before, gs + nzero[gid] + ones_before)
        nxt = np.empty_like(cur)
        nxt[newpos] = cur
        cur = nxt
    return total


def xauc(pred, target) -> float:
    """XAUC: over ordered pairs (i, j) with target_i > target_j (equal targets excluded), the
    fraction with pred_i > pred_j, tied predictions counting 1/2. Exact in O(n log n): sort by
    (target, pred), count discordant pairs as inversions of the pred ranks, and take tied-pair
    counts from run lengths (Knight's Kendall-tau decomposition)."""
    p = _np1d(pred, "pred")
    t = _np1d(target, "target")
    n = _same_len(pred=p, target=t)
    order = np.lexsort((p, t))
    p, t = p[order], t[order]
    _, dense = np.unique(p, return_inverse=True)
    discordant = _count_inversions(dense.reshape(-1))    # t_a < t_b and p_a > p_b (t ties sorted by p)
    tied_t = _tie_pairs(_run_starts(t))
    tied_tp = _tie_pairs(_run_starts(t, p))
    tied_p = _tie_pairs(_run_starts(np.sort(p)))
    pairs = n * (n - 1) // 2 - tied_t
    if pairs == 0:
        raise ValueError(f"target: XAUC needs at least two distinct target values ({n} row(s), all equal)")
    tied_p_only = tied_p - tied_tp
    concordant = pairs - tied_p_only - discordant
    return (concordant + 0.5 * tied_p_only) / pairs


def mae(pred, target) -> float:
    """Mean absolute error."""
    p = _np1d(pred, "pred")
    t = _np1d(target, "target")
    _same_len(pred=p, target=t)
    return float(np.abs(p - t).mean())


def watch_time_metrics(pred, target) -> Dict[str, float]:
    """{"watch_time_xauc", "watch_time_mae"}."""
    return {"watch_time_xauc": xauc(pred, target), "watch_time_mae": mae(pred, target)}


# ------------------------------------------------------------------------------- top-k truth
def topk_true_mean(score, truth, group, k: int = 10) -> float:
    """Mean over groups (requests, each weighted 1) of the mean `truth` (e.g. true_p_satisfied) of
    the group's k highest-scoring items. A group with fewer than k items uses all of its items.
    Ties in score across the k-th place are resolved by expectation: a tie block that straddles
    the cut contributes its mean truth times the places left (the expected value under uniform
    random tie-breaking), so ties neither favour nor penalise the model and the figure does not
    depend on row order."""
    if int(k) < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    s = _np1d(score, "score")
    t = _np1d(truth, "truth")
    g = _np1d(group, "group", dtype=np.int64)
    n = _same_len(score=s, truth=t, group=g)
    order = np.lexsort((-s, g))
    s, t, g = s[order], t[order], g[order]
    gstart = _run_starts(g)
    gid = np.cumsum(gstart) - 1
    gpos = np.flatnonzero(gstart)
    bstart = _run_starts(g, s)
    bid = np.cumsum(bstart) - 1
    bpos = np.flatnonzero(bstart)
    bsize = np.diff(np.append(bpos, n))
    bgid = gid[bpos]
    slots = np.clip(k - (bpos - gpos[bgid]), 0, bsize)   # places of the top k this block fills
    w = (slots / bsize)[bid]
    size = np.bincount(gid)
    per_group = np.bincount(gid, weights=w * t) / np.minimum(k, size)
    return float(per_group.mean())


def truth_topk_metrics(score, truth: Mapping[str, object], group, k: int = 10) -> Dict[str, float]:
    """{"true_sat@k", "true_click@k", ...} for each `true_p_*` column given in `truth`."""
    out = {}
    for col, t in truth.items():
        if col not in TRUTH_KEYS:
            raise ValueError(f"truth: unknown column {col!r}; expected one of {sorted(TRUTH_KEYS)}")
        out[f"{TRUTH_KEYS[col]}@{int(k)}"] = topk_true_mean(score, t, group, k)
    return out


ORACLES = {"oracle_sat": "true_p_satisfied", "oracle_click": "true_p_click"}  # suffix -> the truth column ranked by


def oracle_topk_metrics(truth: Mapping[str, object], group, k: int = 10) -> Dict[str, float]:
    """The ceilings of `truth_topk_metrics` on the same requests: every `true_*@k` of the top-k by the truth
    column itself, `<key>_oracle_sat` (ranked by true_p_satisfied) and `<key>_oracle_click` (by true_p_click).
    Why: true_sat@k of a model means little without the range it lives in; the click oracle is the best
    a perfect click model can do, the satisfaction oracle the best any ranking can do. Ties in the oracle's
    score are resolved like a model's (`topk_true_mean`: a tie block straddling the k-th place contributes
    its mean truth), so the figures are deterministic and do not depend on row order."""
    missing = [c for c in ORACLES.values() if c not in truth]
    if missing:
        raise ValueError(f"oracle metrics: truth lacks {missing} (have {sorted(truth)})")
    out: Dict[str, float] = {}
    for suffix, col in ORACLES.items():
        out.update({f"{key}_{suffix}": v for key, v in truth_topk_metrics(truth[col], truth, group, k).items()})
    return out


def headroom_share(value: float, oracle_click: float, oracle_sat: float) -> Optional[float]:
    """(value - oracle_click) / (oracle_sat - oracle_click): 0 = ranks as well as the click oracle on true
    satisfaction, 1 = as well as the satisfaction oracle (< 0 and > 1 are possible for the first bound);
    None when the two oracles agree (no headroom to share, e.g. k >= every request's size)."""
    span = oracle_sat - oracle_click
    return None if abs(span) <= 1e-12 else (value - oracle_click) / span


# ------------------------------------------------------------------------------- accumulation
class MetricAccumulator:
    """Collects named per-row tensors over batches (detached, on CPU); `compute()` concatenates
    them and, when a torch.distributed process group is initialised, all-gathers every rank's
    tensors (`all_gather_object`, rank order, then batch order) so every rank returns the same
    data and hence the same figures. Rows are not de-duplicated: feed each row once.

    A name missing on a rank (e.g. a rank that saw no batch) contributes no rows. With NCCL,
    `all_gather_object` needs the current CUDA device set (torch.cuda.set_device) beforehand."""

    def __init__(self) -> None:
        self._parts: Dict[str, List[torch.Tensor]] = {}

    def update(self, **named: torch.Tensor) -> None:
        for name, t in named.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"MetricAccumulator.update: {name!r} must be a tensor, got {type(t).__name__}")
            if t.dim() == 0:
                raise ValueError(f"MetricAccumulator.update: {name!r} must have a row dimension, got a scalar")
            parts = self._parts.setdefault(name, [])
            if parts and parts[0].shape[1:] != t.shape[1:]:
                raise ValueError(f"MetricAccumulator.update: {name!r} row shape {tuple(t.shape[1:])} "
                                 f"differs from earlier batches' {tuple(parts[0].shape[1:])}")
            parts.append(t.detach().to("cpu"))

    def reset(self) -> None:
        self._parts = {}

    def local(self) -> Dict[str, torch.Tensor]:
        return {k: torch.cat(v) for k, v in self._parts.items()}

    def compute(self, group: Optional[dist.ProcessGroup] = None) -> Dict[str, torch.Tensor]:
        mine = self.local()
        if not (dist.is_available() and dist.is_initialized()):
            return mine
        gathered: List[Optional[Dict[str, torch.Tensor]]] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, mine, group=group)
        names: List[str] = []
        for d in gathered:
            names += [k for k in d if k not in names]
        return {k: torch.cat([d[k] for d in gathered if k in d]) for k in names}


def standard_metrics(t: Mapping[str, torch.Tensor], k: int = 10, gauc_group: str = "user_id",
                     topk_group: str = "request_id") -> Dict[str, float]:
    """Every metric whose inputs are present in `t` (e.g. `MetricAccumulator.compute()`):
    loo_ranks -> rank metrics | click_pred + click + gauc_group -> click_* |
    watch_time_pred + watch_time_s -> watch_time_* | score + topk_group + true_p_* -> true_*@k."""
    def need(name: str, why: str) -> torch.Tensor:
        if name not in t:
            raise KeyError(f"standard_metrics: {why} needs the group column {name!r}; have {sorted(t)}")
        return t[name]

    out: Dict[str, float] = {}
    if "loo_ranks" in t:
        out.update(metrics_from_ranks(t["loo_ranks"]))
    if "click_pred" in t and "click" in t:
        out.update(click_metrics(t["click_pred"], t["click"], need(gauc_group, "click_gauc")))
    if "watch_time_pred" in t and "watch_time_s" in t:
        out.update(watch_time_metrics(t["watch_time_pred"], t["watch_time_s"]))
    truth = {c: t[c] for c in TRUTH_KEYS if c in t}
    if "score" in t and truth:
        out.update(truth_topk_metrics(t["score"], truth, need(topk_group, "true_*@k"), k))
    return out


"""Evaluators of the stage-1 jobs (SAQRec sec. 4.2): what each job reports on DIR/valid.

`BinaryEvaluator`       click model (satrank.jobs.pretrain) and propensity model (satrank.jobs.propensity): AUC, log loss,
                        ECE (+ reliability table) against the observed label, and, where the data has the
                        simulator's truth column, the log loss against the true probability.
`SatisfactionEvaluator` satisfaction model g (satrank.jobs.satisfaction): the ideal loss of eq. 2 against
                        true_p_satisfied over ALL impressions (`ideal_loss_all`), the AUC against a
                        satisfaction label SAMPLED from true_p_satisfied with a fixed seed over all
                        impressions (`auc_true_all`), the AUC on answered impressions (`auc_answered`, the
                        only observed labels: a biased sample), and the counts that make edge cases visible.
                        With a propensity (IPS / SNIPS / DR losses) also `estimates`: naive, IPS, SNIPS and DR
                        estimates of g's loss and AUC on all impressions with bootstrap 95% intervals
                        (satrank.models.metrics.offline_estimates), which real data gets without truth, and
                        `top_k`: the mean satisfaction of each user's top `evaluate.offline_k` logged rows by g.

Model selection (satrank.jobs.engine.selection): each evaluator's metrics carry `undefined` ({metric: why}: the
metrics the split cannot define, e.g. an AUC whose label has one class on a missing-at-random split where every
row is clicked and answered, or a truth metric on data without truth columns) and its `fallbacks` say which
defined metric replaces a monitor.

Both plug into satrank.jobs.engine.trainer.Trainer.evaluate: `columns` picks per-row tensors of each batch
(cloned, so no reader buffer is held), `metrics` runs on all ranks' gathered rows. Sampling for `auc_true_all` is done
after sorting rows by their ids, so it is the same draw whatever the world size or read order.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np
import torch

from satrank.models.metrics.calibration import auc, binary_metrics, log_loss, reliability_table, satisfaction_metrics
from satrank.models.metrics.offline_estimates import (satisfaction_estimates, top_k_satisfaction_estimates,
                                                       truth_top_k_satisfaction)

ID_ORDER = ("request_id", "user_id", "item_id", "timestamp")


def row_ids(batch) -> Dict[str, torch.Tensor]:
    """The batch's id columns (`id_request_id`, ...; those present), the keys `canonical_order` sorts by."""
    return {f"id_{k}": batch.ids[k].detach().cpu().clone() for k in ID_ORDER if k in batch.ids}


def canonical_order(columns: Dict[str, torch.Tensor]) -> np.ndarray:
    """Row permutation sorting by (request_id, user_id, item_id, timestamp), those present."""
    keys = [columns[f"id_{k}"].numpy() for k in reversed(ID_ORDER) if f"id_{k}" in columns]
    n = len(next(iter(columns.values()))) if columns else 0
    return np.lexsort(keys) if keys else np.arange(n)


def sample_labels(p: torch.Tensor, seed: int) -> torch.Tensor:
    """Bernoulli(p) draws from a generator seeded by `seed` (p in a canonical row order)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(p.shape[0], generator=g, dtype=torch.float64) < p.double()).to(torch.float32)


def auc_vs_drawn_truth(pred: torch.Tensor, true_p: torch.Tensor, seed: int) -> Dict[str, Any]:
    """AUC of `pred` (any score: logits or probabilities) on ALL rows against a label drawn from `true_p` (`sample_labels`, rows already in
    `canonical_order`): `auc_true_all`, the truth's own AUC on the same draw `auc_true_all_ceiling`, `rows_all`
    and `sampled_satisfied_rate`."""
    drawn = sample_labels(true_p, seed)
    return {"auc_true_all": auc(pred, drawn), "auc_true_all_ceiling": auc(true_p, drawn),
            "rows_all": int(drawn.numel()), "sampled_satisfied_rate": float(drawn.mean())}


def one_class_reason(label: str, values: Any, rows: str = "rows") -> Optional[str]:
    """Why an AUC of `label` is undefined on these label values (None: both classes present)."""
    n = int(values.numel())
    if n == 0:
        return f"no {rows}"
    positives = int((values > 0.5).sum())
    if 0 < positives < n:
        return None
    return f"{label} has one class on the {n} {rows} (all {1 if positives else 0})"


def distribution(pred: torch.Tensor) -> Dict[str, Any]:
    """mean, std, min, max and quantiles (p01 ... p99) of a probability column."""
    p = pred.double()
    q = np.quantile(p.numpy(), [0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99])  # torch.quantile refuses > 2**24 rows
    return {"mean": float(p.mean()), "std": float(p.std(unbiased=False)), "min": float(p.min()), "max": float(p.max()),
            "quantiles": dict(zip(("p01", "p05", "p25", "p50", "p75", "p95", "p99"), map(float, q)))}


COLLAPSE_EDGE = 0.01  # rho's mean this close to 0 or 1 ...
COLLAPSE_RANGE = 1e-3  # ... or max - min below this: 1/rho weights are (nearly) constant, IPS is the naive loss


def rho_collapse(stats: Dict[str, Any], observed_rate: float) -> Optional[str]:
    """Why rho's distribution has collapsed (None: it has not). Near 0 counts only where the split's observed
    answer rate is >= 5 * COLLAPSE_EDGE: a log with 0.5% answers has a mean rho of 0.005 by right."""
    if stats["max"] - stats["min"] < COLLAPSE_RANGE:
        return f"spread {stats['max'] - stats['min']:.2g} < {COLLAPSE_RANGE:g}: every 1/rho weight is the same"
    if stats["mean"] > 1.0 - COLLAPSE_EDGE:
        return f"mean {stats['mean']:.4f} within {COLLAPSE_EDGE} of 1: 1/rho ~ 1, IPS is the naive loss"
    if stats["mean"] < COLLAPSE_EDGE and observed_rate >= 5 * COLLAPSE_EDGE:
        return (f"mean {stats['mean']:.4f} within {COLLAPSE_EDGE} of 0 while {observed_rate:.3f} of the rows are "
                f"positive")
    return None


class BinaryEvaluator:
    """Probability `prob_key` of the model outputs against label `label` (and truth column `truth`).

    With one label class on the split (a missing-at-random split where every row is clicked / answered) `auc`,
    `logloss`, `ece` and the model's `loss` are declared undefined; no other metric of this label is defined
    there, so the fallback is the last evaluation (satrank.jobs.engine.selection.LAST). `distribution` adds
    `pred_distribution` (mean, std, min, max, quantiles) and `rho_collapsed` (the propensity job)."""

    fallbacks: Dict[str, Any] = {}

    def __init__(self, prob_key: str, label: str, truth: Optional[str] = None, n_bins: int = 10,
                 reliability: bool = False, distribution: bool = False) -> None:
        self.prob_key, self.label, self.truth = prob_key, label, truth
        self.n_bins, self.reliability, self.distribution = n_bins, reliability, distribution

    def columns(self, batch, outputs: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        cols = {"pred": outputs[self.prob_key].detach().float().cpu().clone(),
                "label": batch.labels[self.label].detach().float().cpu().clone()}
        if self.truth is not None and self.truth in batch.truth:
            cols["truth"] = batch.truth[self.truth].detach().float().cpu().clone()
        return cols

    def metrics(self, columns: Dict[str, torch.Tensor], counters: Dict[str, float]) -> Dict[str, Any]:
        if not columns:
            return {"auc": float("nan"), "logloss": float("nan"), "ece": float("nan"), "n": 0,
                    "undefined": {k: "no rows" for k in ("auc", "logloss", "ece", "loss")}}
        pred, label = columns["pred"], columns["label"]
        out: Dict[str, Any] = binary_metrics(pred, label, self.n_bins)
        why = one_class_reason(self.label, label)
        out["undefined"] = {k: why for k in ("auc", "logloss", "ece", "loss")} if why else {}
        if self.truth is not None and "truth" not in columns:
            out["undefined"]["ideal_logloss_all"] = f"no truth column {self.truth} (real data)"
        if self.distribution and pred.numel():
            out["pred_distribution"] = distribution(pred)
            reason = rho_collapse(out["pred_distribution"], float(label.double().mean()))
            out["rho_collapsed"], out["rho_collapsed_reason"] = reason is not None, reason
        if "truth" in columns:
            out["ideal_logloss_all"] = log_loss(pred, columns["truth"])  # against the true probability
            out["mean_true"] = float(columns["truth"].double().mean())
            out["truth_auc_vs_label"] = auc(columns["truth"], label)  # ceiling: the true probability's AUC
        if self.reliability:
            out["reliability"] = reliability_table(pred, label, self.n_bins)
        return out


class SatisfactionEvaluator:
    """Metrics of the satisfaction model g on every validation impression (module docstring).

    counters (from the loss's stats): `empty` = batches without an answered row, `clipped` = answered rows
    whose propensity was clipped at M. `propensity_below_clip_all` counts all rows with rho < M.
    """

    ANSWERED = ("auc_answered", "answered_auc", "answered_logloss")
    MNAR_POLICY = "(satisfaction.mnar_monitor: loss)"  # ends the reason of a metric the config made undefined
    fallbacks = {m: [("answered_logloss", "min"), ("loss", "min")] for m in ANSWERED[:2]}
    fallbacks["answered_logloss"] = [("loss", "min")]

    def __init__(self, seed: int, clip: float, truth: str = "true_p_satisfied", n_bins: int = 10,
                 mnar_monitor: Optional[str] = None, estimate_clip: Optional[float] = None,
                 top_k: int = 3, top_k_group: str = "user_id") -> None:
        """mnar_monitor "loss" (satisfaction.mnar_monitor): on a split with unanswered rows the answered-row
        metrics are declared unfit to select on, so selection falls back to the job's (weighted) `loss`.
        top_k / top_k_group (evaluate.offline_k / offline_group): `estimates.top_k` ranks each group's logged
        rows by g itself, the estimate (b) of offline_estimates checked where a ranker is cheapest to have."""
        self.seed, self.clip, self.truth, self.n_bins, self.mnar_monitor = seed, clip, truth, n_bins, mnar_monitor
        self.estimate_clip = clip if estimate_clip is None else estimate_clip  # rho clip of `estimates`
        self.top_k, self.top_k_group = top_k, top_k_group

    def columns(self, batch, outputs: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        answered = batch.labels["questionnaire_answered"].detach().float().cpu()
        satisfied = torch.where(answered > 0.5, batch.labels["satisfied"].detach().float().cpu(),
                                torch.zeros_like(answered))
        cols = {"sat_prob": outputs["sat_prob"].detach().float().cpu().clone(), "answered": answered.clone(),
                "satisfied": satisfied, **row_ids(batch)}
        if self.truth in batch.truth:
            cols["true_p"] = batch.truth[self.truth].detach().float().cpu().clone()
        if "propensity" in outputs:
            cols["propensity"] = outputs["propensity"].detach().float().cpu().clone()
        return cols

    def metrics(self, columns: Dict[str, torch.Tensor], counters: Dict[str, float]) -> Dict[str, Any]:
        if not columns:
            return {"ideal_loss_all": float("nan"), "auc_true_all": float("nan"), "auc_answered": float("nan")}
        order = torch.from_numpy(canonical_order(columns))
        c = {k: v[order] for k, v in columns.items()}
        pred, o, s = c["sat_prob"], c["answered"], c["satisfied"]
        true_p = c.get("true_p")
        out: Dict[str, Any] = satisfaction_metrics(pred, s, o, true_p, self.n_bins)
        answered = int((o > 0.5).sum())
        out.update({
            "auc_answered": out["answered_auc"],
            "answered_rows": answered,
            "batches_no_answered": int(counters.get("empty", 0)),
            "clipped_propensities": int(counters.get("clipped", 0)),
            "seed": self.seed,
        })
        if true_p is not None:
            out.update(auc_vs_drawn_truth(pred, true_p, self.seed))  # + the truth itself on the same draw
        else:
            out.update(auc_true_all=float("nan"), rows_all=int(pred.numel()))
            out["ideal_loss_all"] = float("nan")
        if "propensity" in c:
            rho = c["propensity"]
            out["propensity_below_clip_all"] = int((rho < self.clip).sum())
            out["mean_propensity_all"] = float(rho.double().mean())
            out["mean_propensity_answered"] = float(rho[o > 0.5].double().mean()) if answered else float("nan")
            req = c.get("id_request_id")
            out["estimates"] = satisfaction_estimates(  # unbiased offline estimates with 95% intervals
                pred.double().numpy(), o.numpy(), s.numpy(), rho.double().numpy(), clip=self.estimate_clip,
                groups=None if req is None else req.numpy(), true_p=None if true_p is None else true_p.numpy(),
                seed=self.seed)
            group = c.get(f"id_{self.top_k_group}")
            if group is not None:  # (b) with g as the ranker (and as DR's imputation): each group's top k by g
                est, q, groups = out["estimates"], pred.double().numpy(), group.numpy()
                est["top_k"] = top_k_satisfaction_estimates(q, groups, o.numpy(), s.numpy(), rho.double().numpy(), q,
                                                            k=self.top_k, clip=self.estimate_clip, seed=self.seed)
                est["top_k_setup"] = {"k": self.top_k, "group": self.top_k_group}
                if est["truth"] is not None:
                    est["truth"]["top_k"] = truth_top_k_satisfaction(q, groups, true_p.numpy(), self.top_k)
        out["reliability_truth_all"] = reliability_table(pred, true_p, self.n_bins) if true_p is not None else None
        out["undefined"] = self.undefined(s[o > 0.5], int(o.numel()), true_p is not None)
        out["undefined_by_config"] = sorted(m for m, why in out["undefined"].items() if why.endswith(self.MNAR_POLICY))
        return out

    def undefined(self, answered_labels: torch.Tensor, rows: int, has_truth: bool) -> Dict[str, str]:
        """{metric: why} for the metrics this split cannot define or select on (selection falls back, `fallbacks`)."""
        out: Dict[str, str] = {}
        answered = int(answered_labels.numel())
        why = one_class_reason("satisfied", answered_labels, rows="answered rows")
        if why:
            out.update(auc_answered=why, answered_auc=why)
        if answered == 0:
            out.update(answered_logloss="no answered rows", answered_ece="no answered rows", loss="no answered rows")
        elif answered < rows and self.mnar_monitor == "loss":
            mnar = (f"missing not at random: {answered} of {rows} rows answered, a self-selected sample "
                    f"{self.MNAR_POLICY}")
            out.update({m: mnar for m in self.ANSWERED if m not in out})
        if not has_truth:
            out.update({k: f"no truth column {self.truth} (real data)" for k in ("ideal_loss_all", "auc_true_all")})
        return out

"""The report's figures: matplotlib (Agg, no display) drawn from run metrics, returned as embeddable PNG.

Each builder returns a `Figure` holding the PNG and the exact numbers it plots (`data`), so the HTML carries
both and a test can check every plotted number against the run's metrics files. A builder returns None
when its runs hold nothing to plot (e.g. no truth columns: no oracle points).
"""
from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from satrank.jobs.reporting.runs import STAGE2_JOBS, Run

CURVE_METRICS = ("click_auc", "auc", "auc_answered", "ideal_loss_all", "sat_auc_answered")  # eval metric plotted
ESTIMATE_FORMS = ("naive", "ips", "snips", "dr")


@dataclass
class Figure:
    key: str  # a stable id: fig-<kind>-<run>
    title: str
    caption: str
    png_b64: str
    data: Dict[str, Any]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def training_curves(run: Run) -> Optional[Figure]:
    """Train loss per epoch and the validation loss and AUC-type metric per evaluation."""
    train = [(e["epoch"], e["loss"]) for e in run.events("train_epoch") if _finite(e.get("loss"))]
    evals = run.events("eval")
    metric = next((m for m in CURVE_METRICS if any(_finite(e.get(m)) for e in evals)), None)
    val_loss = [(e["epoch"], e["loss"]) for e in evals if _finite(e.get("loss"))]
    val_metric = [(e["epoch"], e[metric]) for e in evals if metric and _finite(e.get(metric))]
    if not (train or val_loss or val_metric):
        return None
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    if train:
        ax1.plot(*zip(*train), "o-", label="train loss")
    if val_loss:
        ax1.plot(*zip(*val_loss), "s--", label="validation loss")
    ax1.set_xlabel("epoch"), ax1.set_ylabel("loss"), ax1.legend(fontsize=8)
    if val_metric:
        ax2.plot(*zip(*val_metric), "o-", color="tab:green")
        ax2.set_ylabel(f"validation {metric}")
    ax2.set_xlabel("epoch")
    fig.suptitle(f"{run.name} ({run.job})", fontsize=10)
    fig.tight_layout()
    data = {"train_loss": [list(p) for p in train], "validation_loss": [list(p) for p in val_loss],
            "validation_metric": metric, "validation_metric_values": [list(p) for p in val_metric]}
    return Figure(f"fig-curves-{run.name}", f"Training curves: {run.name}",
                  f"metrics.jsonl of {run.path}: train loss per epoch, validation loss and {metric} per evaluation",
                  _png(fig), data)


def reliability(run: Run) -> Optional[Figure]:
    """Reliability diagram: mean prediction vs observed rate (click / answer label) or vs the truth (g)."""
    table, against = run.metrics.get("reliability"), "observed label rate"
    if not table:
        table, against = run.metrics.get("reliability_truth_all"), "mean true_p_satisfied"
    if not table:
        return None
    pts = [(b["mean_pred"], b["observed_rate"], b["count"]) for b in table
           if _finite(b.get("mean_pred")) and _finite(b.get("observed_rate"))]
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    x, y, n = zip(*pts)
    ax.scatter(x, y, s=[20 + 80 * c / max(n) for c in n], zorder=3)
    ax.plot(x, y, "-", alpha=0.6)
    lim = max(max(x), max(y)) * 1.05
    ax.set_xlim(0, lim), ax.set_ylim(0, lim)
    ax.set_xlabel("mean prediction in bin"), ax.set_ylabel(against), ax.legend(fontsize=8)
    ax.set_title(f"{run.name} ({run.job})", fontsize=10)
    return Figure(f"fig-reliability-{run.name}", f"Reliability: {run.name}",
                  f"{run.path}/metrics.json bins (marker size ~ rows in bin) against the {against}",
                  _png(fig), {"bins": [list(p) for p in pts], "against": against})


def estimates(run: Run) -> Optional[Figure]:
    """g's loss on all impressions: naive / IPS / SNIPS / DR with 95% intervals, and the truth where known."""
    est = run.metrics.get("estimates")
    if not est or "loss" not in est:
        return None
    forms = [f for f in ESTIMATE_FORMS if _finite(est["loss"].get(f, {}).get("value"))]
    values = {f: est["loss"][f] for f in forms}
    truth = (est.get("truth") or {}).get("loss")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for i, f in enumerate(forms):
        v = values[f]
        lo, hi = v["lo"] if _finite(v["lo"]) else v["value"], v["hi"] if _finite(v["hi"]) else v["value"]
        ax.errorbar([i], [v["value"]], yerr=[[v["value"] - lo], [hi - v["value"]]], fmt="o", capsize=4)
    if _finite(truth):
        ax.axhline(truth, color="black", linestyle="--", label=f"truth (ideal_loss_all) {truth:.4f}")
        ax.legend(fontsize=8)
    ax.set_xticks(range(len(forms)), forms)
    ax.set_ylabel("g's loss on all impressions (eq. 2)")
    ax.set_title(f"{run.name}: offline estimates, 95% bootstrap intervals", fontsize=10)
    return Figure(f"fig-estimates-{run.name}", f"Offline estimates: {run.name}",
                  "naive = answered rows only; IPS / SNIPS / DR weight the answers by 1/rho (docs/stage1.md)",
                  _png(fig), {"loss": values, "truth": truth})


def tradeoff(runs: Sequence[Run]) -> Optional[Figure]:
    """true_sat@k against true_click@k as the fusion weight w_sat sweeps, per stage-2 run, with the oracles."""
    curves = {r.name: r.metrics["tradeoff"] for r in runs if r.job in STAGE2_JOBS and r.metrics.get("tradeoff")}
    points = {r.name: (r.metrics.get("true_click@10"), r.metrics.get("true_sat@10")) for r in runs
              if r.job in STAGE2_JOBS and not r.metrics.get("tradeoff") and _finite(r.metrics.get("true_sat@10"))}
    if not curves:
        return None
    k = next(key.split("@")[1] for key in next(iter(curves.values()))[0] if key.startswith("true_sat@"))
    sat, click = f"true_sat@{k}", f"true_click@{k}"
    ref = next(r.metrics for r in runs if r.name in curves)
    oracles = {o: (ref.get(f"{click}_oracle_{o}"), ref.get(f"{sat}_oracle_{o}")) for o in ("sat", "click")}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, curve in curves.items():
        ax.plot([p[click] for p in curve], [p[sat] for p in curve], "o-", label=name)
        for p in curve:
            ax.annotate(f"w={p['w_sat']:g}", (p[click], p[sat]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for name, (x, y) in points.items():
        ax.plot([x], [y], "D", label=f"{name} (own ranking)")
    for o, (x, y) in oracles.items():
        if _finite(x) and _finite(y):
            ax.plot([x], [y], "*", markersize=12, label=f"oracle by true_p_{'satisfied' if o == 'sat' else 'click'}")
    ax.set_xlabel(f"{click} (true click probability of the top {k})")
    ax.set_ylabel(f"{sat} (true satisfaction of the top {k})")
    ax.legend(fontsize=7)
    return Figure("fig-tradeoff", f"Trade-off: {sat} against {click} as w_sat sweeps",
                  "rank by log P(click) + w_sat log P(sat) on the candidate sets (evaluate.tradeoff_sat_weights)",
                  _png(fig), {"curves": curves, "points": points, "oracles": oracles})


def all_figures(runs: Sequence[Run]) -> List[Figure]:
    figs: List[Optional[Figure]] = [training_curves(r) for r in runs]
    figs += [reliability(r) for r in runs]
    figs += [estimates(r) for r in runs]
    figs.append(tradeoff(runs))
    return [f for f in figs if f is not None]

"""Which validation metric a run selects on (RUN/best, restore_best, early stopping), decided once per run from
the first evaluation: `train.monitor` when it is defined on the validation split, else an explicit fallback.

Why: on a missing-at-random validation split (every row clicked and answered, as in a public rating set's
randomly assigned ratings) a click or answer AUC has one class and is undefined, and a log loss on
all-positive labels is minimised by predicting 1 everywhere: selecting on it picks an arbitrary epoch. An
evaluator says which of its metrics are undefined on the split it saw (the `undefined` entry of its
metrics: {name: reason}; names a config policy made undefined are also listed under `undefined_by_config`,
and falling back from them is logged as INFO, not WARNING) and which defined metric replaces a monitor (its `fallbacks` attribute:
{monitor: [(metric, mode), ...]}); with none defined the run keeps its last evaluation (`LAST`). The
choice and its reason are logged in one line and recorded in RUN/metrics.json (`monitor_used`,
`monitor_mode_used`, `monitor_fallback_reason`). A monitor that is merely null at one evaluation (not
declared undefined: e.g. a diverged model) keeps the old rule: that evaluation is no improvement.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Tuple

LAST = "last_evaluation"  # no defined metric: every evaluation counts as the best so far (the run ends on the last)

Fallbacks = Mapping[str, Sequence[Tuple[str, str]]]


@dataclass(frozen=True)
class Selection:
    """The metric and mode a run selects on; `reason` is None when it is train.monitor itself."""

    metric: str
    mode: str  # min | max | last
    reason: Optional[str] = None
    planned: bool = False  # the fallback is a configured policy (logged as INFO), not a surprise (WARNING)

    def improved(self, value: Optional[float], best: Optional[float], min_delta: float) -> bool:
        """Whether `value` beats `best` (the first defined value always does; LAST: every evaluation does)."""
        if self.mode == "last":
            return True
        if value is None:
            return False
        if best is None:
            return True
        return value < best - min_delta if self.mode == "min" else value > best + min_delta


def undefined_reason(metrics: Mapping[str, Any], name: str) -> Optional[str]:
    """Why metric `name` cannot select on this evaluation (None: it can): declared by the evaluator, or absent."""
    declared = metrics.get("undefined") or {}
    if name in declared:
        return str(declared[name])
    if name not in metrics:
        return "not an evaluation metric"
    return None


def choose(monitor: str, mode: str, metrics: Mapping[str, Any], fallbacks: Optional[Fallbacks] = None,
           split: str = "validation") -> Selection:
    """`monitor` (mode `mode`) if the evaluator did not declare it undefined, else its first defined fallback,
    else LAST. Raises KeyError when `monitor` is not a metric at all (a config typo, not a property of the data)."""
    if monitor not in metrics:
        raise KeyError(f"train.monitor: {monitor!r} is not an evaluation metric; have {sorted(metrics)}")
    why = undefined_reason(metrics, monitor)
    if why is None:
        return Selection(monitor, mode)
    tried: List[str] = []
    for metric, fb_mode in (fallbacks or {}).get(monitor, ()):
        fb_why = undefined_reason(metrics, metric)
        if fb_why is None:
            return Selection(metric, fb_mode, f"{monitor} is undefined on the {split} split ({why}); "
                                              f"selecting on {metric} ({fb_mode}) instead",
                             planned=monitor in (metrics.get("undefined_by_config") or ()))
        tried.append(f"{metric}: {fb_why}")
    also = f"; fallbacks undefined too ({'; '.join(tried)})" if tried else ""
    return Selection(LAST, "last", f"{monitor} is undefined on the {split} split ({why}){also}; no validation "
                                   f"metric can select: the run keeps its last evaluation")

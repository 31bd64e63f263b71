"""What the stage-1 jobs (satrank.jobs.pretrain / propensity / satisfaction) check and report beyond training:

- `check_behaviour_leak` (satrank.jobs.propensity, before any process group): a `propensity.behaviour` input
  that determines `questionnaire_answered` on the training data lets rho see its own label (a log where
  click = answered gives rho ~ 1 on every answered row, which silently turns IPS into the naive loss). The
  job REFUSES such a config with one line naming the input, its column and the fix (drop it from
  propensity.behaviour): dropping it silently would train another model than the one configured.
- `evaluate_test`: every stage-1 job scores DIR/test, when it exists, with the weights it ends on (after
  restore_best) and the validation's evaluator, so metrics.json holds a `test` entry with the same metric set.
- `stage1_evaluator`: each stage-1 job's validation evaluator, in one place: the job evaluates with it and
  satrank.jobs.config_checks (every job, at parse time) checks `<stage>_train.monitor` against its metrics.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from satrank.jobs.engine.readers import evaluation_loader
from satrank.jobs.engine.runtime import get_logger
from satrank.models.metrics.calibration import auc
from satrank.models.stage1.config import BEHAVIOUR_LABEL
from satrank.models.stage1.tasks import share_watched
from satrank.pipeline.config import ConfigError
from satrank.pipeline.shards import list_shards, open_parquet

logger = get_logger("stage1")


MAX_DISTINCT = 1000  # an input with more distinct values is checked by the threshold rule only
AUC_ROWS = 2_000_000  # each input's single-input AUC is computed on the first rows (bounded memory on big logs)


class _Evidence:
    """Streaming evidence (file by file, bounded memory) that an input x determines the 0/1 answer: the range of
    x in each answer class, and, while x has at most MAX_DISTINCT values, the answer count of every value."""

    def __init__(self) -> None:
        self.lo, self.hi = {True: np.inf, False: np.inf}, {True: -np.inf, False: -np.inf}
        self.groups: Optional[Dict[float, list]] = {}  # value -> [rows, answered rows]; None: too many values
        self.rows = 0

    def update(self, x: np.ndarray, answered: np.ndarray) -> None:
        self.rows += len(x)
        for cls in (True, False):
            v = x[answered == cls]
            if len(v):
                self.lo[cls], self.hi[cls] = min(self.lo[cls], v.min()), max(self.hi[cls], v.max())
        if self.groups is None:
            return
        values, inverse = np.unique(x, return_inverse=True)
        if len(values) + len(self.groups) > 2 * MAX_DISTINCT:
            self.groups = None
            return
        positives = np.bincount(inverse, weights=answered.astype(np.float64), minlength=len(values))
        for v, n, k in zip(values.tolist(), np.bincount(inverse, minlength=len(values)).tolist(), positives.tolist()):
            g = self.groups.setdefault(v, [0, 0])
            g[0], g[1] = g[0] + n, g[1] + int(k)
        if len(self.groups) > MAX_DISTINCT:
            self.groups = None

    def verdict(self) -> Optional[str]:
        """How x determines the answer (None: it does not); both classes must have been seen. A threshold
        separates the classes, or (at most MAX_DISTINCT values, >= 10 rows each on average) every value occurs
        with one answer class only."""
        if self.hi[False] < self.lo[True]:
            return f"every answered row has a value >= {self.lo[True]:g}, every other row one <= {self.hi[False]:g}"
        if self.hi[True] < self.lo[False]:
            return f"every answered row has a value <= {self.hi[True]:g}, every other row one >= {self.lo[False]:g}"
        if self.groups is None or len(self.groups) * 10 > self.rows:
            return None
        if all(k == 0 or k == n for n, k in self.groups.values()):
            return f"each of its {len(self.groups)} values occurs with one answered class only"
        return None


def _determines(x: np.ndarray, answered: np.ndarray) -> Optional[str]:
    """`_Evidence.verdict` of one array (both answer classes present)."""
    ev = _Evidence()
    ev.update(x, answered)
    return ev.verdict()


def check_behaviour_leak(data_dir: Path, data_cfg: Any, behaviour: Any,
                         duration_feature: str = "duration_s") -> Dict[str, Any]:
    """Per `propensity.behaviour` input on DIR/train: its single-input AUC for questionnaire_answered (first
    AUC_ROWS rows) and the answer rate (reported in metrics.json); raises ConfigError (one line) on an input
    that determines the answer. `watch_fraction` is checked as the model sees it, clip(watch / duration, 0, 1)
    with the duration from the dense feature `duration_feature`'s column. Read file by file; rows with a null in
    these columns are left out; a missing column is left to the reader's error."""
    if not behaviour:
        return {}
    split = Path(data_dir) / "train"
    fs, files = list_shards(str(split))
    label = data_cfg.labels.questionnaire_answered
    columns = {b: getattr(data_cfg.labels, BEHAVIOUR_LABEL.get(b, b)) for b in behaviour}
    duration = next((f.column for f in data_cfg.dense if f.name == duration_feature), None)
    if "watch_fraction" in behaviour:
        if duration is None:
            raise ConfigError(f"propensity.duration_feature: {duration_feature!r} is not a dense feature of data.dense "
                              f"({[f.name for f in data_cfg.dense]}); propensity.behaviour watch_fraction needs it")
    read = list(dict.fromkeys([label, *columns.values(), *([duration] if "watch_fraction" in behaviour else [])]))
    evidence = {b: _Evidence() for b in behaviour}
    sample: Dict[str, list] = {b: [] for b in [*behaviour, label]}
    rows = answered_rows = sampled = 0
    for path in files:
        pf = open_parquet(fs, path)
        if any(c not in pf.schema_arrow.names for c in read):
            return {}  # the reader names the missing column
        table = pf.read(columns=read)
        arrays = {c: table.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in table.column_names}
        keep = np.all([~np.isnan(a) for a in arrays.values()], axis=0)
        answered = arrays[label][keep] > 0.5
        rows, answered_rows = rows + len(answered), answered_rows + int(answered.sum())
        take = max(0, min(len(answered), AUC_ROWS - sampled))
        sampled += take
        sample[label].append(answered[:take])
        for name in behaviour:
            x = arrays[columns[name]][keep]
            if name == "watch_fraction":
                x = share_watched(torch.from_numpy(x), torch.from_numpy(arrays[duration][keep])).numpy()
            evidence[name].update(x, answered)
            sample[name].append(x[:take])
    report: Dict[str, Any] = {"rows": rows, "answer_rate": answered_rows / rows if rows else None, "auc": {}}
    if answered_rows in (0, rows):
        return report  # one class: nothing to leak (the propensity model cannot learn it either)
    y = torch.from_numpy(np.concatenate(sample[label]).astype(np.float64))
    for name in behaviour:
        column = columns[name]
        report["auc"][name] = auc(torch.from_numpy(np.concatenate(sample[name])), y)
        how = evidence[name].verdict()
        if how is not None:
            rest = [b for b in behaviour if b != name]
            raise ConfigError(
                f"propensity.behaviour: {name} (column {column!r} of {split}) determines {label} on the training data "
                f"({how}): rho would see its own label; drop it from propensity.behaviour "
                f"(--set propensity.behaviour=[{','.join(rest)}])")
    return report


def evaluate_test(trainer: Any, data_dir: Path, cfg: Any, evaluator: Any) -> Optional[Dict[str, Any]]:
    """The evaluator's metrics on DIR/test with the trainer's current weights (collective), None without DIR/test."""
    split = Path(data_dir) / "test"
    if not split.is_dir():
        logger.info("no %s: no test evaluation", split)
        return None
    metrics = trainer.evaluate(evaluation_loader(cfg, split), evaluator)
    logger.info("test (%s): %s", split, ", ".join(f"{k}={v:.5g}" for k, v in metrics.items() if isinstance(v, float)))
    return metrics


def stage1_evaluator(stage: str, cfg: Any, seed: int = 0) -> Any:
    """The validation evaluator of satrank.jobs.<stage> (pretrain | propensity | satisfaction): what the job
    evaluates with, and what satrank.jobs.config_checks checks `<stage>_train.monitor` against."""
    from satrank.models.metrics.stage1_eval import BinaryEvaluator, SatisfactionEvaluator

    if stage == "pretrain":
        return BinaryEvaluator("click_prob", "click", "true_p_click")
    if stage == "propensity":
        return BinaryEvaluator("answer_prob", "questionnaire_answered", "true_p_answered", reliability=True,
                               distribution=True)
    if stage == "satisfaction":
        sat = cfg.satisfaction
        return SatisfactionEvaluator(seed=seed, clip=sat.clip, mnar_monitor=sat.mnar_monitor,
                                     estimate_clip=sat.resolved_estimate_clip, top_k=cfg.evaluate.offline_k,
                                     top_k_group=cfg.evaluate.offline_group)
    raise KeyError(f"no stage-1 job {stage!r}")

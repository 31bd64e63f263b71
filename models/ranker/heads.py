"""The ranker's heads, declared once: each `HeadSpec` says what a head learns, how, and how it is served.

Why: a head used to carry three names (`watch_time` in the ranker, `watch_time_log1p` in the task's
outputs, `watch_time_pred` in serving) and adding one meant editing about ten files. Now the ranker's
towers (satrank.models.ranker.saqrec), the multi-task loss terms (satrank.models.ranker.losses), the
evaluation metrics (satrank.models.metrics.ranker_eval), the serving fusion (satrank.models.common.fusion), the
scored columns (satrank.pipeline.score_writer via satrank.models.serving) and the export outputs are all
derived from the list `head_specs(model, loss)`.

One name per head, end to end: `name` is the ranker's output key, the task's output key (the raw
head: a logit, or log1p seconds for watch time), the loss part `loss/<name>`, the validation loss
`loss_<name>` and the metric prefix (`<name>_auc`). Kept as published, so existing outputs and tables
stay comparable: the Parquet/export column `output` (click -> p_click, satisfaction -> p_satisfied,
watch_time -> watch_time_pred; every other head -> p_<name>) and the built-in metric keys (click_auc /
click_gauc, sat_auc_answered, watch_time_mae / watch_time_xauc: `HeadSpec.metric` names the family).

Built-in heads (switches in `model:`, weights in `loss:`), in loss-summation order:
  click         u_f . v_i, BCE on `click` (eq. 15), weight 1
  satisfaction  u_f . MLP_s(v_i), BCE on g's pseudo-labels with label correction (eqs. 16-18), loss.beta
  watch_time    MLP_wt([u_f, v_i, log1p duration]) ~ log1p(watch_time_s), loss.watch_time_weight
  skip          u_f . MLP_skip(v_i), BCE on `skip`, loss.skip_weight
An extra head is one entry of `model.extra_heads` (`ExtraHead`): a binary label column (listed in
`data.labels.extra` so the reader loads it), u_f . MLP_<name>(v_i), BCE with its own weight, AUC as its
metric, sigmoid when served and a fusion weight on log p_<name> (0 = reported, not ranked by).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, List, Optional, Tuple

from satrank.pipeline.config import ConfigError

if TYPE_CHECKING:
    from satrank.models.ranker.config import ModelConfig, MultiTaskLossConfig

STANDARD = ("click", "satisfaction", "watch_time")  # always a column of the scores (null when a model lacks it)
RESERVED = ("user", "item", "fusion_weights", "loss", "rows", "pseudo_satisfaction",
            "pseudo_satisfaction_logit", "satisfaction_tower", "sat_head", "sat_head_logit",
            "score", "rank", "request_id", "user_id", "item_id")


@dataclass
class ExtraHead:
    """`model.extra_heads` item: a binary head u_f . MLP(v_i) learned from one label column with BCE."""

    name: str  # the head's one name (output key, loss part, metric prefix); output column p_<name>
    label: str  # Batch.labels key: a column listed in data.labels.extra
    weight: float = 0.1  # weight of its BCE in the multi-task loss
    fusion_weight: float = 0.0  # weight of log p_<name> in the serving score (score.fusion covers the built-ins)
    hidden: List[int] = field(default_factory=list)  # MLP: R^d -> R^d ([] = linear)

    def validate(self, path: str) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ConfigError(f"{path}.name: {self.name!r} must be lower-case letters, digits and _")
        if self.name in ("click", "satisfaction", "watch_time", "skip") or self.name in RESERVED:
            raise ConfigError(f"{path}.name: {self.name!r} is a built-in head or a reserved output key")
        if not self.label:
            raise ConfigError(f"{path}.label: must name a label column (data.labels.extra)")
        if self.weight < 0:
            raise ConfigError(f"{path}.weight: must be >= 0, got {self.weight}")
        if any(w < 1 for w in self.hidden):
            raise ConfigError(f"{path}.hidden: hidden widths must be >= 1, got {self.hidden}")


@dataclass(frozen=True)
class HeadSpec:
    """Everything the pipeline needs to know about one head (see the module doc)."""

    name: str
    label: Optional[str]  # Batch.labels key it learns; None: the satisfaction tower learns g's pseudo-labels
    loss: str  # "bce" | "pseudo_bce" (eqs. 16-18) | "log1p_regression" (loss.watch_time_loss)
    weight: float  # weight of its term in the multi-task loss
    metric: str  # "click" (auc, gauc) | "answered_auc" | "watch_time" (mae, xauc) | "auc"
    transform: str  # served value from the raw head: "sigmoid" | "expm1" (clamped at 0 seconds)
    output: str  # column of satrank.jobs.score and output of the exported module
    fusion_key: str  # its weight's name in the fused score (score.fusion.<key>, or w_<name> for extras)
    fusion_weight: float  # the weight of an extra head (built-ins read score.fusion)
    tower: str  # "dot" (u_f . v_i) | "dot_mlp" (u_f . MLP(v_i)) | "regression" (MLP([u_f, v_i, log1p dur]))
    module: Optional[str]  # the ranker attribute holding its MLP (kept stable: checkpoints name it)
    hidden: Tuple[int, ...] = ()


def _builtin(name: str, model: "ModelConfig", loss: "MultiTaskLossConfig") -> HeadSpec:
    if name == "click":
        return HeadSpec("click", "click", "bce", 1.0, "click", "sigmoid", "p_click", "w_click", 0.0, "dot", None)
    if name == "satisfaction":
        return HeadSpec("satisfaction", None, "pseudo_bce", loss.beta, "answered_auc", "sigmoid", "p_satisfied",
                        "w_sat", 0.0, "dot_mlp", "sat_tower", tuple(model.sat_mlp_hidden))
    if name == "watch_time":
        return HeadSpec("watch_time", "watch_time_s", "log1p_regression", loss.watch_time_weight, "watch_time",
                        "expm1", "watch_time_pred", "w_watch_time", 0.0, "regression", "wt_tower",
                        tuple(model.watch_time_hidden))
    if name == "skip":
        return HeadSpec("skip", "skip", "bce", loss.skip_weight, "auc", "sigmoid", "p_skip", "w_skip", 0.0,
                        "dot_mlp", "skip_tower", tuple(model.skip_mlp_hidden))
    raise KeyError(f"no built-in head {name!r}")


def _extra(h: ExtraHead) -> HeadSpec:
    return HeadSpec(h.name, h.label, "bce", h.weight, "auc", "sigmoid", f"p_{h.name}", f"w_{h.name}",
                    h.fusion_weight, "dot_mlp", f"{h.name}_tower", tuple(h.hidden))


def head_specs(model: "ModelConfig", loss: Optional["MultiTaskLossConfig"] = None) -> List[HeadSpec]:
    """The heads a ranker built from `model` has, in loss-summation order (click first)."""
    from satrank.models.ranker.config import MultiTaskLossConfig

    loss = loss or MultiTaskLossConfig()
    names = ["click"]
    if model.use_satisfaction:
        names.append("satisfaction")
    if model.use_watch_time:
        names.append("watch_time")
    if model.use_skip_head:
        names.append("skip")
    specs = [_builtin(n, model, loss) for n in names]
    if model.saqrec:
        specs += [_extra(h) for h in model.extra_heads]
    return specs


def serving_specs(model: "ModelConfig", loss: Optional["MultiTaskLossConfig"] = None) -> List[HeadSpec]:
    """The heads a scorer writes columns for: the STANDARD three always (stable schema, null when the model
    lacks one, e.g. a stage-1 click model), then every other head of `model` (skip, extras)."""
    from satrank.models.ranker.config import MultiTaskLossConfig

    loss = loss or MultiTaskLossConfig()
    std = [_builtin(n, model, loss) for n in STANDARD]
    return std + [s for s in head_specs(model, loss) if s.name not in STANDARD]

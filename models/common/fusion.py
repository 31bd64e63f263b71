"""The serving score: one number per (request, candidate) fused from the ranker's towers.

    score = w_click * log p_click + w_sat * log p_sat + w_watch_time * log1p(watch_time_pred)

with p_click = sigmoid(y) (click tower, SAQRec eq. 14), p_sat = sigmoid(s_f) (satisfaction tower,
eq. 14) and watch_time_pred = max(expm1(h_wt), 0) seconds (the watch-time head regresses
log1p(watch_time_s), so log1p(watch_time_pred) = max(h_wt, 0)). The log terms are computed from the
logits (log sigmoid(y) = -softplus(-y)), so they stay finite for saturated probabilities.

Why this form: with w_click = w_sat = 1 and w_watch_time = 0 (the default), exp(score) =
P(click) * P(satisfied) is the expected number of satisfied clicks of showing the item, the ranking
objective SAQRec argues for (sec. 1, 4.4); the same fusion as satrank.models.metrics.ranker_eval's `fusion` rank score
at w = 1. Raising w_sat trades clicks for satisfaction; w_watch_time adds an engagement term.
Ranking uses `score` only; the towers' values are written next to it for analysis and re-weighting.

Every head of the run (satrank.models.ranker.heads.serving_specs) is served: its value comes from its
raw head through `HeadSpec.transform` (sigmoid, or expm1 clamped at 0 s) and its term is
log p (sigmoid heads) or log1p(watch_time_pred) (the expm1 head), weighted by `score.fusion.<key>`
for the three built-ins and by the head's own `fusion_weight` for an extra head (FORMULA gets a
`+ w_<name> * log p_<name>` term per extra head).

A model without some tower (the stage-1 click model has neither satisfaction nor watch time; a
ranker built with mtl off has no satisfaction tower) contributes no term for it: its weight is
replaced by 0 (`effective_weights`), the job logs that, and the output column is null (NaN in the
exported module). If that leaves no positive weight the fusion is refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from satrank.pipeline.config import ConfigError

if TYPE_CHECKING:
    from satrank.models.ranker.heads import HeadSpec

FORMULA = "score = w_click * log p_click + w_sat * log p_satisfied + w_watch_time * log1p(watch_time_pred)"
CONFIG_WEIGHTS = ("w_click", "w_sat", "w_watch_time")  # the fields of FusionConfig (built-in heads)


@dataclass
class FusionConfig:
    """`score.fusion:` weights of the fused ranking score (see the module doc for the formula)."""

    w_click: float = 1.0
    w_sat: float = 1.0
    w_watch_time: float = 0.0

    def validate(self, path: str) -> None:
        for name in CONFIG_WEIGHTS:
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ConfigError(f"{path}.{name}: must be finite, got {value}")
        if not any(getattr(self, n) > 0 for n in CONFIG_WEIGHTS):
            raise ConfigError(f"{path}: at least one of {list(CONFIG_WEIGHTS)} must be > 0")

    def weights(self) -> Dict[str, float]:
        return {n: float(getattr(self, n)) for n in CONFIG_WEIGHTS}


def formula(specs: Sequence["HeadSpec"]) -> str:
    """FORMULA plus one term per head beyond the built-ins."""
    extra = [f" + {s.fusion_key} * log {s.output}" for s in specs if s.fusion_key not in CONFIG_WEIGHTS]
    return FORMULA + "".join(extra)


def configured_weights(cfg: FusionConfig, specs: Sequence["HeadSpec"]) -> Dict[str, float]:
    """fusion key -> weight: score.fusion for the built-ins, the head's own fusion_weight otherwise."""
    return {s.fusion_key: float(getattr(cfg, s.fusion_key)) if s.fusion_key in CONFIG_WEIGHTS else float(s.fusion_weight)
            for s in specs}


def effective_weights(cfg: FusionConfig, heads: Iterable[str], specs: Sequence["HeadSpec"]) -> Dict[str, float]:
    """The configured weights with those of heads the model lacks set to 0; ConfigError when no
    positive weight remains (the score would not rank by anything the model predicts)."""
    heads = set(heads)
    weights = configured_weights(cfg, specs)
    out = {s.fusion_key: (weights[s.fusion_key] if s.name in heads else 0.0) for s in specs}
    if not any(v > 0 for v in out.values()):
        raise ConfigError(
            f"score.fusion: the model predicts only {sorted(heads)}, and every weight on them is <= 0 "
            f"(configured {weights}); give one of them a positive weight")
    return out


class Fusion(nn.Module):
    """Raw heads (by head name) -> (one served value per spec, in `specs` order, then score), float32 [B].

    A head the model lacks is absent from the input and comes out as NaN (its weight is 0, see
    `effective_weights`). The weights are plain Python floats, so a traced module bakes them in.
    """

    def __init__(self, cfg: FusionConfig, specs: Sequence["HeadSpec"], heads: Iterable[str]) -> None:
        super().__init__()
        self.specs: List["HeadSpec"] = list(specs)
        self.heads = [s.name for s in self.specs if s.name in set(heads)]
        self.weights = effective_weights(cfg, self.heads, self.specs)
        self.outputs = [s.output for s in self.specs] + ["score"]

    def forward(self, raw: Dict[str, Optional[torch.Tensor]]):
        present = [raw[s.name] for s in self.specs if raw.get(s.name) is not None]
        if not present:
            raise ValueError(f"fusion: the model produced none of the heads {[s.name for s in self.specs]}")
        like = present[0].float()
        nan = torch.full_like(like, float("nan"))
        score = torch.zeros_like(like)
        values = []
        for s in self.specs:
            t = raw.get(s.name)
            if t is None:
                values.append(nan)
                continue
            if s.transform == "sigmoid":
                y = t.float()
                values.append(torch.sigmoid(y))
                score = score + self.weights[s.fusion_key] * F.logsigmoid(y)
            else:  # expm1: a log1p regression head, served in seconds
                h = t.float().clamp_min(0.0)
                values.append(torch.expm1(h))
                score = score + self.weights[s.fusion_key] * h
        return (*values, score)

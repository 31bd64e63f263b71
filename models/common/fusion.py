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

A model without some tower (the stage-1 click model has neither satisfaction nor watch time; a
ranker built with mtl off has no satisfaction tower) contributes no term for it: its weight is
replaced by 0 (`effective_weights`), the job logs that, and the output column is null (NaN in the
exported module). If that leaves no positive weight the fusion is refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from satrank.pipeline.config import ConfigError

FORMULA = "score = w_click * log p_click + w_sat * log p_satisfied + w_watch_time * log1p(watch_time_pred)"
# head -> the weight field that multiplies its term
HEAD_WEIGHTS = {"p_click": "w_click", "p_satisfied": "w_sat", "watch_time_pred": "w_watch_time"}


@dataclass
class FusionConfig:
    """`score.fusion:` weights of the fused ranking score (see the module doc for the formula)."""

    w_click: float = 1.0
    w_sat: float = 1.0
    w_watch_time: float = 0.0

    def validate(self, path: str) -> None:
        for name in HEAD_WEIGHTS.values():
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ConfigError(f"{path}.{name}: must be finite, got {value}")
        if not any(getattr(self, n) > 0 for n in HEAD_WEIGHTS.values()):
            raise ConfigError(f"{path}: at least one of {list(HEAD_WEIGHTS.values())} must be > 0")

    def weights(self) -> Dict[str, float]:
        return {n: float(getattr(self, n)) for n in HEAD_WEIGHTS.values()}


def effective_weights(cfg: FusionConfig, heads: Iterable[str]) -> Dict[str, float]:
    """The configured weights with those of heads the model lacks set to 0; ConfigError when no
    positive weight remains (the score would not rank by anything the model predicts)."""
    heads = set(heads)
    out = {w: (float(getattr(cfg, w)) if h in heads else 0.0) for h, w in HEAD_WEIGHTS.items()}
    if not any(v > 0 for v in out.values()):
        raise ConfigError(
            f"score.fusion: the model predicts only {sorted(heads)}, and every weight on them is <= 0 "
            f"(configured {cfg.weights()}); give one of them a positive weight")
    return out


class Fusion(nn.Module):
    """Logits/raw heads -> (p_click, p_satisfied, watch_time_pred, score), each [B] float32.

    Inputs are the click logit, the satisfaction logit and the watch-time head on the log1p scale;
    a head the model lacks is passed as None and comes out as NaN (its weight is 0, see
    `effective_weights`). The weights are plain Python floats, so a traced module bakes them in.
    """

    def __init__(self, cfg: FusionConfig, heads: Iterable[str]) -> None:
        super().__init__()
        self.heads = [h for h in HEAD_WEIGHTS if h in set(heads)]
        self.weights = effective_weights(cfg, self.heads)

    def forward(self, click_logit: Optional[torch.Tensor], sat_logit: Optional[torch.Tensor],
                watch_time_log1p: Optional[torch.Tensor]):
        present = [t for t in (click_logit, sat_logit, watch_time_log1p) if t is not None]
        if not present:
            raise ValueError("fusion: the model produced none of the click / satisfaction / watch-time heads")
        like = present[0].float()
        nan = torch.full_like(like, float("nan"))
        score = torch.zeros_like(like)
        p_click = p_sat = wt = nan
        if click_logit is not None:
            y = click_logit.float()
            p_click = torch.sigmoid(y)
            score = score + self.weights["w_click"] * F.logsigmoid(y)
        if sat_logit is not None:
            s = sat_logit.float()
            p_sat = torch.sigmoid(s)
            score = score + self.weights["w_sat"] * F.logsigmoid(s)
        if watch_time_log1p is not None:
            h = watch_time_log1p.float().clamp_min(0.0)
            wt = torch.expm1(h)
            score = score + self.weights["w_watch_time"] * h
        return p_click, p_sat, wt, score

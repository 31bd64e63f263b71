"""The one MLP builder of the dense models (stage-1 towers and heads, SAQRec's MLP_s / MLP_skip / watch-time head).

Linear-ReLU(-Dropout) stack ending in a plain Linear to `out_dim` (no output activation). With dropout 0
it builds exactly the modules, in the same order (so the same initial weights for a seed), as the two
copies it replaces (models/common/towers.py and models/ranker/saqrec.py). No TorchRec import: the ranker
uses it without TorchRec.
"""
from __future__ import annotations

from typing import List, Sequence

from torch import nn


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, dropout: float = 0.0) -> nn.Sequential:
    """Linear-ReLU(-Dropout) per hidden width, then Linear(., out_dim); [] hidden = one Linear."""
    layers: List[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        d = h
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)

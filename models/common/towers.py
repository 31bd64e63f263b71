"""Dense building blocks of the stage-1 models: MLPs, history encoders and the user/item towers.

They consume `satrank.embeddings.tables.SparseOutput` pieces (pooled dict + sequences dict) and the batch's
dense tensor. None of them contains an embedding table, so TorchRec's pipeline tracer treats each
as a leaf module and runs it eagerly (data-dependent code is fine here, unlike in a task's forward).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor

from satrank.embeddings.tables import padded
from satrank.models.common.encoders import ATTENTION_PATHS, fused_encoder
from satrank.models.common.mlp import mlp  # noqa: F401  (re-exported: stage-1 tasks import it from here)
from satrank.models.stage1.config import TowerConfig
from satrank.pipeline.config import ConfigError
from satrank.pipeline.features import DataConfig


def check_features(path: str, names: Sequence[str], known: Sequence[str], kind: str) -> None:
    """Config feature names must exist in `data:`; the error names the config key."""
    bad = [n for n in names if n not in known]
    if bad:
        raise ConfigError(f"{path}: {bad} are not {kind} features of data:; known: {list(known)}")
    dup = sorted({n for n in names if list(names).count(n) > 1})
    if dup:
        raise ConfigError(f"{path}: features listed twice: {dup}")


def dense_index(data: DataConfig, path: str, names: Sequence[str]) -> List[int]:
    check_features(path, names, data.dense_names, "dense")
    return [data.dense_names.index(n) for n in names]


def masked_mean(seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid positions: [B, L, d], mask [B, L] (True = valid) -> [B, d]; empty rows -> 0.

    Uses where (not multiplication) so that whatever sits in padded positions, even inf/NaN,
    cannot change the result.
    """
    m = mask.unsqueeze(-1)
    total = torch.where(m, seq, torch.zeros_like(seq)).sum(dim=1)
    return total / mask.sum(dim=1, keepdim=True).clamp_min(1).to(seq.dtype)


class MeanHistoryEncoder(nn.Module):
    """Masked mean of the history embeddings."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_dim = dim

    def forward(self, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(seq, mask)


class TransformerHistoryEncoder(nn.Module):
    """One Transformer encoder layer over the left-aligned history, then a masked mean.

    Positions are embedded by recency (0 = most recent), so left alignment and padding length do not
    matter. Padded keys are masked out of attention and padded outputs out of the mean, so the result
    is independent of the padded positions. Empty histories give a zero vector (their single dummy
    key is unmasked only to keep softmax finite; its output is then masked away).

    Kept as its own class (post-norm layer, explicit ff width, masked-mean output, parameter names
    `position` / `layer.*`, no learned empty vector) so stage-1 checkpoints and figures stay as they were;
    its attention is the SAME as SAQRec's HistoryEncoder (models/common/encoders.py): `attention: fused`
    runs the layer through `fused_encoder` (SDPA, mask once per batch), `reference` through the layer itself.
    """

    def __init__(self, dim: int, heads: int, ff: int, max_len: int, dropout: float = 0.0,
                 attention: str = "fused") -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"history_encoder transformer: embedding dim {dim} not divisible by heads {heads}")
        if attention not in ATTENTION_PATHS:
            raise ConfigError(f"history_encoder transformer: attention must be one of {ATTENTION_PATHS}, got {attention!r}")
        self.out_dim = dim
        self.max_len = max_len
        self.attention = attention
        self.position = nn.Embedding(max_len, dim)
        self.layer = nn.TransformerEncoderLayer(
            d_model=dim, nhead=heads, dim_feedforward=ff, dropout=dropout, batch_first=True
        )

    def forward(self, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lengths = mask.sum(dim=1, keepdim=True)
        pos = torch.arange(seq.shape[1], device=seq.device).unsqueeze(0)
        recency = (lengths - 1 - pos).clamp(0, self.max_len - 1)
        x = torch.where(mask.unsqueeze(-1), seq + self.position(recency), torch.zeros_like(seq))
        key_pad = ~mask
        key_pad[:, 0] &= lengths.squeeze(1) > 0  # empty rows: leave one (zero) key visible
        if self.attention == "fused":
            h = fused_encoder([self.layer], None, x, ~key_pad, valid=mask)
        else:
            h = self.layer(x, src_key_padding_mask=key_pad)
        return masked_mean(h, mask)


class UserItemTower(nn.Module):
    """u = MLP_u([e(user feats); enc(history)]), v = MLP_v([e(item feats); dense item cols]), both [B, d]."""

    def __init__(self, data: DataConfig, dims: Dict[str, int], cfg: TowerConfig, path: str = "pretrain.tower"):
        super().__init__()
        single = [f.name for f in data.sparse]
        check_features(f"{path}.user_features", cfg.user_features, single, "single-valued sparse")
        check_features(f"{path}.item_features", cfg.item_features, single, "single-valued sparse")
        self.user_features = list(cfg.user_features)
        self.item_features = list(cfg.item_features)
        self.dense_idx = dense_index(data, f"{path}.item_dense", cfg.item_dense)
        self.history = cfg.history
        self.encoder: Optional[nn.Module] = None
        hist_dim = 0
        if cfg.history is not None:
            check_features(f"{path}.history", [cfg.history], [f.name for f in data.sequence], "sequence")
            self.max_len = data.feature(cfg.history).max_len
            hist_dim = dims[cfg.history]
            if cfg.history_encoder == "mean":
                self.encoder = MeanHistoryEncoder(hist_dim)
            else:
                self.encoder = TransformerHistoryEncoder(
                    hist_dim, cfg.transformer_heads, cfg.transformer_ff, self.max_len, cfg.dropout, cfg.attention
                )
        user_in = sum(dims[n] for n in self.user_features) + hist_dim
        item_in = sum(dims[n] for n in self.item_features) + len(self.dense_idx)
        self.user_mlp = mlp(user_in, cfg.hidden, cfg.dim, cfg.dropout)
        self.item_mlp = mlp(item_in, cfg.hidden, cfg.dim, cfg.dropout)
        self.dim = cfg.dim

    def encode_history(self, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        assert self.encoder is not None
        return self.encoder(seq, mask)

    def forward(
        self, pooled: Dict[str, torch.Tensor], sequences: Dict[str, JaggedTensor], dense: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        user = [pooled[n] for n in self.user_features]
        if self.history is not None:
            seq, mask = padded(sequences[self.history], self.max_len)
            user.append(self.encode_history(seq, mask))
        item = [pooled[n] for n in self.item_features]
        if self.dense_idx:
            item.append(dense[:, self.dense_idx])
        return self.user_mlp(torch.cat(user, dim=-1)), self.item_mlp(torch.cat(item, dim=-1))

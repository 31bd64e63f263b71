"""History encoder of SAQRec (eqs. 7-8): learned positional embeddings + a Transformer encoder.

Input: a padded history V [B, L, d] with mask [B, L] (True = valid, LEFT-aligned, oldest first,
most recent last; `satrank.embeddings.tables.padded` produces exactly this). Output: H [B, L, d] and
h [B, d], the representation at the LAST VALID position (the paper's "last positions").

Design choices (documented because the paper leaves them open):
- Positions count RECENCY: the most recent item has position 0, the one before it 1, ... so that
  with left-aligned variable-length rows the same position always means the same recency (eq. 7's
  P is learned, one row per recency index, max_len rows).
- Padding never changes a valid position's output: padded inputs are zeroed before the encoder,
  they are masked as attention keys (src_key_padding_mask), and the padded rows of H are zeroed on
  output (so downstream attention/pooling can multiply by H without NaN/garbage leaking).
- EMPTY history (length 0, common for hist_dissatisfied): attention over zero keys is undefined
  (softmax of all -inf = NaN), so position 0 is unmasked for the encoder call only and the row's
  h is replaced by a LEARNED empty vector `empty` (H stays all zeros). No NaN in forward or backward.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn


def check_history(name: str, values: torch.Tensor, mask: torch.Tensor, d: int, max_len: int) -> None:
    """Shape/alignment checks with errors naming the history; the alignment check syncs once."""
    if values.dim() != 3 or values.shape[-1] != d:
        raise ValueError(f"history {name!r}: values must be [B, L, {d}], got {tuple(values.shape)}")
    if mask.shape != values.shape[:2] or mask.dtype != torch.bool:
        raise ValueError(
            f"history {name!r}: mask must be bool [B, L] = {tuple(values.shape[:2])}, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    if values.shape[1] > max_len:
        raise ValueError(f"history {name!r}: padded length {values.shape[1]} exceeds max_len {max_len}")
    lengths = mask.sum(1, keepdim=True)
    if not torch.equal(mask, torch.arange(mask.shape[1], device=mask.device) < lengths):
        raise ValueError(f"history {name!r}: mask must be left-aligned (valid positions first, then padding)")


class HistoryEncoder(nn.Module):
    """Trm(V + P) of eqs. 7-8 for one history; forward(V, mask) -> (H [B,L,d], h [B,d])."""

    def __init__(
        self,
        d: int,
        max_len: int,
        layers: int = 1,
        heads: int = 2,
        ff_mult: int = 4,
        dropout: float = 0.1,
        norm_first: bool = True,
        name: str = "history",
    ) -> None:
        super().__init__()
        if d % heads != 0:
            raise ValueError(f"history encoder {name!r}: embedding dim {d} is not divisible by heads={heads}")
        if max_len < 1:
            raise ValueError(f"history encoder {name!r}: max_len must be >= 1, got {max_len}")
        self.d, self.max_len, self.name = d, max_len, name
        self.pos = nn.Embedding(max_len, d)  # P: one learned row per recency index (eq. 7)
        nn.init.normal_(self.pos.weight, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model=d, nhead=heads, dim_feedforward=ff_mult * d, dropout=dropout,
            batch_first=True, norm_first=norm_first,
        )
        self.trm = nn.TransformerEncoder(
            layer, num_layers=layers, norm=nn.LayerNorm(d) if norm_first else None, enable_nested_tensor=False
        )
        self.empty = nn.Parameter(torch.randn(d) * 0.02)  # h of a length-0 history

    def forward(self, values: torch.Tensor, mask: torch.Tensor, check: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        if check:
            check_history(self.name, values, mask, self.d, self.max_len)
        B, L, _ = values.shape
        width = L
        if L == 0:  # every row empty and padded to width 0: one all-padding column keeps shapes valid
            values, mask, L = values.new_zeros(B, 1, self.d), mask.new_zeros(B, 1), 1
        lengths = mask.sum(1)  # [B]
        idx = torch.arange(L, device=values.device)
        recency = (lengths.unsqueeze(1) - 1 - idx.unsqueeze(0)).clamp_min(0)  # [B, L]
        x = torch.where(mask.unsqueeze(-1), values, torch.zeros_like(values)) + self.pos(recency)
        nonempty = lengths > 0
        attend = mask.clone()
        attend[:, 0] = attend[:, 0] | ~nonempty  # empty rows: one dummy key so softmax is defined
        H = self.trm(x, src_key_padding_mask=~attend)
        H = torch.where(mask.unsqueeze(-1), H, torch.zeros_like(H))
        last = (lengths - 1).clamp_min(0)
        h = H.gather(1, last.view(B, 1, 1).expand(B, 1, self.d)).squeeze(1)
        h = torch.where(nonempty.unsqueeze(-1), h, self.empty.to(h.dtype).expand(B, self.d))
        return H[:, :width], h

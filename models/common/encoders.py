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

Two attention paths over the SAME parameters (issue 16; `model.attention`, default fused), so one
state_dict loads into either:
- reference: nn.TransformerEncoder as built (separate bmm / softmax / where ops in MHA);
- fused: `fused_encoder` runs each nn.TransformerEncoderLayer's parameters through
  F.scaled_dot_product_attention with the key-padding mask built ONCE per batch as a boolean
  [B, 1, 1, L] attn_mask shared by every layer and head (in training with attention dropout > 0 the
  same math runs unfused: CPU SDPA has no fused kernel with dropout_p > 0), the padded width trimmed to the batch's longest history first, and the per-token
  parts (LayerNorms, projections, feed-forward) run on the valid positions only (padded positions are
  masked keys and zeroed outputs, so skipping them changes no valid output); attention runs in blocks of
  rows of similar length, each padded to its own longest row (`token_layout`). Dropout masks come from
  16 random bits per element (`keep_mask`) instead of aten::bernoulli_.
  Eval-mode outputs and gradients equal the reference path's within fp32 rounding (tests).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

Attention = Literal["fused", "reference"]
ATTENTION_PATHS = ("fused", "reference")


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


def key_attn_mask(attend: torch.Tensor) -> torch.Tensor:
    """[B, L] bool (True = key takes part) -> [B, 1, 1, L] SDPA attn_mask, shared by all layers and heads."""
    return attend[:, None, None, :]


def keep_mask(x: torch.Tensor, p: float) -> Tuple[torch.Tensor, float]:
    """(keep [x.shape] uint8 0/1, scale) of inverted dropout at rate p, the keep mask drawn from 16 random bits per
    element (4 elements per random 64-bit word) instead of one bernoulli_ draw per element: aten::bernoulli_
    was 17% of training CPU time (issue 16). The drop probability is p rounded to a multiple of 1/65536
    (0.1 -> 0.100006) and scale = 1 / (1 - that p), so E[keep * scale] = 1 exactly; seeded by torch's generator."""
    thr = round(p * 65536)
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_(-2 ** 63, None)
    bits = words.view(torch.int16)[: x.numel()].view(x.shape)  # uniform over [-32768, 32767]
    # uint8, not bool: on CPU, x * uint8 runs vectorised, 3-4x faster than where(bool, x, 0) or x * bool
    return (bits >= thr - 32768).view(torch.uint8), 65536.0 / (65536 - thr)


def fast_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout with `keep_mask`'s mask: x * keep * scale (in x's dtype), so E[output] = x exactly."""
    if not training or p == 0.0:
        return x
    keep, scale = keep_mask(x, p)
    return (x * keep).mul_(scale)


def attention_with_dropout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor,
                           p: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(dh) masked) with dropout p on the weights, @ v: what SDPA computes with dropout_p = p,
    for training on CPU, where SDPA has no fused kernel with dropout. The weights [B, heads, L, L] are the
    largest tensor of the step, so they are touched as few times as possible: scores masked in place, the
    softmax kept in the scores' dtype (under bf16 autocast it would otherwise go to fp32 and back: two casts of
    the largest tensor; the CPU kernel accumulates in fp32 either way), the dropout a product with a uint8 mask
    and its 1 / (1 - p) applied to the output [B, heads, L, dh] instead of the weights."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    scores = scores.masked_fill_(~attn_mask, float("-inf"))
    with torch.autocast(q.device.type, enabled=False):
        w = torch.softmax(scores, dim=-1)
        keep, scale = keep_mask(w, p)
        return ((w * keep) @ v.to(w.dtype)).mul_(scale)


@dataclass
class TokenLayout:
    """Where the tokens of a batch of histories sit for the fused encoder, built once per batch (`token_layout`).

    The per-token parts (LayerNorms, projections, feed-forward) run on `rows` (flat indices into B*L of the valid
    positions; None = all B*L). Attention runs per block of rows of similar length, each padded only to its own
    width: rows sorted by length are cut into blocks of equal count, so attention costs about sum(len^2)
    instead of B * L^2 (on the default world E[len^2] / 50^2 = 0.36 for hist_click). `src` [P] gives each slot
    of the concatenated blocks its token (N = a zero row: padding and the empty rows' dummy key), `dst` [N] each
    token its slot; `blocks` are (rows, width) and `masks` the blocks' [rows, 1, 1, width] key masks. With one
    block of all rows at full width (src None) attention runs on the [B, L] layout itself, the tokens `rows`
    scattered into it (zeros elsewhere)."""

    rows: Optional[torch.Tensor]
    src: Optional[torch.Tensor]
    dst: Optional[torch.Tensor]
    blocks: List[Tuple[int, int]]
    masks: List[torch.Tensor]

    @property
    def slots(self) -> int:
        """Padded token slots over all blocks: sum of rows x width (B * L for the one full-width block)."""
        return sum(rows * width for rows, width in self.blocks)


def token_layout(attend: torch.Tensor, valid: Optional[torch.Tensor], n_blocks: int = 4) -> TokenLayout:
    """The TokenLayout of keys `attend` [B, L] and valid positions `valid` [B, L] (left-aligned); host syncs
    once for the block widths. Under torch.jit.trace one block at full width (the widths would be constants)."""
    B, L = attend.shape
    if valid is None or (not torch.jit.is_tracing() and bool(valid.all())):
        return TokenLayout(None, None, None, [(B, L)], [key_attn_mask(attend)])
    rows = valid.reshape(-1).nonzero().squeeze(1)  # flat indices of the valid tokens, in (row, position) order
    if torch.jit.is_tracing() or n_blocks <= 1 or B < 2 * n_blocks:  # one block: the [B, L] layout
        return TokenLayout(rows, None, None, [(B, L)], [key_attn_mask(attend)])
    n = rows.shape[0]
    token = torch.full((B, L), n, dtype=torch.long, device=attend.device)
    token.view(-1)[rows] = torch.arange(n, device=attend.device)
    lengths = attend.sum(1)  # >= 1 per row (empty rows carry one dummy key)
    order = torch.argsort(lengths, descending=True, stable=True)
    sorted_lengths = lengths[order].tolist()  # the one host sync: block widths
    bounds = [round(i * B / n_blocks) for i in range(n_blocks + 1)]
    src_parts, blocks, masks = [], [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        width = int(sorted_lengths[lo])
        r = order[lo:hi]
        src_parts.append(token[r, :width].reshape(-1))
        blocks.append((hi - lo, width))
        masks.append(key_attn_mask(attend[r, :width]))
    src = torch.cat(src_parts)
    slot = torch.arange(src.shape[0], device=attend.device)
    real = src < n
    dst = torch.empty(n, dtype=torch.long, device=attend.device)
    dst[src[real]] = slot[real]
    return TokenLayout(rows, src, dst, blocks, masks)


def fused_layer(layer: nn.TransformerEncoderLayer, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """One nn.TransformerEncoderLayer (its own parameters, norm_first or post-norm, its dropout rates) with
    attention through F.scaled_dot_product_attention: the same function as layer(x, src_key_padding_mask=
    ~attend) on the valid positions, with one fused kernel instead of bmm/softmax/where.
    x is [N, d] tokens (`layout.rows`, or all B*L); the per-token parts run on those N tokens, attention on the
    layout's padded blocks [rows, heads, width, d/heads] (padded keys zero and masked).
    In training with attention dropout > 0, CPU SDPA has no fused kernel (it falls back to bmm/softmax plus
    a bernoulli_ mask), so that case runs the same math in `attention_with_dropout`."""
    attn = layer.self_attn
    d = x.shape[-1]
    heads = attn.num_heads
    training = layer.training

    def sa_block(y: torch.Tensor) -> torch.Tensor:
        qkv = F.linear(y, attn.in_proj_weight, attn.in_proj_bias)
        if layout.src is not None:  # tokens -> the blocks' padded slots (slot N of the padded table is zero)
            qkv = torch.cat([qkv, qkv.new_zeros(1, 3 * d)]).index_select(0, layout.src)
        elif layout.rows is not None:  # tokens -> the [B, L] layout, zeros at the other positions
            qkv = qkv.new_zeros(layout.slots, 3 * d).index_copy(0, layout.rows, qkv)
        outs, start = [], 0
        for (rows, width), mask in zip(layout.blocks, layout.masks):
            block = qkv[start:start + rows * width]
            start += rows * width
            q, k, v = block.view(rows, width, 3, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)
            if training and attn.dropout > 0:
                o = attention_with_dropout(q, k, v, mask, attn.dropout)
            else:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            outs.append(o.transpose(1, 2).reshape(rows * width, d))
        o = outs[0] if len(outs) == 1 else torch.cat(outs)
        if layout.dst is not None:  # slots -> tokens
            o = o.index_select(0, layout.dst)
        elif layout.rows is not None:
            o = o.index_select(0, layout.rows)
        return fast_dropout(F.linear(o, attn.out_proj.weight, attn.out_proj.bias), layer.dropout1.p, training)

    def ff_block(y: torch.Tensor) -> torch.Tensor:
        hidden = fast_dropout(layer.activation(layer.linear1(y)), layer.dropout.p, training)
        return fast_dropout(layer.linear2(hidden), layer.dropout2.p, training)

    if layer.norm_first:
        x = x + sa_block(layer.norm1(x))
        return x + ff_block(layer.norm2(x))
    x = layer.norm1(x + sa_block(x))
    return layer.norm2(x + ff_block(x))


def fused_encoder(layers, norm, x: torch.Tensor, attend: torch.Tensor,
                  valid: Optional[torch.Tensor] = None, n_blocks: int = 4) -> torch.Tensor:
    """Encoder `layers` (then `norm`, if any) over x [B, L, d] with keys `attend` [B, L] (True = valid;
    every row needs one True so softmax is defined), attention fused; the layout (`token_layout`: masks,
    length blocks) is built once here for every layer. With `valid` [B, L] given and some position not valid,
    the per-token work runs on the valid positions only and the output is ZERO at every other position."""
    B, L, d = x.shape
    layout = token_layout(attend, valid, n_blocks)
    rows = layout.rows
    h = x.reshape(B * L, d) if rows is None else x.reshape(B * L, d).index_select(0, rows)
    for layer in layers:
        h = fused_layer(layer, h, layout)
    if norm is not None:
        h = norm(h)
    if rows is None:
        return h.view(B, L, d)
    return h.new_zeros(B * L, d).index_copy(0, rows, h).view(B, L, d)


def trim_width(values: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Drop padded columns beyond the batch's longest history (>= 1 column kept); one host sync.
    Not under torch.jit.trace: the example batch's width would become a constant of the artifact."""
    if torch.jit.is_tracing():
        return values, mask
    width = max(int(mask.sum(1).max()), 1) if mask.shape[0] else 1
    if width >= values.shape[1]:
        return values, mask
    return values[:, :width], mask[:, :width]


class HistoryEncoder(nn.Module):
    """Trm(V + P) of eqs. 7-8 for one history; forward(V, mask) -> (H [B,L,d], h [B,d]).

    attention: fused (SDPA, mask once per batch, padded width trimmed) | reference (nn.TransformerEncoder);
    both read the same parameters, so a checkpoint of either loads into the other."""

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
        attention: Attention = "fused",
    ) -> None:
        super().__init__()
        if d % heads != 0:
            raise ValueError(f"history encoder {name!r}: embedding dim {d} is not divisible by heads={heads}")
        if max_len < 1:
            raise ValueError(f"history encoder {name!r}: max_len must be >= 1, got {max_len}")
        if attention not in ATTENTION_PATHS:
            raise ValueError(f"history encoder {name!r}: attention must be one of {ATTENTION_PATHS}, got {attention!r}")
        self.d, self.max_len, self.name, self.attention = d, max_len, name, attention
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
        if self.attention == "fused":
            values, mask = trim_width(values, mask)
            L = values.shape[1]
        if L == 0:  # every row empty and padded to width 0: one all-padding column keeps shapes valid
            values, mask, L = values.new_zeros(B, 1, self.d), mask.new_zeros(B, 1), 1
        lengths = mask.sum(1)  # [B]
        idx = torch.arange(L, device=values.device)
        recency = (lengths.unsqueeze(1) - 1 - idx.unsqueeze(0)).clamp_min(0)  # [B, L]
        nonempty = lengths > 0
        attend = mask.clone()
        attend[:, 0] = attend[:, 0] | ~nonempty  # empty rows: one dummy key so softmax is defined
        if self.attention == "fused":  # reads valid positions only and returns zeros elsewhere: no masking passes
            H = fused_encoder(self.trm.layers, self.trm.norm, values + self.pos(recency), attend, valid=mask)
        else:
            x = torch.where(mask.unsqueeze(-1), values, torch.zeros_like(values)) + self.pos(recency)
            H = self.trm(x, src_key_padding_mask=~attend)
            H = torch.where(mask.unsqueeze(-1), H, torch.zeros_like(H))
        last = (lengths - 1).clamp_min(0)
        h = H.gather(1, last.view(B, 1, 1).expand(B, 1, self.d)).squeeze(1)
        h = torch.where(nonempty.unsqueeze(-1), h, self.empty.to(h.dtype).expand(B, self.d))
        if H.shape[1] < width:  # trimmed (or widened from 0): pad back with zero rows to the input width
            H = F.pad(H, (0, 0, 0, width - H.shape[1]))
        return H[:, :width], h

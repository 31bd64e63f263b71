"""SAQRec's satisfaction feature alignment (sec. 4.3) and fusion (eq. 13), on plain tensors.

- `history_attention` + `SatisfactionDisentangle`: SID, eqs. 9-10.
- `mlse_groups` + `MultiLevelSatisfaction`: MLSE, eqs. 11-12 (vectorised, no loop over rows).
- `GatedFusion`: eq. 13, u_f = sum_k w_k x_k with w = gate(x_1 (+) ... (+) x_K).
- `GateMLP`: the MLP_{s+}, MLP_{s-}, MLP_MLSE and MLP_f of the paper, R^{K d} -> R^K.

Gate weights. The paper writes u = [x_1, ..., x_K] . MLP(x_1 (+) ... (+) x_K), a weighted sum whose
weights are the MLP's outputs. With `activation="softmax"` (default) the outputs go through a
softmax, so u is a convex combination of its inputs (bounded scale, weights interpretable as
shares; zero gate weights give the plain mean). `activation="none"` uses the raw outputs, the
literal reading. Inputs that do not exist for a row (empty MLSE groups) are masked out of the
gate: -inf before the softmax, weight 0 with raw outputs.

Empty inputs. Padded history positions are masked with -inf before every softmax. A row with an
EMPTY click history gets u_r^{s+/-} = 0 from SID and u_MLSE = 0 from MLSE (no valid item to attend
or group); h_r is then the click encoder's learned empty vector, see `satrank.models.common.encoders`.
"""
from __future__ import annotations

from typing import List, Literal, Optional, Sequence, Tuple

import torch
from torch import nn

Activation = Literal["softmax", "none"]
NEG_INF = float("-inf")


class GateMLP(nn.Module):
    """MLP R^{in_dim} -> R^{n_out} producing per-input weights; `out` is its last Linear layer."""

    def __init__(self, in_dim: int, n_out: int, hidden: Sequence[int] = (), activation: Activation = "softmax") -> None:
        super().__init__()
        if activation not in ("softmax", "none"):
            raise ValueError(f"gate activation must be 'softmax' or 'none', got {activation!r}")
        layers: List[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.out = nn.Linear(width, n_out)
        layers.append(self.out)
        self.net = nn.Sequential(*layers)
        self.activation = activation
        self.n_out = n_out

    def forward(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        z = self.net(x)
        if self.activation == "none":
            return z if valid is None else torch.where(valid, z, torch.zeros_like(z))
        if valid is None:
            return torch.softmax(z, dim=-1)
        z = z.masked_fill(~valid, NEG_INF)
        z = torch.where(valid.any(-1, keepdim=True), z, torch.zeros_like(z))  # no valid input: weights 0
        return torch.softmax(z, dim=-1) * valid


def weighted_sum(parts: Sequence[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    """sum_k w[:, k] * parts[k] for parts [B, d] and weights [B, K]."""
    return torch.einsum("bk,bkd->bd", w, torch.stack(list(parts), dim=1))


# ------------------------------------------------------------------------------------------ SID
def zero_padding(H: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """H [B, L, d] with its padded rows (mask [B, L] False) set to zero, so even non-finite garbage cannot leak."""
    return torch.where(mask.unsqueeze(-1), H, torch.zeros((), dtype=H.dtype, device=H.device))


def history_attention(H: torch.Tensor, mask: torch.Tensor, q: torch.Tensor, padding_zeroed: bool = False) -> torch.Tensor:
    """Eq. 9: u = H^T softmax(H q) over the valid positions; [B, L, d], [B, L], [B, d] -> [B, d].

    No 1/sqrt(d) scaling (the paper has none). A row without valid positions gives u = 0.
    Padded rows of H are zeroed first (`zero_padding`) unless the caller did (`padding_zeroed`).
    """
    if not padding_zeroed:
        H = zero_padding(H, mask)
    scores = torch.einsum("bld,bd->bl", H, q).masked_fill(~mask, NEG_INF)
    scores = torch.where(mask.any(-1, keepdim=True), scores, torch.zeros_like(scores))
    a = torch.softmax(scores, dim=-1) * mask
    return torch.einsum("bl,bld->bd", a, H)


class SatisfactionDisentangle(nn.Module):
    """SID (eqs. 9-10): disentangle satisfied/dissatisfied information from the click history.

    forward(H_r, mask_r, h_pos, h_neg) -> (u_{s+}, u_{s-}, w_{s+}, w_{s-}) with
    u_r^{s+/-} = history_attention(H_r, mask_r, h_{s+/-}) and
    u_{s+/-} = w[:, 0] h_{s+/-} + w[:, 1] u_r^{s+/-},  w = MLP_{s+/-}(h_{s+/-} (+) u_r^{s+/-}).
    """

    def __init__(self, d: int, hidden: Sequence[int] = (), activation: Activation = "softmax") -> None:
        super().__init__()
        self.gate_pos = GateMLP(2 * d, 2, hidden, activation)
        self.gate_neg = GateMLP(2 * d, 2, hidden, activation)

    @staticmethod
    def _one(gate: GateMLP, H_r, mask_r, h) -> Tuple[torch.Tensor, torch.Tensor]:
        u_r = history_attention(H_r, mask_r, h, padding_zeroed=True)
        w = gate(torch.cat([h, u_r], dim=-1))
        return weighted_sum([h, u_r], w), w

    def forward(self, H_r, mask_r, h_pos, h_neg, padding_zeroed: bool = False):
        """`padding_zeroed`: H_r is already zero at padding (a HistoryEncoder's output), so it is not zeroed again
        (a [B, L, d] pass and its backward)."""
        if not padding_zeroed:
            H_r = zero_padding(H_r, mask_r)  # once for both attentions
        u_pos, w_pos = self._one(self.gate_pos, H_r, mask_r, h_pos)
        u_neg, w_neg = self._one(self.gate_neg, H_r, mask_r, h_neg)
        return u_pos, u_neg, w_pos, w_neg


# ------------------------------------------------------------------------------------------ MLSE
def mlse_groups(scores: torch.Tensor, mask: torch.Tensor, num_levels: int, grouping: str = "chunk") -> torch.Tensor:
    """Satisfaction level (group) of every valid history item: LongTensor [B, L], -1 on padding.

    Valid items are ranked by score, descending (stable: ties keep history order). With n valid
    items and rank r (0 = highest score):
      chunk    (paper): k = ceil(n / N_I); group = r // k. The top k items form group 0, the next
               k group 1, ...; every group holds k items except possibly the last non-empty one,
               and when n is not large relative to N_I the trailing groups are EMPTY (n = 1: only
               group 0; n = 10, N_I = 9: k = 2, groups 0-4 hold items, 5-8 are empty).
      balanced: group = floor(r N_I / n); group sizes differ by at most one and no group is empty
               once n >= N_I.
    Empty groups are masked out of MLP_MLSE's weights by `MultiLevelSatisfaction`.
    """
    if grouping not in ("chunk", "balanced"):
        raise ValueError(f"mlse grouping must be 'chunk' or 'balanced', got {grouping!r}")
    B, L = scores.shape
    s = scores.masked_fill(~mask, NEG_INF)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    ar = torch.arange(L, device=scores.device).expand(B, L)
    rank = torch.empty_like(order).scatter_(1, order, ar)
    n = mask.sum(1, keepdim=True).clamp_min(1)
    if grouping == "chunk":
        k = (n + num_levels - 1) // num_levels
        group = rank // k
    else:
        group = rank * num_levels // n
    return torch.where(mask, group, torch.full_like(group, -1))


class MultiLevelSatisfaction(nn.Module):
    """MLSE (eqs. 11-12) over the click history representations H_r and stage-1 scores s_hat.

    forward(H_r [B,L,d], mask [B,L], scores [B,L]) -> (u_MLSE [B,d], level weights [B,N_I]):
      I_g = sum_{j in group g} softmax_{group g}(s_hat_j / T) h_j^r             (eq. 11, T = 1)
      u_MLSE = sum_g w_g I_g,  w = MLP_MLSE(I_1 (+) ... (+) I_{N_I}) masked to non-empty groups (eq. 12)
    Empty groups enter MLP_MLSE's input as zero vectors and get weight 0. Scores at padded positions
    are ignored; non-finite scores at valid positions raise (one host sync, `check=False` skips it).
    """

    def __init__(
        self,
        d: int,
        num_levels: int,
        hidden: Sequence[int] = (),
        activation: Activation = "softmax",
        grouping: str = "chunk",
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"MLSE num_levels must be >= 1, got {num_levels}")
        if temperature <= 0:
            raise ValueError(f"MLSE temperature must be > 0, got {temperature}")
        self.d, self.num_levels, self.grouping, self.temperature = d, num_levels, grouping, temperature
        self.gate = GateMLP(num_levels * d, num_levels, hidden, activation)

    def forward(self, H: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor, check: bool = True,
                padding_zeroed: bool = False):
        """-> (u_MLSE [B, d], gate weights [B, G]); `padding_zeroed` as in SatisfactionDisentangle.forward."""
        if scores.shape != mask.shape:
            raise ValueError(f"MLSE: history scores must be [B, L] = {tuple(mask.shape)}, got {tuple(scores.shape)}")
        scores = torch.where(mask, scores.to(H.dtype), torch.zeros((), dtype=H.dtype, device=H.device))
        if check and not bool(torch.isfinite(scores).all()):
            raise FloatingPointError("MLSE: the history scorer returned non-finite scores at valid positions")
        if not padding_zeroed:
            H = zero_padding(H, mask)
        G = self.num_levels
        group = mlse_groups(scores, mask, G, self.grouping)  # [B, L]
        member = group.unsqueeze(1) == torch.arange(G, device=H.device).view(1, G, 1)  # [B, G, L]
        nonempty = member.any(-1)  # [B, G]
        logits = (scores / self.temperature).unsqueeze(1).expand_as(member).masked_fill(~member, NEG_INF)
        logits = torch.where(nonempty.unsqueeze(-1), logits, torch.zeros_like(logits))
        a = torch.softmax(logits, dim=-1) * member  # eq. 11 weights; empty groups all zero
        levels = torch.einsum("bgl,bld->bgd", a, H)  # I_g, zero for empty groups
        w = self.gate(levels.reshape(levels.shape[0], G * self.d), valid=nonempty)
        return torch.einsum("bg,bgd->bd", w, levels), w


# ------------------------------------------------------------------------------------------ fusion
class GatedFusion(nn.Module):
    """Eq. 13: u_f = [x_1, ..., x_K] . MLP_f(x_1 (+) ... (+) x_K) for K named [B, d] inputs.

    K is the number of inputs actually present: with SID or MLSE switched off their vectors are
    REMOVED (K shrinks, MLP_f is R^{Kd} -> R^K), not passed as zeros, so the gate never spends
    weight on an input that carries nothing.
    """

    def __init__(self, names: Sequence[str], d: int, hidden: Sequence[int] = (), activation: Activation = "softmax") -> None:
        super().__init__()
        if not names:
            raise ValueError("GatedFusion needs at least one input")
        self.names = list(names)
        self.gate = GateMLP(len(self.names) * d, len(self.names), hidden, activation)

    def forward(self, parts: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        if len(parts) != len(self.names):
            raise ValueError(f"GatedFusion expects {len(self.names)} inputs {self.names}, got {len(parts)}")
        w = self.gate(torch.cat(list(parts), dim=-1))
        return weighted_sum(parts, w), w

"""Low-rank adapters (LoRA, Hu et al. 2021) for EASQ's isolated satisfaction pathway.

    y = W0 x + b + (alpha / r) B A dropout(x),    A in R^{r x in}, B in R^{out x r}

B starts at zero, so a fresh adapter changes nothing (exactly); A starts like an nn.Linear weight
(Kaiming-uniform), so the first gradient step on B is informative. `merge()` folds (alpha/r) B A into
W0 for serving (one plain nn.Linear, no extra matmul). `LoRABranch` is the adapter alone (delta = the
low-rank term); EASQ uses it directly where its base layer is not a single nn.Linear (the item-vector
layer, see satrank.models.easq.pathway). `LoRAEmbedding` is the adapter of an embedding table (peft's embedding LoRA): per
id an r-dim row a[id], mapped by B (zero at init). `apply_lora` replaces named nn.Linear submodules of any module; parameters
split into `lora_parameters` and `non_lora_parameters` (separate optimizer groups).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn


def _check_sizes(rank: int, alpha: float, n_in: int, n_out: int, in_name: str) -> None:
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if alpha <= 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha}")
    if n_in < 1 or n_out < 1:
        raise ValueError(f"LoRA needs positive sizes, got {in_name}={n_in}, out={n_out}")


class LoRABranch(nn.Module):
    """delta(x) = (alpha / r) B A dropout(x): the low-rank update alone; B = 0 at initialisation."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        _check_sizes(rank, alpha, in_features, out_features, "in")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.in_features, self.out_features, self.rank, self.alpha = in_features, out_features, rank, float(alpha)
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # nn.Linear's default for a weight of this shape
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"LoRA: input has {x.shape[-1]} features, expected {self.in_features}")
        return (self.dropout(x) @ self.A.t() @ self.B.t()) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) B A, the [out, in] matrix the adapter adds to W0 (dropout off, as in serving)."""
        return (self.B @ self.A) * self.scale

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def require(cond: torch.Tensor, message: Callable[[], str], static: str) -> None:
    """Raise ValueError(message()) unless the 0-d bool tensor `cond` holds. On CPU the check is immediate; on an
    accelerator it is a device-side assert (`torch._assert_async`, no host sync in the training step) whose message
    is `static`, the check's text without the offending values (naming them would need the sync)."""
    if cond.device.type == "cpu":
        if not bool(cond):
            raise ValueError(message())
    else:
        torch._assert_async(cond, f"{static} (rerun on CPU for the values)")


class LoRAEmbedding(nn.Module):
    """delta(ids) = (alpha / r) B a[ids]: a low-rank update of an embedding table of `num_rows` rows, i.e. the
    table would become E + (alpha / r) a B^T (peft's lora_embedding_A / lora_embedding_B). a ~ N(0, 1) per row,
    B = 0 at initialisation, so a fresh adapter adds exactly zero. Gives a pathway per-id capacity of its own
    (rank r per row) without touching the table E."""

    def __init__(self, num_rows: int, out_features: int, rank: int, alpha: float) -> None:
        super().__init__()
        _check_sizes(rank, alpha, num_rows, out_features, "rows")
        self.num_rows, self.out_features, self.rank, self.alpha = num_rows, out_features, rank, float(alpha)
        self.A = nn.Parameter(torch.randn(num_rows, rank))
        self.B = nn.Parameter(torch.zeros(out_features, rank))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"LoRA embedding: ids must be int32/int64, got {ids.dtype}")
        if ids.numel():
            in_range = (ids.min() >= 0) & (ids.max() < self.num_rows)
            bound = f"LoRA embedding: ids must be in [0, {self.num_rows})"
            require(in_range, lambda: f"{bound}, got [{int(ids.min())}, {int(ids.max())}]", bound)
        return (nn.functional.embedding(ids, self.A) @ self.B.t()) * self.scale

    def delta_table(self) -> torch.Tensor:
        """(alpha / r) a B^T, the [rows, out] update the adapter stands for."""
        return (self.A @ self.B.t()) * self.scale

    def extra_repr(self) -> str:
        return f"rows={self.num_rows}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


class LoRALinear(nn.Module):
    """An nn.Linear plus a LoRA branch: forward(x) = base(x) + branch(x). `base` keeps its name, so
    the wrapped layer's weights live at `<name>.base.weight` / `<name>.base.bias`."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        self.base = base
        self.lora = LoRABranch(base.in_features, base.out_features, rank, alpha, dropout)
        self.lora.to(device=base.weight.device, dtype=base.weight.dtype)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora(x)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A new plain nn.Linear with W = W0 + (alpha/r) B A and the same bias (for serving)."""
        b = self.base
        out = nn.Linear(b.in_features, b.out_features, bias=b.bias is not None,
                        device=b.weight.device, dtype=b.weight.dtype)
        out.weight.copy_(b.weight + self.lora.delta_weight().to(b.weight.dtype))
        if b.bias is not None:
            out.bias.copy_(b.bias)
        return out


def _resolve(module: nn.Module, name: str) -> Tuple[nn.Module, str]:
    parent_name, _, leaf = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    return parent, leaf


def apply_lora(
    module: nn.Module, target_names: Sequence[str], rank: int, alpha: float, dropout: float = 0.0,
    freeze_base: bool = False,
) -> Dict[str, LoRALinear]:
    """Replace each named nn.Linear submodule (dotted path, e.g. "ranker.user_proj") by a LoRALinear
    around it, in place. Returns {name: LoRALinear}. Errors name the target and what it is.
    With `freeze_base` the wrapped layers' own weights get requires_grad=False."""
    if not target_names:
        raise ValueError("apply_lora: no target layers given")
    if len(set(target_names)) != len(target_names):
        raise ValueError(f"apply_lora: repeated targets in {list(target_names)}")
    done: Dict[str, LoRALinear] = {}
    for name in target_names:
        try:
            layer = module.get_submodule(name)
        except AttributeError:
            raise ValueError(f"apply_lora: {type(module).__name__} has no submodule {name!r}") from None
        if isinstance(layer, LoRALinear):
            raise ValueError(f"apply_lora: {name!r} already has a LoRA adapter")
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"apply_lora: {name!r} is a {type(layer).__name__}, only nn.Linear can take a LoRA")
        wrapped = LoRALinear(layer, rank, alpha, dropout)
        if freeze_base:
            layer.requires_grad_(False)
        parent, leaf = _resolve(module, name)
        setattr(parent, leaf, wrapped)
        done[name] = wrapped
    return done


def _lora_param_ids(module: nn.Module) -> set:
    return {id(p) for m in module.modules() if isinstance(m, (LoRABranch, LoRAEmbedding)) for p in m.parameters()}


def lora_parameters(module: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """(name, parameter) of every LoRA adapter (A and B of each LoRABranch / LoRAEmbedding) inside `module`."""
    ids = _lora_param_ids(module)
    return [(n, p) for n, p in module.named_parameters() if id(p) in ids]


def non_lora_parameters(module: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """Every other parameter of `module` (the base weights)."""
    ids = _lora_param_ids(module)
    return [(n, p) for n, p in module.named_parameters() if id(p) not in ids]


def merge_lora(module: nn.Module) -> nn.Module:
    """Replace every LoRALinear inside `module` by its merged nn.Linear, in place; returns the module
    (or, when `module` itself is a LoRALinear, its merged nn.Linear)."""
    if isinstance(module, LoRALinear):
        return module.merge()
    names = [n for n, m in module.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        parent, leaf = _resolve(module, name)
        setattr(parent, leaf, getattr(parent, leaf).merge())
    return module


"""Embedding settings (the `embeddings:` config section): table dims, sharding types, fused optimizer.

Which tables exist comes from the data contract (`data:`): one table per distinct `table` name.
This section only says how they are sized, sharded and optimised; a table named here that no
feature uses is an error (checked in `satrank.embeddings.tables.table_specs`, which sees both sections).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Literal, Optional

from satrank.pipeline.config import ConfigError

ShardingKind = Literal["row_wise", "table_wise", "column_wise", "data_parallel"]
FusedOptimizerKind = Literal["rowwise_adagrad", "exact_adagrad", "adam", "sgd"]


@dataclass
class TableSettings:
    """Per-table overrides; unset fields fall back to the section defaults."""

    sharding: Optional[ShardingKind] = None
    dim: Optional[int] = None


@dataclass
class FusedOptimizerConfig:
    """Optimizer FBGEMM applies inside the backward pass of the embedding tables (TorchRec "fused").

    rowwise_adagrad: one accumulator per row (mean of squared grads over the row), the usual
    choice for big tables; exact_adagrad: one per element; adam: FBGEMM Adam (beta1/beta2);
    sgd: exact SGD. Only rows that appear in a batch are updated (sparse update).
    """

    type: FusedOptimizerKind = "rowwise_adagrad"
    lr: float = 0.05
    eps: float = 1.0e-8
    weight_decay: float = 0.0  # L2, applied to the rows a batch touches
    beta1: float = 0.9  # adam only
    beta2: float = 0.999  # adam only

    def validate(self, path: str) -> None:
        if self.lr <= 0:
            raise ConfigError(f"{path}.lr: must be > 0, got {self.lr}")
        if self.eps <= 0:
            raise ConfigError(f"{path}.eps: must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            raise ConfigError(f"{path}.weight_decay: must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{path}.{name}: must be in [0, 1), got {value}")


@dataclass
class EmbeddingConfig:
    dim: int = 32  # default embedding dim of every table
    sharding: ShardingKind = "table_wise"  # default sharding type of tables not listed in `tables`
    tables: Dict[str, TableSettings] = field(default_factory=dict)
    optimizer: FusedOptimizerConfig = field(default_factory=FusedOptimizerConfig)
    # data_parallel tables (TorchRec's DENSE kernel, updated in torch after DDP's all-reduce) use this optimizer
    # instead of `optimizer` when set: e.g. adam, which FBGEMM's CPU kernels lack, beside fused Adagrad tables
    data_parallel_optimizer: Optional[FusedOptimizerConfig] = None

    def validate(self, path: str) -> None:
        if self.dim <= 0:
            raise ConfigError(f"{path}.dim: must be > 0, got {self.dim}")
        if self.data_parallel_optimizer is not None:
            self.data_parallel_optimizer.validate(f"{path}.data_parallel_optimizer")
        for name, t in self.tables.items():
            if t.dim is not None and t.dim <= 0:
                raise ConfigError(f"{path}.tables.{name}.dim: must be > 0, got {t.dim}")

    def table_dim(self, table: str) -> int:
        t = self.tables.get(table)
        return t.dim if t is not None and t.dim is not None else self.dim

    def dp_optimizer(self) -> FusedOptimizerConfig:
        """The optimizer of data_parallel tables: `data_parallel_optimizer`, else `optimizer`."""
        return self.data_parallel_optimizer if self.data_parallel_optimizer is not None else self.optimizer

    def table_sharding(self, table: str) -> str:
        t = self.tables.get(table)
        return t.sharding if t is not None and t.sharding is not None else self.sharding

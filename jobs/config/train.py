"""Training-loop settings: the `train:` config section (shared by every training job) and the per-stage
override sections `pretrain_train:`, `propensity_train:`, `satisfaction_train:` (read by satrank.jobs.engine.trainer).

Why per-stage overrides: Algorithm 1 of SAQRec trains three stage-1 models on very different amounts
of data (the click and propensity models on every impression, the satisfaction model on the ~2% of
answered ones), so they need different batch sizes and epoch counts; everything else is shared.
An override section lists only what differs; a null/absent key inherits the `train:` value.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

from satrank.pipeline.config import ConfigError

DenseOptimizer = Literal["adam", "adagrad", "sgd"]
UnevenPolicy = Literal["pad", "stop"]
Precision = Literal["fp32", "bf16"]  # training forward precision (Trainer._forward)


@dataclass
class TrainConfig:
    """How satrank.jobs.engine.trainer.Trainer trains, evaluates and checkpoints one model.

    Epoch-level schedule: evaluate on the validation set every `eval_every` epochs and after the last,
    save RUN/checkpoint every `checkpoint_every` epochs and at the end (with the optimizer state and
    every rank's reader position, so `--resume RUN` continues exactly), and RUN/best whenever the
    monitored metric improves (`keep_best`). Early stopping: stop after `patience` evaluations in a row
    without an improvement of more than `min_delta` (0 = never stop early). With `restore_best` the run
    ends with the best evaluation's weights: the final RUN/checkpoint (what later stages load) and
    metrics.json are those of the best evaluation of this process.
    """

    epochs: int = 2
    max_steps: Optional[int] = None  # stop after this many optimizer steps in total (smoke runs, tests)
    batch_size: Optional[int] = None  # rows per rank per training step; null = reader.batch_size
    seed: int = 0  # dense init (embedding init is seeded by it too) and evaluation sampling
    dense_optimizer: DenseOptimizer = "adam"  # embedding tables use embeddings.optimizer (fused)
    dense_lr: float = 1.0e-3
    dense_weight_decay: float = 0.0
    uneven_batches: UnevenPolicy = "pad"  # ranks with fewer batches: pad (zero-loss steps, every batch once)
    #                                      or stop (all stop when the first rank runs out; rest counted)
    drop_last: bool = True  # training reader drops each reader slot's last partial batch (counted): with
    #   trainable row-wise pooled tables every rank's batch must have the same size (TorchRec's backward
    #   all_gather over gloo rejects uneven sizes); false is safe when the tables are frozen
    eval_every: int = 1  # epochs between evaluations (the last epoch is always evaluated); 0 = last only
    monitor: str = "loss"  # evaluation metric driving early stopping and RUN/best
    monitor_mode: Literal["min", "max"] = "min"
    patience: int = 0  # evaluations without improvement before stopping; 0 = no early stopping
    min_delta: float = 0.0
    checkpoint_every: int = 1  # epochs between RUN/checkpoint saves (and always at the end); 0 = end only
    keep_best: bool = True  # also keep RUN/best, the checkpoint of the best monitored evaluation
    restore_best: bool = True  # end with the best evaluation's weights (from RUN/best; needs keep_best)
    log_every: int = 50  # log the running train loss every N steps (rank 0, and RUN/metrics.jsonl)
    precision: Precision = "fp32"  # training forward: fp32 | bf16 (autocast; weights, optimizer state, losses
    #   and evaluation stay fp32); bf16 runs the matmuls on the CPU's bf16 units (docs/benchmarks.md)

    def validate(self, path: str) -> None:
        if self.epochs < 0:
            raise ConfigError(f"{path}.epochs: must be >= 0, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 0:
            raise ConfigError(f"{path}.max_steps: must be >= 0 or null, got {self.max_steps}")
        if self.batch_size is not None and self.batch_size <= 0:
            raise ConfigError(f"{path}.batch_size: must be > 0 or null, got {self.batch_size}")
        if self.seed < 0:
            raise ConfigError(f"{path}.seed: must be >= 0, got {self.seed}")
        if self.dense_lr <= 0:
            raise ConfigError(f"{path}.dense_lr: must be > 0, got {self.dense_lr}")
        if self.dense_weight_decay < 0:
            raise ConfigError(f"{path}.dense_weight_decay: must be >= 0, got {self.dense_weight_decay}")
        for name in ("eval_every", "patience", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{path}.{name}: must be >= 0, got {getattr(self, name)}")
        if self.log_every <= 0:
            raise ConfigError(f"{path}.log_every: must be > 0, got {self.log_every}")
        if self.min_delta < 0:
            raise ConfigError(f"{path}.min_delta: must be >= 0, got {self.min_delta}")
        if not self.monitor:
            raise ConfigError(f"{path}.monitor: must name an evaluation metric (e.g. loss, auc)")


@dataclass
class TrainOverrides:
    """A per-stage section (`pretrain_train:` ...): the `train:` keys that differ for that stage."""

    epochs: Optional[int] = None
    max_steps: Optional[int] = None
    batch_size: Optional[int] = None
    seed: Optional[int] = None
    dense_optimizer: Optional[DenseOptimizer] = None
    dense_lr: Optional[float] = None
    dense_weight_decay: Optional[float] = None
    uneven_batches: Optional[UnevenPolicy] = None
    drop_last: Optional[bool] = None
    eval_every: Optional[int] = None
    monitor: Optional[str] = None
    monitor_mode: Optional[Literal["min", "max"]] = None
    patience: Optional[int] = None
    min_delta: Optional[float] = None
    checkpoint_every: Optional[int] = None
    keep_best: Optional[bool] = None
    restore_best: Optional[bool] = None
    log_every: Optional[int] = None
    precision: Optional[Precision] = None


def resolve_train(base: TrainConfig, overrides: Optional[TrainOverrides], path: str = "train") -> TrainConfig:
    """`base` with every non-null field of `overrides` applied, validated (errors name `path`)."""
    changes = {} if overrides is None else {
        f.name: getattr(overrides, f.name) for f in dataclasses.fields(overrides)
        if getattr(overrides, f.name) is not None
    }
    out = dataclasses.replace(base, **changes)
    out.validate(path)
    return out

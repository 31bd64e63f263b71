"""The data contract in code: which Parquet column plays which role, with vocabularies and policies.

Real logs with other column names plug in by editing the `data:` section of a config; no code
changes. See docs/data.md for the canonical schema.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional

from satrank.pipeline.config import ConfigError

OutOfRangePolicy = Literal["error", "hash", "oov"]


@dataclass
class SparseFeature:
    """A single-valued int64 categorical column (ids and attributes), one lookup per row."""

    name: str
    column: str
    vocab_size: int
    out_of_range: OutOfRangePolicy = "error"
    table: Optional[str] = None  # embedding table; features naming the same table share it

    @property
    def table_name(self) -> str:
        return self.table or self.name

    @property
    def num_rows(self) -> int:
        """Rows of the embedding table: one extra row for out-of-vocabulary ids under `oov`."""
        return self.vocab_size + (1 if self.out_of_range == "oov" else 0)


@dataclass
class SequenceFeature:
    """A list<int64> column, oldest first, most recent last; truncated to the last `max_len` ids."""

    name: str
    column: str
    vocab_size: int
    max_len: int
    out_of_range: OutOfRangePolicy = "error"
    table: Optional[str] = None
    optional: bool = False  # a missing column then reads as empty histories (e.g. hist_skip)

    @property
    def table_name(self) -> str:
        return self.table or self.name

    @property
    def num_rows(self) -> int:
        return self.vocab_size + (1 if self.out_of_range == "oov" else 0)


@dataclass
class DenseFeature:
    """A float column; `log1p` is applied before the model sees it when `transform` says so."""

    name: str
    column: str
    transform: Literal["none", "log1p"] = "none"


@dataclass
class LabelColumns:
    """Canonical label roles -> column names. `satisfied` is nullable: null where not answered."""

    click: str = "click"
    watch_time_s: str = "watch_time_s"
    skip: str = "skip"
    questionnaire_answered: str = "questionnaire_answered"
    satisfied: str = "satisfied"
    extra: List[str] = field(default_factory=list)  # more 0/1 label columns, Batch.labels[column] (extra heads)


@dataclass
class IdColumns:
    user_id: str = "user_id"
    item_id: str = "item_id"
    timestamp: str = "timestamp"
    request_id: str = "request_id"


@dataclass
class DataConfig:
    """Feature config: maps Parquet columns to roles. `true_*` columns are ground truth, never features."""

    ids: IdColumns = field(default_factory=IdColumns)
    sparse: List[SparseFeature] = field(default_factory=list)
    sequence: List[SequenceFeature] = field(default_factory=list)
    dense: List[DenseFeature] = field(default_factory=list)
    labels: LabelColumns = field(default_factory=LabelColumns)
    truth_prefix: str = "true_"
    truth_columns: List[str] = field(default_factory=list)  # read for evaluation only

    def validate(self, path: str) -> None:
        names = [f.name for f in self.sparse] + [f.name for f in self.sequence] + [f.name for f in self.dense]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"{path}: feature names must be unique, repeated: {dup}")
        for f in [*self.sparse, *self.sequence, *self.dense]:
            if f.column.startswith(self.truth_prefix):
                raise ConfigError(f"{path}: feature {f.name!r} reads ground-truth column {f.column!r}")
        tables: Dict[str, int] = {}
        for f in [*self.sparse, *self.sequence]:
            if f.vocab_size <= 0:
                raise ConfigError(f"{path}: feature {f.name!r}: vocab_size must be > 0, got {f.vocab_size}")
            prev = tables.setdefault(f.table_name, f.num_rows)
            if prev != f.num_rows:
                raise ConfigError(
                    f"{path}: features sharing table {f.table_name!r} disagree on rows "
                    f"({prev} vs {f.num_rows} for {f.name!r}); give them the same vocab_size and policy"
                )
        for f in self.sequence:
            if f.max_len <= 0:
                raise ConfigError(f"{path}: sequence feature {f.name!r}: max_len must be > 0")
        canonical = [getattr(self.labels, n) for n in ("click", "watch_time_s", "skip", "questionnaire_answered",
                                                          "satisfied")]
        clash = sorted({c for c in self.labels.extra if c in canonical or self.labels.extra.count(c) > 1})
        if clash:
            raise ConfigError(f"{path}.labels.extra: {clash} repeat a label column")
        for c in self.truth_columns:
            if not c.startswith(self.truth_prefix):
                raise ConfigError(f"{path}: truth column {c!r} must start with {self.truth_prefix!r}")

    @property
    def sparse_names(self) -> List[str]:
        """KeyedJaggedTensor keys, in order: single-valued features, then sequences."""
        return [f.name for f in self.sparse] + [f.name for f in self.sequence]

    @property
    def dense_names(self) -> List[str]:
        return [f.name for f in self.dense]

    def feature(self, name: str):
        for f in [*self.sparse, *self.sequence, *self.dense]:
            if f.name == name:
                return f
        raise KeyError(f"no feature named {name!r}; known: {self.sparse_names + self.dense_names}")

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
class ItemsConfig:
    """The item attribute table `DIR/<dir>/*.parquet` (one row per item) and what the reader derives from it.

    `sparse` / `dense` name data.sparse / data.dense features whose column the table carries (same
    column names); `history` names sequence features of item ids that get one derived sequence
    `<history>__<sparse>` per sparse attribute (the attribute of each history item, looked up in the
    attribute feature's table under its out_of_range policy). `on_missing`: an item id of the data
    without a table row is an error, or reads attribute id 0 / 0.0 and is counted as `items_missing`.
    """

    dir: str = "items"  # relative to the data dir (the parent of train/ valid/ test/ candidates/)
    id: str = "item_id"  # the table's item id column
    sparse: List[str] = field(default_factory=lambda: ["author_id", "category_id"])
    dense: List[str] = field(default_factory=lambda: ["duration_s"])
    history: List[str] = field(default_factory=list)
    on_missing: Literal["error", "default"] = "error"


DERIVED_SEPARATOR = "__"  # derived history attribute feature: <history>__<sparse attribute>


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
    items: Optional[ItemsConfig] = None  # the item attribute table; None = no table

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
        if self.items is not None:
            self._validate_items(f"{path}.items")

    def _validate_items(self, path: str) -> None:
        """One-line errors naming the `data.items` key whose name is not a feature of the right kind."""
        it = self.items
        sparse = {f.name: f for f in self.sparse}
        dense = {f.name for f in self.dense}
        seq = {f.name: f for f in self.sequence}
        for key, names, known, kind in (("sparse", it.sparse, sparse, "data.sparse"),
                                        ("dense", it.dense, dense, "data.dense"),
                                        ("history", it.history, seq, "data.sequence")):
            bad = [n for n in names if n not in known]
            if bad:
                raise ConfigError(f"{path}.{key}: {bad} name no feature of {kind} (known: {sorted(known)})")
            if len(set(names)) != len(names):
                raise ConfigError(f"{path}.{key}: repeated names in {names}")
        item = self.item_feature
        if item is None:
            raise ConfigError(f"{path}: no data.sparse feature reads the item id column {self.ids.item_id!r}; "
                              f"the item table's vocabulary is that feature's vocab_size")
        if item.name in it.sparse:
            raise ConfigError(f"{path}.sparse: {item.name!r} is the item id itself, not an attribute")
        for h in it.history:
            if seq[h].table_name != item.table_name:
                raise ConfigError(f"{path}.history: {h!r} uses table {seq[h].table_name!r}, not the item table "
                                  f"{item.table_name!r} of {item.name!r}: its values are not item ids")
        taken = {f.name for f in [*self.sparse, *self.sequence]} | dense
        clash = sorted(n.name for n in self.derived_sequences if n.name in taken)
        if clash:
            raise ConfigError(f"{path}.history: derived feature name(s) {clash} repeat a feature name")

    @property
    def item_feature(self) -> Optional[SparseFeature]:
        """The single-valued feature reading the item id column (its vocab_size sizes the item table)."""
        return next((f for f in self.sparse if f.column == self.ids.item_id), None)

    @property
    def derived_sequences(self) -> List[SequenceFeature]:
        """History attribute sequences the reader derives from the item table, in KJT key order: for
        each `items.history` feature, for each `items.sparse` attribute, `<history>__<attribute>`
        (attribute's vocab, policy and table; the history's max_len). Empty without items.history."""
        if self.items is None:
            return []
        out = []
        for h in self.items.history:
            hist = next(f for f in self.sequence if f.name == h)
            for a in self.items.sparse:
                attr = next(f for f in self.sparse if f.name == a)
                out.append(SequenceFeature(name=f"{h}{DERIVED_SEPARATOR}{a}", column=f"{h}{DERIVED_SEPARATOR}{a}",
                                           vocab_size=attr.vocab_size, max_len=hist.max_len,
                                           out_of_range=attr.out_of_range, table=attr.table_name))
        return out

    @property
    def all_sequences(self) -> List[SequenceFeature]:
        """Sequence features read from columns, then those derived from the item table."""
        return [*self.sequence, *self.derived_sequences]

    @property
    def sparse_names(self) -> List[str]:
        """KeyedJaggedTensor keys, in order: single-valued features, sequences, derived history attributes."""
        return [f.name for f in self.sparse] + [f.name for f in self.sequence] + [
            f.name for f in self.derived_sequences]

    @property
    def dense_names(self) -> List[str]:
        return [f.name for f in self.dense]

    def feature(self, name: str):
        for f in [*self.sparse, *self.all_sequences, *self.dense]:
            if f.name == name:
                return f
        raise KeyError(f"no feature named {name!r}; known: {self.sparse_names + self.dense_names}")

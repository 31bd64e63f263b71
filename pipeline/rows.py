"""Row-level helpers over Parquet splits: read a few columns, take rows by index, build a per-key
attribute table, and turn in-memory rows into Batches (through the same Converter as the reader).

Why: evaluation protocols that are not a plain scan of a split (SAQRec's leave-one-out ranking,
sec. 5.1.2) need to pick individual rows (a user's last click), repeat them with other candidates'
attributes, and score the result. Building those rows as Arrow tables and converting them with
`satrank.pipeline.convert.table_to_batch` keeps every vocabulary policy and row check of the reader, so a
synthetic row is validated exactly like a logged one. Files are discovered with
`satrank.pipeline.shards.list_shards` (sorted; names starting with '.' or '_' ignored), so "row i of a
split" means the same thing everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from satrank.pipeline.batch import Batch
from satrank.pipeline.convert import table_to_batch
from satrank.pipeline.errors import DataError
from satrank.pipeline.features import DataConfig
from satrank.pipeline.shards import list_shards


def _dataset(uri) -> pads.Dataset:
    fs, files = list_shards(str(uri))
    return pads.dataset(files, format="parquet", filesystem=fs)


def read_columns(uri, columns: Sequence[str]) -> pa.Table:
    """The named columns of every row of a split (file order, row-group order), as one table."""
    ds = _dataset(uri)
    missing = [c for c in columns if c not in ds.schema.names]
    if missing:
        raise DataError(f"{uri}: column(s) {missing} missing; the files have {ds.schema.names}")
    return ds.to_table(columns=list(columns), use_threads=True)


def take_rows(uri, indices: np.ndarray, columns: Sequence[str] | None = None) -> pa.Table:
    """Rows `indices` (global row numbers in `read_columns` order) of a split, in the order given."""
    ds = _dataset(uri)
    idx = np.asarray(indices, dtype=np.int64)
    n = ds.count_rows()
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise DataError(f"{uri}: row index out of range [0, {n})")
    return ds.take(pa.array(idx), columns=list(columns) if columns is not None else None)


@dataclass
class AttributeTable:
    """Per-key attribute values (e.g. item_id -> author_id, category_id, duration_s).

    keys: sorted unique int64; values: column -> array aligned with keys (the value of the key's
    LAST row in file order: logs are time ordered, so the most recent one); conflicts: column ->
    number of keys whose rows disagree on that column (reported, never hidden).
    """

    key: str
    keys: np.ndarray
    values: Dict[str, np.ndarray]
    conflicts: Dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.keys.size)

    def index_of(self, keys: np.ndarray) -> np.ndarray:
        """Positions of `keys` in `self.keys`; DataError naming up to 10 unknown keys."""
        k = np.asarray(keys, dtype=np.int64)
        if self.keys.size == 0:
            raise DataError(f"attribute table ({self.key}) is empty")
        pos = np.minimum(np.searchsorted(self.keys, k), self.keys.size - 1)
        bad = self.keys[pos] != k
        if bad.any():
            unknown = np.unique(k[bad])[:10].tolist()
            raise DataError(f"attribute table ({self.key}): no attributes for {self.key} {unknown}")
        return pos

    def lookup(self, keys: np.ndarray) -> Dict[str, np.ndarray]:
        pos = self.index_of(keys)
        return {c: v[pos] for c, v in self.values.items()}


def collect_attributes(uris: Sequence, key: str, columns: Sequence[str]) -> AttributeTable:
    """Attribute table of `key` over every row of the given splits (read in order; last row wins)."""
    parts = [read_columns(u, [key, *columns]) for u in uris]
    if not parts:
        raise ValueError("collect_attributes: no splits given")
    table = pa.concat_tables(parts, promote_options="permissive")
    for c in [key, *columns]:
        if table.column(c).null_count:
            raise DataError(f"column {c!r}: {table.column(c).null_count} null value(s) in {list(map(str, uris))}")
    k = table.column(key).to_numpy().astype(np.int64)
    order = np.argsort(k, kind="stable")
    ks = k[order]
    start = np.flatnonzero(np.append(True, ks[1:] != ks[:-1]))
    last = np.append(start[1:], ks.size) - 1
    values, conflicts = {}, {}
    for c in columns:
        v = table.column(c).to_numpy()[order]
        values[c] = v[last]
        differs = np.append(False, v[1:] != v[:-1]) & np.append(False, ks[1:] == ks[:-1])
        conflicts[c] = int(np.unique(ks[differs]).size)
    return AttributeTable(key, ks[start], values, conflicts)


def repeat_with(table: pa.Table, row_index: np.ndarray, replace: Mapping[str, np.ndarray],
                drop: Sequence[str] = ()) -> pa.Table:
    """Rows `row_index` of `table` (repeats allowed), with columns in `replace` set to the given
    values (cast to the column's type) and columns in `drop` removed."""
    out = table.take(pa.array(np.asarray(row_index, dtype=np.int64)))
    out = out.drop_columns([c for c in drop if c in out.schema.names])
    for name, values in replace.items():
        i = out.schema.get_field_index(name)
        if i < 0:
            raise DataError(f"repeat_with: column {name!r} is not in the rows (have {out.schema.names})")
        if len(values) != out.num_rows:
            raise ValueError(f"repeat_with: {name!r} has {len(values)} values for {out.num_rows} rows")
        out = out.set_column(i, name, pa.array(values).cast(out.schema.field(i).type))
    return out


def table_batches(table: pa.Table, data_cfg: DataConfig, batch_rows: int, *, with_labels: bool = False,
                  file: str = "<rows>") -> Iterator[Batch]:
    """Batches of `batch_rows` consecutive rows of an in-memory table (row order kept), converted
    and validated like reader batches (on_bad_row=error: a bad synthetic row is a bug)."""
    if batch_rows <= 0:
        raise ValueError(f"batch_rows must be > 0, got {batch_rows}")
    for lo in range(0, table.num_rows, batch_rows):
        batch, stats = table_to_batch(table.slice(lo, batch_rows), data_cfg, file=file, with_labels=with_labels)
        if stats["rows_emitted"] != min(batch_rows, table.num_rows - lo):
            raise DataError(f"{file}: rows {lo}.. were not all converted: {stats}")
        yield batch

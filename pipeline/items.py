"""The item attribute table (`DIR/items/*.parquet`, one row per item) as numpy lookup arrays.

Why: a history (hist_click, ...) carries only item ids, so a model cannot see a history item's
author or category. With the table (KuaiRand's video features), the reader looks up every history
item and emits `<history>__<attribute>` sequences beside the histories, in the one KeyedJaggedTensor
(Parquet -> reader -> Batch -> sharded embeddings). `jobs.check_data` uses the same table to check that
every item id of the data has a row and that the impressions' own attribute columns agree with it.

The table is read once with pyarrow into arrays indexed by item id (size vocab + 1: the last slot is
"no row", read as attribute 0 / 0.0): a lookup is one numpy gather, and the object pickles cheaply
into DataLoader workers (a few arrays of the item vocabulary's size). Plain numpy, no torch.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from satrank.pipeline.errors import DataError
from satrank.pipeline.features import DERIVED_SEPARATOR, DataConfig, ItemsConfig

MISSING = "missing"  # count keys: "missing:<column>" (ids without a row), "mismatch:<column>" (check_data)
MISMATCH = "mismatch"


def data_dir_of(split_uri: str) -> str:
    """The data dir of a split directory (DIR/train -> DIR) or of one shard (DIR/train/x.parquet -> DIR)."""
    uri = str(split_uri).rstrip("/")
    if uri.endswith(".parquet"):
        uri = uri.rsplit("/", 1)[0]
    return uri.rsplit("/", 1)[0] if "/" in uri else "."


def items_location(data_dir: str, cfg: ItemsConfig) -> str:
    """`data.items.dir` resolved against the data dir (an absolute path or a URI is used as is)."""
    if os.path.isabs(cfg.dir) or "://" in cfg.dir:
        return cfg.dir
    return f"{str(data_dir).rstrip('/')}/{cfg.dir}"


def _first(mask: np.ndarray) -> int:
    """Index of the first True (the row an error message names)."""
    return int(np.argmax(mask))


class ItemTable:
    """Item id -> attributes. `present[id]`, `sparse[name][id]` (vocabulary policy of the attribute's
    feature applied), `raw[name][id]` (as stored), `hit[name][id]` (mapped by hash/oov), `dense[name][id]`."""

    def __init__(self, where: str, files: List[str], vocab: int, cfg: ItemsConfig, data: DataConfig,
                 present: np.ndarray, sparse: Dict[str, np.ndarray], raw: Dict[str, np.ndarray],
                 hit: Dict[str, np.ndarray], dense: Dict[str, np.ndarray], rows: int):
        """Use `ItemTable.load`; this only keeps the arrays (all of size vocab + 1)."""
        self.where, self.files, self.vocab, self.cfg = where, files, vocab, cfg
        self.columns = {f.name: f.column for f in [*data.sparse, *data.dense]}
        self.present, self.sparse, self.raw, self.hit, self.dense, self.rows = present, sparse, raw, hit, dense, rows

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, data_dir: str, cfg: ItemsConfig, data: DataConfig) -> "ItemTable":
        """Read `data_dir/<cfg.dir>/*.parquet`; any problem is one DataError naming file, column, row (and id)."""
        from satrank.pipeline.shards import list_shards, open_parquet  # (shards imports convert, which sees us)

        where = items_location(data_dir, cfg)
        try:
            fs, files = list_shards(where)
        except DataError as exc:
            raise DataError(f"data.items: the item attribute table: {exc} (data.items: null if the data has none)") \
                from None
        item = data.item_feature
        vocab = item.vocab_size
        feats = {f.name: f for f in [*data.sparse, *data.dense]}
        kinds = [(cfg.id, "int")] + [(feats[n].column, "int") for n in cfg.sparse] + \
                [(feats[n].column, "number") for n in cfg.dense]
        ids, where_of, columns = [], [], {c: [] for c, _ in kinds}
        for fi, path in enumerate(files):
            table = cls._read(open_parquet(fs, path), path, kinds)
            v = table[cfg.id]
            bad = (v < 0) | (v >= vocab)
            if bad.any():
                i = _first(bad)
                raise DataError(f"{path}: column {cfg.id!r}, row {i}: item id {int(v[i])} is outside the item "
                                f"vocabulary 0..{vocab - 1} (vocab_size of data.sparse {item.name!r})")
            ids.append(v)
            where_of.append(np.stack([np.full(len(v), fi), np.arange(len(v))], 1))
            for c, _ in kinds[1:]:
                columns[c].append(table[c])
        ids_all = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        loc = np.concatenate(where_of) if where_of else np.zeros((0, 2), np.int64)
        order = np.argsort(ids_all, kind="stable")
        dup = np.flatnonzero(ids_all[order][1:] == ids_all[order][:-1])
        if len(dup):
            (f0, r0), (f1, r1) = loc[order[dup[0]]], loc[order[dup[0] + 1]]
            raise DataError(f"{files[f1]}: column {cfg.id!r}, row {r1}: duplicate item id {int(ids_all[order[dup[0]]])}"
                            f" (first at {files[f0]} row {r0}); the item table has one row per item")
        present = np.zeros(vocab + 1, bool)
        present[ids_all] = True
        sparse, raw, hit, dense = {}, {}, {}, {}
        for name in cfg.sparse:
            f = feats[name]
            v = np.concatenate(columns[f.column]) if ids else np.zeros(0, np.int64)
            bad = v < 0
            over = v >= f.vocab_size
            if f.out_of_range == "error":
                bad |= over
            if bad.any():
                fi, r = loc[_first(bad)]
                raise DataError(f"{files[fi]}: column {f.column!r}, row {r}: value {int(v[_first(bad)])} is negative "
                                f"or >= vocab_size {f.vocab_size} of data.sparse {name!r} (out_of_range: "
                                f"{f.out_of_range})")
            mapped = v if not over.any() else (np.remainder(v, f.vocab_size) if f.out_of_range == "hash"
                                                 else np.where(over, f.vocab_size, v))
            for out, val, dt in ((sparse, mapped, np.int64), (raw, v, np.int64), (hit, over, bool)):
                arr = np.zeros(vocab + 1, dt)
                arr[ids_all] = val
                out[name] = arr
        for name in cfg.dense:
            v = np.concatenate(columns[feats[name].column]) if ids else np.zeros(0, np.float32)
            bad = ~np.isfinite(v)
            if bad.any():
                fi, r = loc[_first(bad)]
                raise DataError(f"{files[fi]}: column {feats[name].column!r}, row {r}: NaN or infinite value")
            arr = np.zeros(vocab + 1, np.float32)
            arr[ids_all] = v
            dense[name] = arr
        return cls(where, files, vocab, cfg, data, present, sparse, raw, hit, dense, len(ids_all))

    @staticmethod
    def _read(pf, path: str, kinds: Sequence[Tuple[str, str]]) -> Dict[str, np.ndarray]:
        """Columns of one table file as numpy (int64 / float32); missing column, wrong type or null: DataError."""
        schema = pf.schema_arrow
        for column, kind in kinds:
            i = schema.get_field_index(column)
            if i < 0:
                raise DataError(f"{path}: column {column!r} (item table) is missing; "
                                f"the file has columns {schema.names}")
            t = schema.field(i).type
            ok = pa.types.is_integer(t) or (kind == "number" and pa.types.is_floating(t))
            if not ok:
                want = "an integer type (int64)" if kind == "int" else "a numeric type (float32)"
                raise DataError(f"{path}: column {column!r} (item table) has Arrow type {t}, expected {want}")
        try:
            table = pf.read(columns=list(dict.fromkeys(c for c, _ in kinds)))
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{path}: the item table cannot be read (corrupt?): {exc}") from None
        out = {}
        for column, kind in kinds:
            arr = table.column(column)
            if arr.null_count:
                nulls = np.asarray(arr.is_null())
                raise DataError(f"{path}: column {column!r}, row {_first(nulls)}: null value in the item table")
            arr = pc.cast(arr, pa.int64() if kind == "int" else pa.float32())
            out[column] = arr.to_numpy()
        return out

    def describe(self) -> Dict[str, Any]:
        """Plain data for reports: where the table is, its rows, the attribute columns checked."""
        return {"items_table": self.where, "items_rows": self.rows,
                "items_columns": [self.columns[n] for n in [*self.cfg.sparse, *self.cfg.dense]]}

    # ------------------------------------------------------------------ lookups
    def slots(self, ids: np.ndarray) -> np.ndarray:
        """Index into the lookup arrays: the id itself, or the "no row" slot for ids outside the vocabulary."""
        ids = np.asarray(ids, dtype=np.int64)
        return np.where(ids.view(np.uint64) < self.vocab, ids, self.vocab)

    def lookup(self, ids: np.ndarray) -> Dict[str, np.ndarray]:
        """Per attribute (sparse: int64 with its policy applied, dense: float32) of each id; 0 where no row."""
        s = self.slots(ids)
        return {**{n: a[s] for n, a in self.sparse.items()}, **{n: a[s] for n, a in self.dense.items()}}

    def has(self, ids: np.ndarray) -> np.ndarray:
        """True where the id has a row in the table."""
        return self.present[self.slots(ids)]

    # ------------------------------------------------------------------ reader hooks (Converter)
    def _missing(self, column: str, ctx: Any, missing: np.ndarray, row: np.ndarray, ids: np.ndarray,
                 keep: np.ndarray) -> Optional[np.ndarray]:
        """Per-row counts of ids without a row (emitted rows only matter); DataError under on_missing=error."""
        rows = row[missing]
        if self.cfg.on_missing == "error":
            live = keep[rows]
            if live.any():
                k = _first(live)
                raise DataError(
                    f"{ctx.file}: column {column!r}, row {ctx.row_offset + int(rows[k])}: item id "
                    f"{int(ids[missing][k])} has no row in the item table {self.where} (data.items.on_missing: "
                    f"error; 'default' reads attribute id 0 and counts it as items_missing)")
        return np.bincount(rows, minlength=ctx.n).astype(np.int32) if len(rows) else None

    def derive(self, ctx: Any, history: str, values: np.ndarray, offsets: np.ndarray, keep: np.ndarray,
               counts: Dict[str, np.ndarray], hits: Dict[str, np.ndarray]) -> List[np.ndarray]:
        """The `<history>__<attribute>` values of one history (ids as read, truncated, before the history's
        own vocabulary policy), one array per `items.sparse` attribute, same lengths as the history."""
        s = self.slots(values)
        missing = ~self.present[s]
        row = np.repeat(np.arange(ctx.n), np.diff(offsets))
        if missing.any():
            c = self._missing(history, ctx, missing, row, values, keep)
            if c is not None:
                counts[f"{MISSING}:{history}"] = c
        out = []
        for name in self.cfg.sparse:
            h = self.hit[name][s]
            if h.any():
                hits[f"{history}{DERIVED_SEPARATOR}{name}"] = np.bincount(row[h], minlength=ctx.n).astype(np.int32)
            out.append(self.sparse[name][s])
        return out

    def audit(self, ctx: Any, item_ids: np.ndarray, attrs: Dict[str, np.ndarray],
              histories: Dict[str, Tuple[np.ndarray, np.ndarray]], keep: np.ndarray) -> Dict[str, np.ndarray]:
        """check_data's per-row counts: item ids (item_id column and every history element) without a row,
        and impressions whose attribute columns (raw; dense compared as float32) disagree with the table."""
        counts: Dict[str, np.ndarray] = {}
        n = ctx.n
        s = self.slots(item_ids)
        have = self.present[s]
        if (~have).any():
            c = self._missing(self.cfg.id, ctx, ~have, np.arange(n), item_ids, keep)
            if c is not None:
                counts[f"{MISSING}:{self.cfg.id}"] = c
        for column, (values, offsets) in histories.items():
            missing = ~self.present[self.slots(values)]
            if missing.any():
                row = np.repeat(np.arange(n), np.diff(offsets))
                c = self._missing(column, ctx, missing, row, values, keep)
                if c is not None:
                    counts[f"{MISSING}:{column}"] = c
        for name, v in attrs.items():
            if name in self.raw:
                differs = self.raw[name][s] != v
            else:
                differs = self.dense[name][s] != np.asarray(v, dtype=np.float32)
            differs &= have
            if differs.any():
                counts[f"{MISMATCH}:{self.columns[name]}"] = differs.astype(np.int32)
        return counts


def table_exists(data_dir: str, cfg: ItemsConfig) -> bool:
    """Whether `data.items.dir` exists under the data dir (check_data tells "no table" from "bad table")."""
    import pyarrow.fs as pafs

    where = items_location(data_dir, cfg)
    try:
        fs, path = pafs.FileSystem.from_uri(where) if "://" in where else (pafs.LocalFileSystem(),
                                                                            os.path.abspath(where))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return True  # let the load say what is wrong with the URI
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def summarize(stats: Dict[str, Any], described: Dict[str, Any]) -> Dict[str, Any]:
    """check_data's item figures: `ItemTable.describe()` plus the summed `items` counts of the reader's stats."""
    items = stats.get("items", {})
    missing = {k.split(":", 1)[1]: v for k, v in items.items() if k.startswith(f"{MISSING}:")}
    mismatch = {c: items.get(f"{MISMATCH}:{c}", 0) for c in described["items_columns"]}
    return {**described, "items_missing": sum(missing.values()), "items_missing_by_column": missing,
            "items_attr_mismatch": mismatch}

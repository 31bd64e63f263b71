"""Arrow record batch -> Batch: schema checks, vectorised row validation, vocabulary policies.

Why here: train, eval and score all read Parquet through this one conversion, so a bad file fails
the same way everywhere and no row is dropped without being counted. There is no per-row Python:
columns are checked and mapped with numpy / pyarrow.compute on whole windows, histories stay in
Arrow's memory (offsets -> lengths, values zero-copy), and the rows of a batch (in shuffled order)
are gathered per history with one fbgemm `permute_1D_sparse_data` call, then laid out key-major.
Every element of a history is validated, also those truncated away by max_len.

Column problems (missing, wrong Arrow type, a sequence that is not a list) are always DataError.
Row problems (null/negative ids, ids >= vocab_size under `error`, NaN/inf, labels not 0/1,
watch_time_s < 0, `satisfied` inconsistent with `questionnaire_answered`) raise DataError under
on_bad_row=error and are dropped and counted as `problem:column` under on_bad_row=skip.

With an item table (pipeline/items.py), every history named in data.items.history gets its derived
`<history>__<attribute>` sequences (same lengths), appended after the read sequences; the gathering of
rows into Batches lives in pipeline/parts.py.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from satrank.pipeline.batch import LABEL_NAMES, Batch
from satrank.pipeline.errors import DataError
from satrank.pipeline.features import DataConfig
from satrank.pipeline.parts import (Parts, assemble, empty_batch, gather,  # noqa: F401 (re-exported)
                                    make_batch)

KEEP, FILTERED = 0, 1  # reason codes; 2 + i is Converter.reasons[i]

_TYPES = {  # kind -> (predicate on the Arrow type, what we expected, in words)
    "int": (pa.types.is_integer, "an integer type (int64)"),
    "list": (lambda t: (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type),
             "a list of integers (list<int64>)"),
    "number": (lambda t: pa.types.is_integer(t) or pa.types.is_floating(t), "a numeric type (float32)"),
    "binary": (lambda t: pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t),
               "an integer, boolean or float type holding 0/1 (int8)"),
    "flag": (lambda t: pa.types.is_integer(t) or pa.types.is_boolean(t), "an integer or boolean type"),
}


def new_stats() -> Dict[str, Any]:
    """Per-slot counters (plain JSON data): rows_read == emitted + rejected + filtered + dropped."""
    return {"rows_read": 0, "rows_emitted": 0, "rows_rejected": {}, "rows_filtered": 0,
            "rows_dropped": 0, "oov_hits": {}}


@dataclass
class Chunk:
    """A converted window, rows in file order (no row is removed here: `reason` says which to emit)."""

    n: int
    sparse: np.ndarray  # int64 [n_sparse, n]: single-valued ids, vocabulary policy applied
    seq_values: List[torch.Tensor]  # int64 per sequence feature: truncated, mapped (may view Arrow memory)
    seq_lengths: List[torch.Tensor]  # int32 [n] per sequence feature
    dense: np.ndarray  # float32 [n, D], transforms applied
    floats: np.ndarray  # float32 [len(float_names), n]: labels, then truth columns
    float_names: List[Tuple[str, str]]  # (group, name), group "labels" or "truth"
    ids: np.ndarray  # int64 [len(id_names), n]
    id_names: List[str]
    reason: np.ndarray  # int16 [n]: KEEP, FILTERED or 2 + index into Converter.reasons
    hits: Dict[str, np.ndarray]  # feature -> int32 [n] ids mapped by the hash/oov policy
    counts: Dict[str, np.ndarray]  # item-table count -> int32 [n] (pipeline/items.py: missing:*, mismatch:*)


@dataclass
class _Ctx:
    file: str
    row_offset: int
    n: int
    reason: np.ndarray


def _array(data, column: str) -> pa.Array:
    arr = data.column(column)
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def _row_of(offsets: np.ndarray, elements: np.ndarray) -> np.ndarray:
    """Row of each element index, given relative offsets (offsets[0] == 0)."""
    return np.searchsorted(offsets[1:], elements, side="right")


class Converter:
    """Checks and converts record batches for one DataConfig (pickled into DataLoader workers)."""

    def __init__(self, data_cfg: DataConfig, *, with_labels: bool = True, on_bad_row: str = "error",
                 row_filter: Optional[str] = None, items: Any = None, audit_items: bool = False):
        if on_bad_row not in ("error", "skip"):
            raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
        if items is None and (data_cfg.derived_sequences or audit_items):
            what = (f"data.items.history {data_cfg.items.history} derives history attributes from"
                    if data_cfg.derived_sequences else "audit_items checks the data against")
            raise DataError(f"{what} the item table, but this reader was given none "
                            f"(satrank.pipeline.items.ItemTable)")
        self.items = items  # satrank.pipeline.items.ItemTable, or None (no derived features, no audit)
        self.audit_items = audit_items  # check_data: also count missing item ids and attribute mismatches
        self.cfg = data_cfg
        self.with_labels = with_labels
        self.on_bad_row = on_bad_row
        self.row_filter = row_filter
        self.keys: List[str] = data_cfg.sparse_names
        self.reasons: List[str] = []
        ids = data_cfg.ids
        lab = data_cfg.labels
        # (column, role, kind, required)
        specs = [(ids.user_id, "id user_id", "int", True), (ids.item_id, "id item_id", "int", True),
                 (ids.timestamp, "id timestamp", "int", True), (ids.request_id, "id request_id", "int", False)]
        specs += [(f.column, f"sparse feature {f.name}", "int", True) for f in data_cfg.sparse]
        specs += [(f.column, f"sequence feature {f.name}", "list", not f.optional) for f in data_cfg.sequence]
        specs += [(f.column, f"dense feature {f.name}", "number", True) for f in data_cfg.dense]
        if with_labels:
            specs += [(lab.click, "label click", "binary", True), (lab.skip, "label skip", "binary", True),
                      (lab.questionnaire_answered, "label questionnaire_answered", "binary", True),
                      (lab.satisfied, "label satisfied", "binary", True),
                      (lab.watch_time_s, "label watch_time_s", "number", True)]
            specs += [(c, f"label {c}", "binary", True) for c in lab.extra]
        specs += [(c, "ground truth", "number", False) for c in data_cfg.truth_columns]
        if row_filter is not None:
            specs.append((row_filter, "row_filter", "flag", True))
        self.specs: List[Tuple[str, str, str, bool]] = specs

    # ------------------------------------------------------------------ columns
    def check_schema(self, schema: pa.Schema, file: str) -> None:
        """Raise DataError naming the file and column for a missing column or a wrong Arrow type."""
        for column, role, kind, required in self.specs:
            idx = schema.get_field_index(column)
            if idx < 0:
                if required:
                    raise DataError(f"{file}: column {column!r} ({role}) is missing; "
                                    f"the file has columns {schema.names}")
                continue
            ok, expected = _TYPES[kind]
            t = schema.field(idx).type
            if not ok(t):
                raise DataError(f"{file}: column {column!r} ({role}) has Arrow type {t}, expected {expected}")

    def optional_columns(self, schema: pa.Schema) -> List[str]:
        """The optional id / truth columns this schema has (they decide the Batch's dict keys)."""
        return [c for c, role, kind, required in self.specs if not required and kind != "list" and c in schema.names]

    def columns_for(self, schema: pa.Schema) -> List[str]:
        """The columns to read from a file with this schema (projection pushdown)."""
        present = set(schema.names)
        return list(dict.fromkeys(c for c, _, _, _ in self.specs if c in present))

    # ------------------------------------------------------------------ rows
    def _code(self, reason: str) -> int:
        if reason not in self.reasons:
            self.reasons.append(reason)
        return 2 + self.reasons.index(reason)

    def _bad(self, ctx: _Ctx, rows: np.ndarray, column: str, key: str, text: str,
             first: Optional[Tuple[int, Any]] = None, values: Optional[np.ndarray] = None) -> None:
        """Rows `rows` (bool mask) have problem `key`: raise (error) or mark them rejected (skip)."""
        if self.on_bad_row == "error":
            if first is None:
                i = int(np.argmax(rows))
                first = (i, None if values is None else values[i].item())
            i, value = first
            end = ctx.row_offset + ctx.n - 1
            raise DataError(
                f"{ctx.file}: column {column!r}, row {ctx.row_offset + i}: {text} (value {value!r}); "
                f"{int(rows.sum())} row(s) among rows {ctx.row_offset}..{end} have this problem. "
                f"Fix the data, or set reader.on_bad_row=skip to drop such rows and count them.")
        r = ctx.reason
        r[rows & (r == KEEP)] = self._code(f"{key}:{column}")

    def _ints(self, ctx: _Ctx, arr: pa.Array, column: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """int64 numpy values (nulls filled with 0) and the null mask (None when no nulls)."""
        if arr.type != pa.int64():
            try:
                arr = pc.cast(arr, pa.int64())
            except pa.ArrowInvalid as exc:
                raise DataError(f"{ctx.file}: column {column!r}: values do not fit int64: {exc}") from None
        nulls = None
        if arr.null_count:
            nulls = np.asarray(arr.is_null())
            arr = pc.fill_null(arr, 0)
        return arr.to_numpy(), nulls

    def _floats(self, arr: pa.Array) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        nulls = np.asarray(arr.is_null()) if arr.null_count else None
        x = arr.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
        if nulls is not None:
            x = np.where(nulls, 0.0, x)
        return x, nulls

    def _check_ids(self, ctx, v, nulls, column, vocab, policy, offsets=None):
        """Null / negative / out-of-vocabulary checks, per row (offsets None) or per list element."""
        def flag(elem_mask, key, text):
            shown = None if key.startswith("null") else v  # nulls were filled with 0: show None
            if offsets is None:
                self._bad(ctx, elem_mask, column, key, text, values=shown)
                return
            bad = np.flatnonzero(elem_mask)
            rows = np.zeros(ctx.n, dtype=bool)
            rows[_row_of(offsets, bad)] = True
            first = (int(_row_of(offsets, bad[:1])[0]), None if shown is None else v[bad[0]].item())
            self._bad(ctx, rows, column, key, text + " in the list", first=first)

        if nulls is not None:
            flag(nulls, "null" if offsets is None else "null_element", "null id")
        if policy == "error":
            over = v.view(np.uint64) >= vocab  # negatives are huge as uint64: one pass for both checks
            if over.any():
                neg = v < 0
                if neg.any():
                    flag(neg, "negative", "negative id")
                if (over & ~neg).any():
                    flag(over & ~neg, "out_of_vocab", f"id >= vocab_size {vocab} (out_of_range: error)")
        else:
            neg = v < 0
            if neg.any():
                flag(neg, "negative", "negative id")

    def convert(self, data, file: str, row_offset: int = 0) -> Chunk:
        """Convert a RecordBatch/Table (rows `row_offset`.. of `file`) into a Chunk; see module doc."""
        cfg = self.cfg
        n = data.num_rows
        names = set(data.schema.names)
        ctx = _Ctx(file, row_offset, n, np.zeros(n, dtype=np.int16))
        ints: Dict[str, Tuple[np.ndarray, Optional[np.ndarray]]] = {}

        def int_col(column):
            if column not in ints:
                ints[column] = self._ints(ctx, _array(data, column), column)
            return ints[column]

        id_names, id_rows = [], []
        for role in ("user_id", "item_id", "timestamp", "request_id"):
            column = getattr(cfg.ids, role)
            if column in names:
                v, nulls = int_col(column)
                if nulls is not None:
                    self._bad(ctx, nulls, column, "null", "null value")
                if role == "timestamp" and (v < 0).any():
                    self._bad(ctx, v < 0, column, "negative", "negative timestamp", values=v)
                id_names.append(role)
                id_rows.append(v)

        hits: Dict[str, np.ndarray] = {}
        sparse = np.empty((len(cfg.sparse), n), dtype=np.int64)
        for j, f in enumerate(cfg.sparse):
            v, nulls = int_col(f.column)
            self._check_ids(ctx, v, nulls, f.column, f.vocab_size, f.out_of_range)
            sparse[j] = v
            if f.out_of_range != "error":
                over = v >= f.vocab_size
                if over.any():
                    hits[f.name] = over.astype(np.int32)
                    if f.out_of_range == "hash":
                        np.remainder(sparse[j], f.vocab_size, out=sparse[j])
                    else:
                        sparse[j][over] = f.vocab_size

        seq_values, seq_lengths = [], []
        raw: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}  # item-id histories as read (truncated), for items
        for f in cfg.sequence:
            v, lengths = self._sequence(ctx, data, names, f, hits, raw if self.items is not None else None)
            seq_values.append(v)
            seq_lengths.append(torch.from_numpy(lengths.astype(np.int32)))

        dense = np.empty((n, len(cfg.dense)), dtype=np.float32)
        for j, f in enumerate(cfg.dense):
            x, nulls = self._floats(_array(data, f.column))
            if nulls is not None:
                self._bad(ctx, nulls, f.column, "null", "null value")
            bad = ~np.isfinite(x)
            if bad.any():
                self._bad(ctx, bad, f.column, "non_finite", "NaN or infinite value", values=x)
            if f.transform == "log1p":
                bad = x <= -1.0
                if bad.any():
                    self._bad(ctx, bad, f.column, "log1p_domain", "value <= -1 under transform log1p", values=x)
                dense[:, j] = np.log1p(np.where(bad, 0.0, x))
            else:
                dense[:, j] = x

        float_names: List[Tuple[str, str]] = []
        float_rows: List[np.ndarray] = []
        if self.with_labels:
            for role, x in self._labels(ctx, data, names).items():
                float_names.append(("labels", role))
                float_rows.append(x)
        for c in cfg.truth_columns:
            if c in names:
                x, nulls = self._floats(_array(data, c))
                bad = ~np.isfinite(x) if nulls is None else (nulls | ~np.isfinite(x))
                if bad.any():  # ground truth feeds every true_* metric: a NaN would poison them silently
                    self._bad(ctx, bad, c, "non_finite", "null, NaN or infinite truth value", values=x)
                float_names.append(("truth", c))
                float_rows.append(np.where(bad, 0.0, x))
        if self.row_filter is not None:
            arr = _array(data, self.row_filter)
            v, nulls = self._ints(ctx, pc.cast(arr, pa.int64()) if pa.types.is_boolean(arr.type) else arr,
                                  self.row_filter)
            out = v != 1
            if nulls is not None:
                out |= nulls
            ctx.reason[out & (ctx.reason == KEEP)] = FILTERED
        counts: Dict[str, np.ndarray] = {}
        if self.items is not None:
            self._items(ctx, data, int_col, raw, seq_values, seq_lengths, hits, counts)
        return Chunk(n=n, sparse=sparse, seq_values=seq_values, seq_lengths=seq_lengths, dense=dense,
                     floats=np.array(float_rows, dtype=np.float32).reshape(len(float_rows), n),
                     float_names=float_names, ids=np.array(id_rows, dtype=np.int64).reshape(len(id_rows), n),
                     id_names=id_names, reason=ctx.reason, hits=hits, counts=counts)

    def _items(self, ctx: _Ctx, data, int_col, raw, seq_values, seq_lengths, hits, counts) -> None:
        """Append the derived `<history>__<attribute>` sequences (lengths shared with the history) and, under
        audit_items, count item ids without a table row and attribute columns disagreeing with the table."""
        keep = ctx.reason == KEEP
        index = {f.name: j for j, f in enumerate(self.cfg.sequence)}
        for h in self.cfg.items.history:
            for v in self.items.derive(ctx, h, *raw[h], keep, counts, hits):
                seq_values.append(torch.from_numpy(v))
                seq_lengths.append(seq_lengths[index[h]])
        if self.audit_items:
            cfg = self.cfg
            attrs = {n: int_col(cfg.feature(n).column)[0] for n in cfg.items.sparse}
            attrs.update({n: self._floats(_array(data, cfg.feature(n).column))[0] for n in cfg.items.dense})
            seqs = {f.column: raw[f.name] for f in cfg.sequence if f.name in raw}
            counts.update(self.items.audit(ctx, int_col(cfg.ids.item_id)[0], attrs, seqs, keep))

    def _sequence(self, ctx: _Ctx, data, names, f, hits, raw=None) -> Tuple[torch.Tensor, np.ndarray]:
        """(values, lengths) of a list column: checked, truncated to the last max_len, mapped; `raw` (a dict)
        receives (ids before the vocabulary policy, offsets) of item-table histories."""
        n = ctx.n
        if f.column not in names:  # optional history: empty lists
            if raw is not None:
                raw[f.name] = (np.zeros(0, np.int64), np.zeros(n + 1, np.int64))
            return torch.zeros(0, dtype=torch.int64), np.zeros(n, np.int64)
        arr = _array(data, f.column)
        offsets = np.asarray(arr.offsets).astype(np.int64)
        base = int(offsets[0])
        offsets -= base
        if arr.null_count:
            self._bad(ctx, np.asarray(arr.is_null()), f.column, "null", "null list")
        v, nulls = self._ints(ctx, arr.values.slice(base, int(offsets[-1])), f.column)
        self._check_ids(ctx, v, nulls, f.column, f.vocab_size, f.out_of_range, offsets)
        lengths = np.diff(offsets)
        if n and lengths.max() > f.max_len:  # keep the LAST max_len ids (most recent)
            ends = offsets[1:]
            starts = np.maximum(offsets[:-1], ends - f.max_len)
            lengths = ends - starts
            offsets = np.zeros(n + 1, np.int64)
            np.cumsum(lengths, out=offsets[1:])
            v = v[np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])]
        if raw is not None and f.table_name == self.cfg.item_feature.table_name:
            raw[f.name] = (v, offsets)
        if f.out_of_range != "error":
            over = v >= f.vocab_size
            if over.any():
                hits[f.name] = np.bincount(_row_of(offsets, np.flatnonzero(over)), minlength=n).astype(np.int32)
                v = np.remainder(v, f.vocab_size) if f.out_of_range == "hash" else np.where(over, f.vocab_size, v)
        with warnings.catch_warnings():  # Arrow memory is read-only; the gathers only read it
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(v), lengths

    def _labels(self, ctx: _Ctx, data, names) -> Dict[str, np.ndarray]:
        lab = self.cfg.labels
        out: Dict[str, np.ndarray] = {}
        for role in LABEL_NAMES:  # questionnaire_answered comes before satisfied
            column = getattr(lab, role)
            x, nulls = self._floats(_array(data, column))
            if nulls is not None and role != "satisfied":
                self._bad(ctx, nulls, column, "null", "null label")
            bad = ~np.isfinite(x)
            if bad.any():
                self._bad(ctx, bad, column, "non_finite", "NaN or infinite label", values=x)
                x = np.where(bad, 0.0, x)
            if role == "watch_time_s":
                bad = x < 0
                if bad.any():
                    self._bad(ctx, bad, column, "negative", "negative watch time", values=x)
            else:
                bad = (x != 0) & (x != 1)
                if bad.any():
                    self._bad(ctx, bad, column, "not_binary", "label is not 0/1", values=x)
            if role == "satisfied":
                answered = out["questionnaire_answered"] == 1
                is_null = np.zeros(ctx.n, bool) if nulls is None else nulls
                bad = answered & is_null
                if bad.any():
                    self._bad(ctx, bad, column, "missing_when_answered",
                              f"null although {lab.questionnaire_answered} == 1", first=(int(np.argmax(bad)), None))
                bad = ~answered & ~is_null
                if bad.any():
                    self._bad(ctx, bad, column, "present_when_unanswered",
                              f"not null although {lab.questionnaire_answered} == 0", values=x)
            out[role] = x.astype(np.float32)
        for column in lab.extra:  # extra 0/1 labels (heads of model.extra_heads), keyed by their column
            x, nulls = self._floats(_array(data, column))
            if nulls is not None:
                self._bad(ctx, nulls, column, "null", "null label")
            bad = ~np.isfinite(x) | ((x != 0) & (x != 1))
            if bad.any():
                self._bad(ctx, bad, column, "not_binary", "label is not 0/1", values=x)
                x = np.where(bad, 0.0, x)
            out[column] = x.astype(np.float32)
        return out

    # ------------------------------------------------------------------ accounting
    def tally(self, stats: Dict[str, Any], reason: np.ndarray) -> None:
        """Add rows with these reason codes to `stats` as read / filtered / rejected (not emitted)."""
        if not len(reason):
            return
        counts = np.bincount(reason, minlength=2 + len(self.reasons))
        stats["rows_read"] += int(len(reason))
        stats["rows_filtered"] += int(counts[FILTERED])
        for i in np.flatnonzero(counts[2:]):
            key = self.reasons[i]
            stats["rows_rejected"][key] = stats["rows_rejected"].get(key, 0) + int(counts[2 + i])

    @staticmethod
    def tally_emitted(stats: Dict[str, Any], pieces: Sequence[Tuple[Chunk, np.ndarray]]) -> None:
        for chunk, idx in pieces:
            stats["rows_emitted"] += int(len(idx))
            for name, h in chunk.hits.items():
                k = int(h[idx].sum())
                if k:
                    stats["oov_hits"][name] = stats["oov_hits"].get(name, 0) + k
            for name, c in chunk.counts.items():  # only when an item table is read: old states lack "items"
                k = int(c[idx].sum())
                if k:
                    stats.setdefault("items", {})[name] = stats.get("items", {}).get(name, 0) + k


def table_to_batch(table: pa.Table, data_cfg: DataConfig, *, file: str = "<table>", with_labels: bool = True,
                   on_bad_row: str = "error", row_filter: Optional[str] = None,
                   items: Any = None) -> Tuple[Batch, Dict[str, Any]]:
    """Convert a whole in-memory table (file order) into one Batch plus its row accounting (`items`: the
    ItemTable the derived history attributes come from, when data.items.history names any)."""
    conv = Converter(data_cfg, with_labels=with_labels, on_bad_row=on_bad_row, row_filter=row_filter, items=items)
    conv.check_schema(table.schema, file)
    chunk = conv.convert(table, file)
    stats = new_stats()
    conv.tally(stats, chunk.reason)
    idx = np.flatnonzero(chunk.reason == KEEP)
    conv.tally_emitted(stats, [(chunk, idx)])
    return make_batch(conv.keys, [(chunk, idx)], n_dense=len(data_cfg.dense)), stats

"""Small canonical Parquet datasets (docs/data.md schema) for tests and the loader benchmark.

Why: the reader's tests and bench/loader.py need realistic shards (several files and row groups,
histories oldest-first, nullable `satisfied`) without the simulator; rows are vectorised numpy,
so a million rows take seconds. Every (user_id, item_id, timestamp) key is unique (timestamps
are distinct), which the exactly-once tests rely on.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HISTORY_MAX = {"hist_click": 50, "hist_satisfied": 20, "hist_dissatisfied": 5, "hist_skip": 20}
LABEL_COLUMNS = ("click", "watch_time_s", "skip", "questionnaire_answered", "satisfied")
T0 = 1_700_000_000


def canonical_schema(with_labels: bool = True) -> pa.Schema:
    fields = [("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64()),
              ("request_id", pa.int64()), ("author_id", pa.int64()), ("category_id", pa.int64()),
              ("user_activity", pa.int64())]
    fields += [(h, pa.list_(pa.int64())) for h in HISTORY_MAX]
    fields += [("duration_s", pa.float32())]
    if with_labels:
        fields += [("click", pa.int8()), ("watch_time_s", pa.float32()), ("skip", pa.int8()),
                   ("questionnaire_answered", pa.int8()), ("satisfied", pa.int8())]
    fields += [("true_p_click", pa.float32()), ("true_p_satisfied", pa.float32()), ("true_p_answered", pa.float32())]
    return pa.schema(fields)


def _lists(rng: np.random.Generator, n: int, max_len: int, n_items: int, full: bool) -> pa.ListArray:
    lengths = np.full(n, max_len) if full else rng.integers(0, max_len + 1, n)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = rng.integers(0, n_items, int(offsets[-1]), dtype=np.int64)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def make_table(n: int, *, seed: int = 0, first_row: int = 0, with_labels: bool = True,
               full_histories: bool = False, n_users: int = 20000, n_items: int = 50000,
               n_authors: int = 5000) -> pa.Table:
    """`n` canonical rows; timestamps T0 + first_row + i are unique across calls with disjoint ranges.

    author_id goes up to `n_authors` (above the default vocabulary 4096: the `hash` policy sees hits).
    """
    rng = np.random.default_rng([seed, first_row])
    rows = np.arange(first_row, first_row + n, dtype=np.int64)
    item = rng.integers(0, n_items, n, dtype=np.int64)
    p_click = (1 / (1 + np.exp(-rng.normal(-0.5, 1.0, n)))).astype(np.float32)
    p_sat = (1 / (1 + np.exp(-rng.normal(0.3, 1.0, n)))).astype(np.float32)
    p_ans = rng.uniform(0.02, 0.2, n).astype(np.float32)
    duration = rng.uniform(3, 120, n).astype(np.float32)
    cols: Dict[str, pa.Array] = {
        "user_id": pa.array(rng.integers(0, n_users, n, dtype=np.int64)),
        "item_id": pa.array(item),
        "timestamp": pa.array(T0 + rows),
        "request_id": pa.array(rows // 8),
        "author_id": pa.array(item % n_authors),
        "category_id": pa.array(item % 64),
        "user_activity": pa.array(rng.integers(0, 8, n, dtype=np.int64)),
    }
    for h, max_len in HISTORY_MAX.items():
        cols[h] = _lists(rng, n, max_len, n_items, full_histories)
    cols["duration_s"] = pa.array(duration)
    if with_labels:
        click = rng.random(n) < p_click
        answered = rng.random(n) < p_ans
        satisfied = rng.random(n) < p_sat
        cols["click"] = pa.array(click.astype(np.int8))
        cols["watch_time_s"] = pa.array((click * duration * rng.uniform(0.1, 1.2, n)).astype(np.float32))
        cols["skip"] = pa.array((~click & (rng.random(n) < 0.7)).astype(np.int8))
        cols["questionnaire_answered"] = pa.array(answered.astype(np.int8))
        cols["satisfied"] = pa.array(satisfied.astype(np.int8), mask=~answered)
    cols["true_p_click"] = pa.array(p_click)
    cols["true_p_satisfied"] = pa.array(p_sat)
    cols["true_p_answered"] = pa.array(p_ans)
    return pa.table(cols, schema=canonical_schema(with_labels))


def write_table(table: pa.Table, path: str | Path, row_group_rows: Optional[int] = None) -> str:
    """Write one Parquet file atomically (temp name in the same directory, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, row_group_size=row_group_rows or max(1, table.num_rows))
    os.replace(tmp, path)
    return str(path)


def write_dataset(root: str | Path, *, n_files: int = 3, rows_per_file: int = 1000, row_group_rows: int = 256,
                  seed: int = 0, with_labels: bool = True, full_histories: bool = False) -> List[str]:
    """Write `n_files` shards part-00000.parquet ... under `root`; returns their paths."""
    return [
        write_table(make_table(rows_per_file, seed=seed, first_row=i * rows_per_file, with_labels=with_labels,
                               full_histories=full_histories),
                    Path(root) / f"part-{i:05d}.parquet", row_group_rows)
        for i in range(n_files)
    ]


def dataset_keys(root: str | Path) -> List[tuple]:
    """(user_id, item_id, timestamp) of every row of every *.parquet under `root` (duplicates kept)."""
    keys: List[tuple] = []
    for path in sorted(Path(root).rglob("*.parquet")):
        t = pq.read_table(path, columns=["user_id", "item_id", "timestamp"])
        keys += zip(*(t.column(c).to_pylist() for c in ("user_id", "item_id", "timestamp")))
    return keys

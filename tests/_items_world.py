"""A small Parquet world with an item attribute table, for tests/test_items.py and tests/_dist_items.py.

Data config: tests/_synthetic.py's (item vocab 30, author vocab 12 `hash`, category vocab 5 `oov`,
hist_click max_len 6, hist_satisfied max_len 3) plus a `data.items` section. The table holds items
0..29 except MISSING; its authors reach 16 (hash hits) and categories 6 (oov hits). Impressions take
their author/category/duration from the table except MISMATCH rows (author_id + 1).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from _synthetic import DATA
from satrank.pipeline.config import from_dict
from satrank.pipeline.features import DataConfig

N_ITEMS = 30
MISSING = (7, 19)  # item ids without a table row
MISMATCH = (3, 11, 42)  # impression rows whose author_id disagrees with the table
HIST_LEN = {"hist_click": 9, "hist_satisfied": 4}  # longest lists written (hist_click max_len is 6: truncation)


def items_data(history: Sequence[str] = ("hist_click",), on_missing: str = "default", **items) -> DataConfig:
    """tests/_synthetic.py's data config with `data.items` (sparse author_id/category_id, dense duration_s)."""
    raw = copy.deepcopy(DATA)
    raw["truth_columns"] = []
    raw["items"] = {"dir": "items", "id": "item_id", "sparse": ["author_id", "category_id"], "dense": ["duration_s"],
                    "history": list(history), "on_missing": on_missing, **items}
    return from_dict(DataConfig, raw, "data")


def item_attributes() -> Dict[str, np.ndarray]:
    """The table's columns, every item 0..N_ITEMS-1 except MISSING."""
    ids = np.array([i for i in range(N_ITEMS) if i not in MISSING], dtype=np.int64)
    return {"item_id": ids, "author_id": (ids * 5) % 17, "category_id": ids % 7,
            "duration_s": (ids + 0.5).astype(np.float32)}


def write_items(root: Path, columns: Dict[str, np.ndarray]) -> Path:
    """root/items/part-00000.parquet with these columns (tests break it by passing other columns)."""
    path = root / "items" / "part-00000.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def impressions(n: int, seed: int) -> pa.Table:
    """`n` unlabeled impressions whose attribute columns follow the table (missing items: 0), MISMATCH rows off."""
    rng = np.random.default_rng(seed)
    tab = item_attributes()
    author = np.zeros(N_ITEMS, np.int64)
    category = np.zeros(N_ITEMS, np.int64)
    duration = np.ones(N_ITEMS, np.float32)
    author[tab["item_id"]], category[tab["item_id"]], duration[tab["item_id"]] = (
        tab["author_id"], tab["category_id"], tab["duration_s"])
    item = rng.integers(0, N_ITEMS, n)
    cols = {"user_id": pa.array(rng.integers(0, 40, n)), "item_id": pa.array(item),
            "timestamp": pa.array(np.arange(n, dtype=np.int64) + 1_700_000_000)}
    auth = author[item].copy()
    auth[[r for r in MISMATCH if r < n]] += 1
    cols["author_id"] = pa.array(auth)
    cols["category_id"] = pa.array(category[item])
    for h, longest in HIST_LEN.items():
        lens = rng.integers(0, longest + 1, n)
        cols[h] = pa.array([rng.integers(0, N_ITEMS, k).tolist() for k in lens], pa.list_(pa.int64()))
    cols["duration_s"] = pa.array(duration[item])
    return pa.table(cols)


def write_world(root: Path, n: int = 300, seed: int = 0, files: int = 2) -> pa.Table:
    """root/train/part-0000k.parquet (`files` shards, row groups of 50) + root/items/; returns the impressions."""
    table = impressions(n, seed)
    (root / "train").mkdir(parents=True, exist_ok=True)
    step = -(-n // files)
    for k in range(files):
        pq.write_table(table.slice(k * step, step), root / "train" / f"part-{k:05d}.parquet", row_group_size=50)
    write_items(root, item_attributes())
    return table


def reference(table: pa.Table, data: DataConfig, history: str, attribute: str):
    """numpy reference of `<history>__<attribute>` per timestamp: the last max_len ids' table attribute,
    the attribute feature's policy applied, 0 for items without a row; plus missing / mapped counts."""
    hist = data.feature(history)
    feat = data.feature(attribute)
    tab = item_attributes()
    lookup = {int(i): int(v) for i, v in zip(tab["item_id"], tab[feat.column])}
    out, missing, mapped = {}, 0, 0
    for ts, ids in zip(table.column("timestamp").to_pylist(), table.column(history).to_pylist()):
        vals = []
        for i in ids[-hist.max_len:]:
            v = lookup.get(i)
            if v is None:
                missing += 1
                v = 0
            elif v >= feat.vocab_size:
                mapped += 1
                v = v % feat.vocab_size if feat.out_of_range == "hash" else feat.vocab_size
            vals.append(v)
        out[ts] = vals
    return out, missing, mapped


def table_from_impressions(data_dir: Path) -> Path:
    """DIR/items/part-00000.parquet from the (item_id, author_id, category_id, duration_s) of every split's rows,
    one row per item, unless the simulator already wrote the table (then that one is kept)."""
    path = data_dir / "items" / "part-00000.parquet"
    if path.exists():
        return path
    cols = ["item_id", "author_id", "category_id", "duration_s"]
    rows = pa.concat_tables(pq.read_table(f, columns=cols) for split in ("train", "valid", "test", "candidates")
                            for f in sorted((data_dir / split).glob("*.parquet")))
    _, first = np.unique(rows.column("item_id").to_numpy(), return_index=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(rows.take(pa.array(first)), path)
    return path

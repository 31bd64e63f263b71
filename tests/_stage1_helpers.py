"""Helpers for tests/test_stage1_jobs.py and tests/test_stage1_selection.py: launching a job under torchrun and
reading its metrics, a small data contract, hand-built Batches (incl. one row per (user row, history item) pair
for score_history), reading tensors out of a DCP checkpoint in a process without a process group, and a
rating world (self-selected training answers, randomly assigned validation/test ratings) in the canonical
Parquet layout without truth columns, as a real dataset has it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from satrank.pipeline.sim.testdata import make_table, write_table


from satrank.pipeline.batch import Batch  # noqa: E402
from satrank.pipeline.config import from_dict  # noqa: E402
from satrank.pipeline.features import DataConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def launch(nproc, module, *args, timeout=240):
    """`torchrun --standalone --nproc_per_node=nproc -m module args` (nproc None: plain python)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    head = ([sys.executable, "-m", module] if nproc is None else
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
             "--monitor-interval=0.2", "-m", module])
    return subprocess.run([*head, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def events(run: Path, kind: str) -> list:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["event"] == kind]


DATA = {
    "sparse": [
        {"name": "user_id", "column": "user_id", "vocab_size": 12, "table": "user"},
        {"name": "item_id", "column": "item_id", "vocab_size": 20, "table": "item"},
        {"name": "author_id", "column": "author_id", "vocab_size": 5, "table": "author"},
        {"name": "category_id", "column": "category_id", "vocab_size": 4, "out_of_range": "oov", "table": "category"},
        {"name": "user_activity", "column": "user_activity", "vocab_size": 3, "table": "user_activity"},
    ],
    "sequence": [{"name": "hist_click", "column": "hist_click", "vocab_size": 20, "max_len": 5, "table": "item"}],
    "dense": [{"name": "duration_s", "column": "duration_s", "transform": "log1p"}],
}


def small_data_config() -> DataConfig:
    return from_dict(DataConfig, DATA, "data")


def batch_from(data: DataConfig, singles: Dict[str, List[int]], seqs: Dict[str, List[List[int]]],
               dense: torch.Tensor) -> Batch:
    values, lengths = [], []
    for f in data.sparse:
        values.append(torch.tensor(singles[f.name], dtype=torch.int64))
        lengths.append(torch.ones(len(singles[f.name]), dtype=torch.int64))
    for f in data.sequence:
        rows = seqs[f.name]
        values.append(torch.tensor([v for r in rows for v in r], dtype=torch.int64))
        lengths.append(torch.tensor([len(r) for r in rows], dtype=torch.int64))
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=data.sparse_names, values=torch.cat(values),
                                              lengths=torch.cat(lengths))
    n = dense.shape[0]
    labels = {"click": torch.zeros(n), "questionnaire_answered": torch.zeros(n), "satisfied": torch.zeros(n)}
    return Batch(sparse=kjt, dense=dense, labels=labels)


def make_batch(data: DataConfig, hist_lengths: Sequence[int], seed: int, rows_of: Optional[Batch] = None,
               pairs: Optional[Sequence[Tuple[int, int]]] = None) -> Batch:
    """Random rows with the given hist_click lengths; or, with rows_of + pairs, one row per (row b, item):
    row b of `rows_of` with its candidate item_id replaced by `item` (everything else identical)."""
    if rows_of is not None:
        d = rows_of.sparse.to_dict()
        single = {f.name: d[f.name].values().tolist() for f in data.sparse}
        seq = {}
        for f in data.sequence:
            jt = d[f.name]
            off = jt.offsets().tolist()
            seq[f.name] = [jt.values()[off[i]:off[i + 1]].tolist() for i in range(len(off) - 1)]
        out_single = {k: [v[b] for b, _ in pairs] for k, v in single.items()}
        out_single["item_id"] = [item for _, item in pairs]
        out_seq = {k: [v[b] for b, _ in pairs] for k, v in seq.items()}
        dense = torch.stack([rows_of.dense[b] for b, _ in pairs])
        return batch_from(data, out_single, out_seq, dense)
    g = torch.Generator().manual_seed(seed)
    n = len(hist_lengths)
    singles = {f.name: torch.randint(0, f.vocab_size, (n,), generator=g).tolist() for f in data.sparse}
    seqs = {f.name: [torch.randint(0, f.vocab_size, (int(L),), generator=g).tolist() for L in hist_lengths]
            for f in data.sequence}
    return batch_from(data, singles, seqs, torch.rand(n, len(data.dense), generator=g))


def read_dcp_tensors(checkpoint: Path, prefix: str) -> Dict[str, torch.Tensor]:
    """Every tensor of a satrank.jobs.engine.checkpoint DCP checkpoint whose key starts with `prefix`, whole (shards
    reassembled by DCP), loaded in this process without a process group."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    state = Path(checkpoint) / "state"
    md = dcp.FileSystemReader(str(state)).read_metadata().state_dict_metadata
    out = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in md.items()
           if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
        dcp.load(out, checkpoint_id=str(state))
    return out


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def rating_world(root: Path, seed: int = 0, users: int = 200, items: int = 300, train_per_user: int = 60,
                 eval_per_user: int = 10, click_is_answered: bool = False) -> Path:
    """root/{train,valid,test,items}/ in the canonical layout (satrank.pipeline.sim.testdata), no truth columns.

    Satisfaction s ~ Bernoulli(sigmoid(user bias + item bias + <x_u, y_i>)). train (missing not at random): items
    by popularity, a click follows s's logit, a clicked view's watched share is Beta(4, 1.5) when s else
    Beta(1.2, 4), and the answer self-selects on the rating (P(answer) = sigmoid(-3 + 2 share + 1.5 s), clicked
    rows only). valid / test (missing at random): uniformly assigned items, every row clicked, watched and
    answered. click_is_answered: train's click column := questionnaire_answered (the label leak)."""
    rng = np.random.default_rng(seed)
    d = 4
    xu, yi = rng.normal(0, 1, (users, d)), rng.normal(0, 1, (items, d))
    ub, ib = rng.normal(0, 0.5, users), rng.normal(0, 1.0, items)
    duration = rng.uniform(5, 120, items).astype(np.float32)
    popularity = 1.0 / (np.arange(items) + 1.0) ** 0.8
    popularity /= popularity.sum()
    splits = {"train": (train_per_user, False), "valid": (eval_per_user, True), "test": (eval_per_user, True)}
    first = 0
    for split, (per_user, mar) in splits.items():
        n = users * per_user
        user = np.repeat(np.arange(users), per_user)
        item = rng.integers(0, items, n) if mar else rng.choice(items, n, p=popularity)
        logit = ub[user] + ib[item] + (xu[user] * yi[item]).sum(1) / np.sqrt(d)
        sat = rng.random(n) < _sigmoid(logit)
        click = np.ones(n, bool) if mar else rng.random(n) < _sigmoid(-0.5 + 0.8 * logit)
        share = np.where(sat, rng.beta(4.0, 1.5, n), rng.beta(1.2, 4.0, n))
        watch = np.where(click, duration[item] * share, np.minimum(duration[item], rng.exponential(1.0, n)))
        answered = np.ones(n, bool) if mar else click & (rng.random(n) < _sigmoid(-3.0 + 2.0 * share + 1.5 * sat))
        if click_is_answered and not mar:
            click = answered
        base = make_table(n, seed=seed, first_row=first, n_users=users, n_items=items)
        first += n
        cols = {name: base.column(name) for name in base.column_names if not name.startswith("true_")}
        cols.update(user_id=pa.array(user.astype(np.int64)), item_id=pa.array(item.astype(np.int64)),
                    author_id=pa.array(item.astype(np.int64) % 50), category_id=pa.array(item.astype(np.int64) % 8),
                    user_activity=pa.array((user % 5).astype(np.int64)), duration_s=pa.array(duration[item]),
                    click=pa.array(click.astype(np.int8)), watch_time_s=pa.array(watch.astype(np.float32)),
                    skip=pa.array((watch < 3.0).astype(np.int8)),
                    questionnaire_answered=pa.array(answered.astype(np.int8)),
                    satisfied=pa.array(sat.astype(np.int8), mask=~answered))
        schema = pa.schema([f for f in base.schema if not f.name.startswith("true_")])
        write_table(pa.table(cols, schema=schema), root / split / "part-00000.parquet", row_group_rows=2048)
    ids = np.arange(items, dtype=np.int64)
    write_table(pa.table({"item_id": ids, "author_id": ids % 50, "category_id": ids % 8, "duration_s": duration}),
                root / "items" / "part-00000.parquet")
    return root

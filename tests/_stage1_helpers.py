"""Helpers for tests/test_stage1_jobs.py: a small data contract, hand-built Batches (incl. one row per
(user row, history item) pair for score_history), and reading tensors out of a DCP checkpoint in a
process without a process group."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


from satrank.pipeline.batch import Batch  # noqa: E402
from satrank.pipeline.config import from_dict  # noqa: E402
from satrank.pipeline.features import DataConfig  # noqa: E402

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

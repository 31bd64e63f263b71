"""Tiny synthetic data for the embedding/sharding/checkpoint tests: a small DataConfig shaped like
configs/sim.yaml (shared item table for item_id + histories) and seeded `Batch` objects built
directly (no Parquet reader), plus a small test model in TorchRec's DLRMTrain style."""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from satrank.embeddings.config import EmbeddingConfig
from satrank.embeddings.tables import SparseArch, padded
from satrank.pipeline.batch import Batch
from satrank.pipeline.config import from_dict
from satrank.pipeline.features import DataConfig

DATA = {
    "sparse": [
        {"name": "user_id", "column": "user_id", "vocab_size": 40, "table": "user"},
        {"name": "item_id", "column": "item_id", "vocab_size": 30, "table": "item"},
        {"name": "author_id", "column": "author_id", "vocab_size": 12, "out_of_range": "hash", "table": "author"},
        {"name": "category_id", "column": "category_id", "vocab_size": 5, "out_of_range": "oov", "table": "category"},
    ],
    "sequence": [
        {"name": "hist_click", "column": "hist_click", "vocab_size": 30, "max_len": 6, "table": "item"},
        {"name": "hist_satisfied", "column": "hist_satisfied", "vocab_size": 30, "max_len": 3, "table": "item"},
    ],
    "dense": [{"name": "duration_s", "column": "duration_s", "transform": "log1p"}],
    "truth_columns": ["true_p_click"],
}

EMB = {
    "dim": 8,
    "sharding": "table_wise",
    "tables": {"item": {"sharding": "row_wise"}, "user": {"sharding": "row_wise"},
               "author": {"sharding": "table_wise"}, "category": {"sharding": "data_parallel"}},
    "optimizer": {"type": "rowwise_adagrad", "lr": 0.1},
}


def data_config(**changes) -> DataConfig:
    raw = copy.deepcopy(DATA)
    for name, vocab in changes.items():  # e.g. author_id=20 changes that feature's vocab_size
        for f in raw["sparse"] + raw["sequence"]:
            if f["name"] == name:
                f["vocab_size"] = vocab
    return from_dict(DataConfig, raw)


def emb_config(**overrides) -> EmbeddingConfig:
    raw = {**copy.deepcopy(EMB), **overrides}
    return from_dict(EmbeddingConfig, raw)


def make_rows(data: DataConfig, n: int, seed: int) -> Dict[str, list]:
    """n rows of raw feature values; click depends on (user, item) so a model can learn it."""
    rng = np.random.default_rng(seed)
    rows: Dict[str, list] = {}
    for f in data.sparse:
        rows[f.name] = rng.integers(0, f.num_rows, size=n).tolist()
    for f in data.sequence:
        lens = rng.integers(0, f.max_len + 1, size=n)
        rows[f.name] = [rng.integers(0, f.num_rows, size=k).tolist() for k in lens]
    rows["duration_s"] = rng.exponential(20.0, size=n).tolist()
    logit = np.sin(np.array(rows["user_id"]) * 1.3) + np.cos(np.array(rows["item_id"]) * 0.7)
    rows["click"] = (rng.random(n) < 1 / (1 + np.exp(-2 * logit))).astype(np.float32).tolist()
    return rows


def batch_from_rows(data: DataConfig, rows: Dict[str, list], start: int = 0, end: Optional[int] = None) -> Batch:
    end = len(rows["click"]) if end is None else end
    values: List[int] = []
    lengths: List[int] = []
    for f in data.sparse:
        values.extend(rows[f.name][start:end])
        lengths.extend([1] * (end - start))
    for f in data.sequence:
        for seq in rows[f.name][start:end]:
            values.extend(seq)
            lengths.append(len(seq))
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=data.sparse_names,
        values=torch.tensor(values, dtype=torch.int64),
        lengths=torch.tensor(lengths, dtype=torch.int32),
    )
    dense = torch.log1p(torch.tensor(rows["duration_s"][start:end], dtype=torch.float32)).unsqueeze(1)
    labels = {"click": torch.tensor(rows["click"][start:end], dtype=torch.float32)}
    ids = {"user_id": torch.tensor(rows["user_id"][start:end]), "item_id": torch.tensor(rows["item_id"][start:end])}
    return Batch(sparse=kjt, dense=dense, labels=labels, ids=ids, position={"row": end})


def global_batches(data: DataConfig, steps: int, batch_size: int, seed: int) -> List[Dict[str, list]]:
    return [make_rows(data, batch_size, seed * 1000 + i) for i in range(steps)]


def rank_slice(n: int, rank: int, world: int) -> tuple:
    per = n // world
    return rank * per, (rank + 1) * per


class ToyModel(nn.Module):
    """SparseArch + small MLP over pooled features, mean-pooled sequences and dense; BCE on click.
    forward(batch) -> (loss, logits) like torchrec's DLRMTrain (what TrainPipelineSparseDist wants)."""

    def __init__(self, data: DataConfig, emb: EmbeddingConfig, device: torch.device = torch.device("meta")) -> None:
        super().__init__()
        self.sparse_arch = SparseArch(data, emb, device=device)
        self.max_lens = {f.name: f.max_len for f in data.sequence}
        width = sum(self.sparse_arch.feature_dim(n) for n in self.sparse_arch.single_features)
        width += sum(self.sparse_arch.feature_dim(n) for n in self.sparse_arch.sequence_features)
        width += len(data.dense)
        self.over = Over(width, self.sparse_arch.single_features, self.sparse_arch.sequence_features, self.max_lens)

    def forward(self, batch: Batch):
        out = self.sparse_arch(batch.sparse)
        logits = self.over(out.pooled, out.sequences, batch.dense)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels["click"])
        return loss, logits.detach()


class Over(nn.Module):
    """Dense head (a ShardedModule-free module: a leaf for the pipeline's fx tracer)."""

    def __init__(self, width: int, singles: Sequence[str], seqs: Sequence[str], max_lens: Dict[str, int]) -> None:
        super().__init__()
        self.singles, self.seqs, self.max_lens = list(singles), list(seqs), max_lens
        self.mlp = nn.Sequential(nn.Linear(width, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, pooled, sequences, dense):
        parts = [pooled[n] for n in self.singles]
        for n in self.seqs:
            x, mask = padded(sequences[n], self.max_lens[n])
            m = mask.unsqueeze(-1).to(x.dtype)
            parts.append((x * m).sum(1) / m.sum(1).clamp(min=1.0))
        parts.append(dense)
        return self.mlp(torch.cat(parts, dim=1)).squeeze(1)

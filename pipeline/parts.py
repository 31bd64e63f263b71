"""Gathered rows -> Batch: the rows of one batch (`Parts`, possibly from several converted windows) laid
out key-major into one KeyedJaggedTensor plus dense / label / truth / id tensors.

Why a room of its own: the reader's workers gather and ship `Parts` (pipeline/transport.py) and the main
process assembles Batches from them; conversion (pipeline/convert.py) only produces the `Chunk`s gathered here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm.permute_1D_sparse_data)
import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from satrank.pipeline.batch import Batch
from satrank.pipeline.errors import DataError

if TYPE_CHECKING:
    from satrank.pipeline.convert import Chunk


@dataclass
class Parts:
    """The rows of one batch, gathered; `to_batch` / `write_sparse` lay the KJT out key-major."""

    size: int
    sparse: torch.Tensor  # int64 [n_sparse, B]
    seq_lengths: List[torch.Tensor]  # int32 [B] per sequence feature
    seq_values: List[torch.Tensor]
    dense: torch.Tensor  # float32 [B, D]
    floats: torch.Tensor  # float32 [F, B]
    float_names: List[Tuple[str, str]]
    ids: torch.Tensor  # int64 [I, B]
    id_names: List[str]

    @property
    def n_values(self) -> int:
        return self.sparse.numel() + sum(v.numel() for v in self.seq_values)

    @property
    def n_lengths(self) -> int:
        return self.sparse.numel() + self.size * len(self.seq_lengths)

    def write_sparse(self, values: torch.Tensor, lengths: torch.Tensor) -> None:
        """Key-major KJT values/lengths into preallocated tensors (single-valued keys first)."""
        k = self.sparse.numel()
        values[:k].copy_(self.sparse.reshape(-1))
        lengths[:k] = 1
        at = k
        for j, (ln, v) in enumerate(zip(self.seq_lengths, self.seq_values)):  # (torch.cat(out=) is slow)
            values[at:at + v.numel()].copy_(v)
            at += v.numel()
            lengths[k + j * self.size:k + (j + 1) * self.size].copy_(ln)

    def to_batch(self, keys: List[str], position: Any = None) -> Batch:
        values = torch.empty(self.n_values, dtype=torch.int64)
        lengths = torch.empty(self.n_lengths, dtype=torch.int32)
        self.write_sparse(values, lengths)
        return assemble(keys, values, lengths, self.dense, self.floats, self.float_names, self.ids, self.id_names,
                        position)


def assemble(keys, values, lengths, dense, floats, float_names, ids, id_names, position) -> Batch:
    """A Batch from laid-out tensors; label/truth/id tensors are row views of `floats` / `ids`."""
    groups: Dict[str, Dict[str, torch.Tensor]] = {"labels": {}, "truth": {}}
    for i, (group, name) in enumerate(float_names):
        groups[group][name] = floats[i]
    return Batch(sparse=KeyedJaggedTensor(keys=keys, values=values, lengths=lengths), dense=dense,
                 labels=groups["labels"], ids={name: ids[i] for i, name in enumerate(id_names)},
                 truth=groups["truth"], position=position)


def _gather_one(chunk: Chunk, idx: np.ndarray) -> Parts:
    rows = torch.from_numpy(idx.astype(np.int32))
    seq = [torch.ops.fbgemm.permute_1D_sparse_data(rows, ln, v, None, None)
           for ln, v in zip(chunk.seq_lengths, chunk.seq_values)]
    return Parts(size=len(idx), sparse=torch.from_numpy(np.take(chunk.sparse, idx, axis=1)),
                 seq_lengths=[s[0] for s in seq], seq_values=[s[1] for s in seq],
                 dense=torch.from_numpy(np.take(chunk.dense, idx, axis=0)),
                 floats=torch.from_numpy(np.take(chunk.floats, idx, axis=1)), float_names=chunk.float_names,
                 ids=torch.from_numpy(np.take(chunk.ids, idx, axis=1)), id_names=chunk.id_names)


def gather(pieces: Sequence[Tuple[Chunk, np.ndarray]]) -> Optional[Parts]:
    """Rows `idx` of each chunk, in order (a batch may span windows); None when there are none."""
    parts = [_gather_one(c, i) for c, i in pieces if len(i)]
    if len(parts) <= 1:
        return parts[0] if parts else None
    first = parts[0]
    if any(p.float_names != first.float_names or p.id_names != first.id_names for p in parts):
        raise DataError("a batch spans files with different optional columns (request_id / truth columns); "
                        "give all files the same schema")
    return Parts(size=sum(p.size for p in parts), sparse=torch.cat([p.sparse for p in parts], 1),
                 seq_lengths=[torch.cat(x) for x in zip(*(p.seq_lengths for p in parts))],
                 seq_values=[torch.cat(x) for x in zip(*(p.seq_values for p in parts))],
                 dense=torch.cat([p.dense for p in parts]), floats=torch.cat([p.floats for p in parts], 1),
                 float_names=first.float_names, ids=torch.cat([p.ids for p in parts], 1), id_names=first.id_names)


def empty_batch(keys: List[str], n_dense: int, position: Any = None) -> Batch:
    """A zero-row Batch (the reader uses one to carry a slot's final position and counts)."""
    return assemble(keys, torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int32),
                    torch.zeros(0, n_dense), torch.zeros(0, 0), [], torch.zeros(0, 0, dtype=torch.int64), [],
                    position)


def make_batch(keys: List[str], pieces: Sequence[Tuple[Chunk, np.ndarray]], position: Any = None,
               n_dense: int = 0) -> Batch:
    """A Batch of rows `idx` of each chunk, in order."""
    parts = gather(pieces)
    return empty_batch(keys, n_dense, position) if parts is None else parts.to_batch(keys, position)

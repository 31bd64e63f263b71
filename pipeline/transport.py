"""Worker -> main process transport for the reader: batches packed into reused shared memory.

Why: a Batch is ~16 tensors; sent one by one, each becomes a fresh shared-memory segment whose
pages fault in on both sides, and in VMs those page faults (not the copies) dominated the cost
(~175k rows/s with 100-id histories). A worker instead packs ~4 MiB of batches into one buffer
from a small pool and reuses a buffer once the main process has dropped every tensor viewing it
(a `_Lease` held by the numpy base of those tensors clears the buffer's in-use flag).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch

from satrank.pipeline.batch import Batch
from satrank.pipeline.parts import Parts, assemble, empty_batch

POOL_KEEP = 4  # idle buffers a worker keeps: ~ prefetch_factor (2) + one in use + one being filled
_HEADER = 64  # bytes before the packed tensors; int64 at 0: 1 while the main process uses the buffer
_FIELDS = ((torch.int64, np.int64), (torch.int32, np.int32), (torch.float32, np.float32), (torch.float32, np.float32),
           (torch.int64, np.int64))  # KJT values, KJT lengths, dense, labels + truth, ids


def shared_bytes(n: int) -> torch.Tensor:
    """A uint8 tensor allocated in shared memory (so sending it to the main process copies nothing)."""
    try:
        return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(n))
    except (AttributeError, RuntimeError):  # private API moved: the pickler then moves it to shared memory
        return torch.empty(n, dtype=torch.uint8).share_memory_()


class BufferPool:
    """A worker's shared buffers, reused once the main process has dropped every tensor viewing them.

    Fresh pages cost a page fault each (expensive in VMs); reusing buffers keeps the transport at
    memcpy speed. Memory is bounded by what the consumer holds, plus `keep` idle buffers.
    """

    def __init__(self, keep: int = POOL_KEEP):
        self.keep = keep
        self.buffers: List[torch.Tensor] = []

    def acquire(self, nbytes: int) -> torch.Tensor:
        for buf in self.buffers:
            if buf.numel() >= nbytes and int(buf[:8].view(torch.int64)[0]) == 0:
                buf[:8].view(torch.int64)[0] = 1
                return buf
        idle = [b for b in self.buffers if int(b[:8].view(torch.int64)[0]) == 0]
        if len(idle) >= self.keep:
            self.buffers.remove(idle[0])
        buf = shared_bytes(-(-nbytes * 5 // 4 // (1 << 20)) << 20)  # 25% headroom, whole MiB
        buf[:8].view(torch.int64)[0] = 1
        self.buffers.append(buf)
        return buf


class _Lease:
    """Marks a worker's buffer free when the last tensor viewing it is gone (see _LeasedArray)."""

    __slots__ = ("flag",)

    def __init__(self, flag: np.ndarray):
        self.flag = flag  # int64 view of the buffer's header (a plain ndarray: no cycle with the lease)

    def __del__(self):
        self.flag[0] = 0


class _LeasedArray(np.ndarray):
    """numpy view of a shared buffer holding its _Lease; torch.from_numpy keeps the array alive."""


class Packet:
    """Several batches packed into one shared buffer: one message and no fresh pages per group."""

    def __init__(self, buffer: torch.Tensor, layout: list, leased: bool = True):
        self.buffer = buffer
        self.layout = layout  # per batch: (keys, shapes, offsets, float_names, id_names, position)
        self.leased = leased

    @staticmethod
    def pack(keys: List[str], items: Sequence[Tuple[Parts, Dict[str, Any]]], pool: BufferPool) -> "Packet":
        layout, total = [], _HEADER
        for parts, position in items:
            b = parts.size
            shapes = [(parts.n_values,), (parts.n_lengths,), tuple(parts.dense.shape), (len(parts.float_names), b),
                      (len(parts.id_names), b)]
            offsets = []
            for shape, (_, dtype) in zip(shapes, _FIELDS):
                offsets.append(total)
                total += -(-math.prod(shape) * np.dtype(dtype).itemsize // 8) * 8  # 8-byte aligned
            layout.append((keys, shapes, offsets, parts.float_names, parts.id_names, position))
        buffer = pool.acquire(total)
        for (parts, _), (_, shapes, offsets, _, _, _) in zip(items, layout):
            t = [buffer[o:o + math.prod(sh) * np.dtype(nd).itemsize].view(dt).view(sh)
                 for o, sh, (dt, nd) in zip(offsets, shapes, _FIELDS)]
            parts.write_sparse(t[0], t[1])
            t[2].copy_(parts.dense)
            t[3].copy_(parts.floats)
            t[4].copy_(parts.ids)
        return Packet(buffer, layout)

    def unpack(self) -> Iterator[Batch]:
        if self.leased:
            arr = self.buffer.numpy().view(_LeasedArray)
            arr.lease = _Lease(self.buffer.numpy()[:8].view(np.int64))
        else:
            arr = self.buffer.numpy()
        del self.buffer  # only the batch tensors hold the buffer from here on
        for keys, shapes, offsets, float_names, id_names, position in self.layout:
            t = [torch.from_numpy(arr[o:o + math.prod(sh) * np.dtype(nd).itemsize].view(nd).reshape(sh))
                 for o, sh, (_, nd) in zip(offsets, shapes, _FIELDS)]
            yield assemble(keys, t[0], t[1], t[2], t[3], float_names, t[4], id_names, position)

    def pin_memory(self) -> "Packet":
        pinned = self.buffer.pin_memory()
        if self.leased:
            self.buffer[:8].view(torch.int64)[0] = 0  # copied out: the worker may reuse it
        return Packet(pinned, self.layout, leased=False)


class FinalPosition:
    """A worker slot's final position and counts, sent without a Batch: the main process builds the zero-row
    Batch. Why: building a KeyedJaggedTensor (torch.fx ProxyableClassMeta) makes torch log its is_fx_tracing
    deprecation once per process, and DataLoader workers are fresh processes every pass."""

    def __init__(self, keys: List[str], n_dense: int, position: Dict[str, Any]):
        self.keys, self.n_dense, self.position = keys, n_dense, position

    def unpack(self) -> Iterator[Batch]:
        yield empty_batch(self.keys, self.n_dense, self.position)

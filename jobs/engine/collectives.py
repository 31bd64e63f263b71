"""The object and flag collectives every job uses, in one place (each is the identity without a process group).

Training, evaluation, checkpoints, the online stream and the data check all exchange small Python objects
(counters, reader positions, decisions) between ranks; they call these instead of torch.distributed directly, so
the single-process case and the choice of torch collective live here once. All of them are collective: every rank
must call them at the same point.
"""
from __future__ import annotations

from typing import Any, Callable, List, Sequence, Tuple, Type

import torch
import torch.distributed as dist


def world_size() -> int:
    """Ranks in the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    """Wait for every rank (nothing to wait for alone)."""
    if world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank: decisions taken once (rank 0) and followed everywhere."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj: Any) -> List[Any]:
    """Every rank's `obj`, in rank order (a one-item list without a process group)."""
    if world_size() == 1:
        return [obj]
    out: List[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_ints(values: Sequence[int], device: torch.device, op: str = "sum") -> List[int]:
    """Element-wise sum ("sum") or maximum ("max") of small integer vectors over ranks (one tensor collective,
    cheaper than an object gather: used once per step to keep ranks in lock-step)."""
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
    if op not in ops:
        raise ValueError(f"all_reduce_ints: op {op!r} is not one of {sorted(ops)}")
    t = torch.tensor(list(values), dtype=torch.int64, device=device)
    if world_size() > 1:
        dist.all_reduce(t, op=ops[op])
    return [int(x) for x in t.tolist()]


def together(fn: Callable[[], Any], errors: Tuple[Type[BaseException], ...]) -> Any:
    """Run `fn` on every rank; if it raised one of `errors` anywhere, raise the first failure on every rank
    (so no rank is left waiting in a later collective). Returns this rank's result."""
    try:
        res, err = fn(), None
    except errors as exc:
        res, err = None, (type(exc).__name__, str(exc))
    gathered = all_gather_objects(err)
    failed = [(r, e) for r, e in enumerate(gathered) if e is not None]
    if failed:
        rank_, (name, msg) = failed[0]
        cls = {c.__name__: c for c in errors}[name]
        raise cls(msg if rank_ == 0 or len(failed) == len(gathered) else f"(rank {rank_}) {msg}")
    return res

"""Step loop over per-rank batch iterables that stays in lock-step across ranks.

Every DMP forward/backward is collective (embedding all-to-alls, DDP all-reduce), so all ranks
must take the same number of steps even when their readers yield different numbers of batches.
Before each step the ranks all-reduce a "has a batch" flag (one tiny collective per step) and
then, by policy:

  pad  (default): keep stepping until every rank is exhausted; a rank without a batch re-runs its
       last batch (or `template`) with real=False. The step function must then not count it: eval
       skips metric updates, training multiplies the loss by 0 (forward/backward still run so the
       collectives match). Every row is processed exactly once. With sgd / rowwise_adagrad /
       exact_adagrad a zero loss leaves the embedding rows unchanged; FBGEMM Adam would still decay
       its moments, and DDP averages the real ranks' dense gradients with zeros on that step.
  stop: all ranks stop at the first step where any rank is exhausted (torchrec's usual training
       behaviour); batches left on other ranks are counted (their iterators are drained, not
       stepped) and reported in LoopStats and a warning, never silently dropped.

TrainPipelineSparseDist pulls batches itself; satrank.jobs.engine.trainer feeds it from `synced_pairs`
(padding copies tagged) to keep ranks aligned.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal, Optional, Tuple

import torch

from satrank.jobs.engine.collectives import all_reduce_ints, world_size
from satrank.pipeline.batch import Batch

Policy = Literal["pad", "stop"]
logger = logging.getLogger("satrank.loop")


@dataclass
class LoopStats:
    steps: int = 0  # collective steps (equal on every rank)
    real_steps: int = 0  # steps on this rank's own batches
    padding_steps: int = 0  # pad: steps re-running a batch with real=False
    rows: int = 0  # rows of this rank's real batches that were stepped
    dropped_batches: int = 0  # stop: this rank's batches not stepped
    dropped_rows: int = 0


def synced_pairs(
    batches: Iterable[Batch],
    device: torch.device,
    policy: Policy = "pad",
    template: Optional[Batch] = None,
    stats: Optional[LoopStats] = None,
) -> Iterator[Tuple[Batch, bool]]:
    """Yield (batch, real) in lock-step with the other ranks (see module doc). Collective."""
    if policy not in ("pad", "stop"):
        raise ValueError(f"policy: {policy!r} is not one of ['pad', 'stop']")
    stats = stats if stats is not None else LoopStats()
    world = world_size()
    it = iter(batches)
    last = template
    while True:
        batch = next(it, None)
        cannot_pad = int(batch is None and last is None and policy == "pad")
        active, unpaddable = all_reduce_ints([int(batch is not None), cannot_pad], device)
        if active == 0:
            return
        if policy == "stop" and active < world:
            if batch is not None:
                stats.dropped_batches += 1
                stats.dropped_rows += batch.size
                for rest in it:
                    stats.dropped_batches += 1
                    stats.dropped_rows += rest.size
            if stats.dropped_batches:
                logger.warning("uneven batches (policy=stop): %d batches / %d rows of this rank not stepped",
                               stats.dropped_batches, stats.dropped_rows)
            return
        if unpaddable:
            raise RuntimeError(
                f"uneven batches (policy=pad): {unpaddable} rank(s) had no batch at all and no template "
                "to pad with; pass template= (any batch of the right shape) or use policy='stop'"
            )
        stats.steps += 1
        if batch is None:
            stats.padding_steps += 1
            yield last, False  # type: ignore[misc]
        else:
            stats.real_steps += 1
            stats.rows += batch.size
            last = batch
            yield batch, True


def run_loop(
    batches: Iterable[Batch],
    step: Callable[[Batch, bool], Any],
    runtime: Any,
    *,
    policy: Policy = "pad",
    template: Optional[Batch] = None,
    progress: Any = None,
) -> LoopStats:
    """Call step(batch, real) once per synchronized step; returns this rank's LoopStats.

    runtime: anything with `.device` (satrank.jobs.engine.runtime.Runtime). progress: optional tqdm-like bar,
    advanced by the rows of real batches.
    """
    stats = LoopStats()
    for batch, real in synced_pairs(batches, runtime.device, policy, template, stats):
        step(batch, real)
        if real and progress is not None:
            progress.update(batch.size)
    return stats

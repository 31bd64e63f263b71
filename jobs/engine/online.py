"""Online training on the Trainer: a pluggable step over a time-ordered stream (satrank.jobs.engine.stream), with
step-count checkpoints that carry the stream position, so a killed run resumes and consumes every row once.

`Trainer.stream(source, step, ...)` runs `run_stream` on the trainer's sharded model and optimizer: every rank
takes one collective step per synchronized batch (satrank.jobs.engine.loop.synced_pairs, ranks padded with
real=False), the source records the reader position after each step, and RUN/checkpoint is written every
`checkpoint_every` steps, when a followed stream is caught up, and at the end. A checkpoint holds the model, the
trainer's optimizer, extra = {job, step, done (shards consumed), **step.extra(), **job extra} and, per rank,
the shard in progress with its reader position; the step's per-rank state (`step.state_dict()`: buffers,
prequential columns, ...) goes to RUN/<step.state_dir>/step-<S>/rank<r>.pt next to it (only the latest kept).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Protocol

import torch

from satrank.jobs.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from satrank.jobs.engine.loop import synced_pairs
from satrank.jobs.engine.progress import loader_bar
from satrank.jobs.engine.readers import first_batch
from satrank.jobs.engine.runtime import finite_or_none, get_logger
from satrank.jobs.engine.stream import ShardStream
from satrank.pipeline.batch import Batch

log = get_logger("online")


class OnlineStep(Protocol):
    """What one batch does in online training (e.g. satrank.jobs.engine.easq_step.EasqStep)."""

    state_dir: str  # RUN/<state_dir>/step-<S>/rank<r>.pt holds state_dict()

    def __call__(self, batch: Batch, real: bool) -> None: ...  # forward, backward, optimizer steps (collective)

    def extra(self) -> Dict[str, Any]: ...  # JSON-able global state for meta.json (e.g. rows consumed)

    def state_dict(self) -> Dict[str, Any]: ...

    def load_state_dict(self, state: Dict[str, Any]) -> None: ...


def save_stream(trainer: Any, source: ShardStream, step: OnlineStep, extra: Dict[str, Any]) -> Path:
    """Collective: the step's per-rank state, then RUN/checkpoint (model, optimizer, stream position)."""
    rt, out = trainer.rt, trainer.out_dir
    d = out / step.state_dir / f"step-{trainer.state.step}"
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".rank{rt.rank}.pt.tmp"
    torch.save(step.state_dict(), tmp)
    tmp.replace(d / f"rank{rt.rank}.pt")
    meta = finite_or_none({"job": trainer.job, "step": trainer.state.step, **source.state(), **step.extra(), **extra})
    cfg = trainer.run_config
    path = save_checkpoint(out, trainer.dmp, trainer.optimizer, extra=meta, rank_extra=source.rank_state(),
                           config=cfg, data=cfg.data, emb=cfg.embeddings)
    if rt.is_main:  # keep the state of this checkpoint only (older ones are unreachable)
        for old in (out / step.state_dir).glob("step-*"):
            if old.name != d.name:
                shutil.rmtree(old, ignore_errors=True)
    return path


def restore_stream(trainer: Any, source: ShardStream, step: OnlineStep) -> Dict[str, Any]:
    """Resume from RUN/checkpoint (same world size: the reader positions are per rank). Returns meta extra."""
    rt, out, cfg = trainer.rt, trainer.out_dir, trainer.run_config
    meta = load_checkpoint(out / "checkpoint", trainer.dmp, trainer.optimizer, data=cfg.data, emb=cfg.embeddings)
    if meta["world_size"] != rt.world_size:
        raise CheckpointError(f"{out}/checkpoint was written by {meta['world_size']} ranks; resume with as many")
    ex = meta["extra"]
    trainer.state.step = ex["step"]
    source.load(ex, meta["rank_extra"][rt.rank])
    step.load_state_dict(torch.load(out / step.state_dir / f"step-{ex['step']}" / f"rank{rt.rank}.pt",
                                    weights_only=True))
    trainer.resumed = {"path": meta["path"], "world_size": meta["world_size"], "step": ex["step"]}
    log.info("resumed from %s at step %d (%d shards done)", meta["path"], ex["step"], len(source.done))
    return ex


def run_stream(trainer: Any, source: ShardStream, step: OnlineStep, *, checkpoint_every: int,
               extra: Optional[Dict[str, Any]] = None) -> Path:
    """Train `step` on every batch of `source` (collective); returns the final checkpoint's path."""
    extra = extra or {}
    since = 0

    def checkpoint() -> None:
        nonlocal since
        save_stream(trainer, source, step, extra)
        since = 0

    def caught_up() -> None:
        if since and checkpoint_every:
            log.info("caught up after %d shards; checkpointing and waiting for new shards in %s (up to %ss)",
                     len(source.done), source.split, source.max_wait_s)
            checkpoint()

    source.on_idle = caught_up
    template = None
    trainer.dmp.train()
    for loader in source.loaders(trainer.rt.is_main):
        template = template or first_batch(loader)
        with loader_bar("dpo stream", loader, main=trainer.rt.is_main) as bar:
            for batch, real in synced_pairs(loader, trainer.rt.device, "pad", template):
                step(batch, real)
                bar.update(batch.size if real else 0)
                trainer.state.step += 1
                since += 1
                source.mark(loader)
                if checkpoint_every and since >= checkpoint_every:
                    checkpoint()
    return save_stream(trainer, source, step, extra)

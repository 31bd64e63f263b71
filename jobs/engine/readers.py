"""Reader settings and loader helpers shared by the training jobs (satrank.jobs.engine.trainer) and the online job (satrank.jobs.dpo):
the stage's `train:` section with its overrides, the train / eval reader settings, a padding template batch,
and waiting out the DataLoader's feeder threads between passes (a fork during their teardown can hang)."""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from contextlib import contextmanager
from typing import Any, Optional

from satrank.jobs.engine.runtime import get_logger
from satrank.jobs.config.train import TrainConfig, resolve_train
from satrank.pipeline.batch import Batch
from satrank.pipeline.errors import DataError
from satrank.pipeline.reader import BatchLoader
from satrank.pipeline.reader_config import ReaderConfig

logger = get_logger("trainer")


def stage_train_config(cfg: Any, stage: str) -> TrainConfig:
    """`train:` with the `<stage>_train:` overrides applied (stage: pretrain | propensity | satisfaction | ...)."""
    over = getattr(cfg, f"{stage}_train", None)
    return resolve_train(cfg.train, over, f"{stage}_train")


def train_reader(reader: ReaderConfig, train: TrainConfig) -> ReaderConfig:
    return dataclasses.replace(reader, batch_size=train.batch_size or reader.batch_size,
                               drop_last=reader.drop_last or train.drop_last)


def training_loader(cfg: Any, uri: Any, train: TrainConfig, **kw: Any) -> BatchLoader:
    """The loader of a training pass over the split `uri` (the stage's batch size and drop_last)."""
    return BatchLoader(uri, cfg.data, train_reader(cfg.reader, train), **kw)


def eval_reader(reader: ReaderConfig) -> ReaderConfig:
    """Evaluation reads every row in file order (metrics do not depend on order; this keeps runs comparable)."""
    return dataclasses.replace(reader, shuffle=False, drop_last=False)


def evaluation_loader(cfg: Any, uri: Any, with_labels: bool = True) -> BatchLoader:
    """The loader of every evaluation, scoring-for-metrics and estimate pass over the split `uri`."""
    return BatchLoader(uri, cfg.data, eval_reader(cfg.reader), with_labels=with_labels)


def first_batch(loader: BatchLoader) -> Batch:
    """The first batch of `loader`'s data read as one slot in the main process (a padding template for
    ranks that get no batch at all). DataError when no row survives rejection/filtering."""
    cfg = dataclasses.replace(loader.cfg, num_workers=0, shuffle=False)
    conv = loader.converter
    one = BatchLoader(loader.uri, conv.cfg, cfg, rank=0, world_size=1, row_filter=conv.row_filter,
                      with_labels=conv.with_labels, items=conv.items, audit_items=conv.audit_items)
    it = iter(one)
    try:
        batch = next(it, None)
    finally:
        it.close()
    if batch is None:
        what = f" with {conv.row_filter} = 1" if conv.row_filter else ""
        raise DataError(f"{loader.uri}: no usable rows{what} (every row was rejected or filtered)")
    return batch


_LINGERING: set = set()  # OS threads seen to outlive a loader pass (long-lived): not waited for again


def _task_ids() -> Optional[set]:
    try:
        return set(os.listdir("/proc/self/task"))
    except OSError:  # not Linux: fall back to joining the feeder threads only
        return None


@contextmanager
def reap_loader_threads(loader: BatchLoader, timeout: float = 5.0):
    """Around a pass over a BatchLoader with workers: afterwards, wait until every OS thread started during
    the pass (the DataLoader's queue-feeder threads) has fully exited, so the next DataLoader's fork cannot
    happen while one of them is still tearing down. On CPython 3.11 a child forked at that moment can hang
    forever in PyOS_AfterFork_Child (the thread-state list lock is taken before it is re-initialised);
    seen under load as a rank waiting for its first batch. Threading.join is not enough: it returns
    before the thread's C-level teardown (which takes that lock) is done."""
    if loader.cfg.num_workers == 0:  # read in this process: no DataLoader fork, nothing to wait for
        yield
        return
    before = _task_ids()
    try:
        yield
    finally:
        for t in threading.enumerate():
            if t is not threading.current_thread() and t.name.startswith("QueueFeederThread"):
                t.join(timeout)
        if before is not None:
            deadline = time.monotonic() + timeout
            while True:
                extra = (_task_ids() or set()) - before - _LINGERING
                if not extra:
                    break
                if time.monotonic() > deadline:
                    logger.debug("threads %s outlived a loader pass; not waited for again", sorted(extra))
                    _LINGERING.update(extra)
                    break
                time.sleep(0.002)

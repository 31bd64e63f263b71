"""The online stream source: time-ordered Parquet shards of one split, each consumed once, resumable mid-shard.

The shards of a split are read in file-name order (the simulator's names are time-ordered; `timestamp_ordered`
checks consecutive files' timestamp statistics), no shuffle, no epochs; the row groups of a shard are split
over ranks (satrank.pipeline.reader slots). With `follow` the split is re-listed after the known shards and
waited on until `max_wait_s` passes without a new one. Rank 0 lists and decides, every rank follows (ranks
listing on their own could disagree and then wait in different collectives forever). The state (shards done;
per rank: the shard in progress and its reader position) rides in the trainer's checkpoints
(satrank.jobs.engine.online), so a killed run resumes and consumes every row exactly once.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pyarrow.parquet as pq

from satrank.jobs.engine.collectives import broadcast_object
from satrank.pipeline.errors import DataError
from satrank.pipeline.reader import BatchLoader, list_shards


def pending_shards(split: Path, done: List[str], follow: bool) -> List[str]:
    """The shards of `split` not consumed yet, in file-name (= time) order. Names starting with '.' or '_' are
    writes in flight (`satrank.pipeline.reader.list_shards`: a producer writes `.part-N.parquet` and renames it). With
    `follow` an empty split is waited on instead of refused."""
    try:
        files = list_shards(str(split))[1]
    except DataError:
        if not follow:
            raise
        files = []
    return [f for f in files if Path(f).name not in done]


def timestamp_ordered(files: List[str]) -> bool:
    """Each file's smallest timestamp >= the previous file's largest (Parquet row-group statistics)."""
    prev = None
    for f in files:
        md = pq.ParquetFile(f).metadata
        col = md.schema.to_arrow_schema().get_field_index("timestamp")
        stats = [md.row_group(i).column(col).statistics for i in range(md.num_row_groups)]
        if col < 0 or any(s is None or not s.has_min_max for s in stats):
            return False
        lo, hi = min(s.min for s in stats), max(s.max for s in stats)
        if prev is not None and lo < prev:
            return False
        prev = hi
    return True


class ShardStream:
    """Online source over `split`: `batches()` yields (loader, shard name) in time order until the stream ends;
    `mark(loader)` records the reader position after a trained step, `finish(name)` a consumed shard."""

    def __init__(self, split: Path, data: Any, reader: Any, *, follow: bool = False,
                 max_wait_s: Optional[float] = None, poll_s: float = 1.0) -> None:
        self.split, self.data, self.follow, self.max_wait_s, self.poll_s = Path(split), data, follow, max_wait_s, poll_s
        self.reader_cfg = dataclasses.replace(reader, shuffle=False, drop_last=False)
        self.done: List[str] = []
        self.current: Optional[str] = None
        self.reader: Optional[Dict[str, Any]] = None
        self.on_idle = None  # called on every rank when caught up with --follow, before waiting (checkpoint)

    # ------------------------------------------------------------------ decisions (rank 0, broadcast)
    def _next(self, last_seen: float, is_main: bool):
        decision = None
        if is_main:
            files = pending_shards(self.split, self.done, self.follow)
            decision = (files, not files and (not self.follow or time.monotonic() - last_seen > self.max_wait_s))
        return broadcast_object(decision)

    def loaders(self, is_main: bool) -> Iterator[BatchLoader]:
        """Every shard still to consume as a BatchLoader (restored to the saved reader position for the shard
        in progress), in time order; with `follow` it waits for new shards. Collective."""
        last_seen = time.monotonic()
        while True:
            files, stop = self._next(last_seen, is_main)
            if stop:
                return
            if not files:  # follow, caught up: let the trainer checkpoint once, then poll for the next shard
                if self.on_idle is not None:
                    self.on_idle()
                time.sleep(self.poll_s)
                continue
            last_seen = time.monotonic()
            for f in files:
                name = Path(f).name
                loader = BatchLoader(f, self.data, self.reader_cfg)
                if self.current == name and self.reader is not None:
                    loader.load_state_dict(self.reader)
                self.current = name
                yield loader
                self.done.append(name)
                self.current, self.reader = None, None

    def mark(self, loader: BatchLoader) -> None:
        """The reader position after the step just taken (what a checkpoint stores for this rank)."""
        self.reader = loader.state_dict()

    # ------------------------------------------------------------------ checkpoint state
    def state(self) -> Dict[str, Any]:
        """Global state (same on every rank): the shards consumed, in order."""
        return {"done": list(self.done)}

    def rank_state(self) -> Dict[str, Any]:
        return {"file": self.current, "reader": self.reader}

    def load(self, state: Dict[str, Any], rank_state: Dict[str, Any]) -> None:
        self.done = list(state["done"])
        self.current, self.reader = rank_state["file"], rank_state["reader"]

    def consumed_files(self) -> List[str]:
        return [str(self.split / n) for n in self.done]

"""Streaming Parquet reader: shards -> (rank, worker) slots -> Batches, exactly once, resumable.

Why: training and evaluation read impression logs far larger than memory on several ranks with
several DataLoader workers each, and must survive a restart without skipping or repeating rows.

- Discovery: every *.parquet under a local directory or any pyarrow filesystem URI, sorted; each
  (file, row group) is a fragment, its metadata read once in the main process.
- Split (pipeline/work_units.py): slot = rank * workers + worker_id reads a list of work units,
  row ranges of fragments; whole fragments dealt k % n_slots when that is balanced, else the
  epoch's fragment order cut into equal shares (plan `row_ranges`): every row once per epoch.
- Shuffle: bounded; rows are permuted within windows of `shuffle_buffer_rows` of a row group
  (seeded by (seed, epoch, fragment, window)), so memory stays bounded and any position replays.
- Position: each Batch carries, for its slot, where the next batch starts (epoch, slot, unit
  index in the slot's list under key "fragment", row offset in that unit's shuffled order) and the
  slot's running counts; `BatchLoader.state_dict()` is those positions plus the plan, so a
  restored loader continues exactly.
- Item table: when data.items.history names histories (or check_data audits), the table
  `<data dir>/<data.items.dir>` (data dir = the parent of the split dir) is read once here and the
  converter appends the derived history attribute sequences (pipeline/items.py).
- Transport: a worker packs ~4 MiB of batches into one reused shared-memory buffer
  (pipeline/transport.py).
- Lifeline: the workers and their forkserver die with the rank, even one killed with SIGKILL
  (pipeline/lifeline.py).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
from collections import deque
from typing import Any, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from satrank.pipeline.batch import Batch
from satrank.pipeline.convert import KEEP, Converter, new_stats
from satrank.pipeline.parts import Parts, empty_batch, gather
from satrank.pipeline.errors import DataError
from satrank.pipeline.features import DataConfig
from satrank.pipeline.items import ItemTable, data_dir_of
from satrank.pipeline.lifeline import worker_context, worker_init_fn
from satrank.pipeline.reader_config import ReaderConfig
from satrank.pipeline.shards import list_shards, open_parquet as _open, read_fragments  # noqa: F401 (re-exported)
from satrank.pipeline.transport import POOL_KEEP, BufferPool, FinalPosition, Packet
from satrank.pipeline.work_units import (PLANS, ROW_GROUPS, Fragment, WorkUnit, choose_plan, plan_units,
                                         window_order)

STATE_FORMAT = "satrank.reader.v1"
_PLAN_BEFORE_WORK_UNITS = ROW_GROUPS  # a state without "plan" was saved when whole row groups were dealt
_HISTORY = 256  # position updates remembered for state_dict(unconsumed=...)
_OPEN_FILES = 32  # Parquet files a slot keeps open (shuffled fragments jump between files)


def initial_position(epoch: int, slot: int) -> Dict[str, Any]:
    return {"epoch": epoch, "slot": slot, "fragment": 0, "offset": 0, "done": False, "stats": new_stats()}


def _copy_stats(stats: Dict[str, Any]) -> Dict[str, Any]:
    return {k: dict(v) if isinstance(v, dict) else v for k, v in stats.items()}


def _exact_windows(batches: Iterator[pa.RecordBatch], size: int) -> Iterator[pa.RecordBatch]:
    """Re-chunk record batches into windows of exactly `size` rows (the last may be shorter)."""
    buf: List[pa.RecordBatch] = []
    have = 0
    for rb in batches:
        while rb.num_rows:
            part = rb.slice(0, size - have)
            rb = rb.slice(part.num_rows)
            buf.append(part)
            have += part.num_rows
            if have == size:
                yield buf[0] if len(buf) == 1 else pa.concat_batches(buf)
                buf, have = [], 0
    if have:
        yield buf[0] if len(buf) == 1 else pa.concat_batches(buf)


class ShardDataset(IterableDataset):
    """The batches of this process's slot (rank * workers + worker id) for one epoch.

    `start` maps slot -> position to resume from. After the last batch of a slot, a zero-row Batch
    carries the slot's final position and counts (BatchLoader swallows it).
    """

    def __init__(self, fs: pafs.FileSystem, fragments: Sequence[Fragment], converter: Converter,
                 reader_cfg: ReaderConfig, *, rank: int = 0, world_size: int = 1, epoch: int = 0,
                 start: Optional[Dict[int, Dict[str, Any]]] = None, plan: str = ROW_GROUPS):
        self.fs = fs
        self.fragments = list(fragments)
        self.converter = converter
        self.cfg = reader_cfg
        self.rank = rank
        self.workers_per_rank = max(1, reader_cfg.num_workers)
        self.n_slots = world_size * self.workers_per_rank
        self.epoch = epoch
        self.start = start or {}
        self.plan = plan

    def _slot(self) -> int:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        if nw != self.workers_per_rank:
            raise RuntimeError(f"ShardDataset was built for {self.workers_per_rank} worker(s) per rank "
                               f"(reader.num_workers) but is iterated by {nw}")
        return self.rank * nw + wid

    def __iter__(self) -> Iterator[Batch]:
        return self.stream(self._slot())

    def stream(self, slot: int) -> Iterator[Batch]:
        """The Batches of `slot`, then the zero-row Batch with its final position."""
        keys, n_dense = self.converter.keys, len(self.converter.cfg.dense)
        for parts, position in self.parts(slot):
            yield empty_batch(keys, n_dense, position) if parts is None else parts.to_batch(keys, position)

    def _windows(self, unit: WorkUnit, first: int,
                 files: Dict[str, Any]) -> Iterator[Tuple[int, int, pa.RecordBatch]]:
        """(window index, first row, rows) of a unit's part of each row-group window, from the window
        holding unit row `first` on; rows are counted from the row group's start. The windows before
        the unit's first row are decoded and dropped (no row-level seek in Parquet); reading stops
        after the unit's last row. `files` caches open files."""
        frag = unit.fragment
        if frag.path not in files:
            if len(files) >= _OPEN_FILES:
                del files[next(iter(files))]
            pf = _open(self.fs, frag.path)
            self.converter.check_schema(pf.schema_arrow, frag.path)
            files[frag.path] = (pf, self.converter.columns_for(pf.schema_arrow))
        pf, columns = files[frag.path]
        size = self.cfg.shuffle_buffer_rows
        parts = unit.window_parts(size, first)
        try:
            raw = pf.iter_batches(batch_size=size, row_groups=[frag.row_group], columns=columns,
                                  use_threads=get_worker_info() is None)  # workers: one core each
            want = next(parts, None)
            for w, rb in enumerate(_exact_windows(raw, size)):
                if want is None:
                    break
                if w == want[0]:
                    yield w, want[1], rb.slice(want[1] - w * size, want[2] - want[1])
                    want = next(parts, None)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{frag.path}: row group {frag.row_group} cannot be read (corrupt?): {exc}") from None
        if want is not None:
            raise DataError(f"{frag.path}: row group {frag.row_group} has fewer rows than its metadata says "
                            f"({frag.num_rows}); the file changed while being read?")

    def parts(self, slot: int) -> Iterator[Tuple[Optional[Parts], Dict[str, Any]]]:
        """(gathered rows of a batch, position after it) of `slot`; finally (None, final position)."""
        cfg, conv = self.cfg, self.converter
        size = cfg.batch_size
        units = plan_units(self.plan, self.fragments, self.epoch, self.n_slots, cfg.shuffle, cfg.seed)[slot]
        start = self.start.get(slot) or initial_position(self.epoch, slot)
        if start["epoch"] != self.epoch or start["slot"] != slot:
            raise ValueError(f"resume position {start} does not belong to epoch {self.epoch}, slot {slot}")
        ui0, off0 = start["fragment"], start["offset"]
        stats = _copy_stats(start["stats"])

        def position(ui: int, offset: int) -> Dict[str, Any]:
            if ui < len(units) and offset >= units[ui].num_rows:
                ui, offset = ui + 1, 0
            return {"epoch": self.epoch, "slot": slot, "fragment": ui, "offset": offset,
                    "done": ui >= len(units), "stats": _copy_stats(stats)}

        pending: List[Tuple[Any, np.ndarray]] = []
        n_pending = 0
        files: Dict[str, Any] = {}
        for ui in range(ui0, len(units)):
            unit = units[ui]
            frag = unit.fragment
            skip = off0 if ui == ui0 else 0
            for w, first_row, data in self._windows(unit, skip, files):
                base = first_row - unit.lo  # the part's first row, counted in the unit
                chunk = conv.convert(data, frag.path, frag.first_row + first_row)
                order = window_order(cfg.seed, self.epoch, frag.index, w, data.num_rows, cfg.shuffle)
                reason = chunk.reason[order]
                cursor = max(0, skip - base)
                keep = np.flatnonzero(reason[cursor:] == KEEP) + cursor
                k = 0
                while k < len(keep):
                    take = keep[k:k + size - n_pending]
                    k += len(take)
                    pending.append((chunk, order[take]))
                    n_pending += len(take)
                    if n_pending == size:
                        end = int(take[-1]) + 1
                        conv.tally(stats, reason[cursor:end])
                        conv.tally_emitted(stats, pending)
                        cursor = end
                        yield gather(pending), position(ui, base + end)
                        pending, n_pending = [], 0
                conv.tally(stats, reason[cursor:])
        if n_pending and cfg.drop_last:
            stats["rows_dropped"] += n_pending
        elif n_pending:
            conv.tally_emitted(stats, pending)
            yield gather(pending), position(len(units), 0)
        yield None, position(len(units), 0)


_PACKET_BYTES = 4 << 20  # batches travel from a worker in groups this large: few shared-memory messages


class _PackedShards(ShardDataset):
    """ShardDataset that, inside a DataLoader worker, sends its batches in packets of ~_PACKET_BYTES."""

    def __iter__(self) -> Iterator[Any]:
        if get_worker_info() is None:
            yield from super().__iter__()
            return
        keys, n_dense = self.converter.keys, len(self.converter.cfg.dense)
        pool = BufferPool()
        group: List[Tuple[Parts, Dict[str, Any]]] = []
        size = 0
        for parts, position in self.parts(self._slot()):
            if parts is None:  # the final position: send what is left, then the zero-row batch
                if group:
                    yield Packet.pack(keys, group, pool)
                yield FinalPosition(keys, n_dense, position)  # no KJT built in the worker (see FinalPosition)
                return
            group.append((parts, position))
            size += parts.n_values * 8 + parts.size * 64
            if size >= _PACKET_BYTES:
                yield Packet.pack(keys, group, pool)
                group, size = [], 0


def _worker_context():
    """The forkserver context, its server preloading torch, pyarrow and this module once, so each
    worker starts as a cheap fork of a clean single-threaded process; the server also dies with this rank
    (satrank.pipeline.lifeline). (Preloading the job's main module too saved each worker its imports, but
    every worker then printed runpy's RuntimeWarning about a module found in sys.modules before its
    execution as __mp_main__: reverted, tests/test_logs.py.)"""
    return worker_context("forkserver", ["torch", "pyarrow.parquet", "satrank.pipeline.reader"])


def _dist_rank_world() -> Tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def sum_stats(stats: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Add per-slot counts; checks rows_read == emitted + rejected + filtered + dropped."""
    total = new_stats()
    for s in stats:
        for key in ("rows_read", "rows_emitted", "rows_filtered", "rows_dropped"):
            total[key] += s[key]
        for key in ("rows_rejected", "oov_hits", "items"):
            for name, v in s.get(key, {}).items():  # "items": only when an item table was read
                total.setdefault(key, {})[name] = total.get(key, {}).get(name, 0) + v
    total["rows_rejected_total"] = sum(total["rows_rejected"].values())
    accounted = total["rows_emitted"] + total["rows_rejected_total"] + total["rows_filtered"] + total["rows_dropped"]
    if total["rows_read"] != accounted:
        raise RuntimeError(f"reader accounting is broken: rows_read {total['rows_read']} != emitted + rejected "
                           f"+ filtered + dropped = {accounted}: {total}")
    return total


class BatchLoader:
    """Iterates non-empty Batches of this rank for the current epoch through a torch DataLoader.

    Iterating continues from the tracked positions: after `load_state_dict`, or after a loop that
    was left early, the next iteration picks up exactly there. A pass that ran to the end makes the
    next iteration read the epoch again from its start; `set_epoch(e)` starts epoch e.
    """

    def __init__(self, uri_or_dir, data_cfg: DataConfig, reader_cfg: ReaderConfig, rank: Optional[int] = None,
                 world_size: Optional[int] = None, row_filter: Optional[str] = None, with_labels: bool = True,
                 items: Optional[ItemTable] = None, audit_items: bool = False):
        d_rank, d_world = _dist_rank_world()
        self.rank = d_rank if rank is None else rank
        self.world_size = d_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        self.uri = str(uri_or_dir)
        self.cfg = reader_cfg
        if items is None and data_cfg.items is not None and (data_cfg.derived_sequences or audit_items):
            items = ItemTable.load(data_dir_of(self.uri), data_cfg.items, data_cfg)  # DIR/<data.items.dir>
        self.items = items  # the item attribute table (None when nothing needs it); pickled into the workers
        self.converter = Converter(data_cfg, with_labels=with_labels, on_bad_row=reader_cfg.on_bad_row,
                                   row_filter=row_filter, items=items, audit_items=audit_items)
        self.fs, self.files = list_shards(self.uri)
        self.fragments = read_fragments(self.fs, self.files, self.converter)
        self.workers_per_rank = max(1, reader_cfg.num_workers)
        self.n_slots = self.world_size * self.workers_per_rank
        self.slots = list(range(self.rank * self.workers_per_rank, (self.rank + 1) * self.workers_per_rank))
        root = os.path.dirname(self.files[0]) if len(self.files) == 1 else os.path.commonpath(self.files)
        where = {path: i for i, path in enumerate(self.files)}
        listing = [[f[len(root):].lstrip("/") for f in self.files],
                   [[where[f.path], f.row_group, f.num_rows] for f in self.fragments]]
        self._fingerprint = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
        self.epoch = 0
        self.plan = self._choose_plan(0)  # the work-unit plan of self.epoch (restored with a state)
        self._reset({s: initial_position(0, s) for s in self.slots})

    def _choose_plan(self, epoch: int) -> str:
        return choose_plan(self.fragments, epoch, self.n_slots, self.cfg.shuffle, self.cfg.seed, self.cfg.batch_size)

    def _reset(self, positions: Dict[int, Dict[str, Any]]) -> None:
        self._positions = positions
        self._restart = False  # True after a pass that ran to the end: the next pass starts over
        self._yielded = 0  # non-empty batches yielded since the positions were set
        self._history: Deque[Tuple[int, bool, int, Dict[str, Any]]] = deque(maxlen=_HISTORY)

    @property
    def num_rows(self) -> int:
        """Rows in the whole dataset (all ranks), before any rejection or filtering."""
        return sum(f.num_rows for f in self.fragments)

    def work_units(self, epoch: Optional[int] = None) -> List[List[WorkUnit]]:
        """Every slot's work units (all ranks) in `epoch`: the current plan for the current epoch,
        the plan a fresh loader would choose for another."""
        e = self.epoch if epoch is None else epoch
        plan = self.plan if e == self.epoch else self._choose_plan(e)
        return plan_units(plan, self.fragments, e, self.n_slots, self.cfg.shuffle, self.cfg.seed)

    def slot_rows(self, epoch: Optional[int] = None) -> Dict[int, int]:
        """Rows (before rejection/filtering) each of this rank's slots reads in `epoch`."""
        units = self.work_units(epoch)
        return {s: sum(u.num_rows for u in units[s]) for s in self.slots}

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its beginning (keeps a restored position when it is that epoch)."""
        if epoch < 0:
            raise ValueError(f"set_epoch: epoch must be >= 0, got {epoch}")
        if epoch != self.epoch:
            self.epoch = epoch
            self.plan = self._choose_plan(epoch)
            self._reset({s: initial_position(epoch, s) for s in self.slots})

    def __iter__(self) -> Iterator[Batch]:
        if self._restart:
            self._reset({s: initial_position(self.epoch, s) for s in self.slots})
        dataset = _PackedShards(self.fs, self.fragments, self.converter, self.cfg, rank=self.rank,
                               world_size=self.world_size, epoch=self.epoch, start=copy.deepcopy(self._positions),
                               plan=self.plan)
        # forkserver, not fork: a worker forked while the previous pass's feeder threads are still
        # tearing down can hang forever in CPython's post-fork cleanup (seen under load on 3.11).
        loader = DataLoader(dataset, batch_size=None, num_workers=self.cfg.num_workers,
                            pin_memory=torch.cuda.is_available(), persistent_workers=False,
                            multiprocessing_context=_worker_context() if self.cfg.num_workers > 0 else None,
                            worker_init_fn=worker_init_fn())  # workers die with this rank (lifeline.py)
        it = iter(loader)
        # Holding the last buffers of each worker keeps them mapped: a worker reusing one is then
        # found in torch's shared-storage cache instead of being mapped (and page-faulted) again.
        mapped: Deque[torch.Tensor] = deque(maxlen=2 * POOL_KEEP * self.workers_per_rank)
        try:
            for item in it:
                if isinstance(item, Packet):
                    mapped.append(item.buffer)
                for batch in item.unpack() if isinstance(item, (Packet, FinalPosition)) else (item,):
                    slot = batch.position["slot"]
                    self._history.append((self._yielded, batch.size > 0, slot, self._positions[slot]))
                    self._positions[slot] = batch.position
                    if batch.size:
                        self._yielded += 1
                        yield batch
        finally:  # on error or early exit stop the workers now (left to the GC, shutdown can stall seconds)
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        self._restart = True

    # ------------------------------------------------------------------ accounting and resume
    def stats(self) -> Dict[str, Any]:
        """This rank's counts for the current epoch so far (summed over its slots), checked."""
        return sum_stats([p["stats"] for p in self._positions.values()])

    def state_dict(self, unconsumed: int = 0) -> Dict[str, Any]:
        """Plain JSON-able resume state: where each of this rank's slots stands in the epoch.

        `unconsumed`: how many of the last yielded batches were not used yet (e.g. the batches a
        TrainPipelineSparseDist has prefetched but not trained); the state then re-reads them.
        """
        positions = dict(self._positions)
        if unconsumed:
            keep = self._yielded - unconsumed  # batches 0 .. keep-1 count as consumed
            undo = [h for h in self._history if h[0] >= keep + (0 if h[1] else 1)]
            if keep < 0 or len(undo) == len(self._history) == self._history.maxlen:
                raise ValueError(f"state_dict(unconsumed={unconsumed}): only the last {self._yielded} batches "
                                 f"(at most {_HISTORY}) can be given back")
            for _, _, slot, previous in reversed(undo):
                positions[slot] = previous
        return {
            "format": STATE_FORMAT, "plan": self.plan, "epoch": self.epoch, "seed": self.cfg.seed,
            "shuffle": self.cfg.shuffle,
            "shuffle_buffer_rows": self.cfg.shuffle_buffer_rows, "world_size": self.world_size,
            "num_workers": self.cfg.num_workers, "n_slots": self.n_slots, "rank": self.rank,
            "num_files": len(self.files), "num_rows": self.num_rows, "files_sha256": self._fingerprint,
            "slots": {str(s): copy.deepcopy(p) for s, p in positions.items()},
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume from `state_dict()` of this rank, or from `merge_state_dicts` of all ranks."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a reader state (expected format {STATE_FORMAT!r})")
        if "plan" not in state:  # saved before work units: its positions index whole row groups
            state = {**state, "plan": _PLAN_BEFORE_WORK_UNITS}
        if state["plan"] not in PLANS:
            raise ValueError(f"reader state: unknown work-unit plan {state.get('plan')!r}; expected one of {PLANS}")
        if state["n_slots"] != self.n_slots:
            raise ValueError(
                f"reader state was saved with world_size {state['world_size']} x num_workers "
                f"{state['num_workers']} = {state['n_slots']} slots; this loader has world_size {self.world_size} x "
                f"{self.workers_per_rank} worker(s) = {self.n_slots}. Restore with the same number of slots.")
        if state["files_sha256"] != self._fingerprint:
            raise ValueError(
                f"reader state was saved for a different file list ({state['num_files']} files, {state['num_rows']} "
                f"rows); {self.uri} has {len(self.files)} files, {self.num_rows} rows (or other row groups)")
        mine = (self.cfg.shuffle, self.cfg.seed, self.cfg.shuffle_buffer_rows)
        saved = (state["shuffle"], state["seed"], state["shuffle_buffer_rows"])
        if mine[0] != saved[0] or (mine[0] and mine != saved):
            raise ValueError(f"reader state was saved with (shuffle, seed, shuffle_buffer_rows) = {saved}, this "
                             f"loader has {mine}: the row order would differ")
        missing = [s for s in self.slots if str(s) not in state["slots"]]
        if missing:
            raise ValueError(f"reader state has no position for slot(s) {missing} of rank {self.rank}: restore each "
                             f"rank's own state, or one merged with BatchLoader.merge_state_dicts")
        positions = {s: copy.deepcopy(state["slots"][str(s)]) for s in self.slots}
        for s, p in positions.items():
            if p["epoch"] != state["epoch"] or p["slot"] != s:
                raise ValueError(f"reader state: position of slot {s} is inconsistent: {p}")
        self.epoch = state["epoch"]
        self.plan = state["plan"]
        self._reset(positions)

    @staticmethod
    def merge_state_dicts(states: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        """One state holding every rank's slots (e.g. gathered to rank 0 and saved once)."""
        if not states:
            raise ValueError("merge_state_dicts: no states given")
        head = {k: v for k, v in states[0].items() if k not in ("rank", "slots")}
        slots: Dict[str, Any] = {}
        for st in states:
            other = {k: v for k, v in st.items() if k not in ("rank", "slots")}
            if other != head:
                raise ValueError(f"merge_state_dicts: states disagree: {head} vs {other}")
            slots.update(copy.deepcopy(st["slots"]))
        return {**head, "rank": None, "slots": slots}

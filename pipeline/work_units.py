"""Work-unit planning for the reader: which rows of which row group each (rank, worker) slot reads.

Why: dealing out whole (file, row group) fragments leaves slots idle when the layout is lopsided
(one file with one big row group put every row on one rank: rows_per_rank [240239, 0]). A work
unit is a row range [lo, hi) of one row group, so any layout can be cut into equal shares.

Two plans, both exactly once per epoch, both a pure function of (fragments, epoch, slots, shuffle,
seed), so every rank and every worker computes the same one without talking:

- `row_groups`: fragment k of the epoch's order goes whole to slot k % n_slots (the historical
  dealing). Kept whenever it is already balanced: slot shares within one batch of each other.
- `row_ranges`: the epoch's fragment order is laid end to end and cut into n_slots contiguous
  shares of floor/ceil(rows / n_slots); a cut may fall inside a row group (a partial unit).

Shuffle windows stay aligned to the row group (window w covers its rows [w*W, (w+1)*W)) and are
seeded by (seed, epoch, fragment, window), so a whole-fragment unit reads exactly as before.
Cost: Parquet cannot start decoding in the middle of a row group without a page index, so a unit
starting at row lo of a row group decodes and drops those lo rows first (`skipped_rows`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

ROW_GROUPS = "row_groups"
ROW_RANGES = "row_ranges"
PLANS = (ROW_GROUPS, ROW_RANGES)


@dataclass(frozen=True)
class Fragment:
    """One row group of one file, as listed in the metadata."""

    index: int  # position in the sorted list of all fragments (seeds the window shuffle)
    path: str
    row_group: int
    first_row: int  # row index (in the file) of the row group's first row
    num_rows: int


@dataclass(frozen=True)
class WorkUnit:
    """Rows [lo, hi) (counted from the row group's first row) of one fragment: what a slot reads."""

    fragment: Fragment
    lo: int
    hi: int

    @property
    def num_rows(self) -> int:
        return self.hi - self.lo

    def window_parts(self, window_rows: int, first: int = 0) -> Iterator[Tuple[int, int, int]]:
        """(window index, start, stop) of the unit's rows, in row-group coordinates, per shuffle
        window of the row group, from the window holding unit row `first` on."""
        w = (self.lo + first) // window_rows
        while w * window_rows < self.hi:
            yield w, max(self.lo, w * window_rows), min(self.hi, (w + 1) * window_rows)
            w += 1


def window_order(seed: int, epoch: int, fragment: int, window: int, n: int, shuffle: bool) -> np.ndarray:
    """Emission order of the `n` rows of one window (a permutation when shuffling)."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch, fragment, window]).permutation(n)


def fragment_order(n: int, epoch: int, shuffle: bool, seed: int) -> np.ndarray:
    """The epoch's order of the n fragments (a permutation seeded by (seed, epoch) when shuffling)."""
    return np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)


def deal_row_groups(fragments: Sequence[Fragment], epoch: int, n_slots: int, shuffle: bool,
                    seed: int) -> List[List[WorkUnit]]:
    """Plan `row_groups`: fragment k of the epoch's order, whole, to slot k % n_slots."""
    order = fragment_order(len(fragments), epoch, shuffle, seed)
    return [[WorkUnit(fragments[i], 0, fragments[i].num_rows) for i in order[s::n_slots]] for s in range(n_slots)]


def cut_row_ranges(fragments: Sequence[Fragment], epoch: int, n_slots: int, shuffle: bool,
                   seed: int) -> List[List[WorkUnit]]:
    """Plan `row_ranges`: the epoch's fragments end to end, cut into n_slots contiguous shares
    (slot s gets rows [s*N//n_slots, (s+1)*N//n_slots) of that sequence)."""
    order = fragment_order(len(fragments), epoch, shuffle, seed)
    total = sum(f.num_rows for f in fragments)
    bounds = [s * total // n_slots for s in range(n_slots + 1)]
    plan: List[List[WorkUnit]] = [[] for _ in range(n_slots)]
    start, s = 0, 0
    for i in order:
        frag = fragments[i]
        end = start + frag.num_rows
        while s < n_slots and bounds[s] < end:
            lo, hi = max(start, bounds[s]), min(end, bounds[s + 1])
            if hi > lo:
                plan[s].append(WorkUnit(frag, lo - start, hi - start))
            if bounds[s + 1] > end:
                break
            s += 1
        start = end
    return plan


def choose_plan(fragments: Sequence[Fragment], epoch: int, n_slots: int, shuffle: bool, seed: int,
                batch_size: int) -> str:
    """`row_groups` when whole fragments already give every slot a share within one batch of the
    others (the historical behaviour, unchanged); `row_ranges` otherwise."""
    rows = [sum(u.num_rows for u in units) for units in deal_row_groups(fragments, epoch, n_slots, shuffle, seed)]
    return ROW_GROUPS if max(rows) - min(rows) <= batch_size else ROW_RANGES


def plan_units(plan: str, fragments: Sequence[Fragment], epoch: int, n_slots: int, shuffle: bool,
               seed: int) -> List[List[WorkUnit]]:
    """The units of every slot for `epoch` under `plan`, each slot's list in reading order."""
    if plan == ROW_GROUPS:
        return deal_row_groups(fragments, epoch, n_slots, shuffle, seed)
    if plan == ROW_RANGES:
        return cut_row_ranges(fragments, epoch, n_slots, shuffle, seed)
    raise ValueError(f"unknown reader plan {plan!r}; expected one of {PLANS}")


def skipped_rows(units: Sequence[WorkUnit]) -> int:
    """Rows a slot decodes only to drop them: a unit starting at row lo of a row group decodes its
    first lo rows too (Parquet has no row-level seek without a page index)."""
    return sum(u.lo for u in units)


def balance_report(plan: List[List[WorkUnit]]) -> Dict[str, object]:
    """Per-slot rows and rows decoded-and-dropped, plus the split row groups (for jobs.check_data)."""
    rows = [sum(u.num_rows for u in units) for units in plan]
    skipped = [skipped_rows(units) for units in plan]
    split = sorted({(u.fragment.path, u.fragment.row_group, u.fragment.num_rows)
                    for units in plan for u in units if u.num_rows < u.fragment.num_rows})
    return {"rows_per_slot": rows, "skipped_per_slot": skipped, "split_row_groups": split}


def layout_warning(plan: List[List[WorkUnit]], data: str, min_rows: int = 8192) -> Optional[str]:
    """One line when the layout forces uneven read WORK that the plan cannot fix, else None.

    Rows are always balanced, but a row group split across slots makes the slots reading its later
    ranges decode the earlier rows first and drop them; warned when a slot decodes more than 10% of
    its share (and over `min_rows` rows) for nothing. The fix is in the files: smaller row groups.
    """
    report = balance_report(plan)
    rows, skipped = report["rows_per_slot"], report["skipped_per_slot"]
    worst = max(range(len(skipped)), key=skipped.__getitem__)
    if skipped[worst] <= max(0.1 * rows[worst], min_rows):
        return None
    path, row_group, n = max(report["split_row_groups"], key=lambda s: s[2])
    return (f"{data}: {len(report['split_row_groups'])} row group(s) are larger than a slot's share and split "
            f"across the {len(plan)} (rank, worker) slots (largest: {path} row group {row_group}, {n} rows); "
            f"rows stay balanced but Parquet cannot start reading inside a row group, so slot {worst} decodes "
            f"{skipped[worst]} rows it then drops on top of its own {rows[worst]}, and the slowest slot sets "
            f"the pace. Rewrite the files with row groups of 8192 rows: "
            f"pyarrow.parquet.write_table(pyarrow.parquet.read_table(IN), OUT, row_group_size=8192) per file")

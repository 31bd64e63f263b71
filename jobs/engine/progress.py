"""Progress bars of a job's long steps (training epochs, evaluation, scoring, DPO streaming): one rule for all.

How a bar behaves, everywhere:
  - rank 0 only (other ranks get tqdm's disabled bar, same API, draws nothing);
  - only while stderr is a terminal (tqdm's `disable=None`). Piped or redirected (CI, `make demo 2>&1 | tee`,
    tests, torchrun logs to files) nothing is drawn, so a captured log holds the job's own lines only: one
    line per epoch with its figures and rows/s (satrank.jobs.engine.trainer), never carriage-return frames;
  - transient (`leave=False`): on a terminal a finished bar is erased, and the epoch line stays.
Totals are this rank's rows before filtering (`BatchLoader.slot_rows`), so a bar can end short of its total.
The simulator (satrank.pipeline.sim.simulate) follows the same rule with its own bar: pipeline never imports jobs.
"""
from __future__ import annotations

import sys
from typing import Any, Optional

from tqdm import tqdm


def bar(desc: str, total: Optional[int] = None, *, main: bool = True, unit: str = "rows") -> tqdm:
    """A rows/s bar on stderr (`bar.update(batch.size)`); drawn only when `main` and stderr is a terminal."""
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True, leave=False,
                disable=None if main else True, file=sys.stderr)


def loader_bar(desc: str, loader: Any, *, main: bool = True) -> tqdm:
    """`bar` whose total is this rank's rows of `loader` in its current epoch (when it is a BatchLoader)."""
    slot_rows = getattr(loader, "slot_rows", None)
    return bar(desc, sum(slot_rows().values()) if slot_rows is not None else None, main=main)

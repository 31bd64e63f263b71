"""Causal per-user histories for converted logs: for every impression, the items of the user's earlier events of
one kind (clicked, satisfied, ...), oldest first, at most `max_len` (the most recent kept).

Why one vectorised function: every source (KuaiRand, rating data) must build its histories the same way, and only
from events *strictly before* the impression (an event at the same timestamp, the impression itself included,
is never in its own history: that would leak its labels). Events are sorted once by (user, time); each row's
history is the slice of its user's events before its time, found with two binary searches, so a million rows
take well under a second and no Python loop runs per row.
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import pyarrow as pa


def causal_histories(user: np.ndarray, time: np.ndarray, item: np.ndarray, kinds: Dict[str, np.ndarray],
                     max_lens: Dict[str, int]) -> Dict[str, pa.ListArray]:
    """list<int64> per kind: for row r, `item[e]` of the events e with kinds[name][e], user[e] == user[r] and
    time[e] < time[r], in (time, row) order, the last max_lens[name] of them.

    Rows may come in any order; events at equal times keep their row order (stable sort)."""
    user = np.asarray(user, dtype=np.int64)
    ranks = np.unique(np.asarray(time), return_inverse=True)[1].astype(np.int64).reshape(-1)
    n_ranks = int(ranks.max()) + 1 if len(ranks) else 1
    key = user * n_ranks + ranks  # (user, time) as one sortable int64: time rank < number of rows
    out: Dict[str, pa.ListArray] = {}
    for name, mask in kinds.items():
        events = np.flatnonzero(mask)
        events = events[np.argsort(key[events], kind="stable")]
        event_key, event_item = key[events], np.asarray(item, dtype=np.int64)[events]
        first = np.searchsorted(event_key, user * n_ranks, side="left")  # the user's first event
        before = np.searchsorted(event_key, key, side="left")  # events strictly before this row's time
        start = np.maximum(first, before - max_lens[name])
        lengths = before - start
        offsets = np.zeros(len(user) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        gather = np.repeat(start - offsets[:-1], lengths) + np.arange(offsets[-1])
        out[name] = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(event_item[gather], pa.int64())) \
            .cast(pa.list_(pa.int64()))
    return out

"""SAQRec's leave-one-out evaluation protocol (sec. 5.1.1-5.1.2): each user's most recent click is the
ground truth, ranked against 99 sampled items the user has not interacted with.

Why a module of its own: the candidate lists must be reproducible (a seed fixes them), exclusive (never an
interacted item, never a duplicate) and cheap for large vocabularies, so sampling is vectorised
rejection sampling in numpy. Item ids are the item vocabulary [0, n_items) of the data contract.

Determinism is per (seed, user): each user draws from its own counter-based splitmix64 stream, so a
user's negatives do not depend on which other users are in the call (a sharded evaluation builds the
same lists as a single-process one). Rows come out sorted by user id.
"""
from __future__ import annotations

from typing import Dict, Iterable, Mapping, Tuple

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MAX_WIDTH = 2048        # draws per pending row per rejection round (results do not depend on it)
_CHUNK_ROWS = 4096       # rows sampled together (bounds memory at ~CHUNK_ROWS * MAX_WIDTH draws)
_DENSE_FRACTION = 0.25   # enumerate the complement when fewer than this fraction of items is free


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _user_streams(users: np.ndarray, seed: int) -> np.ndarray:
    s = np.array([int(seed) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64)
    return _mix64(_mix64(s + _GOLDEN) ^ users.astype(np.int64).view(np.uint64))


def _draw(state: np.ndarray, counters: np.ndarray, n_items: int) -> np.ndarray:
    """Item draws [rows, len(counters)] from each row's stream; modulo bias <= n_items / 2**64."""
    z = _mix64(state[:, None] + (counters[None, :].astype(np.uint64) + np.uint64(1)) * _GOLDEN)
    return (z % np.uint64(n_items)).astype(np.int64)


def _in_sorted(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    if sorted_keys.size == 0:
        return np.zeros(keys.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)
    return sorted_keys[pos] == keys


def _sample_rejection(state: np.ndarray, forbidden: np.ndarray, n_items: int, n_neg: int,
                      free: np.ndarray) -> np.ndarray:
    """[R, n_neg]: for each row the first n_neg distinct draws of its stream that are not forbidden.
    `forbidden` holds sorted keys row * n_items + item (row local to this call)."""
    r = len(state)
    out = np.empty((r, n_neg), dtype=np.int64)
    filled = np.zeros(r, dtype=np.int64)
    pending = np.arange(r)
    counter = 0
    while pending.size:
        expect = np.ceil(1.5 * (n_neg - filled[pending]) * n_items / free[pending]).max()
        width = int(min(_MAX_WIDTH, max(16, expect)))
        draws = _draw(state[pending], np.arange(counter, counter + width), n_items)
        keys = pending[:, None] * n_items + draws
        first = np.zeros(keys.size, dtype=bool)
        first[np.unique(keys.ravel(), return_index=True)[1]] = True
        valid = first.reshape(keys.shape) & ~_in_sorted(keys, forbidden)
        rank = np.cumsum(valid, axis=1)
        take = valid & (rank <= (n_neg - filled[pending])[:, None])
        rr, cc = np.nonzero(take)
        rows = pending[rr]
        out[rows, filled[rows] + rank[rr, cc] - 1] = draws[rr, cc]
        forbidden = np.sort(np.concatenate([forbidden, keys[take]]))
        filled[pending] += take.sum(1)
        counter += width
        pending = pending[filled[pending] < n_neg]
    return out


def _sample_dense(state: np.ndarray, banned: np.ndarray, n_items: int, n_neg: int) -> np.ndarray:
    """One row whose free items are scarce: the n_neg free items with the smallest stream hash
    (a uniform sample without replacement, deterministic per (seed, user))."""
    free = np.setdiff1d(np.arange(n_items, dtype=np.int64), banned, assume_unique=False)
    h = _mix64(state ^ _mix64(free.view(np.uint64) + _GOLDEN))
    return free[np.argsort(h, kind="stable")[:n_neg]]


def build_loo_candidates(last_click: Mapping[int, int], interacted: Mapping[int, Iterable[int]],
                         n_items: int, n_neg: int = 99, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Leave-one-out candidate lists (SAQRec sec. 5.1.2).

    last_click: user -> ground-truth item (e.g. from `last_clicks`).
    interacted: user -> the items the user has interacted with (set / list / array); every user of
        `last_click` must have an entry. The ground truth is excluded whether or not it is listed.
    Returns (users int64 [N] ascending, items int64 [N, 1 + n_neg]) with items[:, 0] the ground
    truth and items[:, 1:] n_neg distinct items outside the user's interacted set, sampled
    uniformly without replacement. Raises ValueError for ids outside [0, n_items), missing users,
    or users with fewer than n_neg non-interacted items (all of them named, up to 10).
    """
    if int(n_items) != n_items or n_items < 2:
        raise ValueError(f"n_items: expected an integer >= 2, got {n_items!r}")
    if int(n_neg) != n_neg or n_neg < 1:
        raise ValueError(f"n_neg: expected an integer >= 1, got {n_neg!r}")
    n_items, n_neg = int(n_items), int(n_neg)
    if not last_click:
        raise ValueError("last_click: no users")
    users = np.array(sorted(last_click), dtype=np.int64)
    gt = np.array([last_click[u] for u in users.tolist()], dtype=np.int64)
    bad = (gt < 0) | (gt >= n_items)
    if bad.any():
        raise ValueError(f"last_click: item id(s) outside [0, {n_items}) for user(s) {users[bad][:10].tolist()}")
    missing = [u for u in users.tolist() if u not in interacted]
    if missing:
        raise ValueError(f"interacted: no entry for {len(missing)} user(s) of last_click, e.g. {missing[:10]}")

    per_user = [np.asarray(list(interacted[u]) if isinstance(interacted[u], (set, frozenset))
                           else interacted[u], dtype=np.int64).reshape(-1) for u in users.tolist()]
    lens = np.array([len(a) for a in per_user], dtype=np.int64)
    items = np.concatenate(per_user + [gt]) if per_user else gt
    rows = np.concatenate([np.repeat(np.arange(len(users)), lens), np.arange(len(users))])
    oob = (items < 0) | (items >= n_items)
    if oob.any():
        raise ValueError(f"interacted: item id(s) outside [0, {n_items}) for user(s) "
                         f"{np.unique(users[rows[oob]])[:10].tolist()}")
    forbidden = np.sort(rows * n_items + items)              # interacted + ground truth, sorted, unique
    forbidden = forbidden[np.append(True, forbidden[1:] != forbidden[:-1])]
    n_banned = np.bincount(forbidden // n_items, minlength=len(users))
    free = n_items - n_banned
    short = free < n_neg
    if short.any():
        eg = ", ".join(f"user {u}: {f} free of {n_items}" for u, f in zip(users[short][:10].tolist(),
                                                                            free[short][:10].tolist()))
        raise ValueError(f"cannot sample {n_neg} non-interacted items for {int(short.sum())} user(s) "
                         f"({eg}); lower n_neg or widen the item vocabulary")

    state = _user_streams(users, seed)
    neg = np.empty((len(users), n_neg), dtype=np.int64)
    dense = free < _DENSE_FRACTION * n_items
    for r in np.flatnonzero(dense).tolist():
        lo, hi = np.searchsorted(forbidden, [r * n_items, (r + 1) * n_items])
        neg[r] = _sample_dense(state[r:r + 1], forbidden[lo:hi] - r * n_items, n_items, n_neg)
    sparse_rows = np.flatnonzero(~dense)
    f_rows = forbidden // n_items
    for c in range(0, len(sparse_rows), _CHUNK_ROWS):
        rows_c = sparse_rows[c:c + _CHUNK_ROWS]
        # re-key this chunk's forbidden pairs to local rows 0..len(rows_c)-1
        sel = np.isin(f_rows, rows_c)
        local = np.searchsorted(rows_c, f_rows[sel]) * n_items + forbidden[sel] % n_items
        neg[rows_c] = _sample_rejection(state[rows_c], np.sort(local), n_items, n_neg, free[rows_c])
    return users, np.concatenate([gt[:, None], neg], axis=1)


def _as_np(x, name: str) -> np.ndarray:
    try:
        import torch
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {tuple(a.shape)}")
    return a


def last_clicks(user_ids, item_ids, timestamps, clicks) -> Dict[int, int]:
    """user -> item of the user's most recent click (rows with clicks == 1), vectorised.

    Ties (several clicks at the user's latest timestamp) go to the LARGEST item id, so the result
    does not depend on row order (shard or shuffle order). Users without any click are absent."""
    u = _as_np(user_ids, "user_ids")
    i = _as_np(item_ids, "item_ids")
    t = _as_np(timestamps, "timestamps")
    c = _as_np(clicks, "clicks")
    lens = {"user_ids": len(u), "item_ids": len(i), "timestamps": len(t), "clicks": len(c)}
    if len(set(lens.values())) != 1:
        raise ValueError(f"last_clicks: length mismatch {lens}")
    if not np.isin(c, (0, 1)).all():
        raise ValueError(f"clicks: must be 0/1, got values {np.unique(c)[:5].tolist()}")
    m = c == 1
    u, i, t = u[m].astype(np.int64), i[m].astype(np.int64), t[m].astype(np.int64)
    if u.size == 0:
        return {}
    order = np.lexsort((i, t, u))                 # by user, then timestamp, then item
    u, i = u[order], i[order]
    last = np.ones(u.size, dtype=bool)
    last[:-1] = u[1:] != u[:-1]
    return dict(zip(u[last].tolist(), i[last].tolist()))


def interactions_by_user(user_ids, item_ids, mask=None) -> Dict[int, np.ndarray]:
    """user -> sorted unique item ids (rows where `mask` is true, all rows when None), vectorised;
    e.g. the clicked items (mask = clicks == 1) to pass as `interacted`."""
    u = _as_np(user_ids, "user_ids").astype(np.int64)
    i = _as_np(item_ids, "item_ids").astype(np.int64)
    if len(u) != len(i):
        raise ValueError(f"interactions_by_user: length mismatch user_ids {len(u)} vs item_ids {len(i)}")
    if mask is not None:
        mk = _as_np(mask, "mask").astype(bool)
        if len(mk) != len(u):
            raise ValueError(f"mask: length {len(mk)} differs from user_ids {len(u)}")
        u, i = u[mk], i[mk]
    if u.size == 0:
        return {}
    pairs = np.unique(np.stack([u, i], axis=1), axis=0)     # sorted by user, then item
    cut = np.flatnonzero(pairs[1:, 0] != pairs[:-1, 0]) + 1
    return {int(g[0, 0]): g[:, 1] for g in np.split(pairs, cut)}

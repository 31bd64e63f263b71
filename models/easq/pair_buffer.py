"""Within-user preference pairs for EASQ's DPO: a bounded per-user buffer of recent answered impressions.

What is stored: each kept impression's RAW model inputs as plain tensors (`row_fields`: the ids of
every single-valued feature, each history padded to its max_len plus its length, the dense row), its
user/request/item ids, its kind, its propensity rho_hat and its clipped inverse propensity. Pairs are RESCORED by the
current model every step (`fields_to_batch` rebuilds a KeyedJaggedTensor Batch of the pair rows), so
DPO trains the current backbone and tables, never stale activations.

Pairs (w preferred over l), always of the SAME user:
  strong  (satisfied, dissatisfied), both answered. An unanswered impression is NEVER a dissatisfied
          example: unanswered rows are not stored at all, except
  weak    (satisfied, skipped and unanswered) of the same request, only with weak_pairs (off by default).
Users with only one kind of answer yield no pair; they contribute to L_sat only.
`sample(max_pairs)`: first the fresh rows (added since the last sample), each paired with up to
`pairs_per_row` opposite rows of its user, most recent first; then replay: random pairable users,
one random (satisfied, dissatisfied) pair each. No pair appears twice in a sample.
Pair weight: `product` w_w * w_l (the pair is observed only if both were answered, probability
~ rho_w rho_l) or `mean` (w_w + w_l) / 2, with w = 1 / max(rho_hat, M) (a skipped row's factor is 1),
times weak_pair_weight for weak pairs; the DPO loss self-normalises them.
Bounds: answered rows per user <= per_user (skipped rows too, separately), rows in all <= total;
the oldest go first. state_dict() holds only tensors, ints and lists (torch.load(weights_only=True)).
The buffer is per rank: a user's rows on another rank are not paired.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Deque, Dict, List, Optional, Tuple

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from satrank.models.stage1.losses import clipped_inverse_propensity
from satrank.pipeline.batch import Batch
from satrank.pipeline.features import DataConfig

KIND_DISSATISFIED, KIND_SATISFIED, KIND_SKIPPED = 0, 1, 2
_IDS = ("user_id", "request_id", "item_id")


# ------------------------------------------------------------------------------------------ rows
def row_fields(batch: Batch, data: DataConfig) -> Dict[str, torch.Tensor]:
    """Per-row model inputs of a Batch as fixed-shape tensors: single [B, n_single], seq:<name>
    [B, max_len] (left-aligned, 0-padded), len:<name> [B], dense [B, n_dense]."""
    kjt, B = batch.sparse, batch.size
    keys = set(kjt.keys())
    missing = [n for n in data.sparse_names if n not in keys]
    if missing:
        raise KeyError(f"pair buffer: batch KJT lacks features {missing} (has {sorted(keys)})")
    singles = []
    for f in data.sparse:
        jt = kjt[f.name]
        if not bool((jt.lengths() == 1).all()):
            raise ValueError(f"pair buffer: single-valued feature {f.name!r} has rows without exactly one id")
        singles.append(jt.values().long())
    dev = batch.dense.device
    out = {"single": torch.stack(singles, 1) if singles else torch.zeros(B, 0, dtype=torch.long, device=dev)}
    for f in data.sequence:
        jt = kjt[f.name]
        lengths = jt.lengths().long()
        if bool((lengths > f.max_len).any()):
            raise ValueError(f"pair buffer: sequence {f.name!r} has a row of {int(lengths.max())} ids > max_len {f.max_len}")
        mask = torch.arange(f.max_len, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)
        ids = torch.zeros(B, f.max_len, dtype=torch.long, device=lengths.device)
        ids[mask] = jt.values().long()
        out[f"seq:{f.name}"], out[f"len:{f.name}"] = ids, lengths
    out["dense"] = batch.dense.detach().clone()
    return out


def fields_to_batch(fields: Dict[str, torch.Tensor], data: DataConfig,
                    ids: Optional[Dict[str, torch.Tensor]] = None) -> Batch:
    """Inverse of `row_fields`: a Batch (KJT keyed by data.sparse_names) of the stored rows."""
    need = ["single", "dense"] + [f"{p}:{f.name}" for f in data.sequence for p in ("seq", "len")]
    missing = [k for k in need if k not in fields]
    if missing:
        raise KeyError(f"pair buffer: row fields lack {missing} (have {sorted(fields)})")
    single = fields["single"]
    R = single.shape[0]
    if single.shape[1] != len(data.sparse):
        raise ValueError(f"pair buffer: rows hold {single.shape[1]} single-valued ids, data has {len(data.sparse)}")
    values = [single[:, j] for j in range(single.shape[1])]
    lengths = [torch.ones(R * len(data.sparse), dtype=torch.int32, device=single.device)]
    for f in data.sequence:
        seq, ln = fields[f"seq:{f.name}"], fields[f"len:{f.name}"]
        mask = torch.arange(seq.shape[1], device=seq.device).unsqueeze(0) < ln.unsqueeze(1)
        values.append(seq[mask])
        lengths.append(ln.to(torch.int32))
    kjt = KeyedJaggedTensor(keys=data.sparse_names, values=torch.cat(values).long(), lengths=torch.cat(lengths))
    return Batch(sparse=kjt, dense=fields["dense"], ids=dict(ids or {}))


@dataclass
class PairSample:
    """R distinct rows (their fields and ids) and P pairs indexing them: rows w_index[p] over l_index[p]."""

    rows: Dict[str, torch.Tensor]
    ids: Dict[str, torch.Tensor]  # user_id, request_id, item_id, kind, seq: [R]
    w_index: torch.Tensor  # [P] int64
    l_index: torch.Tensor  # [P] int64
    weight: torch.Tensor  # [P] float32
    weak: torch.Tensor  # [P] bool

    @property
    def num_pairs(self) -> int:
        return int(self.w_index.numel())

    @property
    def num_rows(self) -> int:
        return int(self.ids["user_id"].numel())

    def batch(self, data: DataConfig) -> Batch:
        return fields_to_batch(self.rows, data, {k: self.ids[k] for k in _IDS})


# ------------------------------------------------------------------------------------------ buffer
class PairBuffer:
    """See the module doc. add(...) / add_batch(batch, data, propensity) store rows; sample(P) pairs."""

    def __init__(self, per_user: int = 32, total: int = 50000, pairs_per_row: int = 4, weak_pairs: bool = False,
                 weak_pair_weight: float = 0.5, pair_weight: str = "product", clip: float = 0.05, seed: int = 0) -> None:
        if per_user < 2 or total < per_user:
            raise ValueError(f"PairBuffer: need per_user >= 2 and total >= per_user, got {per_user}, {total}")
        if pair_weight not in ("product", "mean"):
            raise ValueError(f"PairBuffer: pair_weight must be 'product' or 'mean', got {pair_weight!r}")
        if pairs_per_row < 1:
            raise ValueError(f"PairBuffer: pairs_per_row must be >= 1, got {pairs_per_row}")
        self.per_user, self.total, self.pairs_per_row = per_user, total, pairs_per_row
        self.weak_pairs, self.weak_pair_weight, self.pair_weight, self.clip = weak_pairs, weak_pair_weight, pair_weight, clip
        self.seed = seed
        self._reset()

    @classmethod
    def from_config(cls, cfg) -> "PairBuffer":
        """From an satrank.models.easq.config.EasqConfig."""
        return cls(cfg.buffer_per_user, cfg.buffer_total, cfg.pairs_per_row, cfg.weak_pairs, cfg.weak_pair_weight,
                   cfg.pair_weight, cfg.clip, cfg.seed)

    def _reset(self) -> None:
        self._fields: Dict[str, torch.Tensor] = {}
        self._cap = 0
        self._meta: Dict[str, list] = {k: [] for k in ("user", "request", "item", "kind", "ipw", "rho", "seq", "live")}
        self._free: List[int] = []
        self._users: Dict[int, Tuple[List[int], List[int], List[int]]] = {}  # kind-indexed slot lists, oldest first
        self._order: Deque[Tuple[int, int]] = collections.deque()  # (seq, slot) by arrival
        self._live = 0
        self._next_seq = 0
        self._fresh: List[Tuple[int, int]] = []
        self._pairable: List[int] = []
        self._pairable_pos: Dict[int, int] = {}
        self._gen = torch.Generator().manual_seed(self.seed)

    def __len__(self) -> int:
        return self._live

    # ---------------------------------------------------------------- bookkeeping
    def _alive(self, slot: int, seq: int) -> bool:
        return slot < self._cap and self._meta["live"][slot] and self._meta["seq"][slot] == seq

    def _set_pairable(self, u: int) -> None:
        lists = self._users.get(u)
        ok = lists is not None and bool(lists[KIND_SATISFIED]) and bool(lists[KIND_DISSATISFIED])
        if ok and u not in self._pairable_pos:
            self._pairable_pos[u] = len(self._pairable)
            self._pairable.append(u)
        elif not ok and u in self._pairable_pos:
            i = self._pairable_pos.pop(u)
            last = self._pairable.pop()
            if last != u:
                self._pairable[i] = last
                self._pairable_pos[last] = i

    def _evict(self, slot: int) -> None:
        m = self._meta
        u, k = m["user"][slot], m["kind"][slot]
        lists = self._users[u]
        lists[k].remove(slot)
        m["live"][slot] = False
        self._free.append(slot)
        self._live -= 1
        if not any(lists):
            del self._users[u]
        self._set_pairable(u)

    def _grow(self, need: int) -> None:
        new = min(self.total, max(need, 2 * self._cap, 256))
        for k, v in self._fields.items():
            t = v.new_zeros((new,) + tuple(v.shape[1:]))
            t[: self._cap] = v
            self._fields[k] = t
        defaults = (("user", 0), ("request", 0), ("item", 0), ("kind", 0), ("ipw", 0.0), ("rho", 1.0),
                    ("seq", -1), ("live", False))
        for k, default in defaults:
            self._meta[k].extend([default] * (new - self._cap))
        self._free.extend(range(new - 1, self._cap - 1, -1))  # pop() hands out the lowest slot first
        self._cap = new

    def _place(self, u: int, req: int, item: int, kind: int, ipw: float, seq: int, rho: float = 1.0) -> int:
        """Metadata of one row (evicting to keep the bounds); returns its slot."""
        lists = self._users.get(u)
        if lists is not None:
            if kind == KIND_SKIPPED:
                if len(lists[KIND_SKIPPED]) >= self.per_user:
                    self._evict(lists[KIND_SKIPPED][0])
            elif len(lists[KIND_SATISFIED]) + len(lists[KIND_DISSATISFIED]) >= self.per_user:
                heads = [s for s in (lists[KIND_SATISFIED][:1] + lists[KIND_DISSATISFIED][:1])]
                self._evict(min(heads, key=lambda s: self._meta["seq"][s]))
        if self._live >= self.total:
            while self._order:
                s_seq, slot = self._order.popleft()
                if self._alive(slot, s_seq):
                    self._evict(slot)
                    break
        if not self._free:
            self._grow(self._cap + 1)
        slot = self._free.pop()
        m = self._meta
        m["user"][slot], m["request"][slot], m["item"][slot] = u, req, item
        m["kind"][slot], m["ipw"][slot], m["seq"][slot], m["live"][slot] = kind, ipw, seq, True
        m["rho"][slot] = rho
        self._users.setdefault(u, ([], [], []))[kind].append(slot)
        self._order.append((seq, slot))
        self._live += 1
        self._set_pairable(u)
        if len(self._order) > 2 * self.total + 16:  # drop stale (evicted) entries now and then
            self._order = collections.deque((sq, s) for sq, s in self._order if self._alive(s, sq))
        return slot

    def _write(self, slots: List[int], fields: Dict[str, torch.Tensor], rows: List[int]) -> None:
        if not self._fields:
            self._fields = {k: v.new_zeros((self._cap,) + tuple(v.shape[1:])) for k, v in fields.items()}
        if set(fields) != set(self._fields):
            raise ValueError(f"pair buffer: row fields {sorted(fields)} differ from the stored {sorted(self._fields)}")
        last: Dict[int, int] = {}
        for s, r in zip(slots, rows):
            last[s] = r  # a slot reused within one call keeps the later row
        if not last:
            return
        idx = torch.tensor(list(last.keys()), dtype=torch.long)
        src = torch.tensor(list(last.values()), dtype=torch.long)
        for k, v in fields.items():
            store = self._fields[k]
            if tuple(v.shape[1:]) != tuple(store.shape[1:]) or v.dtype != store.dtype:
                raise ValueError(f"pair buffer: field {k!r} is {v.dtype}{tuple(v.shape[1:])}, "
                                 f"stored {store.dtype}{tuple(store.shape[1:])}")
            store[idx] = v[src]

    # ---------------------------------------------------------------- adding
    def add(self, fields: Dict[str, torch.Tensor], user_id: torch.Tensor, answered: torch.Tensor,
            satisfied: torch.Tensor, propensity: torch.Tensor, skip: Optional[torch.Tensor] = None,
            request_id: Optional[torch.Tensor] = None, item_id: Optional[torch.Tensor] = None) -> int:
        """Store the answered rows (and, with weak_pairs, the skipped unanswered ones); returns how many."""
        B = user_id.numel()
        named = {"answered": answered, "satisfied": satisfied, "propensity": propensity, "skip": skip,
                 "request_id": request_id, "item_id": item_id}
        for k, t in [*named.items(), *fields.items()]:
            if t is not None and (t.dim() < 1 or t.shape[0] != B):
                raise ValueError(f"pair buffer: {k!r} has shape {tuple(t.shape)}, expected {B} rows like user_id")
        if self.weak_pairs and (skip is None or request_id is None):
            raise ValueError("pair buffer: weak_pairs needs the skip label and request_id of every row")
        ans = answered.detach().cpu() > 0.5
        keep = ans.clone()
        if self.weak_pairs:
            keep |= (~ans) & (skip.detach().cpu() > 0.5)
        rows = torch.nonzero(keep).flatten()
        if rows.numel() == 0:
            return 0
        rho = propensity.detach().cpu().double()[rows]
        if not bool(torch.isfinite(rho).all()) or bool(((rho < 0) | (rho > 1)).any()):
            raise ValueError(f"pair buffer: propensities of stored rows must be in [0, 1], got {rho[:4].tolist()}...")
        a = ans[rows]
        kind = torch.where(a, (satisfied.detach().cpu()[rows] > 0.5).long(), torch.full_like(rows, KIND_SKIPPED))
        ipw = torch.where(a, clipped_inverse_propensity(rho, self.clip), torch.ones_like(rho))
        zeros = torch.zeros(B, dtype=torch.long)
        cols = [t.detach().cpu().long()[rows].tolist() for t in (user_id, request_id if request_id is not None else zeros,
                                                                  item_id if item_id is not None else zeros)]
        slots = []
        for u, req, it, k, w, r in zip(*cols, kind.tolist(), ipw.tolist(), rho.tolist()):
            seq = self._next_seq
            self._next_seq += 1
            slot = self._place(u, req, it, k, w, seq, r)
            slots.append(slot)
            self._fresh.append((slot, seq))
        self._write(slots, {k: v.detach().cpu() for k, v in fields.items()}, rows.tolist())
        return len(slots)

    def add_batch(self, batch: Batch, data: DataConfig, propensity: torch.Tensor) -> int:
        """`add` with the fields, labels and ids of a Batch (labels questionnaire_answered, satisfied; ids user_id)."""
        for name in ("questionnaire_answered", "satisfied") + (("skip",) if self.weak_pairs else ()):
            if name not in batch.labels:
                raise KeyError(f"pair buffer: batch has no label {name!r} (have {sorted(batch.labels)})")
        if "user_id" not in batch.ids:
            raise KeyError(f"pair buffer: batch has no ids['user_id'] (have {sorted(batch.ids)})")
        return self.add(row_fields(batch, data), batch.ids["user_id"], batch.labels["questionnaire_answered"],
                        batch.labels["satisfied"], propensity, batch.labels.get("skip"),
                        batch.ids.get("request_id"), batch.ids.get("item_id"))

    # ---------------------------------------------------------------- sampling
    def user_rows(self, user: int) -> Dict[str, List[int]]:
        """Stored item ids of one user by kind, oldest first (inspection and tests)."""
        lists = self._users.get(int(user), ([], [], []))
        it = self._meta["item"]
        return {"dissatisfied": [it[s] for s in lists[0]], "satisfied": [it[s] for s in lists[1]],
                "skipped": [it[s] for s in lists[2]]}

    def stored(self) -> Dict[str, torch.Tensor]:
        """Every stored row's user_id, request_id, item_id, kind, rho (the propensity it was added with) and ipw,
        oldest first (inspection and tests)."""
        m = self._meta
        live = sorted((m["seq"][s], s) for s in range(self._cap) if m["live"][s])
        col = lambda k, dt: torch.tensor([m[k][s] for _, s in live], dtype=dt)  # noqa: E731
        return {"user_id": col("user", torch.long), "request_id": col("request", torch.long),
                "item_id": col("item", torch.long), "kind": col("kind", torch.long),
                "rho": col("rho", torch.float64), "ipw": col("ipw", torch.float64)}

    def _randint(self, n: int) -> int:
        return int(torch.randint(n, (1,), generator=self._gen))

    def sample(self, max_pairs: int) -> PairSample:
        """Fresh pairs first, then replay (see the module doc); consumes the fresh list."""
        if max_pairs < 1:
            raise ValueError(f"pair buffer: max_pairs must be >= 1, got {max_pairs}")
        m, ppr = self._meta, self.pairs_per_row
        pairs: List[Tuple[int, int, bool]] = []
        seen = set()

        def push(w: int, l: int, weak: bool) -> None:
            if (w, l) not in seen and len(pairs) < max_pairs:
                seen.add((w, l))
                pairs.append((w, l, weak))

        for slot, seq in self._fresh:
            if len(pairs) >= max_pairs:
                break
            if not self._alive(slot, seq):
                continue
            lists, k, req = self._users[m["user"][slot]], m["kind"][slot], m["request"][slot]
            if k == KIND_SATISFIED:
                for p in lists[KIND_DISSATISFIED][::-1][:ppr]:
                    push(slot, p, False)
                if self.weak_pairs:
                    for p in [p for p in lists[KIND_SKIPPED][::-1] if m["request"][p] == req][:ppr]:
                        push(slot, p, True)
            elif k == KIND_DISSATISFIED:
                for p in lists[KIND_SATISFIED][::-1][:ppr]:
                    push(p, slot, False)
            else:
                for p in [p for p in lists[KIND_SATISFIED][::-1] if m["request"][p] == req][:ppr]:
                    push(p, slot, True)
        self._fresh = []
        tries = 0
        while len(pairs) < max_pairs and self._pairable and tries < 4 * max_pairs:
            tries += 1
            lists = self._users[self._pairable[self._randint(len(self._pairable))]]
            sat, dis = lists[KIND_SATISFIED], lists[KIND_DISSATISFIED]
            push(sat[self._randint(len(sat))], dis[self._randint(len(dis))], False)
        return self._make_sample(pairs)

    def _make_sample(self, pairs: List[Tuple[int, int, bool]]) -> PairSample:
        m = self._meta
        order: List[int] = []
        pos: Dict[int, int] = {}
        for w, l, _ in pairs:
            for s in (w, l):
                if s not in pos:
                    pos[s] = len(order)
                    order.append(s)
        idx = torch.tensor(order, dtype=torch.long)
        rows = {k: v[idx] for k, v in self._fields.items()}  # advanced indexing copies
        ids = {"user_id": torch.tensor([m["user"][s] for s in order], dtype=torch.long),
               "request_id": torch.tensor([m["request"][s] for s in order], dtype=torch.long),
               "item_id": torch.tensor([m["item"][s] for s in order], dtype=torch.long),
               "kind": torch.tensor([m["kind"][s] for s in order], dtype=torch.long),
               "seq": torch.tensor([m["seq"][s] for s in order], dtype=torch.long)}
        ww = torch.tensor([m["ipw"][w] for w, _, _ in pairs], dtype=torch.float64)
        wl = torch.tensor([m["ipw"][l] for _, l, _ in pairs], dtype=torch.float64)
        weak = torch.tensor([k for _, _, k in pairs], dtype=torch.bool)
        weight = ww * wl if self.pair_weight == "product" else (ww + wl) / 2
        weight = torch.where(weak, weight * self.weak_pair_weight, weight).float()
        return PairSample(rows, ids, torch.tensor([pos[w] for w, _, _ in pairs], dtype=torch.long),
                          torch.tensor([pos[l] for _, l, _ in pairs], dtype=torch.long), weight, weak)

    # ---------------------------------------------------------------- checkpointing
    def state_dict(self) -> Dict[str, object]:
        m = self._meta
        live = sorted((m["seq"][s], s) for s in range(self._cap) if m["live"][s])
        slots = torch.tensor([s for _, s in live], dtype=torch.long)
        col = lambda k, dt: torch.tensor([m[k][s] for _, s in live], dtype=dt)  # noqa: E731
        return {
            "version": 1,
            "fields": {k: v[slots].clone() for k, v in self._fields.items()},
            "user": col("user", torch.long), "request": col("request", torch.long), "item": col("item", torch.long),
            "kind": col("kind", torch.long), "ipw": col("ipw", torch.float64), "rho": col("rho", torch.float64),
            "seq": col("seq", torch.long),
            "next_seq": self._next_seq,
            "fresh_seq": torch.tensor([sq for s, sq in self._fresh if self._alive(s, sq)], dtype=torch.long),
            "pairable": torch.tensor(self._pairable, dtype=torch.long),
            "rng": self._gen.get_state(),
        }

    def load_state_dict(self, st: Dict[str, object]) -> None:
        if st.get("version") != 1:
            raise ValueError(f"pair buffer: unknown state version {st.get('version')!r}")
        self._reset()
        n = int(st["seq"].numel())
        rho = st["rho"].tolist() if "rho" in st else [float("nan")] * n  # states written before rho was kept
        slots = [self._place(int(u), int(r), int(i), int(k), float(w), int(sq), float(p))
                 for u, r, i, k, w, sq, p in zip(st["user"].tolist(), st["request"].tolist(), st["item"].tolist(),
                                                 st["kind"].tolist(), st["ipw"].tolist(), st["seq"].tolist(), rho)]
        if n:
            self._write(slots, st["fields"], list(range(n)))
        self._next_seq = int(st["next_seq"])
        by_seq = {self._meta["seq"][s]: s for s in range(self._cap) if self._meta["live"][s]}
        self._fresh = [(by_seq[sq], sq) for sq in st["fresh_seq"].tolist() if sq in by_seq]
        saved = [u for u in st["pairable"].tolist() if u in self._pairable_pos]
        rest = [u for u in self._pairable if u not in set(saved)]
        self._pairable = saved + rest
        self._pairable_pos = {u: i for i, u in enumerate(self._pairable)}
        self._gen.set_state(st["rng"])

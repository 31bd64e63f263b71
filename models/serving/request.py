"""Request-level serving: ONE request (a user and C candidates) per call, the user side computed once.

Why: the per-candidate artifact (satrank.models.serving.module.ServingModule) scores one row per
candidate, so the ranker's history Transformers, SID, MLSE and g's history scores run C times per
request although they depend only on the user. Here they run once on one row, and only the
candidate-dependent part runs over the C candidates:

  once per request   the user's lookups (user features, every history), g's MLSE scores of the click
                     history, SAQRecRanker.user_side: the encoders, SID, MLSE, v_u and the gated fusion u_f
  per candidate      the candidate's lookups (item id + attributes) and dense columns,
                     SAQRecRanker.score_candidates: v_i and every head's tower, then the fusion of the heads

(In SAQRec no attention or gate takes the candidate as its query: SID attends with the satisfied /
dissatisfied history encodings, MLSE groups by g's scores of the history, and the fusion gate reads only
user-side vectors; the candidate meets the user only in the towers.) The ranker's training forward is
exactly user_side + score_candidates, so both artifacts run one code path.

Input signature (`forward`, `interface()` in the manifest), keys in manifest `request_interface` order:
  user_ids         int64 [U]            one id per user-side single-valued key (`user_keys`)
  history_values   int64 [sum lengths]  the history ids, key-major over `history_keys`, oldest first
  history_lengths  int32 [H]            ids of each history key (0 = empty; longer than max_len: last ids kept)
  item_ids         int64 [I, C]         row i = the C candidates' ids of item key `item_keys[i]`
  dense            float32 [C, D]       the candidates' dense columns, transforms applied
  -> one float32 [C] per served head, then score (as the per-candidate artifact)
Ids have had their vocabulary policy applied, as for model.pt.

Batch scoring (satrank.jobs.score, score.request_level) runs the same core over reader Batches:
RequestBatchScorer groups a batch's rows by request_id and calls `user_state` once for all its requests, then
`candidates` for all its rows.

Kinds: `ranker` and `easq` (its folded ServingRanker) are request-level; the stage-1 `click` /
`satisfaction` models are not (`RequestLevelError` names the kind; their per-candidate model.pt serves).
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from satrank.models.common.fusion import Fusion, FusionConfig
from satrank.models.ranker.heads import HeadSpec
from satrank.models.serving.module import model_heads, plain_copy
from satrank.pipeline.errors import DataError
from satrank.pipeline.features import DataConfig

REQUEST_FILE = "model_request.pt"
REQUEST_KINDS = ("ranker", "easq")  # model kinds with a user_side / score_candidates split (stage-1 models have none)


class RequestLevelError(ValueError):
    """This model cannot be served request-level; the message names the kind or feature and why."""


def split_keys(data: DataConfig, model_cfg: Any, g: Any = None) -> Dict[str, List[str]]:
    """{user_keys, history_keys, item_keys}: the candidate's keys are model.item_feature and
    model.item_attr_features; every other single-valued key and every sequence belongs to the user.
    RequestLevelError when a user-side input of the ranker or of g would read a candidate key."""
    item = [f.name for f in data.sparse if f.name == model_cfg.item_feature or f.name in model_cfg.item_attr_features]
    user = [f.name for f in data.sparse if f.name not in item]
    bad = [n for n in model_cfg.user_features if n in item]
    if bad:
        raise RequestLevelError(f"request-level serving: model.user_features {bad} are candidate features "
                                "(model.item_feature / item_attr_features); the user side would depend on the candidate")
    if g is not None:
        bad = [n for n in g.arch.tower.user_features if n in item]
        if bad:
            raise RequestLevelError(f"request-level serving: the satisfaction model g's tower.user_features {bad} are "
                                    "candidate features; its MLSE history scores would depend on the candidate")
    if not user:
        raise RequestLevelError("request-level serving: the data has no user-side single-valued feature")
    return {"user_keys": user, "history_keys": [f.name for f in data.sequence], "item_keys": item}


class RequestCore(nn.Module):
    """The traced part: forward(user_ids, history_values, history_lengths, item_ids, dense) -> (heads..., score).

    Built from the eager task of a `ranker` / `easq` run (satrank.models.ranker.task.RankerTask) with every
    SparseArch replaced by a PlainSparseArch, so the trace holds aten ops only (like model.pt)."""

    def __init__(self, model: nn.Module, kind: str, data: DataConfig, fusion_cfg: FusionConfig,
                 specs: Sequence[HeadSpec]) -> None:
        super().__init__()
        from satrank.models.ranker.task import RankerTask, Teacher

        if kind not in REQUEST_KINDS or not isinstance(model, RankerTask):
            raise RequestLevelError(f"request-level serving: model kind {kind!r} ({type(model).__name__}) is not a "
                                    "stage-2 ranker; only 'ranker' and 'easq' runs are request-level, the per-candidate "
                                    "model.pt serves this one")
        ranker = model.ranker.ranker
        if not (hasattr(ranker, "user_side") and hasattr(ranker, "score_candidates")):
            raise RequestLevelError(f"request-level serving: {type(ranker).__name__} has no user_side / score_candidates "
                                    "split (an unmerged EASQ model? load it with satrank.jobs.engine.runs.load_model)")
        self.data, self.model_cfg = data, model.model_cfg
        self.keys = split_keys(data, model.model_cfg, model.g)
        self.task = plain_copy(model, data.sparse_names)
        self.ranker = self.task.ranker.ranker
        self.teacher = None
        if self.task.g is not None and self.task.teacher.scores:  # MLSE's history scores; g's pseudo-labels are training-only
            self.teacher = Teacher(self.task.teacher.history, scores=True, pseudo=False)
        # model.served_satisfaction: teacher -> the served satisfaction is g(u, candidate): g's user half once per
        # request, its item half per candidate (the way MLSE scores history items), like RankerLoss serves it
        self.g_item_index: Optional[int] = None
        if self.task.g is not None and self.task.loss_fn.served_teacher:
            g_items = self.task.g.arch.tower.item_features
            if len(g_items) != 1 or g_items[0] not in self.keys["item_keys"]:
                raise RequestLevelError(f"request-level serving: g's tower.item_features {g_items} must be one candidate "
                                        f"key of {self.keys['item_keys']} to serve g's satisfaction estimate")
            self.g_item_index = self.keys["item_keys"].index(g_items[0])
        self.specs = list(specs)
        self.heads = model_heads(self.task, data, [s.name for s in specs])
        self.fusion = Fusion(fusion_cfg, specs, self.heads)
        self.outputs = self.fusion.outputs

    def user_state(self, user_ids: torch.Tensor, history_values: torch.Tensor, history_lengths: torch.Tensor,
                   rows: int = 1) -> Tuple[Dict[str, torch.Tensor], Any]:
        """SAQRecRanker.user_side on `rows` user rows ({"user": u_f [rows, d], ...}) and g's lookups of them (None
        when g is not needed). The artifact passes one request's user (rows=1); the batch scorer
        (RequestBatchScorer) passes one user per request of a batch, key-major: user_ids [U*rows], lengths [H*rows]."""
        from satrank.models.ranker.saqrec import user_inputs

        keys = self.keys["user_keys"] + self.keys["history_keys"]
        values = torch.cat([user_ids, history_values])
        lengths = torch.cat([torch.ones_like(user_ids, dtype=torch.int32), history_lengths.to(torch.int32)])
        sp = self.task.sparse_arch.lookup(values, lengths, keys)
        extras: Dict[str, torch.Tensor] = {}
        gsp = None
        if self.teacher is not None or self.g_item_index is not None:
            g = self.task.g
            gsp = g.sparse_arch.lookup(values, lengths, keys)
            # g's history / candidate scores compute g's whole tower but read only its user half: its item half
            # gets a placeholder row (the items are scored through g's item MLP)
            for n in g.arch.tower.item_features:
                gsp.pooled[n] = values.new_zeros(rows, g.sparse_arch.feature_dim(n), dtype=torch.float32)
        if self.teacher is not None:
            dense = torch.zeros(rows, len(self.data.dense), dtype=torch.float32, device=values.device)
            extras.update(self.teacher(gsp, dense, self.task.g))
        return self.ranker.user_side(user_inputs(sp, self.model_cfg, self.data, extras)), gsp

    def served_teacher(self, gsp: Any, item_ids: torch.Tensor, index: Optional[torch.Tensor] = None,
                       rows: int = 1) -> torch.Tensor:
        """g(u, candidate) logits [C]: each candidate's item embedding in g's table against its user row of `gsp`
        (the one request's; with `index` [C], row index[c] of `rows` user rows)."""
        g = self.task.g
        name = g.arch.tower.item_features[0]
        ids = item_ids[self.g_item_index]
        items = g.sparse_arch.lookup(ids, torch.ones_like(ids, dtype=torch.int32), [name]).pooled[name]
        dense = torch.zeros(rows, len(self.data.dense), dtype=torch.float32, device=ids.device)
        if index is None:
            return g.arch.history_logits(gsp.pooled, gsp.sequences, dense, items.unsqueeze(0)).reshape(-1)
        return g.arch.history_logits(gsp.pooled, gsp.sequences, dense, items.unsqueeze(1), rows=index).reshape(-1)

    def candidates(self, state: Dict[str, torch.Tensor], gsp: Any, item_ids: torch.Tensor, dense: torch.Tensor,
                   index: Optional[torch.Tensor] = None, rows: int = 1):
        """The per-candidate part against `user_state`'s output -> (heads..., score), each [C]: the candidates'
        lookups, SAQRecRanker.score_candidates, g's served estimate, the fusion. `index` [C] (batch scoring):
        the user row of each candidate among `rows` user rows; None: the one request's user row for all."""
        from satrank.models.ranker.saqrec import item_inputs

        flat = item_ids.reshape(-1)
        sp = self.task.sparse_arch.lookup(flat, torch.ones_like(flat, dtype=torch.int32), self.keys["item_keys"])
        if index is not None:  # one state row per candidate; score_candidates broadcasts only a single row
            state = {k: v[index] for k, v in state.items()}
        out = self.ranker.score_candidates(state, item_inputs(sp, dense, self.model_cfg, self.data))
        if self.g_item_index is not None and "satisfaction" in out:
            out = {**out, "satisfaction": self.served_teacher(gsp, item_ids, index, rows)}
        return self.fusion({n: out.get(n) for n in self.heads})

    def forward(self, user_ids: torch.Tensor, history_values: torch.Tensor, history_lengths: torch.Tensor,
                item_ids: torch.Tensor, dense: torch.Tensor):
        state, gsp = self.user_state(user_ids, history_values, history_lengths)
        return self.candidates(state, gsp, item_ids, dense)


class RequestBatchScorer:
    """`Scorer` (satrank.models.serving.module) over reader Batches that runs RequestCore request by request:
    the rows of a batch are grouped by request_id, `user_state` runs ONCE per request (on the request's first
    row in the batch, all requests of the batch in one call) and `candidates` scores every row against its
    request's user state. satrank.jobs.score uses it under score.request_level (docs/serving.md).

    Why per batch: the reader cuts batches by rows, so a request may span two batches; each batch then computes
    that request's user side from its own rows, the same values, and the scores do not depend on the cut.
    A request's rows must repeat one user side (every key of `user_keys` and `history_keys`); a row that differs
    from the request's first row (in its batch or an earlier batch of the same file) is a DataError naming the
    file, the request_id, both rows (counted from 0 over the file's scored rows) and the feature: one user state
    per request cannot score it, and a silent per-row fallback would hide a broken candidate set.
    Call `begin_file(name)` before the batches of each file."""

    def __init__(self, core: RequestCore, device: torch.device | str = "cpu") -> None:
        self.core = core.eval().to(device)
        self.device = torch.device(device)
        self.specs, self.heads, self.outputs = core.specs, core.heads, core.outputs
        self.user_keys, self.history_keys = core.keys["user_keys"], core.keys["history_keys"]
        self.item_keys = core.keys["item_keys"]
        self.max_len = {f.name: f.max_len for f in core.data.sequence}
        self.begin_file("batch")

    def begin_file(self, name: str) -> None:
        """Start a file: errors name `name`, rows count from 0 and the user sides of its requests are remembered
        from here on (to check a request cut by a batch boundary across both batches)."""
        self.where, self.offset = name, 0
        self.seen: Dict[int, Tuple[Any, int]] = {}

    def user_rows(self, batch: Any) -> Tuple[torch.Tensor, List[Tuple[str, int]], Dict[str, torch.Tensor]]:
        """(each row's user side int64 [B, W]: the user keys' ids, then per history its length and its last max_len
        ids, -1 padded; the (feature, width) of each column span; the candidate keys' ids [B] by name)."""
        kjt, n = batch.sparse, batch.size
        names = list(kjt.keys())
        per_key = dict(zip(names, torch.split(kjt.values(), kjt.length_per_key())))
        lengths = dict(zip(names, kjt.lengths().view(len(names), n).long()))
        cols = [torch.stack([per_key[k] for k in self.user_keys], 1)]
        spans = [(k, 1) for k in self.user_keys]
        for name in self.history_keys:
            vals, lens, width = per_key[name], lengths[name], self.max_len[name]
            keep = lens.clamp(max=width)
            pos = torch.arange(width)
            mask = pos < keep.unsqueeze(1)
            idx = (torch.cumsum(lens, 0) - keep).unsqueeze(1) + pos  # the last max_len ids, as the lookups keep
            padded = torch.cat([vals, vals.new_full((1,), -1)])[torch.where(mask, idx, vals.numel())]
            cols += [lens.unsqueeze(1), padded]
            spans.append((name, 1 + width))
        return torch.cat(cols, 1), spans, {k: per_key[k] for k in self.item_keys}

    def _feature(self, spans: List[Tuple[str, int]], col: int) -> str:
        for name, width in spans:
            if col < width:
                return name
            col -= width
        return "?"

    def _mismatch(self, rid: int, first: int, row: int, feature: str) -> DataError:
        return DataError(f"{self.where}: request_id {rid}: rows {first} and {row} differ in the user-side feature "
                         f"{feature!r}; request-level scoring (score.request_level) computes one user side per request, "
                         "so a request's rows must repeat its user's features and histories (fix the candidates, or "
                         "score per row with --set score.request_level=false)")

    def check(self, user: torch.Tensor, spans: List[Tuple[str, int]], rid: torch.Tensor, uniq: torch.Tensor,
              first: torch.Tensor, inverse: torch.Tensor) -> None:
        """DataError unless every row repeats its request's first row, in this batch and in earlier batches."""
        diff = user != user[first[inverse]]
        bad = diff.any(1)
        if bool(bad.any()):
            row = int(bad.nonzero()[0])
            raise self._mismatch(int(rid[row]), self.offset + int(first[inverse[row]]), self.offset + row,
                                 self._feature(spans, int(diff[row].nonzero()[0])))
        reps = user[first].numpy()
        for r, key in enumerate(uniq.tolist()):
            prev = self.seen.setdefault(key, (reps[r], self.offset + int(first[r])))
            if prev[1] != self.offset + int(first[r]) and not np.array_equal(prev[0], reps[r]):
                raise self._mismatch(key, prev[1], self.offset + int(first[r]),
                                     self._feature(spans, int(np.flatnonzero(prev[0] != reps[r])[0])))

    def __call__(self, batch: Any) -> Dict[str, torch.Tensor]:
        n = batch.size
        if n == 0:
            return {name: torch.zeros(0) for name in self.outputs}
        rid = batch.ids["request_id"]
        user, spans, items = self.user_rows(batch)
        uniq, inverse = torch.unique(rid, return_inverse=True)
        rows = int(uniq.numel())
        first = torch.full((rows,), n, dtype=torch.long).scatter_reduce(0, inverse, torch.arange(n), "amin")
        self.check(user, spans, rid, uniq, first, inverse)
        reps = user[first]  # one row per request: its user ids, then per history (length, ids)
        n_user = len(self.user_keys)
        values, lengths, col = [], [], n_user
        for _, width in spans[n_user:]:
            keep = reps[:, col].clamp(max=width - 1)
            values.append(reps[:, col + 1:col + width][torch.arange(width - 1) < keep.unsqueeze(1)])
            lengths.append(keep.to(torch.int32))
            col += width
        dev = self.device
        with torch.inference_mode():
            state, gsp = self.core.user_state(reps[:, :n_user].t().reshape(-1).to(dev), torch.cat(values).to(dev),
                                              torch.cat(lengths).to(dev), rows=rows)
            parts = self.core.candidates(state, gsp, torch.stack([items[k] for k in self.item_keys]).to(dev),
                                         batch.dense.to(dev), inverse.to(dev), rows=rows)
        self.offset += n
        return {name: t.cpu() for name, t in zip(self.outputs, parts)}


class RequestModule(nn.Module):
    """The published module (torch.jit.script): input checks with one-line messages, then the traced core.
    A bad request raises ValueError 'request: ...' (TorchScript shows it as the last line of its error)."""

    def __init__(self, core: torch.jit.ScriptModule, n_user: int, n_history: int, n_item: int, n_dense: int) -> None:
        super().__init__()
        self.core = core
        self.n_user, self.n_history, self.n_item, self.n_dense = n_user, n_history, n_item, n_dense

    def forward(self, user_ids: torch.Tensor, history_values: torch.Tensor, history_lengths: torch.Tensor,
                item_ids: torch.Tensor, dense: torch.Tensor):
        if user_ids.dim() != 1 or user_ids.size(0) != self.n_user or user_ids.dtype != torch.int64:
            raise ValueError("request: user_ids must be int64 [{}], got {} {}".format(
                self.n_user, user_ids.dtype, user_ids.shape))
        if history_lengths.dim() != 1 or history_lengths.size(0) != self.n_history:
            raise ValueError("request: history_lengths must be [{}], got {}".format(self.n_history, history_lengths.shape))
        if history_values.dim() != 1 or history_values.size(0) != int(history_lengths.sum()):
            raise ValueError("request: history_values has {} ids but history_lengths sum to {}".format(
                history_values.size(0), int(history_lengths.sum())))
        if item_ids.dim() != 2 or item_ids.size(0) != self.n_item or item_ids.dtype != torch.int64:
            raise ValueError("request: item_ids must be int64 [{}, C], got {} {}".format(
                self.n_item, item_ids.dtype, item_ids.shape))
        if item_ids.size(1) == 0:
            raise ValueError("request: no candidates (item_ids is [{}, 0])".format(self.n_item))
        if dense.dim() != 2 or dense.size(0) != item_ids.size(1) or dense.size(1) != self.n_dense:
            raise ValueError("request: dense must be [C={}, {}] like item_ids' {} candidates, got {}".format(
                item_ids.size(1), self.n_dense, item_ids.size(1), dense.shape))
        return self.core(user_ids, history_values, history_lengths, item_ids, dense.to(torch.float32))


def example_request(data: DataConfig, keys: Dict[str, List[str]], candidates: int, seed: int = 0,
                    history: str = "half") -> Tuple[torch.Tensor, ...]:
    """Random valid request inputs; `history`: 'empty', 'half' or 'full' (every history at that fill)."""
    g = torch.Generator().manual_seed(seed)
    feats = {f.name: f for f in [*data.sparse, *data.sequence]}
    user = torch.stack([torch.randint(0, feats[n].num_rows, (), generator=g) for n in keys["user_keys"]])
    fill = {"empty": 0.0, "half": 0.5, "full": 1.0}[history]
    lengths = torch.tensor([int(feats[n].max_len * fill) for n in keys["history_keys"]], dtype=torch.int32)
    values = [torch.randint(0, feats[n].num_rows, (int(k),), generator=g) for n, k in zip(keys["history_keys"], lengths)]
    items = torch.stack([torch.randint(0, feats[n].num_rows, (candidates,), generator=g) for n in keys["item_keys"]])
    dense = torch.rand(candidates, len(data.dense), generator=g) * 3
    return user, torch.cat(values) if values else torch.zeros(0, dtype=torch.int64), lengths, items, dense


def build_request_module(model: nn.Module, kind: str, data: DataConfig, fusion_cfg: FusionConfig,
                         specs: Sequence[HeadSpec], trace_candidates: int = 64) -> torch.jit.ScriptModule:
    """RequestCore traced on an example request (half-full histories, `trace_candidates` candidates; the
    candidate count stays dynamic), wrapped in the scripted RequestModule. RequestLevelError if not possible."""
    core = RequestCore(model, kind, data, fusion_cfg, specs).eval()
    example = example_request(data, core.keys, trace_candidates, seed=0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*is_fx_tracing.*")
        traced = torch.jit.trace(core, example, check_trace=False)
    wrapper = RequestModule(traced, len(core.keys["user_keys"]), len(core.keys["history_keys"]),
                            len(core.keys["item_keys"]), len(data.dense))
    scripted = torch.jit.script(wrapper.eval())
    scripted.outputs, scripted.keys = list(core.outputs), core.keys  # Python-side attributes for the export
    return scripted


def interface(keys: Dict[str, List[str]], dense: Sequence[str], outputs: Sequence[str]) -> Dict[str, Any]:
    """The manifest's `request_interface`: the input signature of model_request.pt."""
    return {
        "file": REQUEST_FILE, "format": "torchscript (torch.jit.script wrapper around torch.jit.trace)",
        "load": "torch.jit.load(path, map_location='cpu')", **{k: list(v) for k, v in keys.items()},
        "dense": list(dense),
        "inputs": [
            {"name": "user_ids", "dtype": "int64", "shape": ["len(user_keys)"], "doc": "one id per user key"},
            {"name": "history_values", "dtype": "int64", "shape": ["sum(history_lengths)"],
             "doc": "history ids, key-major in history_keys order, oldest first"},
            {"name": "history_lengths", "dtype": "int32", "shape": ["len(history_keys)"],
             "doc": "ids per history key (0 = empty; only the last max_len ids are used)"},
            {"name": "item_ids", "dtype": "int64", "shape": ["len(item_keys)", "C"],
             "doc": "row i: the C candidates' ids of item_keys[i]"},
            {"name": "dense", "dtype": "float32", "shape": ["C", "len(dense)"], "doc": "candidates' dense, transformed"}],
        "outputs": [{"name": n, "dtype": "float32", "shape": ["C"]} for n in outputs],
        "computed_once": "user lookups, g's MLSE history scores, history encoders, SID, MLSE, v_u, fusion u_f",
        "per_candidate": "item lookups, v_i, the head towers, the score fusion",
        "errors": "a malformed request raises ValueError 'request: ...' naming the input",
    }

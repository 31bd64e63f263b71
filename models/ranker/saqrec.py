"""The stage-2 ranker: SAQRec (sec. 4.3-4.4, eqs. 7-14) and the click-only SASRec-style baseline.

`SAQRecRanker.forward(RankerInputs) -> Dict[str, Tensor]` works on plain tensors (pooled vectors,
padded histories + masks, dense), so it is testable without TorchRec; `ranker_inputs` adapts a
`satrank.embeddings.tables.SparseOutput` and `build_ranker` sizes the ranker from the data contract.

User side (eq. 13): u_f = fusion of [u_{s+}, u_{s-}, h_r, u_MLSE, v_u (, h_skip)], where switched-off
parts are removed (see `satrank.models.ranker.sid_mlse.GatedFusion`); v_u = Linear(concat of the pooled user
features), the paper's concatenation of ID and attribute embeddings projected to d.

Item side: histories carry only item ids, so the item-table embedding e_i is the shared basis of
history items and candidates; the candidate adds a projection of its attributes:
v_i = e_i + Linear(concat(author, category, ... embeddings, dense features)).

Towers (eq. 14 and extensions), one per head of `satrank.models.ranker.heads.head_specs`, outputs keyed by
the head's name:
  click          y = u_f . v_i (a logit)                                     always
  satisfaction   s_f = u_f . MLP_s(v_i) (a logit), MLP_s: R^d -> R^d          mtl on (saqrec)
  watch_time     MLP_wt(u_f (+) v_i (+) log1p(duration)) ~ log1p(watch_time_s) watch_time_head on
  skip           u_f . MLP_skip(v_i) (a logit)                                skip_head on
  <extra>        u_f . MLP_<extra>(v_i) (a logit)                             model.extra_heads
  user [B,d] = u_f, item [B,d] = v_i, fusion_weights [B,K] (order: `fusion_names`).
Watch time is regressed on the log1p scale because it is heavy-tailed (a few long views would
dominate an MSE on seconds); the candidate's log1p(duration) is an input so the tower learns the
duration dependence (longer videos are watched longer) instead of confounding it with interest.
Alternatives not implemented: duration-bucketed quantile targets, D2Co-style debiasing.

MLSE needs the stage-1 satisfaction model g: `history_scorer(inputs, V_r, mask_r) -> [B, L]`
satisfaction probabilities s_hat of each clicked history item (V_r = the ranker's item-table
embeddings of them; a g with its own frozen tables instead reads what the job put in
`inputs.extras`, see `PrecomputedScorer`). g is frozen (Algorithm 1 trains it before the main
model): it is called under torch.no_grad(), exactly once per forward, only when MLSE is on, and is
a plain callable, never a submodule (`set_history_scorer`). Scores are probabilities, used as printed in
eq. 11 (softmax(s_hat), T = 1).

Wiring: `build_ranker` sizes it from `data:` and the table dims; `RankerFromSparse` wraps
`ranker_inputs` (SparseOutput + Batch.dense -> RankerInputs) and the ranker as one table-free
module, which TorchRec's pipeline tracer keeps as a leaf.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from satrank.models.common.encoders import HistoryEncoder
from satrank.models.common.mlp import mlp
from satrank.models.ranker.config import ModelConfig
from satrank.models.ranker.heads import HeadSpec, head_specs
from satrank.models.ranker.sid_mlse import GatedFusion, MultiLevelSatisfaction, SatisfactionDisentangle

if TYPE_CHECKING:  # imported lazily: the ranker itself needs no TorchRec
    from satrank.embeddings.tables import SparseOutput
    from satrank.pipeline.features import DataConfig


@dataclass
class RankerInputs:
    """Plain-tensor inputs of the ranker for a batch of B (user, candidate) rows."""

    user: Dict[str, torch.Tensor]  # pooled user-side vectors [B, d_f] (ModelConfig.user_features)
    item: torch.Tensor  # [B, d] candidate's item-table embedding
    item_attrs: Dict[str, torch.Tensor]  # pooled item attributes [B, d_f] (ModelConfig.item_attr_features)
    dense: torch.Tensor  # [B, n_dense], transforms applied
    duration_log1p: torch.Tensor  # [B] log1p(duration_s) of the candidate
    histories: Dict[str, Tuple[torch.Tensor, torch.Tensor]]  # name -> (V [B,L,d], mask [B,L], left-aligned)
    extras: Dict[str, torch.Tensor] = field(default_factory=dict)  # for the history scorer, e.g. g's scores


@dataclass
class UserInputs:
    """The user-side part of RankerInputs (no candidate): what `SAQRecRanker.user_side` reads."""

    user: Dict[str, torch.Tensor]  # pooled user-side vectors [B, d_f]
    histories: Dict[str, Tuple[torch.Tensor, torch.Tensor]]  # name -> (V [B,L,d], mask [B,L])
    extras: Dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class ItemInputs:
    """The candidate part of RankerInputs for C candidates: what `SAQRecRanker.score_candidates` reads."""

    item: torch.Tensor  # [C, d]
    item_attrs: Dict[str, torch.Tensor]  # [C, d_f]
    dense: torch.Tensor  # [C, n_dense]
    duration_log1p: torch.Tensor  # [C]


HistoryScorer = Callable[[RankerInputs, torch.Tensor, torch.Tensor], torch.Tensor]


class PrecomputedScorer:
    """History scorer reading s_hat [B, L] that the caller computed with g beforehand from `inputs.extras[key]`.

    The usual wiring: g has its own frozen tables, so its scores of the click history come from its
    own lookups (not from the ranker's V_r, which keeps training); the job computes them and passes
    them in `extras`.
    """

    def __init__(self, key: str = "hist_click_satisfaction") -> None:
        self.key = key

    def __call__(self, inputs: RankerInputs, V_r: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.key not in inputs.extras:
            raise KeyError(f"history scorer: inputs.extras has no {self.key!r} (have {sorted(inputs.extras)})")
        return inputs.extras[self.key]


class SAQRecRanker(nn.Module):
    """SAQRec ranker (variant `saqrec`) or the SASRec-style click-only baseline (`click_only`).

    Submodules exist only for the parts the resolved switches use, so a switched-off part can
    neither receive gradient nor leave unused parameters for DDP:
      enc_click always; enc_sat, enc_dis, sid with SID; mlse with MLSE; enc_skip with the skip
      history; one tower per head (`HeadSpec.module`: sat_tower with mtl, wt_tower / skip_tower / <extra>_tower
      with their heads).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        d: int,
        max_lens: Mapping[str, int],
        user_dims: Mapping[str, int],
        item_attr_dims: Mapping[str, int],
        n_dense: int,
        history_scorer: Optional[HistoryScorer] = None,
    ) -> None:
        super().__init__()
        self.cfg, self.d, self.n_dense = cfg, d, n_dense
        missing = [n for n in cfg.required_histories() if n not in max_lens]
        if missing:
            raise ValueError(f"model: histories {missing} have no max_len (not in data.sequence: {sorted(max_lens)})")
        for key, names, dims in (("user_features", cfg.user_features, user_dims),
                                 ("item_attr_features", cfg.item_attr_features, item_attr_dims)):
            unknown = [n for n in names if n not in dims]
            if unknown:
                raise ValueError(f"model.{key}: {unknown} have no embedding dim (known: {sorted(dims)})")

        def encoder(name: str) -> HistoryEncoder:
            return HistoryEncoder(d, max_lens[name], cfg.transformer_layers, cfg.transformer_heads,
                                  cfg.transformer_ff_mult, cfg.dropout, cfg.norm_first, name=name,
                                  attention=cfg.attention)

        h = cfg.histories
        self.enc_click = encoder(h.click)
        names = []
        if cfg.use_sid:
            self.enc_sat, self.enc_dis = encoder(h.satisfied), encoder(h.dissatisfied)
            self.sid = SatisfactionDisentangle(d, cfg.gate_hidden, cfg.gate_activation)
            names += ["u_sat", "u_dis"]
        names.append("h_r")
        if cfg.use_mlse:
            self.mlse = MultiLevelSatisfaction(d, cfg.num_levels, cfg.gate_hidden, cfg.gate_activation,
                                               cfg.mlse_grouping, cfg.mlse_temperature)
            names.append("u_mlse")
        names.append("v_u")
        if cfg.use_skip_seq:
            self.enc_skip = encoder(h.skip)
            names.append("h_skip")
        self.fusion = GatedFusion(names, d, cfg.gate_hidden, cfg.gate_activation)
        self.user_proj = nn.Linear(sum(user_dims[n] for n in cfg.user_features), d)
        item_in = sum(item_attr_dims[n] for n in cfg.item_attr_features) + n_dense
        self.item_proj = nn.Linear(item_in, d) if item_in > 0 else None
        self.head_specs: List[HeadSpec] = head_specs(cfg)
        for spec in self.head_specs:  # created in head order (sat_tower = MLP_s first): same init per seed
            if spec.tower == "dot_mlp":
                setattr(self, spec.module, mlp(d, spec.hidden, d))
            elif spec.tower == "regression":
                setattr(self, spec.module, mlp(2 * d + 1, spec.hidden, 1))
        self.set_history_scorer(history_scorer)

    @property
    def fusion_names(self) -> List[str]:
        return list(self.fusion.names)

    @property
    def heads(self) -> List[str]:
        """Output heads this ranker produces (keys of forward's dict that are per-row logits/values)."""
        return [spec.name for spec in self.head_specs]

    def set_history_scorer(self, scorer: Optional[HistoryScorer]) -> None:
        """A plain callable, never a module: g is frozen and owned by the task, its scores reach MLSE
        through `RankerInputs.extras` (PrecomputedScorer), so the ranker's state_dict holds no part of g."""
        if isinstance(scorer, nn.Module):
            raise TypeError(f"history_scorer: {type(scorer).__name__} is an nn.Module; pass its scores through "
                            "RankerInputs.extras (PrecomputedScorer) so the frozen g stays outside the ranker")
        self._history_scorer = scorer

    def _history(self, x: RankerInputs, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
        if name not in x.histories:
            raise KeyError(f"ranker: history {name!r} missing from inputs (have {sorted(x.histories)})")
        return x.histories[name]

    @staticmethod
    def _pick(d: Dict[str, torch.Tensor], names: Sequence[str], what: str) -> List[torch.Tensor]:
        missing = [n for n in names if n not in d]
        if missing:
            raise KeyError(f"ranker: {what} {missing} missing from inputs (have {sorted(d)})")
        return [d[n] for n in names]

    def user_vector(self, x: RankerInputs) -> torch.Tensor:
        return self.user_proj(torch.cat(self._pick(x.user, self.cfg.user_features, "user features"), dim=-1))

    def item_vector(self, x: RankerInputs) -> torch.Tensor:
        if x.item.dim() != 2 or x.item.shape[-1] != self.d:
            raise ValueError(f"ranker: item embedding must be [B, {self.d}], got {tuple(x.item.shape)}")
        if self.item_proj is None:
            return x.item
        feats = self._pick(x.item_attrs, self.cfg.item_attr_features, "item attributes")
        if self.n_dense:
            if x.dense.dim() != 2 or x.dense.shape[-1] != self.n_dense:
                raise ValueError(f"ranker: dense must be [B, {self.n_dense}], got {tuple(x.dense.shape)}")
            feats.append(x.dense.to(x.item.dtype))
        return x.item + self.item_proj(torch.cat(feats, dim=-1))

    def user_side(self, x: "RankerInputs | UserInputs", user_delta: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Everything that depends only on the user: the history encoders, SID, MLSE, v_u and the fusion (eq. 13).

        Reads x.user, x.histories and x.extras only (a `UserInputs` suffices), so serving runs it once per
        request on one row (satrank.models.serving.request). Returns {"user": u_f [B, d], "fusion_weights": w
        [B, K], "v_u": v_u [B, d]}; `user_delta` [B, d] is added to v_u (EASQ's user-layer pathway)."""
        cfg, h = self.cfg, self.cfg.histories
        V_r, m_r = self._history(x, h.click)
        H_r, h_r = self.enc_click(V_r, m_r)
        v_u = self.user_vector(x) if user_delta is None else self.user_vector(x) + user_delta
        parts: List[torch.Tensor] = []
        if cfg.use_sid:
            _, h_pos = self.enc_sat(*self._history(x, h.satisfied))
            _, h_neg = self.enc_dis(*self._history(x, h.dissatisfied))
            u_pos, u_neg, _, _ = self.sid(H_r, m_r, h_pos, h_neg, padding_zeroed=True)  # encoders zero padding
            parts += [u_pos, u_neg]
        parts.append(h_r)
        if cfg.use_mlse:
            scorer = self._history_scorer
            if scorer is None:
                raise RuntimeError("ranker: model.mlse is on but no history_scorer (stage-1 satisfaction model g) is set")
            with torch.no_grad():
                scores = scorer(x, V_r.detach(), m_r)
            u_mlse, _ = self.mlse(H_r, m_r, scores.detach(), padding_zeroed=True)
            parts.append(u_mlse)
        parts.append(v_u)
        if cfg.use_skip_seq:
            _, h_skip = self.enc_skip(*self._history(x, h.skip))
            parts.append(h_skip)
        u_f, w = self.fusion(parts)
        return {"user": u_f, "fusion_weights": w, "v_u": v_u}

    def score_candidates(self, state: Mapping[str, torch.Tensor], x: "RankerInputs | ItemInputs") -> Dict[str, torch.Tensor]:
        """The candidate-dependent part: v_i and one tower per head, over C candidates.

        `state` is `user_side`'s output for either C rows (training: one user per row) or ONE row (a
        request: u_f is broadcast to the C candidates). Reads x.item, x.item_attrs, x.dense, x.duration_log1p."""
        v_i = self.item_vector(x)
        n = v_i.shape[0]
        u_f, w = state["user"], state["fusion_weights"]
        if u_f.shape[0] not in (1, n):
            raise ValueError(f"ranker: user state has {u_f.shape[0]} rows but there are {n} candidates "
                             "(expected one row per candidate, or one row for the whole request)")
        u_f, w = u_f.expand(n, -1), w.expand(n, -1)  # a no-op when u_f already has a row per candidate
        out = {"user": u_f, "item": v_i, "fusion_weights": w}
        for spec in self.head_specs:
            out[spec.name] = self._tower(spec, u_f, v_i, x)
        return out

    def forward(self, x: RankerInputs, user_delta: Optional[torch.Tensor] = None,
                with_user_vector: bool = False) -> Dict[str, torch.Tensor]:
        """Outputs by name (module doc): exactly `user_side` then `score_candidates` on the same rows.
        `user_delta` [B, d] is added to v_u, and `with_user_vector` adds `v_u` to the outputs: EASQ's
        user-layer pathway passes and reads them (satrank.models.easq.pathway)."""
        state = self.user_side(x, user_delta)
        out = self.score_candidates(state, x)
        if with_user_vector:
            out["v_u"] = state["v_u"]
        return out

    def _tower(self, spec: HeadSpec, u_f: torch.Tensor, v_i: torch.Tensor, x: "RankerInputs | ItemInputs") -> torch.Tensor:
        """One head's raw output [B] (a logit; log1p seconds for the regression tower)."""
        if spec.tower == "dot":
            return (u_f * v_i).sum(-1)
        tower = getattr(self, spec.module)
        if spec.tower == "dot_mlp":
            return (u_f * tower(v_i)).sum(-1)
        dur = x.duration_log1p.to(u_f.dtype).reshape(-1, 1)
        return tower(torch.cat([u_f, v_i, dur], dim=-1)).squeeze(-1)


# ------------------------------------------------------------------------------------------ wiring
def build_ranker(
    cfg: ModelConfig,
    data: "DataConfig",
    feature_dim: Callable[[str], int],
    history_scorer: Optional[HistoryScorer] = None,
) -> SAQRecRanker:
    """Size the ranker from the data contract; `feature_dim(name)` is e.g. `SparseArch.feature_dim`."""
    seq = {f.name: f for f in data.sequence}
    sparse = {f.name for f in data.sparse}
    for key, names in (("item_feature", [cfg.item_feature]), ("user_features", cfg.user_features),
                       ("item_attr_features", cfg.item_attr_features)):
        unknown = [n for n in names if n not in sparse]
        if unknown:
            raise ValueError(f"model.{key}: {unknown} are not single-valued features of data.sparse {sorted(sparse)}")
    for n in cfg.required_histories():
        if n not in seq:
            raise ValueError(f"model.histories: {n!r} is not a sequence feature of data.sequence {sorted(seq)}")
    d = feature_dim(cfg.histories.click)
    if feature_dim(cfg.item_feature) != d:
        raise ValueError(f"model.item_feature {cfg.item_feature!r}: dim {feature_dim(cfg.item_feature)} != history dim {d}")
    if cfg.use_watch_time and cfg.duration_feature not in data.dense_names:
        raise ValueError(f"model.duration_feature {cfg.duration_feature!r} is not a dense feature {data.dense_names}")
    for h in cfg.extra_heads if cfg.saqrec else []:
        if h.label not in data.labels.extra:
            raise ValueError(f"model.extra_heads.{h.name}.label: {h.label!r} is not a label column the reader loads; "
                             f"list it in data.labels.extra (now {data.labels.extra})")
    return SAQRecRanker(
        cfg, d,
        max_lens={n: seq[n].max_len for n in cfg.required_histories()},
        user_dims={n: feature_dim(n) for n in cfg.user_features},
        item_attr_dims={n: feature_dim(n) for n in cfg.item_attr_features},
        n_dense=len(data.dense),
        history_scorer=history_scorer,
    )


def _pooled(sparse: "SparseOutput", name: str) -> torch.Tensor:
    if name not in sparse.pooled:
        raise KeyError(f"ranker_inputs: pooled feature {name!r} missing (have {sorted(sparse.pooled)})")
    return sparse.pooled[name]


def user_inputs(sparse: "SparseOutput", cfg: ModelConfig, data: "DataConfig",
                extras: Optional[Dict[str, torch.Tensor]] = None) -> UserInputs:
    """Adapter SparseOutput -> UserInputs: pooled user features and histories padded to their max_len."""
    from satrank.embeddings.tables import padded

    seq = {f.name: f for f in data.sequence}
    histories = {}
    for n in cfg.required_histories():
        if n not in sparse.sequences:
            raise KeyError(f"ranker_inputs: sequence feature {n!r} missing (have {sorted(sparse.sequences)})")
        histories[n] = padded(sparse.sequences[n], seq[n].max_len)
    return UserInputs(user={n: _pooled(sparse, n) for n in cfg.user_features}, histories=histories,
                      extras=dict(extras or {}))


def item_inputs(sparse: "SparseOutput", dense: torch.Tensor, cfg: ModelConfig, data: "DataConfig") -> ItemInputs:
    """Adapter SparseOutput (+ dense [C, n_dense]) -> ItemInputs: the candidate's embedding, attributes, dense."""
    if cfg.duration_feature in data.dense_names:
        i = data.dense_names.index(cfg.duration_feature)
        col = dense[:, i]
        dur = col if data.dense[i].transform == "log1p" else torch.log1p(col.clamp_min(0))
    else:
        dur = dense.new_zeros(dense.shape[0])  # only read by the watch-time tower (checked in build_ranker)
    return ItemInputs(item=_pooled(sparse, cfg.item_feature),
                      item_attrs={n: _pooled(sparse, n) for n in cfg.item_attr_features},
                      dense=dense, duration_log1p=dur)


def ranker_inputs(
    sparse: "SparseOutput",
    dense: torch.Tensor,
    cfg: ModelConfig,
    data: "DataConfig",
    extras: Optional[Dict[str, torch.Tensor]] = None,
) -> RankerInputs:
    """Adapter SparseOutput (+ Batch.dense) -> RankerInputs (`user_inputs` + `item_inputs` of the same rows)."""
    u, i = user_inputs(sparse, cfg, data, extras), item_inputs(sparse, dense, cfg, data)
    return RankerInputs(user=u.user, item=i.item, item_attrs=i.item_attrs, dense=i.dense,
                        duration_log1p=i.duration_log1p, histories=u.histories, extras=u.extras)


class RankerFromSparse(nn.Module):
    """`ranker_inputs` + the ranker as ONE module holding no sharded tables: TorchRec's pipeline tracer
    treats it as a leaf, so the adapter's shape logic is never fx-traced. forward(sparse, dense, extras)."""

    def __init__(self, ranker: SAQRecRanker, data: "DataConfig") -> None:
        super().__init__()
        self.ranker, self.data = ranker, data

    def forward(
        self, sparse: "SparseOutput", dense: torch.Tensor, extras: Optional[Dict[str, torch.Tensor]] = None
    ) -> Dict[str, torch.Tensor]:
        return self.ranker(ranker_inputs(sparse, dense, self.ranker.cfg, self.data, extras))

"""Stage 1 of SAQRec (sec. 4.2, Algorithm 1 lines 1-7) as TorchRec train-task modules.

    ClickModel         base ranker pre-training (satrank.jobs.pretrain): logit = <u, v> + b, BCE on clicks (eq. 15).
                       Its tables (and, by default, tower MLPs) initialise the satisfaction model.
    PropensityModel    rho(u, i) = P(o = 1), BCE on questionnaire_answered over all impressions (eq. 5).
    SatisfactionModel  g(u, i) = MLP([u, v, u*v]) (eq. 1) on FROZEN click-model embeddings, trained with
                       naive (eq. 3) / ips (eq. 6) / snips / dr losses; rho comes from a frozen
                       PropensityModel submodule evaluated on the same batch.

Each forward(batch) returns (loss, outputs) like torchrec's DLRMTrain, so TrainPipelineSparseDist
can drive it. The forward bodies are deliberately tiny: the SparseArch (which holds every sharded
module) is called with `batch.sparse` directly, and everything else happens inside table-free
submodules (`arch`, `loss_fn`), which the pipeline's fx tracer treats as leaves and runs eagerly.
Outputs are detached. `loss` is None only in eval mode when the batch lacks the task's label
(candidate sets); in training mode a missing label raises.

Freezing (SatisfactionModel): the frozen SparseArches run under torch.no_grad() and their outputs are
detached, so no autograd graph reaches a table: FBGEMM's fused (in-backward) optimizers never fire and
an unsharded table's .grad stays None, i.e. tables stay bit-identical. Table parameters keep
requires_grad=True (TorchRec's apply_optimizer_in_backward and DMP need it); no_grad alone freezes them.
Frozen dense parts (the propensity MLP, the towers when `freeze_tower`) get requires_grad=False (DDP
skips them) and stay in eval mode. tests/test_stage1_models.py checks all this sharded (row_wise,
table_wise and data_parallel tables) under TrainPipelineSparseDist on 2 gloo ranks.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor

from satrank.embeddings.config import EmbeddingConfig
from satrank.embeddings.tables import META, TABLE_KEY, SparseArch, padded
from satrank.models.stage1.config import (BEHAVIOUR_INPUTS, BEHAVIOUR_LABEL, PropensityConfig, SatisfactionConfig,
                                          TowerConfig)
from satrank.pipeline.config import ConfigError
from satrank.models.stage1.losses import LossOut, bce_with_logits, dr_imputation_loss, satisfaction_loss
from satrank.models.common.towers import UserItemTower, check_features, dense_index, masked_mean, mlp
from satrank.pipeline.features import DataConfig

Outputs = Dict[str, object]


def _dims(arch: SparseArch) -> Dict[str, int]:
    return {n: arch.feature_dim(n) for n in [*arch.single_features, *arch.sequence_features]}


def _label(labels: Dict[str, torch.Tensor], name: str, training: bool, task: str) -> Optional[torch.Tensor]:
    if name in labels:
        return labels[name]
    if training:
        raise ValueError(f"{task}: training batch has no label {name!r} (labels present: {sorted(labels)})")
    return None


def log1p_dense_index(data: DataConfig, path: str, name: str) -> int:
    """Index of the dense column `name`, which must hold log1p(seconds) (watch_share inverts it)."""
    index = dense_index(data, path, [name])[0]
    if data.dense[index].transform != "log1p":
        raise ValueError(f"{path}: {name!r} must have transform log1p (the share watched inverts it), "
                         f"got {data.dense[index].transform!r}")
    return index


def share_watched(watch_s: torch.Tensor, duration_s: torch.Tensor) -> torch.Tensor:
    """The share of the video watched, clip(watch / duration, 0, 1), from seconds (the one definition the models,
    their targets and the propensity leak check use; the simulator's world keeps its own, pipeline/sim/world.py)."""
    return (watch_s.clamp_min(0.0) / duration_s.clamp_min(1e-6)).clamp(0.0, 1.0)


def watch_share(watch_s: torch.Tensor, log1p_duration: torch.Tensor) -> torch.Tensor:
    """share_watched with the duration given as its log1p dense column (what a batch carries)."""
    return share_watched(watch_s, torch.expm1(log1p_duration))


def repeated_items_share_a_score(scores: torch.Tensor, V: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """scores [B, L] with every repeat of an item in a row set to the score of its first occurrence.

    Why: MLSE (eq. 11) ranks history items by g's score, and a history often holds one item several times. Their
    scores are equal in exact arithmetic but the matmul computes them in different tiles, so they can differ in the
    last bit, and differently for a batch of candidates than for one request: the rank of the repeats (and with it
    the MLSE levels) flipped between model.pt and model_request.pt (the export check caught it on 3 of 500 demo
    requests). Repeats are found by their embedding rows (V [B, L, d]: one table row each, bitwise equal): the
    first and last coordinates and the row sum (the same reduction for every row) must all be equal; padding
    matches nothing. A stable sort then keeps repeats in history order in every batch shape."""
    v = V.detach()
    keys = (v[..., 0], v[..., -1], v.sum(-1))
    same = mask.unsqueeze(2) & mask.unsqueeze(1)
    for k in keys:
        same = same & (k.unsqueeze(2) == k.unsqueeze(1))
    first = same.to(torch.uint8).argmax(-1)  # the first equal position (itself when the item is not repeated)
    first = torch.where(mask, first, torch.arange(mask.shape[1], device=mask.device).expand_as(first))
    return scores.gather(1, first)


def _stats_out(out: LossOut, prefix: str = "") -> Dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in out.stats.items()}


# ---------------------------------------------------------------------------------------------- click
class ClickArch(nn.Module):
    """logit = <u, v> + b; with a watch-time head also log1p(watch) prediction = Linear([u, v, u*v])."""

    def __init__(self, data: DataConfig, dims: Dict[str, int], tower: TowerConfig, watch_time: bool = False) -> None:
        super().__init__()
        self.tower = UserItemTower(data, dims, tower, "pretrain.tower")
        self.bias = nn.Parameter(torch.zeros(1))
        self.watch_head = nn.Linear(3 * tower.dim, 1) if watch_time else None

    def forward(self, pooled, sequences, dense) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        u, v = self.tower(pooled, sequences, dense)
        watch = None
        if self.watch_head is not None:
            watch = self.watch_head(torch.cat([u, v, u * v], dim=-1)).squeeze(-1)
        return (u * v).sum(-1) + self.bias, watch


class ClickTaskLoss(nn.Module):
    """Click BCE (eq. 15) + weight * the watch head's loss on clicked (or all) rows: MSE against
    log1p(watch_time_s) (`log1p`), or BCE against the share watched clip(watch / duration, 0, 1) (`fraction`)."""

    def __init__(self, weight: float, rows: str, target: str = "log1p", duration_index: Optional[int] = None) -> None:
        super().__init__()
        self.click = BinaryTaskLoss("click", "click", "click_model")
        self.weight, self.rows, self.target, self.duration_index = weight, rows, target, duration_index
        if weight > 0 and target == "fraction" and duration_index is None:
            raise ValueError("click_model: watch_time_target=fraction needs the duration's dense column index")

    def forward(self, logit: torch.Tensor, watch: Optional[torch.Tensor], labels: Dict[str, torch.Tensor],
                dense: Optional[torch.Tensor] = None) -> Tuple[Optional[torch.Tensor], Outputs]:
        loss, out = self.click(logit, labels)
        if watch is None:
            return loss, out
        out["watch_time_pred"] = watch.detach()
        y = _label(labels, "watch_time_s", self.training, "click_model watch-time head")
        if loss is None or y is None:
            return loss, out
        if self.target == "fraction":
            share = watch_share(y, dense[:, self.duration_index])
            per = nn.functional.binary_cross_entropy_with_logits(watch, share, reduction="none")
        else:
            per = (watch - torch.log1p(y.clamp_min(0.0))) ** 2
        mask = labels["click"] if self.rows == "clicked" else torch.ones_like(per)
        l_wt = (per * mask).sum() / mask.sum().clamp_min(1.0)
        loss = loss + self.weight * l_wt
        out["loss_watch_time"] = l_wt.detach()
        out["loss"] = loss.detach()
        return loss, out


class BinaryTaskLoss(nn.Module):
    """BCE of one logit against one label (eqs. 5 and 15) -> (loss, detached outputs)."""

    def __init__(self, label: str, prefix: str, task: str, prob_alias: Optional[str] = None) -> None:
        super().__init__()
        self.label, self.prefix, self.task, self.prob_alias = label, prefix, task, prob_alias

    def forward(self, logit: torch.Tensor, labels: Dict[str, torch.Tensor]) -> Tuple[Optional[torch.Tensor], Outputs]:
        out: Outputs = {f"{self.prefix}_logit": logit.detach(), f"{self.prefix}_prob": torch.sigmoid(logit.detach())}
        if self.prob_alias:
            out[self.prob_alias] = out[f"{self.prefix}_prob"]
        y = _label(labels, self.label, self.training, self.task)
        if y is None:
            return None, out
        res = bce_with_logits(logit, y, name=self.task)
        out[self.label] = y.detach()
        out["loss"] = res.loss.detach()
        out["stats/rows"] = res.stats["rows"]
        return res.loss, out


class ClickModel(nn.Module):
    """Base ranker pre-training (satrank.jobs.pretrain). forward(batch) -> (BCE on `click`, outputs)."""

    def __init__(
        self, data: DataConfig, emb: EmbeddingConfig, tower: TowerConfig, sparse_device: torch.device = META,
        watch_time_weight: float = 0.0, watch_time_rows: str = "clicked", watch_time_target: str = "log1p",
        duration_feature: str = "duration_s",
    ) -> None:
        super().__init__()
        self.sparse_arch = SparseArch(data, emb, device=sparse_device)
        self.arch = ClickArch(data, _dims(self.sparse_arch), tower, watch_time=watch_time_weight > 0)
        duration_index = None
        if watch_time_weight > 0 and watch_time_target == "fraction":
            duration_index = log1p_dense_index(data, "pretrain.duration_feature", duration_feature)
        self.loss_fn = ClickTaskLoss(watch_time_weight, watch_time_rows, watch_time_target, duration_index)

    def forward(self, batch) -> Tuple[Optional[torch.Tensor], Outputs]:
        sp = self.sparse_arch(batch.sparse)
        logit, watch = self.arch(sp.pooled, sp.sequences, batch.dense)
        return self.loss_fn(logit, watch, batch.labels, batch.dense)


# ---------------------------------------------------------------------------------------------- propensity
class PropensityArch(nn.Module):
    """rho logit = MLP([e(features); mean(history)?; dense cols; behaviour?]).

    `behaviour` inputs are the impression's own logged click / skip (0/1) / log1p(watch_time_s): observed
    for every impression, answered or not, so rho(u, i, b) = P(o = 1 | u, i, b) is a valid IPS propensity
    (it needs s independent of o given (u, i, b), weaker than given (u, i) when behaviour drives answering).
    """

    def __init__(self, data: DataConfig, dims: Dict[str, int], cfg: PropensityConfig) -> None:
        super().__init__()
        check_features("propensity.features", cfg.features, [f.name for f in data.sparse], "single-valued sparse")
        self.features = list(cfg.features)
        self.dense_idx = dense_index(data, "propensity.dense", cfg.dense)
        self.history = cfg.history
        hist_dim = 0
        if cfg.history is not None:
            check_features("propensity.history", [cfg.history], [f.name for f in data.sequence], "sequence")
            self.max_len = data.feature(cfg.history).max_len
            hist_dim = dims[cfg.history]
        self.behaviour = list(cfg.behaviour)
        self.duration_index: Optional[int] = None
        if "watch_fraction" in self.behaviour:
            self.duration_index = log1p_dense_index(data, "propensity.duration_feature", cfg.duration_feature)
        in_dim = sum(dims[n] for n in self.features) + hist_dim + len(self.dense_idx) + len(self.behaviour)
        self.mlp = mlp(in_dim, cfg.hidden, 1, cfg.dropout)

    def forward(self, pooled, sequences: Dict[str, JaggedTensor], dense: torch.Tensor,
                labels: Optional[Mapping[str, torch.Tensor]] = None) -> torch.Tensor:
        parts = [pooled[n] for n in self.features]
        if self.history is not None:
            parts.append(masked_mean(*padded(sequences[self.history], self.max_len)))
        if self.dense_idx:
            parts.append(dense[:, self.dense_idx])
        if self.behaviour:
            parts.append(self.behaviour_inputs(labels, dense))
        return self.mlp(torch.cat(parts, dim=-1)).squeeze(-1)

    def behaviour_inputs(self, labels: Optional[Mapping[str, torch.Tensor]], dense: torch.Tensor) -> torch.Tensor:
        """[B, len(behaviour)] float inputs from the batch's labels (BEHAVIOUR_INPUTS transforms)."""
        needed = [BEHAVIOUR_LABEL.get(b, b) for b in self.behaviour]
        missing = [n for n in dict.fromkeys(needed) if labels is None or n not in labels]
        if missing:
            raise ValueError(f"propensity.behaviour needs the batch labels {missing} (present: "
                             f"{sorted(labels or {})}): rho(u, i, behaviour) cannot score rows without them")
        cols = []
        for b, name in zip(self.behaviour, needed):
            x = labels[name].float()
            how = BEHAVIOUR_INPUTS[b]
            if how == "log1p":
                x = torch.log1p(x.clamp_min(0.0))
            elif how == "share":  # the dense column is log1p(seconds)
                x = watch_share(x, dense[:, self.duration_index])
            cols.append(x)
        return torch.stack(cols, dim=-1)


class PropensityModel(nn.Module):
    """Propensity model (satrank.jobs.propensity). forward(batch) -> (BCE on `questionnaire_answered`, outputs)."""

    def __init__(
        self, data: DataConfig, emb: EmbeddingConfig, cfg: PropensityConfig, sparse_device: torch.device = META
    ) -> None:
        super().__init__()
        self.sparse_arch = SparseArch(data, emb, device=sparse_device)
        self.arch = PropensityArch(data, _dims(self.sparse_arch), cfg)
        self.loss_fn = BinaryTaskLoss("questionnaire_answered", "answer", "propensity_model", "propensity")

    def forward(self, batch) -> Tuple[Optional[torch.Tensor], Outputs]:
        sp = self.sparse_arch(batch.sparse)
        logit = self.arch(sp.pooled, sp.sequences, batch.dense, batch.labels)
        return self.loss_fn(logit, batch.labels)


# ---------------------------------------------------------------------------------------------- satisfaction
def mf_logit(e_u: torch.Tensor, e_i: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Logistic MF with the biases folded into the rows: <e_u[..., :-1], e_i[..., :-1]> + e_u[..., -1] + e_i[..., -1]
    + bias (satisfaction.form: mf). No learned map between the tables and the product (docs/stage1.md)."""
    return (e_u[..., :-1] * e_i[..., :-1]).sum(-1) + e_u[..., -1] + e_i[..., -1] + bias


class SatisfactionArch(nn.Module):
    """s_hat logit = MLP([u, v, u*v]) (eq. 1), or with `form: mf` mf_logit of the first user and item features'
    table rows; for `dr` also e_hat = softplus(MLP_e([u, v, u*v].detach())) (u, v: the rows with form mf).

    The imputation head sees detached features, so its loss trains only the head itself. With form mf the tower and
    head are built (the checkpoint layout stays g's) but frozen and never called.
    """

    def __init__(self, data: DataConfig, dims: Dict[str, int], tower: TowerConfig, cfg: SatisfactionConfig):
        super().__init__()
        self.tower = UserItemTower(data, dims, tower, "pretrain.tower")
        self.head = mlp(3 * tower.dim, cfg.hidden, 1, cfg.dropout)
        self.form = cfg.form
        feat_dim = tower.dim
        if self.form == "mf":
            self.mf_user, self.mf_item = tower.user_features[0], tower.item_features[0]
            if dims[self.mf_user] != dims[self.mf_item]:
                raise ConfigError(f"satisfaction.form: mf takes the dot product of {self.mf_user!r} ({dims[self.mf_user]}"
                                  f" dims) and {self.mf_item!r} ({dims[self.mf_item]} dims), the first user and item "
                                  f"features of pretrain.tower: their tables need one dim (embeddings.tables.*.dim)")
            feat_dim = dims[self.mf_user]
            self.mf_bias = nn.Parameter(torch.zeros(()))
            self.tower.requires_grad_(False)  # unused with mf: no gradient, so DDP must not wait for one
            self.head.requires_grad_(False)
        self.imputation = mlp(3 * feat_dim, cfg.imputation_hidden, 1) if cfg.loss == "dr" else None
        self.frozen_tables = cfg.tables == "frozen"
        self.dot_product = cfg.dot_product

    def forward(self, pooled, sequences, dense) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.frozen_tables:
            # Frozen tables: inputs come from no_grad lookups; detach anyway so no graph can reach a table.
            pooled, sequences = {k: t.detach() for k, t in pooled.items()}, _detach_sequences(sequences)
        mf = self.form == "mf"
        u, v = (pooled[self.mf_user], pooled[self.mf_item]) if mf else self.tower(pooled, sequences, dense)
        h = torch.cat([u, v, u * v], dim=-1)
        logit = mf_logit(u, v, self.mf_bias) if mf else self.head(h).squeeze(-1)
        if self.dot_product:
            logit = logit + (u * v).sum(-1)
        e_hat = None
        if self.imputation is not None:
            e_hat = nn.functional.softplus(self.imputation(h.detach()).squeeze(-1))
        return logit, e_hat

    def history_logits(self, pooled, sequences, dense, items: torch.Tensor,
                       rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits of g(u, i) for the batch's users u and items given as item-table rows `items` [B, L, d_e]
        (the item tower must take exactly one sparse feature and no dense column): [B, L]. `rows` [B'] (optional)
        gives the user row of each of B' item sets instead (items [B', L, d_e] -> [B', L]): batch scoring computes
        each request's user half once and scores every candidate row of the request against it."""
        if self.form == "mf":
            e_u = pooled[self.mf_user] if rows is None else pooled[self.mf_user][rows]
            return mf_logit(e_u.unsqueeze(1), items, self.mf_bias)
        u, _ = self.tower(pooled, sequences, dense)  # the item half is recomputed below, per history item
        if rows is not None:
            u = u[rows]
        v = self.tower.item_mlp(items)  # [B, L, dim]
        u = u.unsqueeze(1).expand_as(v)
        logit = self.head(torch.cat([u, v, u * v], dim=-1)).squeeze(-1)
        return logit + (u * v).sum(-1) if self.dot_product else logit


class SatisfactionLoss(nn.Module):
    """The selected satisfaction objective (+ the DR imputation loss) -> (loss, detached outputs)."""

    def __init__(self, cfg: SatisfactionConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, logit, e_hat, rho, labels) -> Tuple[Optional[torch.Tensor], Outputs]:
        cfg = self.cfg
        out: Outputs = {"sat_logit": logit.detach(), "sat_prob": torch.sigmoid(logit.detach())}
        if rho is not None:
            out["propensity"] = rho.detach()
        if e_hat is not None:
            out["imputed_error"] = e_hat.detach()
        o = _label(labels, "questionnaire_answered", self.training, "satisfaction_model")
        s = _label(labels, "satisfied", self.training, "satisfaction_model")
        if o is None or s is None:
            return None, out
        s = torch.where(o > 0.5, s, torch.zeros_like(s))  # the contract says 0 there; never trust it
        res = satisfaction_loss(
            cfg.loss, logit, s, o, rho, clip=cfg.clip, imputed_error=e_hat,
            ips_normalizer=cfg.ips_normalizer, check_finite=cfg.check_finite,
        )
        loss = res.loss
        out.update({"satisfied": s.detach(), "questionnaire_answered": o.detach(), "sat_loss": res.loss.detach()})
        out.update(_stats_out(res, "stats/"))
        if cfg.loss == "dr":
            imp = dr_imputation_loss(logit, s, o, rho, e_hat, cfg.clip, check_finite=cfg.check_finite)
            loss = loss + cfg.imputation_weight * imp.loss
            out["imputation_loss"] = imp.loss.detach()
        out["loss"] = loss.detach()
        return loss, out


class SatisfactionModel(nn.Module):
    """Satisfaction model (satrank.jobs.satisfaction). forward(batch) -> (satisfaction loss, outputs).

    Submodules: `sparse_arch` (tables loaded from ClickModel.sparse_arch and frozen; with satisfaction.tables
    fine_tune loaded and trained, with own fresh and trained), `arch.tower`
    (loaded from ClickModel.arch.tower when init_tower_from_pretrain), `arch.head`, `arch.imputation`
    (dr only) and `propensity` (a frozen PropensityModel; absent for `naive`, which needs no rho).
    Taking rho from a frozen submodule on the same batch keeps one code path for train/eval/score,
    needs no extra column in the data, and always uses the propensities the checkpoint was trained with.
    """

    def __init__(
        self,
        data: DataConfig,
        emb: EmbeddingConfig,
        tower: TowerConfig,
        cfg: SatisfactionConfig,
        propensity: Optional[PropensityConfig] = None,
        sparse_device: torch.device = META,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.sparse_arch = SparseArch(data, emb, device=sparse_device)
        self.arch = SatisfactionArch(data, _dims(self.sparse_arch), tower, cfg)
        self.propensity: Optional[PropensityModel] = None
        if cfg.loss != "naive":
            self.propensity = PropensityModel(data, emb, propensity or PropensityConfig(), sparse_device)
            # dense part frozen by requires_grad (DDP skips it); tables, like ours, by no_grad only:
            # TorchRec's apply_optimizer_in_backward / DMP expect table params with requires_grad.
            self.propensity.arch.requires_grad_(False)
        if cfg.freeze_tower:
            self.arch.tower.requires_grad_(False)
        self.loss_fn = SatisfactionLoss(cfg)
        self.train(True)

    def train(self, mode: bool = True) -> "SatisfactionModel":
        super().train(mode)
        if self.propensity is not None:
            self.propensity.eval()
        if self.cfg.freeze_tower:
            self.arch.tower.eval()
        return self

    def forward(self, batch) -> Tuple[Optional[torch.Tensor], Outputs]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.cfg.tables != "frozen"):
            sp = self.sparse_arch(batch.sparse)  # g's tables: trained with g's loss unless satisfaction.tables=frozen
        with torch.no_grad():
            rho = None
            if self.propensity is not None:
                psp = self.propensity.sparse_arch(batch.sparse)
                rho = torch.sigmoid(self.propensity.arch(psp.pooled, psp.sequences, batch.dense, batch.labels))
        logit, e_hat = self.arch(sp.pooled, sp.sequences, batch.dense)
        return self.loss_fn(logit, e_hat, rho, batch.labels)

    @torch.no_grad()
    def predict(self, batch) -> Outputs:
        """g's outputs (sat_logit, sat_prob) without a loss and without rho: for serving rows, which carry no
        labels for the propensity model's behaviour inputs (satrank.models.serving.module.Stage1Heads)."""
        sp = self.sparse_arch(batch.sparse)
        logit, _ = self.arch(sp.pooled, sp.sequences, batch.dense)
        return {"sat_logit": logit.detach(), "sat_prob": torch.sigmoid(logit.detach())}

    @torch.no_grad()
    def score_history(self, batch_or_sparse, feature: str = "hist_click", dense: Optional[torch.Tensor] = None
                      ) -> torch.Tensor:
        """s_hat = g(u, item) for every item of the history `feature` of each row: Tensor[B, L] of probabilities
        (L = the feature's max_len, left-aligned like `satrank.embeddings.tables.padded`, 0 at padding positions).

        MLSE (SAQRec eq. 11) scores the user's CLICK-HISTORY items with g, and a history carries only item
        ids; so g's item side (pretrain.tower.item_features) must be a single feature of the history's
        embedding table with no item_dense columns (the default config). Uses g's own frozen tables:
        pass a Batch (looked up here) or the SparseOutput of this model's `sparse_arch`; `dense` is the
        batch's dense tensor (only needed by the user tower's features, never by the item side).
        No autograd graph (g is frozen); call it in eval mode.
        """
        from satrank.embeddings.tables import SparseOutput

        if isinstance(batch_or_sparse, SparseOutput):
            sp = batch_or_sparse
        else:
            sp = self.sparse_arch(batch_or_sparse.sparse)
            dense = batch_or_sparse.dense if dense is None else dense
        data = self.sparse_arch.data
        tower = self.arch.tower
        seq = data.feature(feature) if feature in [f.name for f in data.sequence] else None
        if seq is None:
            raise ValueError(f"score_history: {feature!r} is not a sequence feature of data.sequence")
        items = tower.item_features
        if len(items) != 1 or tower.dense_idx or data.feature(items[0]).table_name != seq.table_name:
            raise ValueError(
                f"score_history: g's item side is pretrain.tower.item_features={items} with item_dense "
                f"columns {tower.dense_idx}; scoring history items needs exactly one feature of the "
                f"{seq.table_name!r} table (that {feature!r} uses) and item_dense: [] (a history has only item ids)")
        if feature not in sp.sequences:
            raise KeyError(f"score_history: sparse output has no sequence {feature!r} (have {sorted(sp.sequences)})")
        if dense is None:
            n = sp.sequences[feature].lengths().numel()
            dense = torch.zeros(n, len(data.dense), device=sp.sequences[feature].values().device)
        V, mask = padded(sp.sequences[feature], seq.max_len)
        logits = self.arch.history_logits(sp.pooled, sp.sequences, dense, V)
        return torch.where(mask, torch.sigmoid(repeated_items_share_a_score(logits, V, mask)), torch.zeros_like(logits))

    def frozen_table_keys(self) -> List[str]:
        """state_dict keys of the frozen tables (for tests and checkpoint sanity checks)."""
        return [k for k in self.state_dict() if TABLE_KEY.match(k)]

    def init_from_pretrain(self, click_state: Mapping[str, torch.Tensor]) -> List[str]:
        """Copy the click model's tables (and tower when cfg.init_tower_from_pretrain); returns keys copied.

        Plain (unsharded) state dicts: ClickModel keys `sparse_arch.*` and `arch.tower.*` map to the
        same keys here. For DMP-sharded models load the same keys through the checkpoint code.
        """
        prefixes = ((["sparse_arch."] if self.cfg.tables != "own" else [])
                    + (["arch.tower."] if self.cfg.init_tower_from_pretrain and self.cfg.tables != "own" else []))
        if not prefixes:
            return []
        return _copy_prefixed(self, click_state, {p: p for p in prefixes}, "click model")

    def init_propensity(self, propensity_state: Mapping[str, torch.Tensor]) -> List[str]:
        """Load a PropensityModel state dict into the frozen `propensity` submodule (keys gain `propensity.`)."""
        if self.propensity is None:
            raise ValueError("satisfaction.loss is 'naive': this model has no propensity submodule to load")
        return _copy_prefixed(self, propensity_state, {"": "propensity."}, "propensity model")


def _detach_sequences(seqs: Dict[str, JaggedTensor]) -> Dict[str, JaggedTensor]:
    return {
        k: JaggedTensor(values=jt.values().detach(), lengths=jt.lengths(), offsets=jt.offsets())
        for k, jt in seqs.items()
    }


@torch.no_grad()
def _copy_prefixed(dst: nn.Module, src: Mapping[str, torch.Tensor], mapping: Dict[str, str], what: str) -> List[str]:
    own = dst.state_dict()
    copied: List[str] = []
    for sp, dp in mapping.items():
        keys = [k for k in src if k.startswith(sp)]
        if not keys:
            raise KeyError(f"{what} state has no keys under {sp!r}; first keys: {list(src)[:5]}")
        for k in keys:
            target = dp + k[len(sp):]
            if target not in own:
                continue  # e.g. the source's loss_fn or optimizer-free extras
            if own[target].shape != src[k].shape:
                raise ValueError(f"{what}: {k} has shape {tuple(src[k].shape)}, {target} needs {tuple(own[target].shape)}")
            own[target].copy_(src[k])
            copied.append(target)
        missing = [k for k in own if k.startswith(dp) and k not in copied]
        if missing:
            raise KeyError(f"{what} state lacks {missing[:5]} (needed under {dp!r})")
    return copied

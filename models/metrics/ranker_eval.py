"""Offline evaluation of a ranker: impression metrics, candidate-set truth, and SAQRec's leave-one-out.

Three protocols, each an accumulator fed with (Batch, model outputs) by a rank-synchronised loop
(satrank.jobs.evaluate drives them; every `compute()` all-gathers, so all ranks return the same figures):

  ImpressionMetrics  a labelled split (DIR/valid, DIR/test), every row once:
                     click_auc, click_gauc (per user, size-weighted) on the click logit;
                     sat_auc_answered: AUC of the satisfaction score against `satisfied` on the rows
                       whose questionnaire was answered (MNAR-selected rows, the only ones with a label);
                       the score is the satisfaction tower s_f, or the click logit for a model without one;
                     watch_time_mae (seconds, prediction expm1 of the log1p head) and watch_time_xauc;
                       None for a model without a watch-time head;
                     <head>_auc for every other head whose HeadSpec.metric is `auc` (skip, extra heads) on
                       its own label column (satrank.models.ranker.heads).
  CandidateMetrics   the simulator's candidate sets (DIR/candidates): per request, the mean true
                     P(satisfied) / P(click) of the model's top-k (true_sat@k, true_click@k), ranked by
                     `EvaluationConfig.rank_score`: `click` (the click logit y) or `fusion`
                     (log sigmoid(y) + w log sigmoid(s_f) = log P(click) P(sat)^w, the expected
                     satisfied clicks for w = 1; models without s_f fall back to log sigmoid(y)).
                     Both rankings are always reported: true_*@k by the configured score and
                     true_*@k_by_click by the click logit alone. The ceilings on the same requests:
                     true_*@k_oracle_sat / true_*@k_oracle_click rank by the truth columns
                     true_p_satisfied / true_p_click (satrank.models.metrics.ranking.oracle_topk_metrics),
                     and true_sat@k_headroom_share = (true_sat@k - oracle_click) / (oracle_sat - oracle_click).
  LooMetrics         sec. 5.1.2: for each user with a click in the split, the most recent click
                     (satrank.models.metrics.protocol.last_clicks) against `loo_negatives` sampled items the user
                     never interacted with (no impression in any split), ranked by the click logit:
                     hr@1/5/10, ndcg@5/10, mrr (mid ranks on ties). A user who interacted with so much
                     of the catalogue that fewer than K items are left is left out and counted
                     (loo_users_skipped).

Leave-one-out candidate rows (`build_loo_plan`): the ground-truth row of the split is repeated
1 + K times, keeping everything user-side (user features, histories as of that impression) and
replacing the item-side columns (item id, its attributes, the dense item features) with each
candidate's values, looked up in an item-attribute table collected from every split and the
candidate sets (`satrank.pipeline.rows.collect_attributes`; the most recent row of an item wins and
disagreements are counted). Negatives are drawn among the items of that table only (their
attributes must be known), i.e. uniform over the catalogue seen in the data, deterministic per
(seed, user). Rows go through the reader's Converter, so vocabulary policies apply unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Literal, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from satrank.models.metrics.protocol import build_loo_candidates, interactions_by_user, last_clicks
from satrank.models.metrics.ranking import (MetricAccumulator, auc, click_metrics, headroom_share, loo_ranks,
                                            metrics_from_ranks, oracle_topk_metrics, truth_topk_metrics,
                                            watch_time_metrics)
from satrank.models.metrics.stage1_eval import one_class_reason
from satrank.models.ranker.heads import HeadSpec, head_specs
from satrank.models.ranker.losses import watch_time_loss
from satrank.pipeline.batch import Batch
from satrank.pipeline.config import ConfigError
from satrank.pipeline.features import DataConfig
from satrank.pipeline.rows import AttributeTable, collect_attributes, read_columns, repeat_with, table_batches, take_rows

METRIC_KEYS = ("hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr", "click_auc", "click_gauc",
               "sat_auc_answered", "watch_time_mae", "watch_time_xauc", "true_sat@10", "true_click@10",
               "true_sat@10_oracle_sat", "true_click@10_oracle_sat", "true_sat@10_oracle_click",
               "true_click@10_oracle_click", "true_sat@10_headroom_share")
TRUTH_COLUMNS = ("true_p_satisfied", "true_p_click")
PSEUDO_KEY = "pseudo_satisfaction"  # satrank.models.ranker.task.PSEUDO


@dataclass
class EvaluationConfig:
    """How a trained ranker is evaluated (satrank.jobs.evaluate, and satrank.jobs.train at the end)."""

    k: int = 10  # top-k of the candidate-set truth metrics
    rank_score: Literal["click", "fusion"] = "fusion"  # candidate ranking: click logit, or log P(click) P(sat)^w
    fusion_sat_weight: float = 1.0  # w of the fusion
    loo_negatives: int = 99  # sampled non-interacted items per ground truth (the paper's 99)
    loo_seed: int = 0
    loo_users_per_batch: int = 32  # users per scoring batch (each contributes 1 + loo_negatives rows)
    # the trade-off curve: true_sat@k / true_click@k of the fusion at each w (metrics.json `tradeoff`, the report)
    tradeoff_sat_weights: List[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0])
    # jobs.evaluate --propensity: the offline estimate of the top-k satisfaction among logged impressions
    offline_k: int = 3
    offline_group: Literal["user_id", "request_id"] = "user_id"  # whose logged impressions a top k is taken from

    def validate(self, path: str) -> None:
        if self.k < 1 or self.offline_k < 1:
            raise ConfigError(f"{path}.k and {path}.offline_k: must be >= 1, got {self.k} and {self.offline_k}")
        if self.fusion_sat_weight < 0:
            raise ConfigError(f"{path}.fusion_sat_weight: must be >= 0, got {self.fusion_sat_weight}")
        if any(not math.isfinite(w) or w < 0 for w in self.tradeoff_sat_weights):
            raise ConfigError(f"{path}.tradeoff_sat_weights: every weight must be finite and >= 0, got "
                              f"{self.tradeoff_sat_weights}")
        if self.loo_negatives < 1 or self.loo_users_per_batch < 1 or self.loo_seed < 0:
            raise ConfigError(f"{path}: loo_negatives and loo_users_per_batch must be >= 1, loo_seed >= 0")


# ------------------------------------------------------------------------------------------ scores
def ranking_score(out: Mapping[str, torch.Tensor], cfg: EvaluationConfig) -> torch.Tensor:
    """The candidate-ranking score of `cfg.rank_score` from a RankerTask's outputs (see module doc)."""
    click = out["click"]
    if cfg.rank_score == "click":
        return click
    score = F.logsigmoid(click.double())
    if "satisfaction" in out and cfg.fusion_sat_weight > 0:
        score = score + cfg.fusion_sat_weight * F.logsigmoid(out["satisfaction"].double())
    return score


def satisfaction_score(out: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """s_f when the model has a satisfaction tower, else the click logit."""
    return out["satisfaction"] if "satisfaction" in out else out["click"]


def _none_if_nan(metrics: Dict[str, float]) -> Dict[str, Optional[float]]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}


# ------------------------------------------------------------------------------------------ accumulators
def impression_columns(batch: Batch, out: Mapping[str, torch.Tensor], user_key: str = "user_id",
                       heads: Sequence[HeadSpec] = ()) -> Dict[str, torch.Tensor]:
    """Per-row columns (1-D, this batch's rows) of a labelled batch and a RankerTask's outputs; `heads` whose
    metric is `auc` add <name>_pred and <name>_label."""
    lab = batch.labels
    for name in ("click", "questionnaire_answered", "satisfied", "watch_time_s"):
        if name not in lab:
            raise KeyError(f"impression metrics: batch has no label {name!r} (is this a labelled split?)")
    if user_key not in batch.ids:
        raise KeyError(f"impression metrics: batch has no id {user_key!r} (have {sorted(batch.ids)})")
    cols = dict(click_pred=out["click"].double(), click=lab["click"].clone(), user=batch.ids[user_key].clone(),
                answered=lab["questionnaire_answered"].clone(), satisfied=lab["satisfied"].clone(),
                sat_pred=satisfaction_score(out).double(), watch_time_s=lab["watch_time_s"].double())
    if "satisfaction" in out and PSEUDO_KEY in out:  # eq. 16 loss of the tower (not of g's served estimate)
        cols.update(sat_logit=out.get("satisfaction_tower", out["satisfaction"]).double(), pseudo=out[PSEUDO_KEY].double())
    if "watch_time" in out:
        cols["wt_log1p"] = out["watch_time"].double()
    for spec in heads:
        if spec.metric == "auc" and spec.name in out:
            if spec.label not in lab:
                raise KeyError(f"impression metrics: head {spec.name!r} needs label {spec.label!r}, the batch has "
                               f"{sorted(lab)} (is it in data.labels.extra?)")
            cols[f"{spec.name}_pred"] = out[spec.name].double()
            cols[f"{spec.name}_label"] = lab[spec.label].clone()
    return {k: v.detach() for k, v in cols.items()}


def impression_metrics(t: Mapping[str, torch.Tensor]) -> Dict[str, Optional[float]]:
    """click_auc, click_gauc, sat_auc_answered, watch_time_mae/xauc from gathered `impression_columns`."""
    if "click" not in t or t["click"].numel() == 0:
        raise ValueError("impression metrics: no rows were scored")
    out: Dict[str, float] = {"impression_rows": int(t["click"].numel())}
    out.update(click_metrics(t["click_pred"], t["click"], t["user"]))
    ans = t["answered"] > 0.5
    sat, pred = t["satisfied"][ans], t["sat_pred"][ans]
    n_ans, pos = int(ans.sum()), int(sat.sum())
    out["sat_answered_rows"] = n_ans
    out["sat_auc_answered"] = auc(pred, sat) if 0 < pos < n_ans else float("nan")
    if "wt_log1p" in t:
        out.update(watch_time_metrics(torch.expm1(t["wt_log1p"]).clamp_min(0), t["watch_time_s"]))
    else:
        out.update(watch_time_mae=float("nan"), watch_time_xauc=float("nan"))
    for key in [k for k in t if k.endswith("_label")]:  # heads with an `auc` metric (impression_columns)
        name, y = key[:-len("_label")], t[key]
        pos = int(y.sum())
        out[f"{name}_auc"] = auc(t[f"{name}_pred"], y) if 0 < pos < y.numel() else float("nan")
    return _none_if_nan(out)


class ImpressionMetrics:
    """Click / satisfaction / watch-time metrics over a labelled split (see module doc); compute() gathers."""

    def __init__(self, heads: Sequence[HeadSpec] = ()) -> None:
        self.acc = MetricAccumulator()
        self.heads = list(heads)

    def update(self, batch: Batch, out: Mapping[str, torch.Tensor]) -> None:
        self.acc.update(**impression_columns(batch, out, heads=self.heads))

    def compute(self) -> Dict[str, Optional[float]]:
        return impression_metrics(self.acc.compute())


class RankerEvaluator:
    """satrank.jobs.engine.trainer Evaluator of the per-epoch validation: the impression metrics plus the mean
    validation loss of every tower, computed per row exactly as MultiTaskLoss does:
    loss_click (eq. 15), loss_satisfaction (eq. 16 against g's pseudo-labels; never the mixed
    target, so epochs compare), loss_watch_time (loss.watch_time_loss on log1p seconds), and
    loss_<name> (BCE) with <name>_auc for every other binary head of `model_cfg` (skip, extra heads).

    On a split where every row is clicked (a rating set's missing-at-random validation) the click AUC and GAUC
    are declared undefined (`undefined`), and model selection falls back to the answered-row satisfaction AUC,
    then the loss (`fallbacks`; satrank.jobs.engine.selection)."""

    fallbacks = {m: [("sat_auc_answered", "max"), ("loss", "min")] for m in ("click_auc", "click_gauc")}

    def __init__(self, loss_cfg, model_cfg=None) -> None:
        from satrank.models.ranker.config import ModelConfig

        self.loss_cfg = loss_cfg
        self.heads = head_specs(model_cfg or ModelConfig(), loss_cfg)

    def columns(self, batch: Batch, outputs: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        return impression_columns(batch, outputs, heads=self.heads)

    def metrics(self, columns: Dict[str, torch.Tensor], counters: Dict[str, float]) -> Dict[str, Any]:
        t, cfg = columns, self.loss_cfg
        out: Dict[str, Any] = {"loss_click": float(F.binary_cross_entropy_with_logits(t["click_pred"], t["click"].double()))}
        if "sat_logit" in t:
            out["loss_satisfaction"] = float(F.binary_cross_entropy_with_logits(t["sat_logit"], t["pseudo"]))
        if "wt_log1p" in t:
            out["loss_watch_time"] = float(watch_time_loss(t["wt_log1p"], t["watch_time_s"], t["click"], cfg))
        for key in [k for k in t if k.endswith("_label")]:
            name = key[:-len("_label")]
            out[f"loss_{name}"] = float(F.binary_cross_entropy_with_logits(t[f"{name}_pred"], t[key].double()))
        out.update(impression_metrics(t))
        out["undefined"] = self.undefined(t)
        return out

    @staticmethod
    def undefined(t: Mapping[str, torch.Tensor]) -> Dict[str, str]:
        """{metric: why} for the metrics this split cannot define (selection falls back, `fallbacks`)."""
        out: Dict[str, str] = {}
        why = one_class_reason("click", t["click"])
        if why:
            out.update(click_auc=why, click_gauc=why)
        why = one_class_reason("satisfied", t["satisfied"][t["answered"] > 0.5], rows="answered rows")
        if why:
            out["sat_auc_answered"] = why
        return out


class CandidateMetrics:
    """true_sat@k / true_click@k of each request's top-k (configured score and click logit), the oracles'
    (top-k by true_p_satisfied, by true_p_click) and the share of the click -> satisfaction oracle gap taken."""

    def __init__(self, cfg: EvaluationConfig, group_key: str = "request_id") -> None:
        self.cfg, self.group_key = cfg, group_key
        self.acc = MetricAccumulator()

    def update(self, batch: Batch, out: Mapping[str, torch.Tensor]) -> None:
        missing = [c for c in TRUTH_COLUMNS if c not in batch.truth]
        if missing or self.group_key not in batch.ids:
            raise KeyError(f"candidate metrics: batch lacks truth {missing} or id {self.group_key!r} "
                           f"(have truth {sorted(batch.truth)}, ids {sorted(batch.ids)})")
        sat = {"sat_score": out["satisfaction"].detach().double()} if "satisfaction" in out else {}
        self.acc.update(score=ranking_score(out, self.cfg).detach(), click_score=out["click"].detach().double(),
                        group=batch.ids[self.group_key], **sat, **{c: batch.truth[c] for c in TRUTH_COLUMNS})

    def compute(self) -> Dict[str, Optional[float]]:
        t = self.acc.compute()
        if "group" not in t:
            raise ValueError("candidate metrics: no rows were scored")
        truth = {c: t[c] for c in TRUTH_COLUMNS}
        k = self.cfg.k
        out: Dict[str, float] = {"candidate_rows": int(t["group"].numel()),
                                 "candidate_requests": int(torch.unique(t["group"]).numel())}
        out.update(truth_topk_metrics(t["score"], truth, t["group"], k))
        out.update({f"{name}_by_click": v for name, v in truth_topk_metrics(t["click_score"], truth, t["group"], k).items()})
        out.update(oracle_topk_metrics(truth, t["group"], k))
        sat = f"true_sat@{k}"
        out[f"{sat}_headroom_share"] = headroom_share(out[sat], out[f"{sat}_oracle_click"], out[f"{sat}_oracle_sat"])
        out["tradeoff"] = self.tradeoff(t, truth) if "sat_score" in t else None
        return out

    def tradeoff(self, t: Mapping[str, torch.Tensor], truth: Mapping[str, torch.Tensor]) -> List[Dict[str, float]]:
        """[{w_sat, true_sat@k, true_click@k}] ranking by log sigmoid(y) + w log sigmoid(s_f) at each configured w:
        how much true satisfaction the fusion buys and what it costs in true clicks (the report's curve)."""
        click, sat = F.logsigmoid(t["click_score"]), F.logsigmoid(t["sat_score"])
        return [{"w_sat": float(w), **truth_topk_metrics(click + w * sat, truth, t["group"], self.cfg.k)}
                for w in self.cfg.tradeoff_sat_weights]


class LooMetrics:
    """Leave-one-out ranks: batches hold whole groups of 1 + K consecutive rows (ground truth first)."""

    def __init__(self, group_size: int, expected_users: Optional[int] = None) -> None:
        self.group_size, self.expected = group_size, expected_users
        self.acc = MetricAccumulator()

    def update(self, batch: Batch, out: Mapping[str, torch.Tensor]) -> None:
        scores = out["click"].detach().double()
        if scores.numel() % self.group_size:
            raise ValueError(f"leave-one-out: {scores.numel()} rows are not whole groups of {self.group_size}")
        groups = scores.view(-1, self.group_size)
        self.acc.update(ranks=loo_ranks(groups), user=batch.ids["user_id"].view(-1, self.group_size)[:, 0])

    def compute(self) -> Dict[str, float]:
        t = self.acc.compute()
        if "ranks" not in t:
            raise ValueError("leave-one-out: no users were scored")
        users = t["user"]
        if torch.unique(users).numel() != users.numel() or (self.expected is not None and users.numel() != self.expected):
            raise RuntimeError(f"leave-one-out: scored {users.numel()} rows for {torch.unique(users).numel()} users, "
                               f"expected each of {self.expected} users exactly once")
        return {**metrics_from_ranks(t["ranks"]), "loo_users": int(users.numel())}


# ------------------------------------------------------------------------------------------ leave-one-out rows
def item_side_columns(data: DataConfig, item_features: Sequence[str]) -> List[str]:
    """Columns that describe the candidate item: the item id, the columns of `item_features`
    (single-valued features, e.g. item_id, author_id, category_id) and every dense column
    (the ranker treats dense features as item attributes)."""
    cols = [data.ids.item_id] + [data.feature(n).column for n in item_features] + [f.column for f in data.dense]
    return list(dict.fromkeys(cols))


@dataclass
class LooPlan:
    """Everything needed to score SAQRec's leave-one-out lists; identical on every rank."""

    users: np.ndarray  # int64 [N] ascending
    items: np.ndarray  # int64 [N, 1 + K], column 0 = the user's last click
    rows: pa.Table  # [N] the ground-truth rows (features only), aligned with users
    attrs: AttributeTable  # item_id -> item-side columns
    item_columns: List[str]
    data: DataConfig
    skipped_users: int = 0  # users left out: fewer never-interacted catalogue items than loo_negatives

    @property
    def group_size(self) -> int:
        return int(self.items.shape[1])

    def user_slice(self, rank: int, world: int) -> np.ndarray:
        """Row positions of this rank's users (round robin: shares differ by at most one user)."""
        return np.arange(rank, len(self.users), world)

    def batches(self, rank: int = 0, world: int = 1, users_per_batch: int = 32) -> Iterator[Batch]:
        mine = self.user_slice(rank, world)
        for lo in range(0, len(mine), users_per_batch):
            yield self.batch_for(mine[lo:lo + users_per_batch])

    def batch_for(self, positions: np.ndarray) -> Batch:
        g = self.group_size
        items = self.items[positions].reshape(-1)
        attrs = self.attrs.lookup(items)
        replace = {c: (items if c == self.data.ids.item_id else attrs[c]) for c in self.item_columns}
        table = repeat_with(self.rows, np.repeat(positions, g), replace)
        (batch,) = table_batches(table, self.data, table.num_rows, file="<leave-one-out rows>")
        return batch


def build_loo_plan(data_dir: str | Path, data: DataConfig, item_columns: Sequence[str], cfg: EvaluationConfig,
                   split: str = "test", history_splits: Sequence[str] = ("train", "valid", "test"),
                   attribute_splits: Sequence[str] = ("train", "valid", "test", "candidates")) -> LooPlan:
    """Leave-one-out lists for the users with a click in DIR/`split` (see module doc)."""
    root = Path(data_dir)
    ids, click = data.ids, data.labels.click
    t = read_columns(root / split, [ids.user_id, ids.item_id, ids.timestamp, click])
    u, i, ts = (t.column(c).to_numpy().astype(np.int64) for c in (ids.user_id, ids.item_id, ids.timestamp))
    c = t.column(click).to_numpy(zero_copy_only=False).astype(np.int64)
    gt = last_clicks(u, i, ts, c)
    if not gt:
        raise ValueError(f"leave-one-out: {root / split} has no clicks")
    clicked = np.flatnonzero(c == 1)
    order = clicked[np.lexsort((clicked, i[clicked], ts[clicked], u[clicked]))]  # last row = last click
    last_row = np.flatnonzero(np.append(u[order][1:] != u[order][:-1], True))
    row_of = dict(zip(u[order][last_row].tolist(), order[last_row].tolist()))
    attr_cols = [col for col in item_columns if col != ids.item_id]
    sources = [root / s for s in attribute_splits if (root / s).exists()]
    attrs = collect_attributes(sources, ids.item_id, attr_cols)
    seen_u, seen_i = [], []
    for s in history_splits:
        h = read_columns(root / s, [ids.user_id, ids.item_id])
        seen_u.append(h.column(ids.user_id).to_numpy())
        seen_i.append(h.column(ids.item_id).to_numpy())
    interacted = interactions_by_user(np.concatenate(seen_u), attrs.index_of(np.concatenate(seen_i)))
    last_pos = {user: int(attrs.index_of(np.array([item]))[0]) for user, item in gt.items()}
    # a user who interacted with almost the whole catalogue cannot get K distinct negatives: left out, counted
    short = sorted(u for u, i in last_pos.items()
                   if len(attrs) - np.union1d(interacted.get(u, np.empty(0, np.int64)), [i]).size < cfg.loo_negatives)
    for u in short:
        del last_pos[u]
    if not last_pos:
        raise ValueError(f"leave-one-out: no user of {root / split} has {cfg.loo_negatives} never-interacted items "
                         f"among the {len(attrs)} items of the catalogue; lower evaluate.loo_negatives")
    users, cand = build_loo_candidates(last_pos, interacted, len(attrs), cfg.loo_negatives, cfg.loo_seed)
    items = attrs.keys[cand]
    rows = take_rows(root / split, np.array([row_of[x] for x in users.tolist()], dtype=np.int64))
    drop = [col for col in rows.schema.names if col.startswith(data.truth_prefix)]
    drop += [getattr(data.labels, n) for n in ("click", "watch_time_s", "skip", "questionnaire_answered", "satisfied")]
    rows = rows.drop_columns([col for col in dict.fromkeys(drop) if col in rows.schema.names])
    return LooPlan(users, items, rows, attrs, list(item_columns), data, skipped_users=len(short))

"""Stage-1 model and loss settings: the `pretrain:`, `propensity:` and `satisfaction:` config sections.

Algorithm 1 of SAQRec trains three models in order: a click model (the "pre-trained recommendation
model" whose embedding tables initialise the satisfaction model, sec. 4.2.2), the propensity model
rho (eq. 5) and the satisfaction model g (eqs. 1, 6). Feature names refer to `data:`; they are checked
against it when a model is built (satrank.models.stage1.tasks), with errors naming the config key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional

from satrank.pipeline.config import ConfigError

SatLoss = Literal["naive", "ips", "snips", "dr"]
SatTables = Literal["frozen", "fine_tune", "own"]
SAT_TABLES = ("frozen", "fine_tune", "own")
SatForm = Literal["mlp", "mf"]
SAT_FORMS = ("mlp", "mf")


def _check_hidden(path: str, hidden: List[int]) -> None:
    bad = [h for h in hidden if h <= 0]
    if bad:
        raise ConfigError(f"{path}: layer sizes must be > 0, got {hidden}")


def _check_dropout(path: str, p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"{path}: dropout must be in [0, 1), got {p}")


@dataclass
class TowerConfig:
    """User/item towers shared by the click model and the satisfaction model (same shapes, so the
    satisfaction model can be initialised from the click model's weights)."""

    dim: int = 32  # d of the user vector u and item vector v
    hidden: List[int] = field(default_factory=lambda: [64])  # MLP hidden sizes (ReLU), then Linear -> dim
    user_features: List[str] = field(default_factory=lambda: ["user_id", "user_activity"])
    # Item side: by default only what a click-history item has (its id), so that the satisfaction model g
    # built on these towers can score history items for MLSE (SatisfactionModel.score_history).
    item_features: List[str] = field(default_factory=lambda: ["item_id"])
    item_dense: List[str] = field(default_factory=list)  # dense columns on the item side
    history: Optional[str] = "hist_click"  # a sequence feature encoded into the user vector (null = none)
    history_encoder: Literal["mean", "transformer"] = "mean"  # masked mean | 1-layer Transformer + masked mean
    transformer_heads: int = 2
    transformer_ff: int = 64
    attention: Literal["fused", "reference"] = "reference"  # transformer encoder: nn.TransformerEncoderLayer | fused (SDPA)
    dropout: float = 0.0

    def validate(self, path: str) -> None:
        if self.dim <= 0:
            raise ConfigError(f"{path}.dim: must be > 0, got {self.dim}")
        _check_hidden(f"{path}.hidden", self.hidden)
        _check_dropout(f"{path}.dropout", self.dropout)
        if not self.user_features:
            raise ConfigError(f"{path}.user_features: needs at least one feature")
        if not self.item_features:
            raise ConfigError(f"{path}.item_features: needs at least one feature")
        if self.transformer_heads <= 0 or self.transformer_ff <= 0:
            raise ConfigError(f"{path}: transformer_heads and transformer_ff must be > 0")


@dataclass
class PretrainConfig:
    """`pretrain:` the click model, logit = <u, v> + b, trained with BCE on clicks (eq. 15), plus an optional
    auxiliary watch-time head on [u, v, u*v] (regression of log1p(watch_time_s)) whose gradient also shapes
    the tables and towers that the satisfaction model later inherits frozen (docs/stage1.md)."""

    tower: TowerConfig = field(default_factory=TowerConfig)
    watch_time_weight: float = 1.0  # 0 = click only (the paper's base ranker)
    watch_time_rows: Literal["clicked", "all"] = "clicked"  # rows whose watch time is regressed
    # log1p: MSE on log1p(watch_time_s) (dominated by the item's duration) | fraction: BCE of a logit against the
    # share watched, clip(watch_time_s / duration, 0, 1), the part of viewing that satisfaction drives
    watch_time_target: Literal["log1p", "fraction"] = "fraction"
    duration_feature: str = "duration_s"  # dense feature holding the item's duration (fraction target only)

    def validate(self, path: str) -> None:
        if self.watch_time_weight < 0:
            raise ConfigError(f"{path}.watch_time_weight: must be >= 0, got {self.watch_time_weight}")
        if self.watch_time_target not in ("log1p", "fraction"):
            raise ConfigError(f"{path}.watch_time_target: must be log1p or fraction, got {self.watch_time_target!r}")


# behaviour label role -> input transform (satrank.models.stage1.tasks.PropensityArch)
# behaviour input -> how it enters rho: binary 0/1, log1p(seconds), or `share` = clip(watch_time_s / duration, 0, 1)
# (the share of the video watched; the duration is the log1p dense column `propensity.duration_feature`)
BEHAVIOUR_INPUTS = {"click": "binary", "skip": "binary", "watch_time_s": "log1p", "watch_fraction": "share"}
BEHAVIOUR_LABEL = {"watch_fraction": "watch_time_s"}  # the batch label an input is computed from (default: itself)


@dataclass
class PropensityConfig:
    """`propensity:` rho(u, i) = P(questionnaire_answered = 1), an MLP trained on all impressions (eq. 5)."""

    features: List[str] = field(
        default_factory=lambda: ["user_id", "user_activity", "item_id", "author_id", "category_id"]
    )
    dense: List[str] = field(default_factory=lambda: ["duration_s"])
    history: Optional[str] = None  # optionally a masked-mean sequence feature as extra input
    # Logged behaviour of the impression itself as inputs (every impression has it, answered or not):
    # click and skip as 0/1, watch_time_s as log1p. Answering follows viewing, so P(o | u, i, behaviour)
    # is the propensity IPS needs when behaviour drives answering (docs/stage1.md).
    behaviour: List[str] = field(default_factory=list)  # the paper's rho(u, i); configs/sim.yaml sets [click, watch_time_s]
    duration_feature: str = "duration_s"  # dense column (log1p seconds) of the item's duration: watch_fraction only
    hidden: List[int] = field(default_factory=lambda: [64, 32])
    dropout: float = 0.0

    def validate(self, path: str) -> None:
        _check_hidden(f"{path}.hidden", self.hidden)
        _check_dropout(f"{path}.dropout", self.dropout)
        for b in self.behaviour:
            if b not in BEHAVIOUR_INPUTS:
                raise ConfigError(f"{path}.behaviour: {b!r} is not a behaviour label; choose from {list(BEHAVIOUR_INPUTS)}")
        if len(set(self.behaviour)) != len(self.behaviour):
            raise ConfigError(f"{path}.behaviour: duplicate entries in {self.behaviour}")
        if not self.features and not self.dense and self.history is None and not self.behaviour:
            raise ConfigError(f"{path}: needs at least one input (features, dense or history)")


@dataclass
class SatisfactionConfig:
    """`satisfaction:` g(u, i) = MLP([u, v, u*v]) on frozen click-model embeddings (eqs. 1, 6).

    tables: frozen (the paper's: the click model's tables, bit-identical) | fine_tune (start from the click model's
    tables and train them with g's loss) | own (fresh tables and towers, nothing loaded from --init; g is then a
    neural MF trained on the answers alone). docs/stage1.md "g's own tables on rating data".
    loss: naive (eq. 3) | ips (eq. 6) | snips | dr; see models/stage1/losses.py. clip is M of eq. 6 and
    must be > 0 so that rho_hat = 0 keeps a finite weight. The towers use `pretrain.tower`.
    """

    loss: SatLoss = "ips"
    clip: float = 0.005
    # rho clip of the offline estimates (metrics `estimates`, jobs.evaluate `offline_top_k`), not of training:
    # an estimate wants no bias, training wants low variance; null = `clip` (docs/stage1.md "Offline estimates")
    estimate_clip: Optional[float] = 1.0e-5
    ips_normalizer: Literal["all", "answered"] = "all"  # all = |D| (unbiased, Thm 4.1); answered = |O| as printed
    hidden: List[int] = field(default_factory=lambda: [64, 32])
    dropout: float = 0.0
    imputation_hidden: List[int] = field(default_factory=lambda: [32])  # dr only
    imputation_weight: float = 1.0  # dr only: total = L_DR + weight * L_imputation
    tables: SatTables = "frozen"  # frozen | fine_tune | own (above); trained tables need satisfaction_train.drop_last
    # add <u, v> to g's logit (the MLP of eq. 1 plus a generalised-MF term, as NeuMF): an MLP over [u, v, u*v] learns
    # a dot product slowly and poorly from a few thousand answers (docs/stage1.md "g's own tables on rating data")
    dot_product: bool = False
    # mlp: eq. 1, MLP([u, v, u*v]) over the towers | mf: a logistic MF read straight off the tables, logit =
    # <e_u[:-1], e_i[:-1]> + e_u[-1] + e_i[-1] + b (the last coordinate of each row is its bias) with e_u, e_i the rows
    # of pretrain.tower's FIRST user and item feature; the towers and head are kept but frozen and unused. Any learned
    # map between the tables and the product lets g fit the answers before the factors learn the users' tastes
    # (docs/benchmarks.md "Ratings baseline"); mf needs trained tables (tables: own | fine_tune)
    form: SatForm = "mlp"
    init_tower_from_pretrain: bool = True  # copy the click model's tower MLPs too (tables copied unless tables=own)
    freeze_tower: bool = False  # also freeze the tower MLPs
    check_finite: bool = True  # raise FloatingPointError on a non-finite loss (one host sync per batch)
    # What RUN/best selects on where the validation split is missing not at random (some rows unanswered: the
    # answers are a self-selected sample): "loss" = the job's validation loss (1/rho-weighted for ips / snips /
    # dr) instead of the answered-row metrics; null = satisfaction_train.monitor on any split (docs/stage1.md)
    mnar_monitor: Optional[Literal["loss"]] = "loss"

    @property
    def resolved_estimate_clip(self) -> float:
        """The rho clip the offline estimates use: estimate_clip, or the training clip where it is null."""
        return self.clip if self.estimate_clip is None else self.estimate_clip

    def validate(self, path: str) -> None:
        if not 0.0 < self.clip <= 1.0:
            raise ConfigError(f"{path}.clip: the propensity clip M must be in (0, 1], got {self.clip}")
        if self.estimate_clip is not None and not 0.0 < self.estimate_clip <= 1.0:
            raise ConfigError(f"{path}.estimate_clip: must be in (0, 1] or null (= clip), got {self.estimate_clip}")
        if self.tables not in SAT_TABLES:
            raise ConfigError(f"{path}.tables: must be one of {list(SAT_TABLES)}, got {self.tables!r}")
        if self.form not in SAT_FORMS:
            raise ConfigError(f"{path}.form: must be one of {list(SAT_FORMS)}, got {self.form!r}")
        if self.form == "mf" and self.tables == "frozen":
            raise ConfigError(f"{path}.form: mf learns in the tables themselves; it needs {path}.tables own or "
                              f"fine_tune, got frozen")
        if self.form == "mf" and self.dot_product:
            raise ConfigError(f"{path}.dot_product: adds the towers' <u, v> to the mlp form; with form mf set it false")
        _check_hidden(f"{path}.hidden", self.hidden)
        _check_hidden(f"{path}.imputation_hidden", self.imputation_hidden)
        _check_dropout(f"{path}.dropout", self.dropout)
        if self.imputation_weight < 0:
            raise ConfigError(f"{path}.imputation_weight: must be >= 0, got {self.imputation_weight}")

"""Settings of the stage-2 ranker (the `model:` config section) and of its multi-task loss (`loss:`).

SAQRec sec. 4.3-4.4: SID (eqs. 9-10), MLSE (eqs. 11-12), fusion (eq. 13), towers (eq. 14) and the
loss L = L_C + beta L_S^final + gamma ||Theta||_2 (eqs. 15-19), extended with a watch-time and a skip
head and the skip history of the implicit-negative-feedback paper. Every default is in configs/.
The ablation switches of the paper's Table 3 are `sid`, `mlse` and `mtl`; `variant: click_only` is
the SASRec-style baseline (one Transformer over the click history, h_r and v_u fused, click tower).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal

from satrank.models.ranker.heads import ExtraHead
from satrank.pipeline.config import ConfigError

GateActivation = Literal["softmax", "none"]
Grouping = Literal["chunk", "balanced"]


@dataclass
class HistoryNames:
    """Which sequence features (names in `data.sequence`) play which history role."""

    click: str = "hist_click"  # T_r
    satisfied: str = "hist_satisfied"  # T_{s+}
    dissatisfied: str = "hist_dissatisfied"  # T_{s-}
    skip: str = "hist_skip"  # implicit negative feedback (used when model.use_skip_history)


@dataclass
class ModelConfig:
    variant: Literal["saqrec", "click_only"] = "saqrec"
    # ablation switches (paper Table 3); click_only ignores sid, mlse, mtl and every extra head/history
    sid: bool = True  # satisfaction information disentanglement (eqs. 9-10) + T_{s+}, T_{s-} encoders
    mlse: bool = True  # multi-level satisfaction enhancement (eqs. 11-12), needs the stage-1 model g
    mtl: bool = True  # satisfaction tower s_f and its loss L_S (eqs. 14, 16-18); false = click loss only
    # which estimate the served `satisfaction` head carries (ranking fusion, p_satisfied, sat_auc_answered), with mtl:
    # teacher = g(u, i), the stage-1 IPS model the tower is distilled from (eq. 16); tower = s_f (eq. 14).
    # Why teacher: with beta = 0.1 (eq. 19) the tower keeps about 2/3 of g's within-request signal (docs/alignment.md)
    served_satisfaction: Literal["teacher", "tower"] = "teacher"
    use_skip_history: bool = False  # encode `histories.skip` with its own Transformer, 6th fusion input
    skip_head: bool = False  # skip logit u_f . MLP_skip(v_i), trained with BCE on the `skip` label
    watch_time_head: bool = True  # regresses log1p(watch_time_s) from [u_f, v_i, log1p(duration)]
    extra_heads: List[ExtraHead] = field(default_factory=list)  # binary label heads (satrank.models.ranker.heads)
    histories: HistoryNames = field(default_factory=HistoryNames)
    item_feature: str = "item_id"  # pooled feature holding the candidate's item-table embedding
    user_features: List[str] = field(default_factory=lambda: ["user_id", "user_activity"])  # -> v_u
    item_attr_features: List[str] = field(default_factory=lambda: ["author_id", "category_id"])  # -> v_i
    duration_feature: str = "duration_s"  # dense feature giving the candidate's duration (watch-time input)
    # history encoders (eqs. 7-8)
    transformer_layers: int = 1
    transformer_heads: int = 2  # must divide the item embedding dim d
    transformer_ff_mult: int = 4  # feed-forward width = mult * d
    dropout: float = 0.1
    norm_first: bool = True  # pre-LayerNorm blocks (+ a final LayerNorm)
    attention: Literal["fused", "reference"] = "reference"  # reference: nn.TransformerEncoder | fused: SDPA, mask once per batch
    # gates MLP_{s+}, MLP_{s-}, MLP_MLSE, MLP_f
    gate_hidden: List[int] = field(default_factory=list)  # [] = one linear layer R^{kd} -> R^k
    gate_activation: GateActivation = "softmax"  # softmax: convex weights; none: raw MLP outputs
    # MLSE (eqs. 11-12)
    num_levels: int = 9  # N_I (the paper's choice)
    mlse_grouping: Grouping = "chunk"  # chunk: groups of k = ceil(n/N_I) (paper); balanced: sizes differ <= 1
    mlse_temperature: float = 1.0  # within-group weights softmax(s_hat / T); T = 1 is eq. 11
    # towers (eq. 14)
    sat_mlp_hidden: List[int] = field(default_factory=list)  # MLP_s: R^d -> R^d ([] = linear)
    skip_mlp_hidden: List[int] = field(default_factory=list)  # MLP_skip: R^d -> R^d
    watch_time_hidden: List[int] = field(default_factory=lambda: [64])

    def validate(self, path: str) -> None:
        def bad(key: str, msg: str) -> ConfigError:
            return ConfigError(f"{path}.{key}: {msg}")

        for key in ("transformer_layers", "transformer_heads", "transformer_ff_mult", "num_levels"):
            if getattr(self, key) < 1:
                raise bad(key, f"must be >= 1, got {getattr(self, key)}")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.mlse_temperature <= 0:
            raise bad("mlse_temperature", f"must be > 0, got {self.mlse_temperature}")
        if self.served_satisfaction not in ("teacher", "tower"):
            raise bad("served_satisfaction", f"must be 'teacher' or 'tower', got {self.served_satisfaction!r}")
        for key in ("gate_hidden", "sat_mlp_hidden", "skip_mlp_hidden", "watch_time_hidden"):
            if any(w < 1 for w in getattr(self, key)):
                raise bad(key, f"hidden widths must be >= 1, got {getattr(self, key)}")
        if not self.user_features:
            raise bad("user_features", "needs at least one pooled feature to form v_u")
        if len(set(self.user_features)) != len(self.user_features):
            raise bad("user_features", f"repeated names in {self.user_features}")
        if len(set(self.item_attr_features)) != len(self.item_attr_features):
            raise bad("item_attr_features", f"repeated names in {self.item_attr_features}")
        names = [h.name for h in self.extra_heads]
        if len(set(names)) != len(names):
            raise bad("extra_heads", f"repeated head names in {names}")

    # ------------------------------------------------------------------ resolved switches
    @property
    def saqrec(self) -> bool:
        return self.variant == "saqrec"

    @property
    def use_sid(self) -> bool:
        return self.saqrec and self.sid

    @property
    def use_mlse(self) -> bool:
        return self.saqrec and self.mlse

    @property
    def use_satisfaction(self) -> bool:
        """The satisfaction tower exists (and L_S is trained) only with mtl on."""
        return self.saqrec and self.mtl

    @property
    def use_watch_time(self) -> bool:
        return self.saqrec and self.watch_time_head

    @property
    def use_skip_head(self) -> bool:
        return self.saqrec and self.skip_head

    @property
    def use_skip_seq(self) -> bool:
        return self.saqrec and self.use_skip_history

    def required_histories(self) -> List[str]:
        """Sequence feature names the ranker reads under the resolved switches."""
        names = [self.histories.click]
        if self.use_sid:
            names += [self.histories.satisfied, self.histories.dissatisfied]
        if self.use_skip_seq:
            names.append(self.histories.skip)
        return names


@dataclass
class MultiTaskLossConfig:
    """L = L_C + beta L_S^final + w_wt L_wt + w_skip L_skip + gamma L2 (eq. 19 plus the extra heads)."""

    beta: float = 0.1  # weight of L_S^final (eq. 19); the paper sweeps 1e-5 .. 1e-1
    gamma: float = 1.0e-6  # weight of the L2 term over dense (non-embedding) parameters
    l2_form: Literal["squared", "norm"] = "squared"  # squared: sum theta^2 (weight decay); norm: ||theta||_2 as printed
    watch_time_weight: float = 0.1
    watch_time_loss: Literal["mse", "huber"] = "huber"  # on log1p(watch_time_s)
    huber_delta: float = 1.0
    watch_time_rows: Literal["all", "clicked"] = "all"  # rows whose watch time is regressed
    skip_weight: float = 0.1
    # adaptive label correction (eqs. 17-18), Beta mixture of Arazo et al. 2019
    label_correction: bool = True
    n_mix: int = 2  # 0-based epoch t from which L_S^mix replaces L_S (2 = the third epoch, paper's best)
    bmm_iters: int = 10  # EM iterations
    bmm_quantiles: List[float] = field(default_factory=lambda: [0.05, 0.95])  # loss -> (0,1) normalisation
    bmm_lookup_size: int = 100  # grid points of the monotone lambda(loss) lookup
    bmm_max_samples: int = 200000  # uniform reservoir of per-sample losses per epoch and rank
    check_finite: bool = True  # raise on a non-finite loss (one host sync per step)

    def validate(self, path: str) -> None:
        def bad(key: str, msg: str) -> ConfigError:
            return ConfigError(f"{path}.{key}: {msg}")

        for key in ("beta", "gamma", "watch_time_weight", "skip_weight"):
            if getattr(self, key) < 0:
                raise bad(key, f"must be >= 0, got {getattr(self, key)}")
        if self.huber_delta <= 0:
            raise bad("huber_delta", f"must be > 0, got {self.huber_delta}")
        if self.n_mix < 1:
            raise bad("n_mix", f"must be >= 1 (lambda is fitted on the previous epoch's losses), got {self.n_mix}")
        if self.bmm_iters < 1:
            raise bad("bmm_iters", f"must be >= 1, got {self.bmm_iters}")
        q = self.bmm_quantiles
        if len(q) != 2 or not 0.0 <= q[0] < q[1] <= 1.0:
            raise bad("bmm_quantiles", f"must be [lo, hi] with 0 <= lo < hi <= 1, got {q}")
        if self.bmm_lookup_size < 2:
            raise bad("bmm_lookup_size", f"must be >= 2, got {self.bmm_lookup_size}")
        if self.bmm_max_samples < 100:
            raise bad("bmm_max_samples", f"must be >= 100, got {self.bmm_max_samples}")

"""Settings of stage 3, EASQ (the `easq:` config section): LoRA pathway, L_sat, DPO, ramp and pairs.

EASQ (End-to-end Alignment of user Satisfaction via Questionnaire) adds to the trained stage-2
ranker an isolated LoRA pathway trained only by the sparse questionnaire answers (L_sat), and a
DPO objective that aligns the serving (main) head with the satisfaction head on within-user
preference pairs. See docs/easq.md for the design; every default is in configs/.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal

from satrank.pipeline.config import ConfigError

EASQ_TARGETS = ("item", "user")
DpoMode = Literal["easq", "adapter_policy"]
SatLossKind = Literal["ips", "snips", "pairwise"]
LogProb = Literal["logit", "log_sigmoid"]
PairWeight = Literal["product", "mean"]
RewardPairs = Literal["none", "sat_head", "teacher"]
RewardPairWithin = Literal["user", "user_click"]
Pathway = Literal["isolated", "shared"]


@dataclass
class EasqConfig:
    # ---- LoRA pathway (satrank.models.easq.pathway.EasqRanker)
    # isolated: LoRA + satisfaction head behind stop-gradients (L_sat trains only them); shared: the baseline
    # auxiliary tower, the head reads the ranker's u_f, v_i directly (no LoRA, no stop-gradient), so L_sat
    # trains the backbone and the tables too (docs/easq.md, "Isolated vs shared")
    pathway: Pathway = "isolated"
    targets: List[str] = field(default_factory=lambda: ["item"])  # item: v_i layer; user: v_u = user_proj
    # single-valued sparse features (e.g. user_id, item_id) whose ids get a LoRA of their embedding table
    # (satrank.models.common.lora.LoRAEmbedding): per-id capacity of the satisfaction path, read by the satisfaction head only
    # (teacher-only: the main path and serving never see it; DPO carries it over). Empty: none
    id_targets: List[str] = field(default_factory=list)
    rank: int = 4  # r
    alpha: float = 8.0  # delta = (alpha / r) B A x
    dropout: float = 0.0  # on the LoRA input (training only)
    sat_head_hidden: List[int] = field(default_factory=lambda: [32])  # satisfaction head MLP widths
    lr: float = 1.0e-2  # optimizer of the `lora` group (LoRA + satisfaction head), Adam
    weight_decay: float = 0.0
    # ---- L_sat (satrank.models.easq.dpo.EasqLoss.sat): trains the LoRA + satisfaction head only
    sat_loss: SatLossKind = "ips"  # ips | snips (IPS-weighted BCE on answered rows) | pairwise (on pairs)
    sat_weight: float = 1.0
    clip: float = 0.005  # M: inverse propensities 1 / max(rho_hat, M); well below the answer rate
    ips_normalizer: Literal["all", "answered"] = "all"  # ips only, see satrank.models.stage1.losses.ips_loss
    # + distill_weight * BCE(satisfaction head, g's pseudo-label) on every row: the head starts from what the
    # stage-1 satisfaction model g (itself trained on the answers, eq. 6) knows, instead of from ~2% answered
    # rows alone; needs the stage-2 teacher g (model.mtl). 0 = the head learns from the answers only.
    distill_weight: float = 1.0
    # ---- DPO (satrank.models.easq.dpo.dpo_loss)
    dpo_mode: DpoMode = "easq"  # easq: policy = main head, reference = sg(sat head); adapter_policy: ablation
    dpo_head: str = "click"  # main-head output whose logit is the policy's log-probability
    beta: float = 1.0  # configs/sim.yaml: 0.3 with the online pairs (more satisfaction per unit of click AUC)
    logprob: LogProb = "logit"  # logit: z (per-user softmax, normaliser cancels) | log_sigmoid: log sigma(z)
    dpo_weight: float = 0.03  # weight of L_DPO once the ramp is at 1 (docs/easq.md: 1.0 wrecks the click model)
    ramp_threshold: float = 0.6  # satisfaction head's running answered-AUC that starts the ramp
    ramp_updates: int = 20  # updates from 0 to full weight once the threshold is cleared (0 = jump)
    auc_window: int = 1024  # most recent answered rows in the running AUC
    auc_min_per_class: int = 50  # satisfied and dissatisfied rows needed before the AUC counts
    # ---- pairs (satrank.models.easq.pair_buffer.PairBuffer)
    pair_weight: PairWeight = "product"  # combine the two rows' clipped inverse propensities
    pairs_per_step: int = 256  # most pairs rescored per step (per rank)
    pairs_per_row: int = 4  # partners of each freshly answered row (most recent first)
    weak_pairs: bool = False  # also (satisfied, skipped & unanswered) of the same request
    weak_pair_weight: float = 0.5  # extra factor on weak pairs
    buffer_per_user: int = 32  # answered rows kept per user (and skipped rows, with weak_pairs)
    buffer_total: int = 50000  # rows kept in all (per rank); ~0.85 kB per row with the sim contract
    seed: int = 0  # pair sampling
    # online pairs (satrank.models.easq.dpo.reward_pairs): each batch's rows of one user, ordered by a reward logit,
    # weighted by the Bradley-Terry confidence; none | sat_head (the satisfaction head: the pathway's in-model reward)
    # | teacher (stage 1's g). Added to the answered pairs' DPO loss with weight reward_pair_weight.
    # (none / 1.0 here, EASQ's answered pairs alone; configs/sim.yaml, the embedded default, turns them on)
    reward_pairs: RewardPairs = "none"
    reward_pair_weight: float = 1.0
    # which rows an online pair may join: user (any two rows of one user) | user_click (two rows of one user with the
    # same click label: the pair never asks the click head to rank an unclicked row over a clicked one)
    reward_pair_within: RewardPairWithin = "user"

    def validate(self, path: str) -> None:
        def bad(key: str, msg: str) -> ConfigError:
            return ConfigError(f"{path}.{key}: {msg}")

        if self.pathway not in ("isolated", "shared"):
            raise bad("pathway", f"must be 'isolated' or 'shared', got {self.pathway!r}")
        if self.pathway == "shared" and self.dpo_mode == "adapter_policy":
            raise bad("pathway", "'shared' has no adapters; dpo_mode adapter_policy needs pathway: isolated")
        if not self.targets:
            raise bad("targets", f"needs at least one of {list(EASQ_TARGETS)}")
        unknown = [t for t in self.targets if t not in EASQ_TARGETS]
        if unknown:
            raise bad("targets", f"{unknown} are not LoRA targets; choose from {list(EASQ_TARGETS)}")
        if len(set(self.targets)) != len(self.targets):
            raise bad("targets", f"repeated names in {self.targets}")
        if len(set(self.id_targets)) != len(self.id_targets):
            raise bad("id_targets", f"repeated names in {self.id_targets}")
        if self.rank < 1:
            raise bad("rank", f"must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise bad("alpha", f"must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", f"must be in [0, 1), got {self.dropout}")
        if any(w < 1 for w in self.sat_head_hidden):
            raise bad("sat_head_hidden", f"hidden widths must be >= 1, got {self.sat_head_hidden}")
        if self.lr <= 0:
            raise bad("lr", f"must be > 0, got {self.lr}")
        if self.reward_pairs not in ("none", "sat_head", "teacher"):
            raise bad("reward_pairs", f"must be none, sat_head or teacher, got {self.reward_pairs!r}")
        if self.reward_pair_within not in ("user", "user_click"):
            raise bad("reward_pair_within", f"must be user or user_click, got {self.reward_pair_within!r}")
        for key in ("weight_decay", "sat_weight", "dpo_weight", "weak_pair_weight", "distill_weight",
                    "reward_pair_weight"):
            if getattr(self, key) < 0:
                raise bad(key, f"must be >= 0, got {getattr(self, key)}")
        if not 0.0 < self.clip <= 1.0:
            raise bad("clip", f"must be in (0, 1], got {self.clip}")
        if self.beta <= 0:
            raise bad("beta", f"must be > 0, got {self.beta}")
        if not self.dpo_head:
            raise bad("dpo_head", "must name a main-head output, e.g. click")
        if not 0.0 <= self.ramp_threshold <= 1.0:
            raise bad("ramp_threshold", f"is an AUC and must be in [0, 1], got {self.ramp_threshold}")
        if self.ramp_updates < 0:
            raise bad("ramp_updates", f"must be >= 0, got {self.ramp_updates}")
        if self.auc_window < 2:
            raise bad("auc_window", f"must be >= 2, got {self.auc_window}")
        if self.auc_min_per_class < 1:
            raise bad("auc_min_per_class", f"must be >= 1, got {self.auc_min_per_class}")
        if 2 * self.auc_min_per_class > self.auc_window:
            raise bad("auc_min_per_class", f"2 x {self.auc_min_per_class} rows cannot fit auc_window={self.auc_window}")
        for key in ("pairs_per_step", "pairs_per_row"):
            if getattr(self, key) < 1:
                raise bad(key, f"must be >= 1, got {getattr(self, key)}")
        if self.buffer_per_user < 2:
            raise bad("buffer_per_user", f"must be >= 2 (a pair needs two rows), got {self.buffer_per_user}")
        if self.buffer_total < self.buffer_per_user:
            raise bad("buffer_total", f"must be >= buffer_per_user={self.buffer_per_user}, got {self.buffer_total}")
        if self.seed < 0:
            raise bad("seed", f"must be >= 0, got {self.seed}")

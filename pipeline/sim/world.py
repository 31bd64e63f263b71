"""The simulated short-video world: users, authors, items and the ground-truth behaviour model.

Why: SAQRec (CIKM'24) and EASQ claims — clicks are a biased proxy of satisfaction; questionnaire
feedback is sparse and missing-not-at-random — can only be *tested* against a world whose true
click / satisfaction / answer probabilities are known. This module holds that world (built
deterministically from the seed, so any later job can rebuild it from `world.json`) and the
vectorised per-round step; `satrank.pipeline.sim.simulate` drives rounds and writes Parquet.
The generative story and every formula are in docs/simulator.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Dict, List, Literal, Optional, Tuple

import numpy as np

from satrank.pipeline.config import ConfigError

N_ACTIVITY = 5  # user_activity buckets 0 (least active) .. 4 (most active)
HISTORY_CAPS = {"hist_click": 50, "hist_satisfied": 20, "hist_dissatisfied": 5, "hist_skip": 20}


@dataclass
class SimulateConfig:
    """The `simulate:` config section: world size and every generative parameter (docs/simulator.md)."""

    users: int = 2000
    items: int = 3000
    impressions: int = 200000
    seed: int = 0
    topics: int = 20  # = category_id values 0..topics-1
    authors: int = 400
    # users
    interest_concentration: float = 0.3  # Dirichlet alpha of user topic interests
    activity_bucket_probs: List[float] = field(default_factory=lambda: [0.30, 0.25, 0.20, 0.15, 0.10])
    activity_participation: List[float] = field(default_factory=lambda: [0.05, 0.15, 0.35, 0.60, 0.90])
    user_satisfaction_sd: float = 0.5  # per-user satisfaction offset (some users are hard to please)
    # authors and items
    author_topic_fidelity: float = 0.8  # P(item topic = author's main topic)
    author_quality_sd: float = 0.5
    item_quality_sd: float = 1.0
    attractiveness_sd: float = 1.0  # click-bait appeal, independent of quality
    duration_median_s: float = 20.0
    duration_sigma: float = 0.8
    duration_min_s: float = 3.0
    duration_max_s: float = 300.0
    zipf_exponent: float = 0.9  # exposure weight ~ (popularity rank + 1) ** -zipf_exponent
    popularity_quality_corr: float = 0.6  # correlation of the popularity ranking key with quality
    personalization: float = 0.6  # P(exposure drawn from the user's topic interests) vs global popularity
    # click: logit = click_bias + click_w_attractiveness * attract + click_w_interest * affinity
    click_bias: float = -0.9
    click_w_attractiveness: float = 1.0
    click_w_interest: float = 1.0
    # satisfaction: logit = sat_bias + sat_w_quality * quality + sat_w_interest * affinity + user offset
    sat_bias: float = -0.7
    sat_w_quality: float = 0.8
    sat_w_interest: float = 1.0
    sat_w_activity: float = 0.4  # + sat_w_activity * (activity - 2): active users are the satisfied ones
    sat_w_attractiveness: float = 0.0  # + w * attractiveness; < 0: click-bait disappoints (configs/sim_alt.yaml)
    # whose topic affinity the satisfaction logit reads: shared = the click affinity (one taste drives both) | own = a
    #   second Dirichlet draw per user, independent of the click taste (a diagnostic world, docs/simulator.md)
    sat_taste: Literal["shared", "own"] = "shared"
    # satisfaction feeds back into later clicks: every clicked view moves the user's click logit for that topic by
    #   +sat_feedback (satisfied) or -sat_feedback (not), the running offset clipped to +-sat_feedback_cap. 0 (the
    #   default) = a stationary world: past satisfaction says nothing about the next click (docs/simulator.md)
    sat_feedback: float = 0.0
    sat_feedback_cap: float = 1.0
    # questionnaire answered: logit = answer_bias + w_act*(activity-2) + w_pop*pop_z + w_click*click
    #   + w_watch*(watch_time_s / duration_s) + w_sat*sat
    answer_bias: float = -6.5
    answer_w_activity: float = 0.5
    answer_w_popularity: float = 0.4
    answer_w_click: float = 0.5
    answer_w_watch: float = 3.0  # the questionnaire shows in the player: longer views see (and answer) it more;
    #   < 0: short views answer more (dissatisfied viewers answer, configs/sim_alt.yaml)
    answer_w_satisfied: float = 0.0  # MNAR on the realised label: no propensity can undo it
    # watch time
    scroll_mean_s: float = 1.0  # unclicked impressions: Exponential(scroll_mean_s), capped at duration
    watch_beta_satisfied: List[float] = field(default_factory=lambda: [4.0, 1.5])
    watch_beta_dissatisfied: List[float] = field(default_factory=lambda: [1.2, 4.0])
    skip_threshold_s: float = 3.0  # skip = watch_time_s < skip_threshold_s
    # time
    start_timestamp: int = 1_700_000_000
    round_seconds: int = 600
    # output
    split_fractions: List[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])  # train, valid, test
    shard_rows: int = 50000
    row_group_rows: int = 8192
    compression: str = "zstd"
    candidate_requests: int = 500  # one request per sampled user (capped at `users`)
    candidates_per_request: int = 100
    candidate_exploration: float = 0.5  # candidates ~ (1-e) * exposure policy + e * uniform

    def validate(self, path: str = "simulate") -> None:
        def bad(key: str, msg: str) -> ConfigError:
            return ConfigError(f"{path}.{key}: {msg}")

        for f in fields(self):  # a NaN or infinite weight would silently poison every probability
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise bad(f.name, f"must be finite, got {v}")
        for key in ("users", "items", "impressions", "topics", "authors", "round_seconds",
                    "shard_rows", "row_group_rows", "candidates_per_request"):
            if getattr(self, key) <= 0:
                raise bad(key, f"must be > 0, got {getattr(self, key)}")
        if self.seed < 0 or self.candidate_requests < 0:
            raise bad("seed" if self.seed < 0 else "candidate_requests", "must be >= 0")
        for key in ("interest_concentration", "duration_median_s", "duration_sigma", "duration_min_s",
                    "scroll_mean_s", "skip_threshold_s"):
            if getattr(self, key) <= 0:
                raise bad(key, f"must be > 0, got {getattr(self, key)}")
        if self.duration_max_s < self.duration_min_s:
            raise bad("duration_max_s", "must be >= duration_min_s")
        for key in ("author_topic_fidelity", "personalization", "candidate_exploration"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise bad(key, f"must be in [0, 1], got {getattr(self, key)}")
        if not -1.0 <= self.popularity_quality_corr <= 1.0:
            raise bad("popularity_quality_corr", "must be in [-1, 1]")
        for key in ("activity_bucket_probs", "activity_participation"):
            v = getattr(self, key)
            if len(v) != N_ACTIVITY or min(v) < 0:
                raise bad(key, f"needs {N_ACTIVITY} non-negative numbers (one per activity bucket), got {v}")
        if sum(self.activity_bucket_probs) <= 0 or max(self.activity_participation) > 1:
            raise bad("activity_participation", "probabilities must be <= 1 and bucket probs not all 0")
        if sum(p * q for p, q in zip(self.activity_bucket_probs, self.activity_participation)) <= 0:
            raise bad("activity_participation", "no user could ever take part in a round")
        for key in ("watch_beta_satisfied", "watch_beta_dissatisfied"):
            v = getattr(self, key)
            if len(v) != 2 or min(v) <= 0:
                raise bad(key, f"needs two positive Beta parameters [a, b], got {v}")
        f = self.split_fractions
        if len(f) != 3 or min(f) < 0 or abs(sum(f) - 1.0) > 1e-6:
            raise bad("split_fractions", f"needs three non-negative fractions summing to 1, got {f}")
        if self.row_group_rows > self.shard_rows:
            raise bad("row_group_rows", f"must be <= shard_rows ({self.shard_rows})")
        if self.sat_taste not in ("shared", "own"):
            raise bad("sat_taste", f"must be 'shared' or 'own', got {self.sat_taste!r}")
        if self.sat_feedback < 0 or self.sat_feedback_cap < 0:
            raise bad("sat_feedback" if self.sat_feedback < 0 else "sat_feedback_cap", "must be >= 0")
        if self.candidates_per_request > self.items:
            raise bad("candidates_per_request", f"{self.candidates_per_request} exceeds items ({self.items})")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass
class World:
    """Latent state of users and items (float64 unless noted). Rebuilt exactly by `build_world(cfg)` (with
    sat_feedback > 0: as it stood at the first round; click_drift then changes while the log is written)."""

    theta: np.ndarray  # [U, T] user topic interests (Dirichlet)
    theta_cdf: np.ndarray  # [U, T] row-wise cumulative theta
    affinity: np.ndarray  # [U, T] log(1 + T*theta) - log 2  (0 for a uniform user)
    activity: np.ndarray  # [U] int64 bucket 0..4
    participation: np.ndarray  # [U] P(user takes part in a round)
    user_sat_offset: np.ndarray  # [U]
    author_topic: np.ndarray  # [A] int64
    author_quality: np.ndarray  # [A]
    item_topic: np.ndarray  # [I] int64 (= category_id)
    item_author: np.ndarray  # [I] int64
    quality: np.ndarray  # [I]
    attractiveness: np.ndarray  # [I]
    duration: np.ndarray  # [I] seconds
    pop_weight: np.ndarray  # [I] exposure weight (Zipf over a quality-correlated ranking), sums to 1
    pop_z: np.ndarray  # [I] log pop_weight standardised with exposure (pop_weight) weights
    global_cdf: np.ndarray  # [I] cumulative pop_weight
    topic_items: np.ndarray  # [I] item ids grouped by topic
    topic_cdf: np.ndarray  # [I] cumulative pop_weight in topic_items order
    topic_start: np.ndarray  # [T] index range of each topic in topic_items
    topic_end: np.ndarray  # [T]
    topic_mass: np.ndarray  # [T] sum of pop_weight per topic
    sat_affinity: np.ndarray  # [U, T] the topic affinity satisfaction reads: `affinity` itself unless sat_taste: own
    # [U, T] the running click offset from past satisfaction (sat_feedback > 0; None = stationary). The only state
    # that changes while the log is written (satrank.pipeline.sim.simulate); build_world starts it at 0
    click_drift: Optional[np.ndarray] = None


def _affinity(theta: np.ndarray) -> np.ndarray:
    """Topic affinity a(u, t) = log(1 + T theta_ut) - log 2 of [U, T] interests (0 for a uniform user)."""
    return np.log1p(theta.shape[1] * theta) - np.log(2.0)


def build_world(cfg: SimulateConfig) -> World:
    """Draw the latent world from `cfg.seed` (its own RNG stream, independent of the log)."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0]))
    U, I, T, A = cfg.users, cfg.items, cfg.topics, cfg.authors
    theta = rng.dirichlet(np.full(T, cfg.interest_concentration), size=U)
    theta_cdf = np.cumsum(theta, axis=1)
    theta_cdf[:, -1] = 1.0
    affinity = _affinity(theta)
    probs = np.asarray(cfg.activity_bucket_probs, dtype=np.float64)
    activity = rng.choice(N_ACTIVITY, size=U, p=probs / probs.sum()).astype(np.int64)
    participation = np.asarray(cfg.activity_participation, dtype=np.float64)[activity]
    user_sat_offset = rng.normal(0.0, cfg.user_satisfaction_sd, size=U)

    author_topic = rng.integers(0, T, size=A)
    author_quality = rng.normal(0.0, cfg.author_quality_sd, size=A)
    item_author = rng.integers(0, A, size=I)
    off_topic = rng.random(I) >= cfg.author_topic_fidelity
    item_topic = np.where(off_topic, rng.integers(0, T, size=I), author_topic[item_author])
    quality = author_quality[item_author] + rng.normal(0.0, cfg.item_quality_sd, size=I)
    attractiveness = rng.normal(0.0, cfg.attractiveness_sd, size=I)
    duration = np.clip(cfg.duration_median_s * np.exp(cfg.duration_sigma * rng.standard_normal(I)),
                       cfg.duration_min_s, cfg.duration_max_s)

    # The platform promotes good items: popularity rank follows a quality-correlated key.
    qz = (quality - quality.mean()) / (quality.std() + 1e-12)
    rho = cfg.popularity_quality_corr
    key = rho * qz + np.sqrt(1.0 - rho * rho) * rng.standard_normal(I)
    rank = np.empty(I, dtype=np.int64)
    rank[np.argsort(-key, kind="stable")] = np.arange(I)
    pop_weight = (rank + 1.0) ** -cfg.zipf_exponent
    pop_weight /= pop_weight.sum()
    logw = np.log(pop_weight)  # standardised under the exposure distribution: mean 0 per impression
    mu = float((pop_weight * logw).sum())
    pop_z = (logw - mu) / (np.sqrt(float((pop_weight * (logw - mu) ** 2).sum())) + 1e-12)
    global_cdf = np.cumsum(pop_weight)

    topic_items = np.argsort(item_topic, kind="stable")
    topic_cdf = np.cumsum(pop_weight[topic_items])
    topic_end = np.searchsorted(item_topic[topic_items], np.arange(T), side="right")
    topic_start = np.concatenate([[0], topic_end[:-1]])
    topic_mass = np.bincount(item_topic, weights=pop_weight, minlength=T)
    sat_affinity = affinity
    if cfg.sat_taste == "own":  # its own RNG stream (k=3): every other latent stays bit-identical to the shared world
        own = np.random.default_rng(np.random.SeedSequence([cfg.seed, 3]))
        sat_affinity = _affinity(own.dirichlet(np.full(T, cfg.interest_concentration), size=U))
    return World(theta, theta_cdf, affinity, activity, participation, user_sat_offset, author_topic,
                 author_quality, item_topic, item_author, quality, attractiveness, duration, pop_weight,
                 pop_z, global_cdf, topic_items, topic_cdf, topic_start, topic_end, topic_mass, sat_affinity,
                 np.zeros((U, T)) if cfg.sat_feedback > 0 else None)


def sample_exposures(world: World, cfg: SimulateConfig, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Exposure policy: w.p. `personalization` a topic ~ theta_u then an item ~ popularity within it,
    else an item ~ global popularity (also the fallback for a topic without items)."""
    n = len(users)
    r_mode, r_topic, r_within, r_global = rng.random((4, n))
    glob = np.minimum(np.searchsorted(world.global_cdf, r_global * world.global_cdf[-1], side="right"),
                      len(world.global_cdf) - 1)
    topic = np.minimum((world.theta_cdf[users] < r_topic[:, None]).sum(axis=1), cfg.topics - 1)
    lo_i, hi_i = world.topic_start[topic], world.topic_end[topic]
    has_items = hi_i > lo_i
    base = np.where(lo_i > 0, world.topic_cdf[np.maximum(lo_i - 1, 0)], 0.0)
    target = base + r_within * world.topic_mass[topic]
    j = np.clip(np.searchsorted(world.topic_cdf, target, side="right"), lo_i, np.maximum(hi_i - 1, lo_i))
    personal = world.topic_items[np.minimum(j, len(world.topic_items) - 1)]
    return np.where((r_mode < cfg.personalization) & has_items, personal, glob).astype(np.int64)


def exposure_probs(world: World, cfg: SimulateConfig, users: np.ndarray) -> np.ndarray:
    """[len(users), I] probability that the exposure policy shows each item (used for candidates)."""
    t = world.item_topic
    within = world.pop_weight / np.where(world.topic_mass[t] > 0, world.topic_mass[t], 1.0)
    theta = world.theta[users][:, t]  # [R, I]
    empty = (world.topic_end <= world.topic_start).astype(np.float64)  # topics without items
    fallback = cfg.personalization * (world.theta[users] * empty).sum(axis=1, keepdims=True)
    return (cfg.personalization * theta * within + (1.0 - cfg.personalization) * world.pop_weight
            + fallback * world.pop_weight)


def click_logit(world: World, cfg: SimulateConfig, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    topic = world.item_topic[items]
    logit = (cfg.click_bias + cfg.click_w_attractiveness * world.attractiveness[items]
             + cfg.click_w_interest * world.affinity[users, topic])
    if world.click_drift is not None:  # sat_feedback > 0: what the user's past views of the topic left behind
        logit = logit + world.click_drift[users, topic]
    return logit


def feed_back(world: World, cfg: SimulateConfig, users: np.ndarray, items: np.ndarray, click: np.ndarray,
              sat: np.ndarray) -> None:
    """After a round (sat_feedback > 0): each clicked view moves its user's click offset for the item's topic by
    +sat_feedback if the user was satisfied, -sat_feedback if not, clipped to +-sat_feedback_cap. `users` are
    distinct within a round, so the update is one vectorised step."""
    if world.click_drift is None:
        return
    u, t = users[click], world.item_topic[items[click]]
    step = np.where(sat[click], cfg.sat_feedback, -cfg.sat_feedback)
    world.click_drift[u, t] = np.clip(world.click_drift[u, t] + step, -cfg.sat_feedback_cap, cfg.sat_feedback_cap)


def satisfaction_logit(world: World, cfg: SimulateConfig, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Attractiveness enters only through `sat_w_attractiveness` (0 by default: click-bait draws clicks but
    does not satisfy; < 0 in configs/sim_alt.yaml: it disappoints). The term is skipped at 0 so the default
    world stays bit-identical. The topic affinity is `world.sat_affinity` (the click affinity unless sat_taste: own)."""
    aff = world.sat_affinity[users, world.item_topic[items]]
    logit = (cfg.sat_bias + cfg.sat_w_quality * world.quality[items] + cfg.sat_w_interest * aff
             + cfg.sat_w_activity * (world.activity[users] - 2.0) + world.user_sat_offset[users])
    if cfg.sat_w_attractiveness != 0.0:
        logit = logit + cfg.sat_w_attractiveness * world.attractiveness[items]
    return logit


def answer_base_logit(world: World, cfg: SimulateConfig, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Answer logit before the click and (realised) satisfaction terms."""
    return (cfg.answer_bias + cfg.answer_w_activity * (world.activity[users] - 2.0)
            + cfg.answer_w_popularity * world.pop_z[items])


_QUAD_NODES = 64  # quadrature points for the expectation of the answer probability over the watch fraction


def _beta_nodes(a: float, b: float) -> Tuple[np.ndarray, np.ndarray]:
    """Midpoint nodes on (0, 1) and normalised Beta(a, b) density weights (deterministic quadrature)."""
    t = (np.arange(_QUAD_NODES) + 0.5) / _QUAD_NODES
    w = t ** (a - 1.0) * (1.0 - t) ** (b - 1.0)
    return t, w / w.sum()


def watch_fraction(watch: np.ndarray, duration: np.ndarray) -> np.ndarray:
    """The share of the video watched, in [0, 1]: the input of the answer logit's watch term."""
    return np.clip(watch / duration, 0.0, 1.0)


def _mean_answer_prob(cfg: SimulateConfig, logit: np.ndarray, click: bool, sat: bool,
                      duration: np.ndarray) -> np.ndarray:
    """E[sigma(logit + w_watch * f)] over the watch fraction f given click and satisfaction (docs/simulator.md).
    The nodes and weights describe the law of f only, so the same quadrature holds for either sign of w_watch."""
    if cfg.answer_w_watch == 0.0:
        return _sigmoid(logit)
    if click:
        t, w = _beta_nodes(*(cfg.watch_beta_satisfied if sat else cfg.watch_beta_dissatisfied))
        return _sigmoid(logit[:, None] + cfg.answer_w_watch * t[None, :]) @ w
    q = (np.arange(_QUAD_NODES) + 0.5) / _QUAD_NODES  # scroll-past: f = min(X, d) / d, X ~ Exp(scroll_mean_s)
    x = -cfg.scroll_mean_s * np.log1p(-q)
    f = watch_fraction(x[None, :], duration[:, None])
    return _sigmoid(logit[:, None] + cfg.answer_w_watch * f).mean(axis=1)


def true_probs(world: World, cfg: SimulateConfig, users: np.ndarray, items: np.ndarray
               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(p_click, p_satisfied, p_answered marginal over click, satisfaction and watch time, answer base logit)."""
    pc = _sigmoid(click_logit(world, cfg, users, items))
    ps = _sigmoid(satisfaction_logit(world, cfg, users, items))
    base = answer_base_logit(world, cfg, users, items)
    wc, ws, d = cfg.answer_w_click, cfg.answer_w_satisfied, world.duration[items]
    pa = ((1 - pc) * (1 - ps) * _mean_answer_prob(cfg, base, False, False, d)
          + (1 - pc) * ps * _mean_answer_prob(cfg, base + ws, False, True, d)
          + pc * (1 - ps) * _mean_answer_prob(cfg, base + wc, True, False, d)
          + pc * ps * _mean_answer_prob(cfg, base + wc + ws, True, True, d))
    return pc, ps, pa, base


class HistoryBuffers:
    """Per-user ring buffers ([U, L] int64 + counts) for every history; vectorised over a round."""

    def __init__(self, users: int, caps: Dict[str, int] = HISTORY_CAPS):
        self.caps = dict(caps)
        self.buf = {k: np.zeros((users, L), dtype=np.int64) for k, L in self.caps.items()}
        self.count = {k: np.zeros(users, dtype=np.int64) for k in self.caps}

    def snapshot(self, name: str, users: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(int32 offsets [B+1], int64 values): each user's last <= L ids, oldest first."""
        L = self.caps[name]
        c = self.count[name][users]
        n = np.minimum(c, L)
        offsets = np.zeros(len(users) + 1, dtype=np.int32)
        np.cumsum(n, out=offsets[1:])
        row = np.repeat(np.arange(len(users)), n)
        pos = np.arange(offsets[-1], dtype=np.int64) - offsets[:-1][row]
        col = ((c - n)[row] + pos) % L
        values = self.buf[name].reshape(-1)[users[row] * L + col]
        return offsets, values

    def push(self, name: str, users: np.ndarray, items: np.ndarray) -> None:
        """Append one id per user; `users` must be distinct (one impression per user per round)."""
        L = self.caps[name]
        cnt = self.count[name]
        self.buf[name][users, cnt[users] % L] = items
        cnt[users] += 1

"""EASQ objectives: L_sat on answered impressions, DPO on within-user preference pairs, and the ramp.

L_sat (trains the LoRA + satisfaction head only, by construction of satrank.models.easq.pathway):
  ips / snips  clipped-IPS BCE of the satisfaction head on ANSWERED rows (SAQRec eq. 6 machinery:
               satrank.models.stage1.losses.ips_loss / snips_loss, weights 1 / max(rho_hat, M))
  pairwise     -log sigmoid(s_w - s_l) on the buffer's pairs, weighted by the pair weights.
L_DPO, for a pair (w preferred over l) of the SAME user:
  L = -log sigmoid(beta * ([log pi(w) - log pi(l)] - sg[log pi_ref(w) - log pi_ref(l)]))
  dpo_mode easq:           pi = main head (the serving logit, `easq.dpo_head`), pi_ref = satisfaction head
  dpo_mode adapter_policy: pi = the model with adapters on (only the LoRA trains), pi_ref = adapters off.
Log-probabilities (`easq.logprob`): `logit` reads pi as a softmax over the user's candidates,
p(i) = exp(z_i) / sum_j exp(z_j); both items of a pair share the user's normaliser, so
log p(w) - log p(l) = z_w - z_l exactly. `log_sigmoid` reads each logit as a pointwise probability.
Pairs are combined as sum_p w_p L_p / sum_p w_p (self-normalised weights, see satrank.models.easq.pair_buffer).
Online pairs (`easq.reward_pairs`, `reward_pairs`): the batch's own rows of one user, ordered by g or the satisfaction
head, weighted by the Bradley-Terry confidence; their DPO loss is added with weight `easq.reward_pair_weight`.
`easq.reward_pair_within: user_click` pairs only rows of one user with the same click label.
The DPO weight is 0 until the satisfaction head's running answered-AUC clears `ramp_threshold`,
then rises linearly to 1 over `ramp_updates` optimizer updates (`DpoRamp`).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from satrank.models.easq.pathway import SAT_HEAD
from satrank.models.easq.config import EasqConfig
from satrank.models.stage1.losses import LossOut, satisfaction_loss
from satrank.models.metrics.ranking import auc


def _graph_zero(t: torch.Tensor) -> torch.Tensor:
    return t.sum() * 0.0


def _weights(weights: Optional[torch.Tensor], like: torch.Tensor, name: str) -> torch.Tensor:
    if weights is None:
        return torch.ones_like(like)
    if weights.shape != like.shape:
        raise ValueError(f"{name}: weights have shape {tuple(weights.shape)}, expected {tuple(like.shape)}")
    w = weights.to(like.dtype)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"{name}: pair weights must be finite and >= 0, got {w.flatten()[:4].tolist()}...")
    return w


def logprob_margin(z_w: torch.Tensor, z_l: torch.Tensor, logprob: str = "logit") -> torch.Tensor:
    """log p(w) - log p(l) from logits: z_w - z_l (`logit`) or log sig(z_w) - log sig(z_l)."""
    if logprob == "logit":
        return z_w - z_l
    if logprob == "log_sigmoid":
        return F.logsigmoid(z_w) - F.logsigmoid(z_l)
    raise ValueError(f"logprob must be 'logit' or 'log_sigmoid', got {logprob!r}")


def dpo_loss(
    policy_w: torch.Tensor, policy_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
    beta: float, weights: Optional[torch.Tensor] = None, logprob: str = "logit", check_finite: bool = True,
) -> LossOut:
    """sum_p w_p softplus(-beta (dpi_p - sg dref_p)) / sum_p w_p, the weighted DPO loss over P pairs.

    No pairs (or all weights 0) -> an exact zero that still carries the policy's graph. Stats:
    pairs, weight_sum, accuracy (weighted share with dpi > 0), margin (weighted mean of dpi - dref).
    """
    name = "dpo"
    for arg, t in (("policy_l", policy_l), ("ref_w", ref_w), ("ref_l", ref_l)):
        if t.shape != policy_w.shape:
            raise ValueError(f"{name}: {arg} has shape {tuple(t.shape)}, expected {tuple(policy_w.shape)}")
    if policy_w.dim() != 1:
        raise ValueError(f"{name}: pair scores must be 1-D [P], got {tuple(policy_w.shape)}")
    if beta <= 0:
        raise ValueError(f"{name}: beta must be > 0, got {beta}")
    w = _weights(weights, policy_w, name)
    d_pol = logprob_margin(policy_w, policy_l, logprob)
    d_ref = logprob_margin(ref_w, ref_l, logprob).detach()
    per = F.softplus(-beta * (d_pol - d_ref))  # = -log sigmoid(beta (d_pol - d_ref))
    denom = w.sum()
    tiny = torch.finfo(per.dtype).tiny
    loss = torch.where(denom > 0, (per * w).sum() / denom.clamp_min(tiny), torch.zeros_like(denom))
    loss = loss + _graph_zero(policy_w) + _graph_zero(policy_l)
    if check_finite and not bool(torch.isfinite(loss)):
        raise FloatingPointError(f"{name}: loss is not finite ({float(loss)}), {policy_w.numel()} pairs")
    dp = d_pol.detach()
    stats = {
        "pairs": torch.tensor(float(policy_w.numel()), device=policy_w.device),
        "weight_sum": denom.detach(),
        "accuracy": ((dp > 0).to(w.dtype) * w).sum().detach() / denom.detach().clamp_min(tiny),
        "margin": ((dp - d_ref) * w).sum().detach() / denom.detach().clamp_min(tiny),
    }
    return LossOut(loss, stats)


def reward_pairs(user_id: torch.Tensor, reward: torch.Tensor, max_offset: int = 4):
    """Within-user pairs of ONE batch's rows, oriented by a reward logit r: (w_index, l_index, confidence) with
    r[w] > r[l] and confidence = |2 sigmoid(r_a - r_b) - 1| = P(w > l) - P(l > w) under Bradley-Terry on r.

    Rows are grouped by user (stable sort); row k of a user's group is paired with the next `max_offset` rows of the
    same group, so a user with m rows gives min(m - 1, max_offset) pairs per row (C(m, 2) when m <= max_offset + 1).
    Ties (equal rewards) give no pair. This is the online-DPO pair source (`easq.reward_pairs`): the policy's own
    logged impressions, labelled by the in-model reward, many per step where the questionnaire gives a few.
    """
    if user_id.dim() != 1 or reward.shape != user_id.shape:
        raise ValueError(f"reward pairs: user_id and reward must be two 1-D [B] tensors, "
                         f"got {tuple(user_id.shape)}, {tuple(reward.shape)}")
    if max_offset < 1:
        raise ValueError(f"reward pairs: max_offset must be >= 1, got {max_offset}")
    order = torch.argsort(user_id, stable=True)
    u = user_id[order]
    a_parts, b_parts = [], []
    for k in range(1, min(max_offset, u.numel() - 1) + 1):
        same = u[k:] == u[:-k]
        if not bool(same.any()):
            break  # no group has k + 1 rows, so none has more
        a_parts.append(order[:-k][same])
        b_parts.append(order[k:][same])
    empty = torch.zeros(0, dtype=torch.long, device=user_id.device)
    a = torch.cat(a_parts) if a_parts else empty
    b = torch.cat(b_parts) if b_parts else empty
    r = reward.detach()
    d = r[a] - r[b]
    keep = d != 0
    a, b, d = a[keep], b[keep], d[keep]
    first = d > 0
    w = torch.where(first, a, b)
    l = torch.where(first, b, a)
    return w, l, (2 * torch.sigmoid(d.abs()) - 1).to(reward.dtype)


def pairwise_sat_loss(s_w: torch.Tensor, s_l: torch.Tensor, weights: Optional[torch.Tensor] = None) -> LossOut:
    """sum_p w_p softplus(-(s_w - s_l)) / sum_p w_p: BPR on the satisfaction head (`sat_loss: pairwise`)."""
    if s_w.shape != s_l.shape or s_w.dim() != 1:
        raise ValueError(f"pairwise sat loss: scores must be two 1-D [P] tensors, "
                         f"got {tuple(s_w.shape)}, {tuple(s_l.shape)}")
    w = _weights(weights, s_w, "pairwise sat loss")
    per = F.softplus(-(s_w - s_l))
    denom = w.sum()
    loss = torch.where(denom > 0, (per * w).sum() / denom.clamp_min(torch.finfo(per.dtype).tiny), torch.zeros_like(denom))
    loss = loss + _graph_zero(s_w) + _graph_zero(s_l)
    return LossOut(loss, {"pairs": torch.tensor(float(s_w.numel()), device=s_w.device), "weight_sum": denom.detach()})


class DpoRamp:
    """Running answered-AUC of the satisfaction head over the last `window` answered rows, and the
    DPO weight: 0 until the AUC (with >= min_per_class rows of each class) reaches `threshold`, then
    min(1, k / ramp_updates) on the k-th update after that (1 at once when ramp_updates = 0). Once
    started the ramp does not go back (latched), so a noisy AUC cannot toggle the objective.

    Protocol per training step: `observe` the batch's satisfaction logits (scored BEFORE this step's
    update: progressive validation), read `weight`, and call `update()` once after the optimizer step.
    """

    def __init__(self, threshold: float, ramp_updates: int, window: int = 8192, min_per_class: int = 50) -> None:
        if window < 2 or min_per_class < 1 or ramp_updates < 0:
            raise ValueError(f"DpoRamp: bad window={window}, min_per_class={min_per_class}, ramp_updates={ramp_updates}")
        self.threshold, self.ramp_updates, self.window, self.min_per_class = threshold, ramp_updates, window, min_per_class
        self._scores = torch.zeros(window, dtype=torch.float64)
        self._labels = torch.zeros(window, dtype=torch.bool)
        self._n, self._next = 0, 0
        self.started, self.k, self.updates = False, 0, 0
        self.last_auc = float("nan")

    def observe(self, logits: torch.Tensor, satisfied: torch.Tensor, answered: torch.Tensor) -> int:
        """Append the answered rows (one host copy); returns how many were added."""
        if not (logits.shape == satisfied.shape == answered.shape):
            raise ValueError(f"DpoRamp.observe: shapes differ: logits {tuple(logits.shape)}, "
                             f"satisfied {tuple(satisfied.shape)}, answered {tuple(answered.shape)}")
        m = answered.detach().cpu() > 0.5
        s = logits.detach().cpu().double()[m][-self.window:]
        y = satisfied.detach().cpu()[m][-self.window:] > 0.5
        n = s.numel()
        idx = (self._next + torch.arange(n)) % self.window
        self._scores[idx], self._labels[idx] = s, y
        self._next = (self._next + n) % self.window
        self._n = min(self.window, self._n + n)
        return n

    def auc(self) -> Optional[float]:
        """AUC of the stored rows, or None while either class has fewer than min_per_class rows."""
        y = self._labels[: self._n]
        pos = int(y.sum())
        if pos < self.min_per_class or self._n - pos < self.min_per_class:
            return None
        return auc(self._scores[: self._n], y)

    @property
    def weight(self) -> float:
        if not self.started:
            return 0.0
        return 1.0 if self.ramp_updates == 0 else min(1.0, self.k / self.ramp_updates)

    def update(self) -> float:
        """One optimizer update happened: refresh the AUC, start the ramp when it clears, advance; the new weight."""
        self.updates += 1
        a = self.auc()
        self.last_auc = float("nan") if a is None else a
        if not self.started and a is not None and a >= self.threshold:
            self.started = True
        if self.started:
            self.k += 1
        return self.weight

    def state_dict(self) -> Dict[str, object]:
        return {"scores": self._scores.clone(), "labels": self._labels.clone(), "n": self._n, "next": self._next,
                "started": self.started, "k": self.k, "updates": self.updates, "last_auc": self.last_auc}

    def load_state_dict(self, st: Dict[str, object]) -> None:
        if st["scores"].shape != (self.window,):
            raise ValueError(f"DpoRamp: saved window {tuple(st['scores'].shape)} != configured ({self.window},)")
        self._scores, self._labels = st["scores"].clone().double(), st["labels"].clone().bool()
        self._n, self._next = int(st["n"]), int(st["next"])
        self.started, self.k, self.updates = bool(st["started"]), int(st["k"]), int(st["updates"])
        self.last_auc = float(st["last_auc"])


def _label(labels: Dict[str, torch.Tensor], name: str, like: torch.Tensor) -> torch.Tensor:
    if name not in labels:
        raise KeyError(f"easq loss: label {name!r} is required but missing (have {sorted(labels)})")
    t = labels[name]
    if t.shape != like.shape:
        raise ValueError(f"easq loss: label {name!r} has shape {tuple(t.shape)}, expected {tuple(like.shape)}")
    return t


class EasqLoss:
    """sat_weight * L_sat + distill_weight * BCE(sat head, g) + dpo_weight * ramp * L_DPO; settings from `EasqConfig`.
    L_DPO = the answered pairs' loss + reward_pair_weight x the online pairs' loss (with easq.reward_pairs, which needs
    the batch's `user_id`; `teacher` also needs g's logit `teacher_logit`).

    __call__(out, labels, propensity, pair_scores=None, pairs=None) -> {"loss": total with graph, and
    detached parts: "sat", "dpo", "dpo_ramp", "sat_auc", "pairs", "pair_accuracy", "dpo_margin"}.
    out: EasqRanker outputs of the batch (needs `sat_head`); labels: Batch.labels (needs
    questionnaire_answered and satisfied); propensity: rho_hat [B] (ips/snips); pair_scores:
    EasqRanker.dpo_scores of the pair rows; pairs: the satrank.models.easq.pair_buffer.PairSample they came from.
    Without pairs there is no DPO term (and no pairwise L_sat). Call `update()` after each optimizer step.
    """

    def __init__(self, cfg: EasqConfig) -> None:
        cfg.validate("easq")
        self.cfg = cfg
        self.ramp = DpoRamp(cfg.ramp_threshold, cfg.ramp_updates, cfg.auc_window, cfg.auc_min_per_class)

    def sat(self, sat_logit: torch.Tensor, labels: Dict[str, torch.Tensor], propensity: Optional[torch.Tensor]) -> LossOut:
        """Pointwise L_sat (ips / snips) on the answered rows of the batch."""
        answered = _label(labels, "questionnaire_answered", sat_logit)
        satisfied = _label(labels, "satisfied", sat_logit)
        if propensity is None:
            raise ValueError(f"easq loss: sat_loss {self.cfg.sat_loss!r} needs the propensities rho_hat of the batch")
        return satisfaction_loss(self.cfg.sat_loss, sat_logit, satisfied, answered, propensity,
                                 clip=self.cfg.clip, ips_normalizer=self.cfg.ips_normalizer)

    def update(self) -> float:
        return self.ramp.update()

    def _reward(self, out: Dict[str, torch.Tensor], teacher_logit: Optional[torch.Tensor]) -> torch.Tensor:
        """The logit that orders `reward_pairs`: the satisfaction head's (sat_head) or g's (teacher), detached."""
        if self.cfg.reward_pairs == "sat_head":
            return out[SAT_HEAD].detach()
        if teacher_logit is None:
            raise ValueError("easq loss: easq.reward_pairs 'teacher' needs g's logit g(u, i) (stage-2 model.mtl on)")
        return teacher_logit.detach()

    def __call__(self, out: Dict[str, torch.Tensor], labels: Dict[str, torch.Tensor],
                 propensity: Optional[torch.Tensor] = None, pair_scores: Optional[Dict[str, torch.Tensor]] = None,
                 pairs=None, observe: bool = True, pseudo: Optional[torch.Tensor] = None,
                 user_id: Optional[torch.Tensor] = None,
                 teacher_logit: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        cfg = self.cfg
        if SAT_HEAD not in out:
            raise KeyError(f"easq loss: outputs have no {SAT_HEAD!r} (is the ranker an EasqRanker?); have {sorted(out)}")
        s = out[SAT_HEAD]
        if observe:
            self.ramp.observe(s, _label(labels, "satisfied", s), _label(labels, "questionnaire_answered", s))
        res: Dict[str, torch.Tensor] = {}
        if (pair_scores is None) != (pairs is None):
            raise ValueError("easq loss: pass both pair_scores and pairs, or neither")
        dpo: Optional[LossOut] = None
        l_sat: Optional[torch.Tensor] = None
        if pairs is not None:
            for key in ("policy", "reference", SAT_HEAD):
                if key not in pair_scores:
                    raise KeyError(f"easq loss: pair_scores lack {key!r} (use EasqRanker.dpo_scores)")
            dev = pair_scores["policy"].device
            w_i, l_i = pairs.w_index.to(dev), pairs.l_index.to(dev)
            pw = pairs.weight.to(device=dev, dtype=s.dtype)
            dpo = dpo_loss(pair_scores["policy"][w_i], pair_scores["policy"][l_i], pair_scores["reference"][w_i],
                           pair_scores["reference"][l_i], cfg.beta, pw, cfg.logprob)
            if cfg.sat_loss == "pairwise":
                l_sat = pairwise_sat_loss(pair_scores[SAT_HEAD][w_i], pair_scores[SAT_HEAD][l_i], pw).loss
        if cfg.reward_pairs != "none":  # online pairs: this batch's rows of one user, ordered by the reward
            rw = self._reward(out, teacher_logit)
            if user_id is None:
                raise ValueError(f"easq loss: easq.reward_pairs {cfg.reward_pairs!r} needs the batch's user ids")
            group = user_id.to(s.device).long()
            if cfg.reward_pair_within == "user_click":  # one group per (user, click label): 2 u + click
                group = 2 * group + (_label(labels, "click", s) > 0.5).long()
            w_i, l_i, conf = reward_pairs(group, rw, cfg.pairs_per_row)
            head = cfg.dpo_head
            if head not in out:
                raise KeyError(f"easq.dpo_head {head!r} is not an output of the ranker (have {sorted(out)})")
            rdpo = dpo_loss(out[head][w_i], out[head][l_i], s[w_i].detach(), s[l_i].detach(), cfg.beta, conf,
                            cfg.logprob)
            r_loss = cfg.reward_pair_weight * rdpo.loss
            dpo = LossOut(r_loss, rdpo.stats) if dpo is None else LossOut(dpo.loss + r_loss, dpo.stats)
            res["reward_pairs"] = rdpo.stats["pairs"]
            res["reward_pair_accuracy"] = rdpo.stats["accuracy"]
        if cfg.sat_loss != "pairwise":
            l_sat = self.sat(s, labels, propensity).loss
        if l_sat is None:  # pairwise without pairs this step
            l_sat = _graph_zero(s)
        total = cfg.sat_weight * l_sat
        if cfg.distill_weight > 0:  # the head starts from g's knowledge (pseudo = sigmoid g(u, i), detached)
            if pseudo is None:
                raise ValueError("easq loss: easq.distill_weight > 0 needs g's pseudo-labels (stage-2 model.mtl on); "
                                 "set easq.distill_weight=0 to train the satisfaction head on the answers only")
            l_distill = F.binary_cross_entropy_with_logits(s, pseudo.detach().to(s.dtype))
            total = total + cfg.distill_weight * l_distill
            res["distill"] = l_distill.detach()
        ramp = self.ramp.weight
        res["sat"] = l_sat.detach()
        res["dpo_ramp"] = torch.tensor(ramp, device=s.device)
        a = self.ramp.last_auc
        res["sat_auc"] = torch.tensor(a, device=s.device)
        if dpo is not None:
            total = total + (cfg.dpo_weight * ramp) * dpo.loss  # ramp 0: graph kept, exact zero gradient
            res["dpo"] = dpo.loss.detach()
            res["pairs"] = dpo.stats["pairs"]
            res["pair_accuracy"] = dpo.stats["accuracy"]
            res["dpo_margin"] = dpo.stats["margin"]
        res["loss"] = total
        return res

    def state_dict(self) -> Dict[str, object]:
        return {"ramp": self.ramp.state_dict()}

    def load_state_dict(self, st: Dict[str, object]) -> None:
        self.ramp.load_state_dict(st["ramp"])


def pair_accuracy(policy: torch.Tensor, w_index: torch.Tensor, l_index: torch.Tensor) -> float:
    """Unweighted share of pairs whose score prefers the winner (ties count 1/2)."""
    d = policy.detach()[w_index] - policy.detach()[l_index]
    return float(((d > 0).double() + 0.5 * (d == 0).double()).mean()) if d.numel() else float("nan")


__all__: List[str] = ["dpo_loss", "reward_pairs", "pairwise_sat_loss", "logprob_margin", "auc", "DpoRamp", "EasqLoss", "pair_accuracy"]

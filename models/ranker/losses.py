"""Multi-task loss of the stage-2 ranker (SAQRec eqs. 15-19 plus watch-time and skip heads):

    L = L_C + beta L_S^final + w_wt L_wt + w_skip L_skip + gamma L2

- L_C     click BCE on the click logit (eq. 15), mean over the batch.
- L_S     satisfaction BCE of s_f against the stage-1 pseudo-label s_hat = g(u, i) (eq. 16), mean over
          the batch (every row has a pseudo-label). From epoch n_mix on, with label correction,
          L_S^mix: BCE against s_mix = lambda s_hat + (1 - lambda) sg(s_f) (eqs. 17-18, see
          `satrank.models.ranker.label_correction`). Absent when model.mtl is off (the tower does not exist).
- L_wt    regression of log1p(watch_time_s): MSE or Huber (loss.watch_time_loss), on all rows or
          clicked rows only (loss.watch_time_rows).
- L_skip  skip BCE on all rows.
- L2      eq. 19's gamma ||Theta||_2 over the DENSE parameters passed in (the ranker's; embedding
          tables are regularised by their fused optimizer's weight_decay, see satrank.embeddings.config).
          `l2_form: squared` (default) is sum theta^2, i.e. classic L2 / weight decay with gradient
          2 gamma theta; `l2_form: norm` is the printed ||Theta||_2 = sqrt(sum theta^2).

- L_<extra> BCE of each `model.extra_heads` head on its label column, weighted by its own `weight`.

The terms come from the head specs (satrank.models.ranker.heads.head_specs, which also fixes the
summation order): `HeadSpec.loss` picks the term (`bce`, `pseudo_bce`, `log1p_regression`) and
`HeadSpec.weight` its weight. A head that the model has is always added, even with weight 0 (then
0 * L keeps the graph, so DDP sees gradients for every parameter); a head it does not have contributes
no term and no key. `MultiTaskLoss.__call__` returns {"loss": total with graph, and per part a
detached value: one per head name ("click", "satisfaction", "watch_time", "skip", extras), "l2",
"sat_mixed" (1.0 when L_S^mix was used), "lambda_mean"}.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch
import torch.nn.functional as F

from satrank.models.ranker.label_correction import LabelCorrector
from satrank.models.ranker.config import ModelConfig, MultiTaskLossConfig
from satrank.models.ranker.heads import HeadSpec, head_specs


def _need(labels: Dict[str, torch.Tensor], name: str, like: torch.Tensor) -> torch.Tensor:
    if name not in labels:
        raise KeyError(f"multi-task loss: label {name!r} is required by an active head but missing (have {sorted(labels)})")
    t = labels[name]
    if t.shape != like.shape:
        raise ValueError(f"multi-task loss: label {name!r} has shape {tuple(t.shape)}, expected {tuple(like.shape)}")
    return t.to(like.dtype)


def l2_penalty(params: Iterable[torch.Tensor], form: str = "squared") -> torch.Tensor:
    """sum theta^2 over params (`squared`) or its square root (`norm`); dense params only."""
    sq = [p.pow(2).sum() for p in params if p.requires_grad]
    if not sq:
        raise ValueError("l2_penalty: no trainable parameters given")
    total = torch.stack(sq).sum()
    if form == "squared":
        return total
    if form == "norm":
        return total.clamp_min(1e-30).sqrt()  # clamp: finite gradient at theta = 0
    raise ValueError(f"l2_penalty: form must be 'squared' or 'norm', got {form!r}")


def satisfaction_loss_final(
    sat_logit: torch.Tensor,
    pseudo: torch.Tensor,
    epoch: int,
    corrector: Optional[LabelCorrector],
    record: bool = True,
) -> Dict[str, torch.Tensor]:
    """Eq. 18: eq. 16 before n_mix (or without a corrector), eq. 17 from n_mix on.

    Returns {"loss", "per_sample" (eq. 16 per row, detached), "lambda" (or None), "target"}.
    With `record`, the eq. 16 per-sample losses go into the corrector's reservoir for the next fit.
    """
    if pseudo.shape != sat_logit.shape:
        raise ValueError(f"satisfaction loss: pseudo-labels have shape {tuple(pseudo.shape)}, expected {tuple(sat_logit.shape)}")
    pseudo = pseudo.to(sat_logit.dtype)
    per = F.binary_cross_entropy_with_logits(sat_logit, pseudo, reduction="none")  # eq. 16 per row
    if corrector is not None and record:
        corrector.observe(per.detach())
    if corrector is None or not corrector.active(epoch):
        return {"loss": per.mean(), "per_sample": per.detach(), "lambda": None, "target": pseudo}
    target, lam = corrector.mixed_target(pseudo, sat_logit, per.detach())
    loss = F.binary_cross_entropy_with_logits(sat_logit, target, reduction="mean")  # eq. 17
    return {"loss": loss, "per_sample": per.detach(), "lambda": lam, "target": target}


def watch_time_loss(pred: torch.Tensor, watch_time_s: torch.Tensor, click: Optional[torch.Tensor],
                    cfg: MultiTaskLossConfig) -> torch.Tensor:
    """L_wt: loss.watch_time_loss (mse | huber) of the log1p head against log1p(watch_time_s), over all rows or
    the clicked rows only (loss.watch_time_rows); shared by training and validation."""
    target = torch.log1p(watch_time_s.clamp_min(0))
    if cfg.watch_time_loss == "mse":
        per = F.mse_loss(pred, target, reduction="none")
    else:
        per = F.huber_loss(pred, target, reduction="none", delta=cfg.huber_delta)
    if cfg.watch_time_rows == "clicked":
        if click is None:
            raise ValueError("watch-time loss: loss.watch_time_rows=clicked needs the click labels")
        m = click > 0.5
        per = torch.where(m, per, torch.zeros_like(per))
        return per.sum() / m.sum().clamp_min(1).to(per.dtype)
    return per.mean()


class MultiTaskLoss:
    """Eq. 19 with the extra heads; every weight from `MultiTaskLossConfig` (the `loss:` section)."""

    def __init__(self, cfg: MultiTaskLossConfig, model: ModelConfig, corrector: Optional[LabelCorrector] = None, seed: int = 0):
        self.cfg, self.model = cfg, model
        self.heads: list[HeadSpec] = head_specs(model, cfg)
        if corrector is None and cfg.label_correction and model.use_satisfaction:
            corrector = LabelCorrector(cfg.n_mix, cfg.bmm_iters, cfg.bmm_quantiles, cfg.bmm_lookup_size,
                                       cfg.bmm_max_samples, seed=seed)
        self.corrector = corrector if model.use_satisfaction else None

    def epoch_losses(self) -> Optional[torch.Tensor]:
        """This rank's label-correction reservoir of the epoch (None without label correction)."""
        return self.corrector.epoch_losses() if self.corrector is not None else None

    def end_epoch(self, epoch: int, losses: Optional[torch.Tensor] = None) -> Dict[str, float]:
        """Call on every rank after each training epoch (fits the label-correction mixture when due); `losses`:
        every rank's `epoch_losses()` concatenated (LabelCorrector.end_epoch)."""
        return self.corrector.end_epoch(epoch, losses) if self.corrector is not None else {}

    def __call__(
        self,
        out: Dict[str, torch.Tensor],
        labels: Dict[str, torch.Tensor],
        epoch: int,
        pseudo_satisfaction: Optional[torch.Tensor] = None,
        params: Optional[Iterable[torch.Tensor]] = None,
        record: bool = True,
    ) -> Dict[str, torch.Tensor]:
        """out: the ranker's outputs; labels: Batch.labels; pseudo_satisfaction: s_hat = g(u, i) [B]
        probabilities (required with mtl); params: dense parameters for L2 (required if gamma > 0);
        record: feed the label-correction reservoir (True in training, False in evaluation)."""
        cfg = self.cfg
        if "click" not in out:
            raise KeyError(f"multi-task loss: the model produced no 'click' head (outputs {sorted(out)})")
        parts: Dict[str, torch.Tensor] = {}
        total: Optional[torch.Tensor] = None
        for spec in self.heads:
            if spec.name not in out:
                continue
            pred = out[spec.name]
            if spec.loss == "bce":  # eq. 15 for click; skip and extra heads alike
                term = F.binary_cross_entropy_with_logits(pred, _need(labels, spec.label, pred))
            elif spec.loss == "pseudo_bce":
                term = self._satisfaction(pred, pseudo_satisfaction, epoch, record, parts)
            elif spec.loss == "log1p_regression":
                clicked = _need(labels, "click", pred) if cfg.watch_time_rows == "clicked" else None
                term = watch_time_loss(pred, _need(labels, spec.label, pred), clicked, cfg)
            else:
                raise ValueError(f"multi-task loss: head {spec.name!r} has unknown loss {spec.loss!r}")
            total = term if total is None else total + spec.weight * term  # click first, weight 1 (eq. 19)
            parts[spec.name] = term
        if cfg.gamma > 0:
            if params is None:
                raise ValueError("multi-task loss: loss.gamma > 0 needs the dense parameters (params=...)")
            l2 = l2_penalty(params, cfg.l2_form)
            total = total + cfg.gamma * l2
            parts["l2"] = l2
        if cfg.check_finite and not bool(torch.isfinite(total)):
            desc = {k: float(v.detach()) for k, v in parts.items()}
            raise FloatingPointError(f"multi-task loss at epoch {epoch} is not finite; parts: {desc}")
        result = {k: v.detach() for k, v in parts.items()}
        result["loss"] = total
        return result

    def _satisfaction(self, logit: torch.Tensor, pseudo: Optional[torch.Tensor], epoch: int, record: bool,
                      parts: Dict[str, torch.Tensor]) -> torch.Tensor:
        """L_S^final (eq. 18) against g's pseudo-labels; records sat_mixed / lambda_mean in `parts`."""
        if pseudo is None:
            raise ValueError("multi-task loss: model.mtl is on but no pseudo_satisfaction (stage-1 s_hat) was given")
        s = satisfaction_loss_final(logit, pseudo, epoch, self.corrector, record)
        lam = s["lambda"]
        parts["sat_mixed"] = torch.tensor(float(lam is not None), device=logit.device)
        if lam is not None:
            parts["lambda_mean"] = lam.mean()
        return s["loss"]

"""Adaptive label correction of SAQRec (eqs. 17-18) with a two-component Beta mixture model.

The paper writes s_mix = lambda s_hat + (1 - lambda) s_f with "lambda = Beta(L_S)", which is
ambiguous. Our reading follows the loss-correction method it cites in spirit (Arazo et al. 2019,
"Unsupervised label noise modeling and loss correction"): fit a two-component Beta mixture (BMM)
by EM with weighted method-of-moments M-steps on the per-sample satisfaction losses L_S (eq. 16,
BCE of s_f against the pseudo-label s_hat) of the PREVIOUS epoch, normalised to (0, 1) with the
5th/95th percentiles (configurable). Then

    lambda_i = P(high-loss component | normalised current loss of sample i),

made monotone non-decreasing in the loss (see `BetaMixture.lookup`). A small loss gives a small
lambda, hence more weight on the model's own prediction s_f: exactly the direction the paper
states. (Arazo et al. use the posterior the other way round, trusting the model where the loss is
HIGH; we follow the paper.) The mixed target is detached: s_mix = lambda s_hat + (1 - lambda) sg(s_f),
so L_S^mix only pulls s_f towards a fixed target (no gradient through the target).

Eq. 18: epochs t < n_mix use L_S; t >= n_mix use L_S^mix. `LabelCorrector.observe` collects the
losses of an epoch in a uniform reservoir, `end_epoch` fits the BMM and `lam` evaluates lambda. With several
ranks the caller hands `end_epoch` every rank's reservoir (`epoch_losses`), gathered outside the loss by the
trainer (satrank.jobs.engine.trainer, epoch-end payload), so all ranks fit the same lambda; nothing here
communicates.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist  # only to refuse a local-only fit in a multi-rank run

EPS_X = 1e-4  # normalised losses are clamped to [EPS_X, 1 - EPS_X] (Beta densities blow up at 0 and 1)
EPS_NAN = 1e-12


def _beta_log_pdf(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log Beta(x; a, b) for x [N] and per-component a, b [K] -> [K, N]."""
    a, b = a.unsqueeze(1), b.unsqueeze(1)
    lbeta = torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)
    return (a - 1) * torch.log(x) + (b - 1) * torch.log1p(-x) - lbeta


def _weighted_moments(x: torch.Tensor, r: torch.Tensor):
    """Method-of-moments Beta fit with weights r [K, N] -> alphas, betas [K] (Arazo et al. 2019)."""
    wsum = r.sum(1).clamp_min(EPS_NAN)
    mean = (r * x).sum(1) / wsum
    var = (r * (x - mean.unsqueeze(1)) ** 2).sum(1) / wsum
    var = var.clamp_min(1e-8)
    common = (mean * (1 - mean) / var - 1).clamp_min(1e-3)  # > 0 for any data in (0, 1)
    alphas = (mean * common).clamp(1e-3, 1e4)
    betas = (alphas * (1 - mean) / mean).clamp(1e-3, 1e4)
    return alphas, betas


@dataclass
class BetaMixture:
    """Two-component Beta mixture on (0, 1): alphas, betas, weights are float64 [2]."""

    alphas: torch.Tensor
    betas: torch.Tensor
    weights: torch.Tensor

    @property
    def means(self) -> torch.Tensor:
        return self.alphas / (self.alphas + self.betas)

    @property
    def high(self) -> int:
        """Index of the high-loss component (larger mean)."""
        return int(torch.argmax(self.means))

    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior P(component k | x) [2, N]."""
        x = x.to(torch.float64).clamp(EPS_X, 1 - EPS_X)
        logp = _beta_log_pdf(x, self.alphas, self.betas) + torch.log(self.weights.clamp_min(EPS_NAN)).unsqueeze(1)
        return torch.softmax(logp, dim=0)

    def posterior_high(self, x: torch.Tensor) -> torch.Tensor:
        return self.responsibilities(x)[self.high]

    def lookup(self, size: int) -> torch.Tensor:
        """Monotone non-decreasing lambda on the grid linspace(0, 1, size).

        The raw posterior of the high-loss component need not be monotone at the ends (Beta tails):
        as in Arazo et al., everything right of its argmax is set to the max; then a reverse
        cumulative minimum makes the left end monotone too (lambda(x) = min_{x' >= x} posterior).
        """
        grid = torch.linspace(0.0, 1.0, size, dtype=torch.float64)
        post = self.posterior_high(grid)
        top = int(torch.argmax(post))
        post[top:] = post[top]
        return torch.flip(torch.cummin(torch.flip(post, [0]), 0).values, [0])


def fit_beta_mixture(
    x: torch.Tensor,
    iters: int = 10,
    alphas_init: Sequence[float] = (1.0, 2.0),
    betas_init: Sequence[float] = (2.0, 1.0),
    weights_init: Sequence[float] = (0.5, 0.5),
) -> BetaMixture:
    """EM for a 2-component Beta mixture on x in (0, 1) (clamped to [1e-4, 1 - 1e-4]); float64.

    E-step: responsibilities; M-step: weighted method of moments per component and mixing weights
    = mean responsibilities. Initialisation as in Arazo et al.: a low-loss Beta(1, 2) and a
    high-loss Beta(2, 1).
    """
    x = x.detach().to("cpu", torch.float64).flatten()
    if x.numel() < 2:
        raise ValueError(f"fit_beta_mixture: needs at least 2 samples, got {x.numel()}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("fit_beta_mixture: samples must be finite")
    x = x.clamp(EPS_X, 1 - EPS_X)
    bmm = BetaMixture(
        torch.tensor(alphas_init, dtype=torch.float64),
        torch.tensor(betas_init, dtype=torch.float64),
        torch.tensor(weights_init, dtype=torch.float64),
    )
    for _ in range(iters):
        r = bmm.responsibilities(x).clamp_min(EPS_NAN)
        r = r / r.sum(0, keepdim=True)
        a, b = _weighted_moments(x, r)
        w = r.sum(1)
        bmm = BetaMixture(a, b, w / w.sum())
    return bmm


class LabelCorrector:
    """Holds the per-epoch loss reservoir, the fitted BMM and the lambda lookup (eqs. 17-18)."""

    def __init__(
        self,
        n_mix: int,
        iters: int = 10,
        quantiles: Sequence[float] = (0.05, 0.95),
        lookup_size: int = 100,
        max_samples: int = 200_000,
        seed: int = 0,
    ) -> None:
        if n_mix < 1:
            raise ValueError(f"label correction: n_mix must be >= 1 (needs a previous epoch), got {n_mix}")
        self.n_mix, self.iters, self.quantiles = n_mix, iters, (float(quantiles[0]), float(quantiles[1]))
        self.lookup_size, self.max_samples = lookup_size, max_samples
        self._gen = torch.Generator().manual_seed(seed)
        self._vals = torch.empty(0, dtype=torch.float64)
        self._keys = torch.empty(0, dtype=torch.float64)
        self.bmm: Optional[BetaMixture] = None
        self.table: Optional[torch.Tensor] = None  # lambda on linspace(0, 1, lookup_size)
        self.lo = self.hi = 0.0
        self.fitted_epoch = -1

    # ------------------------------------------------------------------ collection
    def active(self, epoch: int) -> bool:
        """Eq. 18: L_S^mix from 0-based epoch n_mix on."""
        return epoch >= self.n_mix

    @torch.no_grad()
    def observe(self, per_sample_loss: torch.Tensor) -> None:
        """Add a batch of per-sample L_S values to the epoch's uniform reservoir (bounded memory).

        Every value gets a random key; the max_samples largest keys are kept, which is a uniform
        sample without replacement of everything observed this epoch.
        """
        v = per_sample_loss.detach().flatten().to("cpu", torch.float64)
        if not bool(torch.isfinite(v).all()):
            raise FloatingPointError("label correction: observed a non-finite per-sample satisfaction loss")
        k = torch.rand(v.numel(), generator=self._gen, dtype=torch.float64)
        vals, keys = torch.cat([self._vals, v]), torch.cat([self._keys, k])
        if vals.numel() > self.max_samples:
            keep = torch.topk(keys, self.max_samples).indices
            vals, keys = vals[keep], keys[keep]
        self._vals, self._keys = vals, keys

    def epoch_losses(self) -> torch.Tensor:
        """This process's reservoir of the epoch (float64, CPU): what `end_epoch` needs from every rank."""
        return self._vals

    def end_epoch(self, epoch: int, losses: Optional[torch.Tensor] = None) -> Dict[str, float]:
        """Close 0-based epoch `epoch`: fit the BMM for the next epoch if it mixes; clear the reservoir.

        losses: every rank's `epoch_losses()` concatenated in rank order (the trainer gathers them); None in a
        single process = this reservoir. Returns the fit's statistics for logging ({} when no fit was needed).
        """
        if losses is None:
            if dist.is_initialized() and dist.get_world_size() > 1:
                raise RuntimeError("label correction: end_epoch needs every rank's epoch_losses() (losses=...) "
                                   "in a multi-rank run; a fit on this rank's losses alone would differ by rank")
            losses = self._vals
        self._vals = self._vals[:0]
        self._keys = self._keys[:0]
        if not self.active(epoch + 1):
            return {}
        return self.fit(losses, epoch)

    def fit(self, losses: torch.Tensor, epoch: int = -1) -> Dict[str, float]:
        """Fit on raw per-sample losses: quantile-normalise to (0, 1), EM, build the lambda lookup."""
        losses = losses.detach().to("cpu", torch.float64).flatten()
        if losses.numel() < 2:
            raise ValueError(
                f"label correction: epoch {epoch} observed {losses.numel()} per-sample losses; cannot fit "
                f"the Beta mixture needed from epoch n_mix={self.n_mix} on"
            )
        lo, hi = torch.quantile(losses, torch.tensor(self.quantiles, dtype=torch.float64)).tolist()
        self.lo, self.hi, self.fitted_epoch = lo, hi, epoch
        if hi - lo <= 1e-12:
            warnings.warn(
                f"label correction: epoch {epoch} losses are (nearly) constant ({lo:.6g}); lambda = 1 "
                "(pure pseudo-labels) until the next fit"
            )
            self.bmm, self.table = None, torch.ones(self.lookup_size, dtype=torch.float64)
            return {"bmm_degenerate": 1.0, "bmm_lo": lo, "bmm_hi": hi, "bmm_n": float(losses.numel())}
        inside = losses[(losses >= lo) & (losses <= hi)]  # outliers beyond the quantiles do not shape the fit
        self.bmm = fit_beta_mixture(self.normalise(inside), self.iters)
        self.table = self.bmm.lookup(self.lookup_size)
        m = self.bmm
        return {
            "bmm_degenerate": 0.0, "bmm_lo": lo, "bmm_hi": hi, "bmm_n": float(losses.numel()),
            "bmm_mean_low": float(m.means[1 - m.high]), "bmm_mean_high": float(m.means[m.high]),
            "bmm_weight_high": float(m.weights[m.high]),
        }

    # ------------------------------------------------------------------ use
    def normalise(self, losses: torch.Tensor) -> torch.Tensor:
        return ((losses - self.lo) / (self.hi - self.lo + 1e-6)).clamp(EPS_X, 1 - EPS_X)

    @torch.no_grad()
    def lam(self, per_sample_loss: torch.Tensor) -> torch.Tensor:
        """lambda_i in [0, 1] for current per-sample losses (linear interpolation of the lookup)."""
        if self.table is None:
            raise RuntimeError(
                "label correction: lambda requested but no Beta mixture is fitted; call end_epoch(t) on "
                "every epoch (or restore the corrector's state_dict when resuming)"
            )
        x = self.normalise(per_sample_loss.detach().to(torch.float64))
        pos = x * (self.lookup_size - 1)
        i0 = pos.floor().long().clamp(0, self.lookup_size - 2)
        frac = pos - i0
        t = self.table.to(x.device)
        return (t[i0] * (1 - frac) + t[i0 + 1] * frac).to(per_sample_loss.dtype)

    def mixed_target(self, pseudo: torch.Tensor, sat_logit: torch.Tensor, per_sample_loss: torch.Tensor):
        """Eq. 17: (s_mix, lambda) with s_mix = lambda s_hat + (1 - lambda) sg(sigmoid(sat_logit)), detached."""
        lam = self.lam(per_sample_loss)
        s_f = torch.sigmoid(sat_logit.detach())
        return (lam * pseudo.detach().to(s_f.dtype) + (1 - lam) * s_f).detach(), lam

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> Dict[str, object]:
        return {
            "lo": self.lo, "hi": self.hi, "fitted_epoch": self.fitted_epoch,
            "table": None if self.table is None else self.table.clone(),
            "bmm": None if self.bmm is None else torch.stack([self.bmm.alphas, self.bmm.betas, self.bmm.weights]),
        }

    def load_state_dict(self, state: Dict[str, object]) -> None:
        self.lo, self.hi, self.fitted_epoch = float(state["lo"]), float(state["hi"]), int(state["fitted_epoch"])
        table = state["table"]
        if table is not None and (not isinstance(table, torch.Tensor) or table.numel() != self.lookup_size):
            raise ValueError(f"label correction state: table must be a tensor of {self.lookup_size} values")
        self.table = None if table is None else table.to(torch.float64)
        bmm = state["bmm"]
        self.bmm = None if bmm is None else BetaMixture(*[t.to(torch.float64) for t in bmm])

"""Offline estimate of a ranker's top-K satisfaction on logged impressions (satrank.jobs.evaluate --propensity RUN_P).

Why: on real logs there is no true_p_satisfied, so true_sat@k cannot be measured; what a user has is the logged
impressions, the self-selected answers and the stage-1 propensity model. For each group of logged impressions
(`evaluate.offline_group`: each user's, since the simulator and the KuaiRand converter write one impression per
request, or each request's), the ranker's top `evaluate.offline_k` rows by its ranking score are taken, and the
mean satisfaction of those rows is estimated naive / IPS / SNIPS / DR (satrank.models.metrics.offline_estimates;
DR imputes g's pseudo-label, the ranker's own satisfaction estimate when it has no g) with request-bootstrap 95%
intervals; where the split has truth, the same quantity from true_p_satisfied sits beside them. One pass over
DIR/<split>, every forward collective (padded like the other evaluation loops), rows gathered on every rank.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch
from torch import nn

from satrank.jobs.engine.easq_step import FrozenPropensity
from satrank.jobs.engine.loop import synced_pairs
from satrank.jobs.engine.progress import loader_bar
from satrank.jobs.engine.readers import evaluation_loader, first_batch
from satrank.jobs.engine.runtime import Runtime
from satrank.models.metrics.offline_estimates import top_k_satisfaction_estimates, truth_top_k_satisfaction
from satrank.models.metrics.ranker_eval import PSEUDO_KEY, EvaluationConfig, ranking_score
from satrank.models.metrics.ranking import MetricAccumulator


def _imputed(out: Dict[str, torch.Tensor]) -> torch.Tensor:
    """g's pseudo-label when the ranker carries g, else its satisfaction tower, else NaN (DR is then undefined)."""
    if PSEUDO_KEY in out:
        return out[PSEUDO_KEY].detach().double()
    if "satisfaction" in out:
        return torch.sigmoid(out["satisfaction"].detach().double())
    return torch.full_like(out["click"], float("nan"), dtype=torch.float64)


@torch.no_grad()
def evaluate_offline_top_k(model: nn.Module, propensity: FrozenPropensity, cfg, ecfg: EvaluationConfig, uri: Path,
                           runtime: Runtime, clip: float) -> Dict[str, Any]:
    """The `offline_top_k` entry of metrics.json (module docstring); collective."""
    loader = evaluation_loader(cfg, uri)
    acc = MetricAccumulator()
    group = ecfg.offline_group
    with loader_bar("offline estimate", loader, main=runtime.is_main) as bar:
        for batch, real in synced_pairs(loader, runtime.device, "pad", first_batch(loader)):
            batch = batch.to(runtime.device)
            _, out = model(batch)
            rho = propensity.rho(batch)
            if not real:
                continue
            if group not in batch.ids:
                raise KeyError(f"evaluate.offline_group: {uri} has no id column {group!r} "
                               f"(have {sorted(batch.ids)})")
            answered = batch.labels["questionnaire_answered"].detach().double().cpu()
            truth = {"true_p": batch.truth["true_p_satisfied"].detach().double().cpu()} \
                if "true_p_satisfied" in batch.truth else {}
            acc.update(score=ranking_score(out, ecfg).detach().double().cpu(), group=batch.ids[group].cpu(),
                       answered=answered, satisfied=torch.where(answered > 0.5, batch.labels["satisfied"].double().cpu(),
                                                                torch.zeros_like(answered)),
                       rho=rho.double().cpu(), imputed=_imputed(out).cpu(), **truth)
            bar.update(batch.size)
    t = {k: v.numpy() for k, v in acc.compute().items()}
    est = top_k_satisfaction_estimates(t["score"], t["group"], t["answered"], t["satisfied"], t["rho"], t["imputed"],
                                       k=ecfg.offline_k, clip=clip, seed=ecfg.loo_seed)
    truth = truth_top_k_satisfaction(t["score"], t["group"], t["true_p"], ecfg.offline_k) if "true_p" in t else None
    return {"k": ecfg.offline_k, "group": group, "rows": int(len(t["score"])), "clip": clip,
            "estimates": est, "truth": truth, "propensity": propensity.run}

"""The stage-3 EASQ train module (DMP-shardable): the stage-2 RankerTask with the EASQ pathway installed,
computing behaviour losses + EasqLoss (L_sat + ramped L_DPO, satrank.models.easq.dpo) in ONE forward.

    EasqTask.forward(batch, pairs=None, n_real=None, rho=None, behaviour_weight=1.0) -> (loss, outputs)

Why one module: the main batch and the pair rows both go through the sharded SparseArch (collectives),
and DMP's DDP wrapper sees one forward per step. Eval mode without pairs returns exactly RankerTask's
outputs (+ `sat_head_logit`), so satrank.jobs.evaluate.evaluate_all scores it unchanged (the main path of a fresh
adapter is bit-identical to the stage-2 ranker). Shapes are kept equal on every rank (gloo refuses
unequal all-gathers in the row-wise backward): the job pads each batch to a fixed row count and passes
`n_real`; rows past it enter no loss. `pad_rows` does that padding; pair rows are padded the same way
(pairs index only real rows). Every parameter is in the graph every step (zero weights where off), so DDP
never waits for a missing gradient. See docs/easq.md ("Wiring a training step", "The online job").
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from satrank.models.easq.dpo import EasqLoss
from satrank.models.easq.pathway import SAT_HEAD, EasqRanker, id_extras, install_easq
from satrank.models.easq.config import EasqConfig
from satrank.models.easq.pair_buffer import PairSample, fields_to_batch, row_fields
from satrank.models.ranker.task import HISTORY_SCORES, PSEUDO, PSEUDO_LOGIT, RankerTask
from satrank.models.ranker.saqrec import ranker_inputs
from satrank.pipeline.batch import Batch


def pad_rows(batch: Batch, n: int, data, truncate: bool = False) -> Batch:
    """`batch` with its rows repeated cyclically up to exactly `n` rows (labels/ids/truth alike); a batch
    of more than n rows is an error (the caller chose n = the reader's batch size)."""
    B = batch.size
    if B > n and not truncate:
        raise ValueError(f"pad_rows: batch has {B} rows, more than the fixed size {n}")
    if B == n:
        return batch
    idx = torch.arange(n, device=batch.dense.device) % B
    fields = {k: v[idx] for k, v in row_fields(batch, data).items()}
    pick = lambda d: {k: v[idx] for k, v in d.items()}  # noqa: E731
    out = fields_to_batch(fields, data, pick(batch.ids))
    out.labels, out.truth, out.position = pick(batch.labels), pick(batch.truth), batch.position
    return out


def pair_batch(pairs: Optional[PairSample], fallback: Batch, n: int, data) -> Batch:
    """The pair rows padded to `n` rows; without pairs, `fallback`'s rows (scored with weight 0)."""
    if pairs is None or pairs.num_pairs == 0:
        return pad_rows(Batch(sparse=fallback.sparse, dense=fallback.dense, ids=dict(fallback.ids)), n, data, True)
    return pad_rows(pairs.batch(data), n, data)


def _head(d: Dict[str, torch.Tensor], n: int) -> Dict[str, torch.Tensor]:
    return {k: (v[:n] if torch.is_tensor(v) and v.dim() >= 1 else v) for k, v in d.items()}


class EasqTask(nn.Module):
    """RankerTask + EasqRanker + EasqLoss. `task` keeps the stage-2 key layout under `task.` (the job loads
    RUN_MAIN's weights with a prefix map); the LoRA and satisfaction head live in task.ranker.ranker."""

    def __init__(self, task: RankerTask, cfg: EasqConfig) -> None:
        super().__init__()
        self.task = task
        self.easq: EasqRanker = install_easq(task, cfg)
        self.easq_cfg = cfg
        self.loss = EasqLoss(cfg)  # plain object (ramp state), checkpointed by the job

    @property
    def heads(self):
        return self.task.heads

    @torch.no_grad()
    def serving_task(self) -> RankerTask:
        """The stage-2 RankerTask that serves this model: its ranker replaced by `EasqRanker.merged()` (the main
        path with the adapters folded into user_proj / item_proj + the item_in matrix; no satisfaction head), in
        eval mode. Takes the task out of this module (call it once, after the weights are loaded)."""
        task, merged = self.task, self.easq.merged()
        task.ranker.ranker = merged  # task.l2_path "ranker.ranker.ranker" is now the served copy (L2 unused in eval)
        return task.eval()

    def _signals(self, batch: Batch) -> Dict[str, torch.Tensor]:
        t = self.task
        if t.g is None:
            return {}
        with torch.no_grad():
            gsp = t.g.sparse_arch(batch.sparse)
        return t.teacher(gsp, batch.dense, t.g)

    def forward(self, batch: Batch, pairs: Optional[Batch] = None, sample: Optional[PairSample] = None,
                n_real: Optional[int] = None, rho: Optional[torch.Tensor] = None,
                behaviour_weight: float = 1.0, step_weight: float = 1.0) -> Tuple[Optional[torch.Tensor], Dict[str, Any]]:
        t = self.task
        sp = t.sparse_arch(batch.sparse)
        signals = self._signals(batch)
        out = t.ranker(sp, batch.dense, {**signals, **id_extras(batch.sparse, self.easq.id_features)})
        n = batch.size if n_real is None else int(n_real)
        if pairs is None:  # evaluation / scoring: RankerTask's outputs (+ the satisfaction head)
            loss, res = t.loss_fn(_head(out, n), _head(batch.labels, n), _head(signals, n), t.l2_module())
            res["sat_head_logit"] = out[SAT_HEAD][:n].detach()
            return loss, res
        # ---- training step: behaviour (main path) + L_sat (LoRA) + DPO on the pair rows
        psp = t.sparse_arch(pairs.sparse)
        pextras = id_extras(pairs.sparse, self.easq.id_features)
        psig = self._signals(pairs)
        if HISTORY_SCORES in psig:
            pextras[HISTORY_SCORES] = psig[HISTORY_SCORES]
        scores = self.easq.dpo_scores(ranker_inputs(psp, pairs.dense, self.easq.cfg, t.data, pextras))
        outs, labels, sig = _head(out, n), _head(batch.labels, n), _head(signals, n)
        b_loss, res = t.loss_fn(outs, labels, sig, t.l2_module())
        if rho is None:
            rho = torch.ones(n, dtype=outs[SAT_HEAD].dtype, device=outs[SAT_HEAD].device)
        real_pairs = sample is not None and sample.num_pairs > 0
        e = self.loss(outs, labels, rho[:n], scores if real_pairs else None, sample if real_pairs else None,
                      observe=step_weight > 0, pseudo=sig.get(PSEUDO), user_id=batch.ids["user_id"][:n],
                      teacher_logit=sig.get(PSEUDO_LOGIT))
        keep = sum(v.sum() for v in scores.values() if v.requires_grad) * 0.0  # every parameter in the graph
        total = step_weight * (behaviour_weight * b_loss + e["loss"]) + keep
        res.update({f"easq/{k}": v for k, v in e.items() if k != "loss"})
        res["sat_head_logit"] = outs[SAT_HEAD].detach()
        res["loss"] = total.detach()
        return total, res

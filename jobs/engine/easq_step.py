"""EASQ's online step for the Trainer (satrank.jobs.engine.online): one batch = behaviour losses + L_sat + ramped DPO
on pairs from the replay buffer, with the optimizer groups that keep the isolated pathway's backbone untouched.

- `EasqOptimizers`: the trainer's optimizer for an EasqTask, per group: fused tables (in backward), `lora`
  (Adam, easq.lr), `backbone` (backbone dense, train.dense_optimizer at train.dense_lr) and `dp_tables`
  (data-parallel tables, embeddings.optimizer), built with satrank.embeddings.sharding's public factories.
- `EasqStep`: pads the batch to a fixed row count (gloo needs equal shapes), scores rho with the frozen
  propensity model (every rank, every step), samples pairs, decides once for all ranks whether DPO is on,
  steps `lora` always and `backbone` (+ `dp_tables`) unless the step is an isolated L_sat-only one (behaviour off
  and DPO weight x ramp = 0: the backbone stays bit-identical); with `easq.pathway: shared` L_sat trains the
  backbone, so it steps every step. Real rows feed the pair buffer, the ramp and the prequential columns.
- `FrozenPropensity`: the stage-1 propensity model of --propensity RUN_P, frozen (own DMP, eval, no_grad).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from satrank.embeddings.sharding import dense_optimizer_factory, embedding_optimizer_factory, shard_model
from satrank.embeddings.tables import TABLE_KEY
from satrank.jobs.engine.checkpoint import load_prefixed, local_tables, propensity_run, tables_changed
from satrank.jobs.engine.collectives import all_gather_objects, all_reduce_ints
from satrank.models.easq.pair_buffer import PairBuffer
from satrank.models.easq.pathway import GROUP_LORA
from satrank.models.easq.task import EasqTask, pad_rows, pair_batch
from satrank.pipeline.batch import Batch

BACKBONE_PREFIX = "task.ranker.ranker.ranker."  # the backbone's dense parameters (theta for backbone_drift)


class EasqOptimizers:
    """Called by the Trainer with the sharded EasqTask: returns the CombinedOptimizer it checkpoints; `groups`
    (name -> optimizer) and `backbone` (name -> backbone dense parameter) are kept for the step."""

    def __init__(self, module: EasqTask, emb: Any, easq: Any, train: Any) -> None:
        self.module, self.emb, self.easq, self.train = module, emb, easq, train
        self.groups: Dict[str, Any] = {}
        self.combined: Any = None
        self.backbone: Dict[str, nn.Parameter] = {}

    def __call__(self, dmp: nn.Module) -> Any:
        from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
        from torchrec.optim.optimizers import in_backward_optimizer_filter

        e, t = self.easq, self.train
        lora_ids = {id(p) for p in self.module.easq.lora_parameters()}
        plain = dict(in_backward_optimizer_filter(dmp.named_parameters()))
        lora = {k: p for k, p in plain.items() if id(p) in lora_ids}
        dp_tables = {k: p for k, p in plain.items() if id(p) not in lora_ids and TABLE_KEY.match(k)}
        backbone = {k: p for k, p in plain.items() if id(p) not in lora_ids and k not in dp_tables and p.requires_grad}
        g = {GROUP_LORA: KeyedOptimizerWrapper(lora, lambda ps: torch.optim.Adam(ps, lr=e.lr, weight_decay=e.weight_decay)),
             "backbone": KeyedOptimizerWrapper(backbone, dense_optimizer_factory(t.dense_optimizer, t.dense_lr,
                                                                                 t.dense_weight_decay))}
        parts = [("fused", dmp.fused_optimizer), ("lora", g[GROUP_LORA]), ("backbone", g["backbone"])]
        if dp_tables:
            g["dp_tables"] = KeyedOptimizerWrapper(dp_tables, embedding_optimizer_factory(self.emb.dp_optimizer()))
            parts.append(("dp_tables", g["dp_tables"]))
        self.groups, self.combined = g, CombinedOptimizer(parts)
        self.backbone = {k: backbone[k] for k in sorted(backbone) if k.startswith(BACKBONE_PREFIX)}
        return self.combined


class FrozenPropensity:
    """The stage-1 propensity model of --propensity RUN_P, FROZEN: satrank.models.stage1.tasks.PropensityModel built from
    RUN_P's config (its `embeddings:` and `propensity:` sections; `data:` is the stream's, fingerprint-checked),
    sharded in a DMP of its own, weights loaded strictly (every key, any world size), always in eval mode and
    called under no_grad, so no optimizer can ever reach it. `rho(batch)` = its `propensity` output (collective:
    every rank calls it every step). Not part of the EASQ checkpoint (a resumed run reloads RUN_P)."""

    def __init__(self, run_p: Path, data, rt, seed: int) -> None:
        from satrank.models.stage1.tasks import PropensityModel

        self.run = str(run_p)
        self.path, pcfg = propensity_run(run_p, data)
        torch.manual_seed(seed)
        model = PropensityModel(data, pcfg.embeddings, pcfg.propensity)
        self.dmp, _ = shard_model(model, pcfg.embeddings, rt, seed=seed)
        self.keys = load_prefixed(self.path, self.dmp, {"": ""}, data, pcfg.embeddings, what="--propensity",
                                  expect_job="propensity")
        self.dmp.eval()
        self.tables = local_tables(self.dmp)
        self.dense = {k: v.detach().clone() for k, v in self.dmp.state_dict().items()
                      if k not in self.tables and torch.is_tensor(v) and not hasattr(v, "local_shards")}
        self.answered, self.rho_sum, self.clipped = 0, 0.0, 0

    @torch.no_grad()
    def rho(self, batch) -> torch.Tensor:
        self.dmp.eval()
        _, out = self.dmp(batch)
        return out["propensity"].detach().float()

    def observe(self, rho: torch.Tensor, answered: torch.Tensor, clip: float) -> None:
        r = rho[answered > 0.5].double()
        self.answered += int(r.numel())
        self.rho_sum += float(r.sum())
        self.clipped += int((r < clip).sum())

    def report(self, clip: float) -> Dict[str, Any]:
        """Collective: where the model came from, whether anything in it moved, rho on the answered rows."""
        now = self.dmp.state_dict()
        dense_moved = sorted(k for k, v in self.dense.items() if not torch.equal(now[k], v))
        parts = all_gather_objects({"n": self.answered, "sum": self.rho_sum, "clipped": self.clipped,
                                    "dense": dense_moved})
        changed = tables_changed(self.tables, self.dmp)
        n = sum(p["n"] for p in parts)
        return {"run": self.run, "checkpoint": str(self.path), "keys_loaded": len(self.keys),
                "tables": sorted(self.tables), "tables_changed": changed,
                "dense_changed": sorted({k for p in parts for k in p["dense"]}), "clip": clip,
                "answered_rows": n, "rho_mean_answered": sum(p["sum"] for p in parts) / n if n else None,
                "clipped_share_answered": sum(p["clipped"] for p in parts) / n if n else None}


PAIR_SUMS = ("answered", "online", "online_agreeing", "dpo_steps")


def _pair_sums(out: Dict[str, Any], sample: Any, dpo_on: bool, like: torch.Tensor) -> torch.Tensor:
    """This step's addend to EasqStep.pair_sums (PAIR_SUMS order), from EasqTask's outputs and the pair sample."""
    zero = torch.zeros((), dtype=like.dtype, device=like.device)
    online = out.get("easq/reward_pairs", zero).to(like)
    agree = out.get("easq/reward_pair_accuracy", zero).to(like) * online
    answered = float(sample.num_pairs) if sample is not None else 0.0
    return torch.stack([zero + answered, online, agree, zero + float(dpo_on)])


def pair_summary(parts: List[Dict[str, Any]]) -> Dict[str, Any]:
    """RUN/metrics.json `dpo_pairs` from every rank's EasqStep.pair_sums: pairs scored (answered, online), the
    online pairs' weighted share the policy already ordered as the reward does, and the steps with DPO on (rank 0's)."""
    total = dict(zip(PAIR_SUMS, (float(x) for x in torch.stack([p["pair_sums"].cpu() for p in parts]).sum(0))))
    online = total["online"]
    return {"answered": int(total["answered"]), "online": int(online),
            "online_agreement": total["online_agreeing"] / online if online > 0 else None,
            "dpo_steps": int(parts[0]["pair_sums"][PAIR_SUMS.index("dpo_steps")])}


def _cat(ts: List[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
    return torch.cat(ts) if ts else empty


class EasqStep:
    """One online EASQ step per batch (module docstring); its state is checkpointed by satrank.jobs.engine.online."""

    state_dir = "easq_state"

    def __init__(self, dmp: nn.Module, module: EasqTask, opts: EasqOptimizers, data: Any, easq: Any, *,
                 batch_rows: int, device: torch.device, prop: Optional[FrozenPropensity] = None,
                 sat_only: bool = False, log_keys: bool = False) -> None:
        self.dmp, self.module, self.opts, self.data, self.easq = dmp, module, opts, data, easq
        self.batch_rows, self.pair_rows, self.device = batch_rows, 2 * easq.pairs_per_step, device
        self.prop, self.log_keys = prop, log_keys
        self.bw = 0.0 if sat_only else 1.0
        self.buf = PairBuffer.from_config(easq)
        self.theta0 = {k: p.detach().clone() for k, p in opts.backbone.items()}
        self.logits: List[torch.Tensor] = []
        self.labels: List[torch.Tensor] = []
        self.keys: List[torch.Tensor] = []
        self.rows = 0
        # answered pairs, online (reward) pairs, online pairs the policy already orders as the reward does (weighted
        # share x pairs), steps with the DPO term on (weight x ramp > 0): summed over real steps, on the device (no sync)
        self.pair_sums = torch.zeros(len(PAIR_SUMS), dtype=torch.float64, device=device)

    def __call__(self, batch: Batch, real: bool) -> None:
        e, n, g = self.easq, batch.size, self.opts.groups
        b = pad_rows(batch, self.batch_rows, self.data)
        rho = self.prop.rho(b) if self.prop is not None else None  # every rank, every step (collective)
        if real:
            buf_rho = rho[:n].cpu() if rho is not None else torch.ones(n)
            if self.prop is not None:
                self.prop.observe(buf_rho, batch.labels["questionnaire_answered"].cpu(), e.clip)
            sample = self.buf.sample(e.pairs_per_step) if len(self.buf) else None
        else:
            buf_rho, sample = None, None
        pb = pair_batch(sample, b, self.pair_rows, self.data)
        dpo_on = e.dpo_weight * self.module.loss.ramp.weight > 0 and sample is not None and sample.num_pairs > 0
        dpo_on = bool(all_reduce_ints([int(dpo_on)], self.device, "max")[0])  # backbone steps everywhere or nowhere
        loss, out = self.dmp(b, pb, sample, n, rho, self.bw, 1.0 if real else 0.0)
        loss.backward()
        g[GROUP_LORA].step()
        if self.bw > 0 or dpo_on or self.module.easq.shared:  # never on an isolated L_sat-only step
            g["backbone"].step()
            if "dp_tables" in g:
                g["dp_tables"].step()
        self.opts.combined.zero_grad()
        if real:
            self.pair_sums += _pair_sums(out, sample, e.dpo_weight * self.module.loss.ramp.weight > 0, self.pair_sums)
            self.module.loss.update()
            self.buf.add_batch(batch, self.data, buf_rho)
            ans = batch.labels["questionnaire_answered"] > 0.5
            self.logits.append(out["sat_head_logit"][:n][ans].cpu())
            self.labels.append(batch.labels["satisfied"][ans].cpu())
            self.rows += n
            if self.log_keys:
                self.keys.append(torch.stack([batch.ids[k] for k in ("user_id", "item_id", "timestamp")], 1))

    # ------------------------------------------------------------------ state and results
    def columns(self) -> Dict[str, torch.Tensor]:
        return {"logits": _cat(self.logits, torch.zeros(0)), "labels": _cat(self.labels, torch.zeros(0)),
                "keys": _cat(self.keys, torch.zeros(0, 3, dtype=torch.long))}

    def extra(self) -> Dict[str, Any]:
        return {"rows": self.rows}

    def state_dict(self) -> Dict[str, Any]:
        return {"buffer": self.buf.state_dict(), "loss": self.module.loss.state_dict(), "theta0": self.theta0,
                "rows": self.rows, "pair_sums": self.pair_sums.cpu(), **self.columns()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.buf.load_state_dict(state["buffer"])
        self.module.loss.load_state_dict(state["loss"])
        self.theta0, self.rows = state["theta0"], int(state["rows"])
        if "pair_sums" in state:  # absent from checkpoints written before the pair counts existed: they restart at 0
            self.pair_sums = state["pair_sums"].to(device=self.device, dtype=torch.float64)
        self.logits, self.labels, self.keys = [state["logits"]], [state["labels"]], [state["keys"]]

    def drift(self) -> Optional[float]:
        """||theta_t - theta_0|| / ||theta_0|| over the backbone's dense parameters (this rank's copy)."""
        num = sum(float((p.detach() - self.theta0[k]).pow(2).sum()) for k, p in self.opts.backbone.items())
        den = sum(float(v.pow(2).sum()) for v in self.theta0.values())
        return (num ** 0.5) / (den ** 0.5) if den > 0 else None

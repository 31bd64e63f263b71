"""The offline evaluation of a stage-2 ranker as rank-synchronised loops (satrank.jobs.evaluate, satrank.jobs.train,
satrank.jobs.dpo): DIR/<split> impressions, the candidate sets and SAQRec's leave-one-out lists.

Why in jobs/engine: every DMP forward is collective, so the loops pad uneven ranks through the engine's
`synced_pairs` (padded steps never update a metric); the metrics themselves are the accumulators of
satrank.models.metrics.ranker_eval (every head of satrank.models.ranker.heads with a metric is reported).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, Sequence

import torch
from torch import nn

from satrank.jobs.engine import checkpoint as ckpt
from satrank.jobs.engine.checkpoint import checkpoint_config
from satrank.jobs.engine.loop import synced_pairs
from satrank.jobs.engine.progress import loader_bar
from satrank.jobs.engine.readers import evaluation_loader, first_batch
from satrank.jobs.engine.runs import TEACHER_FILE, build_task, run_checkpoint, teacher_from_dict
from satrank.jobs.config import SatrankConfig
from satrank.jobs.engine.runtime import Runtime, get_logger
from satrank.models.metrics.ranker_eval import (METRIC_KEYS, CandidateMetrics, EvaluationConfig, ImpressionMetrics,
                                                LooMetrics, build_loo_plan, item_side_columns)
from satrank.models.ranker.heads import head_specs
from satrank.models.ranker.task import find_task, needs_teacher

log = get_logger("evaluate")


@torch.no_grad()
def _run(model: nn.Module, batches, runtime: Runtime, update, template=None) -> int:
    """Score every batch once (pad policy: padded steps run the forward but update nothing)."""
    rows = 0
    with loader_bar("evaluate", batches, main=runtime.is_main) as bar:
        for batch, real in synced_pairs(batches, runtime.device, "pad", template):
            _, out = model(batch.to(runtime.device))
            if real:
                update(batch, out)
                rows += batch.size
                bar.update(batch.size)
    return rows


def evaluate_impressions(model: nn.Module, cfg: SatrankConfig, uri: Path, runtime: Runtime) -> Dict[str, Any]:
    acc = ImpressionMetrics(head_specs(cfg.model, cfg.loss))
    loader = evaluation_loader(cfg, uri)
    _run(model, loader, runtime, acc.update, first_batch(loader))
    return acc.compute()


def evaluate_candidates(model: nn.Module, cfg: SatrankConfig, ecfg: EvaluationConfig, uri: Path,
                        runtime: Runtime) -> Dict[str, Any]:
    acc = CandidateMetrics(ecfg)
    loader = evaluation_loader(cfg, uri, with_labels=False)
    _run(model, loader, runtime, acc.update, first_batch(loader))
    return acc.compute()


def evaluate_loo(model: nn.Module, cfg: SatrankConfig, ecfg: EvaluationConfig, data_dir: Path,
                 runtime: Runtime, split: str = "test") -> Dict[str, Any]:
    task = find_task(model)
    names = [cfg.model.item_feature, *cfg.model.item_attr_features]
    if task.g is not None:  # g's item side is part of the candidate too
        names += [n for n in task.g.arch.tower.item_features if n not in names]
    plan = build_loo_plan(data_dir, cfg.data, item_side_columns(cfg.data, names), ecfg, split=split)
    acc = LooMetrics(plan.group_size, expected_users=len(plan.users))
    template = plan.batch_for(plan.user_slice(0, 1)[:1])
    _run(model, plan.batches(runtime.rank, runtime.world_size, ecfg.loo_users_per_batch), runtime, acc.update, template)
    out = acc.compute()
    out["loo_item_attribute_conflicts"] = sum(plan.attrs.conflicts.values())
    out["loo_catalogue_items"] = len(plan.attrs)
    out["loo_users_skipped"] = plan.skipped_users
    if plan.skipped_users:
        log.warning("leave-one-out: %d user(s) have fewer than %d never-interacted items and are left out",
                    plan.skipped_users, ecfg.loo_negatives)
    return out


def evaluate_all(model: nn.Module, cfg: SatrankConfig, ecfg: EvaluationConfig, data_dir: Path, runtime: Runtime,
                 split: str = "test") -> Dict[str, Any]:
    """Every protocol of satrank.models.metrics.ranker_eval on DIR/`split`, DIR/candidates and leave-one-out (collective)."""
    was_training = model.training
    model.eval()
    metrics: Dict[str, Any] = {}
    timings: Dict[str, float] = {}
    try:
        for name, fn in (("impressions", lambda: evaluate_impressions(model, cfg, data_dir / split, runtime)),
                         ("candidates", lambda: evaluate_candidates(model, cfg, ecfg, data_dir / "candidates", runtime)),
                         ("leave_one_out", lambda: evaluate_loo(model, cfg, ecfg, data_dir, runtime, split))):
            if name == "candidates" and not (data_dir / "candidates").exists():
                log.warning("no %s: true_sat@k / true_click@k and their oracles are null", data_dir / "candidates")
                continue
            t0 = time.perf_counter()
            metrics.update(fn())
            timings[f"eval_{name}_s"] = round(time.perf_counter() - t0, 2)
    finally:
        model.train(was_training)
    out = {k: metrics.get(k) for k in METRIC_KEYS}
    out.update({k: v for k, v in metrics.items() if k not in out})
    out.update(timings)
    return out


def format_table(rows: Dict[str, Dict[str, Any]], keys: Sequence[str] = METRIC_KEYS) -> str:
    """Markdown table: one row per named metrics dict, one column per key (4 decimals, '-' for null)."""
    head = "| model | " + " | ".join(keys) + " |"
    sep = "|---" * (len(keys) + 1) + "|"
    lines = [head, sep]
    for name, m in rows.items():
        cells = ["-" if m.get(k) is None else f"{m[k]:.4f}" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_trained(run: Path, runtime: Runtime, cfg_cli: SatrankConfig):
    """(sharded model, its config) of a satrank.jobs.train or satrank.jobs.dpo run, weights loaded from its best/last
    checkpoint. A dpo run (meta.json's job) is rebuilt as it trained, the stage-2 ranker with its EASQ pathway
    (satrank.models.easq.task.EasqTask): the main heads serve with the adapters' sg(h_lora) injected, as in its
    own `after` figures."""
    from satrank.embeddings.sharding import shard_model
    from satrank.jobs.engine.runs import kind_of
    from satrank.jobs.engine.easq_run import easq_task  # here: easq_run imports this module

    path = run_checkpoint(run)
    cfg = checkpoint_config(path)
    cfg.reader = cfg_cli.reader
    kind = kind_of(ckpt.read_meta(path), path)
    if kind not in ("ranker", "easq"):
        raise ckpt.CheckpointError(f"{path}: a {kind} model (stage 1) is not a stage-2 ranker; evaluate a train or "
                                   "dpo run (stage-1 models report their figures in their own metrics.json)")
    teacher_file = Path(run) / TEACHER_FILE
    teacher = teacher_from_dict(json.loads(teacher_file.read_text())) if teacher_file.is_file() else None
    if needs_teacher(cfg.model) and teacher is None:
        raise ckpt.CheckpointError(f"{run}: the model needs its satisfaction model g but {teacher_file} is missing")
    task = easq_task(cfg, teacher, 0) if kind == "easq" else build_task(cfg, teacher, seed=0)
    dmp, _ = shard_model(task, cfg.embeddings, runtime)
    meta = ckpt.load_checkpoint(path, dmp)
    log.info("loaded %s (%s, written by %d rank(s))", path, meta["extra"].get("job"), meta["world_size"])
    return dmp, cfg

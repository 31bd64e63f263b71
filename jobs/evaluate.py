"""`satrank.jobs.evaluate`: score a trained stage-2 ranker on DIR/test, the candidate sets and the leave-one-out lists.

    torchrun --nproc_per_node=N -m satrank.jobs.evaluate --config CFG --data DIR --model RUN --out OUT

RUN is a satrank.jobs.train run directory: its checkpoint (RUN/best when kept, else RUN/checkpoint; written
by any world size, resharded on load) and RUN/teacher.json (how its frozen satisfaction model g was
built). The model's architecture and features come from the checkpoint's config.yaml, so every
ablation evaluates as it was trained; --config/--set supply the reader and `evaluate:` settings.
Writes OUT/metrics.json (satrank.models.metrics.ranker_eval.METRIC_KEYS plus row counts and timings; a metric the
model cannot produce, e.g. watch time without a watch-time head, is null).

The helpers here are shared with satrank.jobs.train: building the task from configs, finding g's
satisfaction run and its config, and the rank-synchronised evaluation loops (every DMP forward is collective, so
the loops pad uneven ranks; padded steps never update a metric).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from satrank.jobs.engine import checkpoint as ckpt
from satrank.jobs.engine.checkpoint import checkpoint_config  # noqa: F401  (re-exported: serving and tests read run configs here)
from satrank.jobs.engine.cli import build_parser, parse
from satrank.jobs.config import SatrankConfig, load_config
from satrank.jobs.engine.loop import synced_pairs
from satrank.jobs.engine.progress import loader_bar
from satrank.jobs.engine.runtime import Runtime, get_logger, init_runtime, write_json_atomic
from satrank.jobs.engine.readers import first_batch
from satrank.models.metrics.ranker_eval import (METRIC_KEYS, CandidateMetrics, EvaluationConfig, ImpressionMetrics, LooMetrics,
                               build_loo_plan, item_side_columns)
from satrank.models.ranker.task import RankerTask, TeacherSpec, find_task, needs_teacher
from satrank.pipeline import config as cfgio
from satrank.pipeline.reader import BatchLoader

log = get_logger("evaluate")
TEACHER_FILE = "teacher.json"


# ------------------------------------------------------------------------------------------ runs and configs
def run_checkpoint(run: str | Path, prefer: Sequence[str] = ("best", "checkpoint")) -> Path:
    """The checkpoint directory of a run: the first of RUN/best, RUN/checkpoint (or RUN itself) that exists."""
    run = Path(run)
    for name in prefer:
        try:
            return ckpt.resolve(run / name)
        except ckpt.CheckpointError:
            continue
    return ckpt.resolve(run)


def satisfaction_teacher(run_s: str | Path, data) -> Tuple[TeacherSpec, Path]:
    """(TeacherSpec, checkpoint dir) of a satrank.jobs.satisfaction run (RUN_S/best, else RUN_S/checkpoint): g is
    built from RUN_S's own config; the run must be a satrank.jobs.satisfaction run written for these features."""
    from satrank.jobs.engine.checkpoint import check_checkpoint

    try:
        path = run_checkpoint(run_s)
    except ckpt.CheckpointError as exc:
        raise ckpt.CheckpointError(f"--satisfaction: {exc}") from None
    scfg = checkpoint_config(path)
    spec = TeacherSpec(scfg.embeddings, scfg.pretrain.tower, scfg.satisfaction)
    check_checkpoint(path, data, spec.emb, what="--satisfaction", expect_job="satisfaction")
    return spec, path


def teacher_to_dict(spec: Optional[TeacherSpec], source: Optional[str]) -> Dict[str, Any]:
    if spec is None:
        return {"teacher": None}
    return {"teacher": {"source": source, "embeddings": cfgio.to_dict(spec.emb), "tower": cfgio.to_dict(spec.tower),
                        "satisfaction": cfgio.to_dict(spec.satisfaction)}}


def teacher_from_dict(obj: Dict[str, Any]) -> Optional[TeacherSpec]:
    from satrank.embeddings.config import EmbeddingConfig
    from satrank.models.stage1.config import SatisfactionConfig, TowerConfig

    t = obj.get("teacher")
    if t is None:
        return None
    return TeacherSpec(cfgio.from_dict(EmbeddingConfig, t["embeddings"], "teacher.embeddings"),
                       cfgio.from_dict(TowerConfig, t["tower"], "teacher.tower"),
                       cfgio.from_dict(SatisfactionConfig, t["satisfaction"], "teacher.satisfaction"))


def build_task(cfg: SatrankConfig, teacher: Optional[TeacherSpec], seed: int) -> RankerTask:
    torch.manual_seed(seed)
    return RankerTask(cfg.data, cfg.embeddings, cfg.model, cfg.loss, teacher if needs_teacher(cfg.model) else None,
                      seed=seed)


# ------------------------------------------------------------------------------------------ evaluation loops
def _eval_reader(cfg: SatrankConfig, uri: Path, with_labels: bool) -> BatchLoader:
    import dataclasses

    rcfg = dataclasses.replace(cfg.reader, shuffle=False, drop_last=False)
    return BatchLoader(uri, cfg.data, rcfg, with_labels=with_labels)


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
    acc = ImpressionMetrics()
    loader = _eval_reader(cfg, uri, True)
    _run(model, loader, runtime, acc.update, first_batch(loader))
    return acc.compute()


def evaluate_candidates(model: nn.Module, cfg: SatrankConfig, ecfg: EvaluationConfig, uri: Path,
                        runtime: Runtime) -> Dict[str, Any]:
    acc = CandidateMetrics(ecfg)
    loader = _eval_reader(cfg, uri, False)
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
                log.warning("no %s: true_sat@k / true_click@k are null", data_dir / "candidates")
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


# ------------------------------------------------------------------------------------------ CLI
def load_trained(run: Path, runtime: Runtime, cfg_cli: SatrankConfig):
    """(sharded model, its config) of a satrank.jobs.train run, weights loaded from its best/last checkpoint."""
    from satrank.embeddings.sharding import shard_model

    path = run_checkpoint(run)
    cfg = checkpoint_config(path)
    cfg.reader = cfg_cli.reader
    teacher_file = Path(run) / TEACHER_FILE
    teacher = teacher_from_dict(json.loads(teacher_file.read_text())) if teacher_file.is_file() else None
    if needs_teacher(cfg.model) and teacher is None:
        raise ckpt.CheckpointError(f"{run}: the model needs its satisfaction model g but {teacher_file} is missing")
    task = build_task(cfg, teacher, seed=0)
    dmp, _ = shard_model(task, cfg.embeddings, runtime)
    meta = ckpt.load_checkpoint(path, dmp)
    log.info("loaded %s (written by %d rank(s))", path, meta["world_size"])
    return dmp, cfg


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser("satrank.jobs.evaluate", __doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="satrank.jobs.train run directory (or a checkpoint)")
    parser.add_argument("--split", default="test",
                        help="labelled split of the impression metrics and the leave-one-out ground truths")
    args, cfg_cli = parse(parser, argv)
    ecfg = getattr(cfg_cli, "evaluate", None) or EvaluationConfig()
    rt = init_runtime(seed=0, debug=args.debug)
    try:
        started = time.perf_counter()
        dmp, cfg = load_trained(args.model, rt, cfg_cli)
        metrics = evaluate_all(dmp, cfg, ecfg, args.data, rt, split=args.split)
        metrics["wall_s"] = round(time.perf_counter() - started, 2)
        metrics["world_size"] = rt.world_size
        if rt.is_main:
            write_json_atomic(args.out / "metrics.json", metrics)
            log.info("metrics:\n%s", format_table({str(args.model): metrics}))
        del dmp
    finally:
        rt.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A trained run on disk: its checkpoint, config, teacher g, kind, and its model loaded unsharded.

Why here (jobs/engine, beside checkpoint.py): loading a run reads DCP checkpoints and run configs,
which the jobs package owns; models/ stays free of them (imports point down only). Every job that
reads a run (evaluate, score, export, train's --satisfaction, dpo's --init) uses these functions.

A run's kind comes from its checkpoint's meta.json (`extra.job`, written by the training job), never
from parameter names: JOB_KINDS maps train -> ranker, dpo -> easq, pretrain -> click, satisfaction ->
satisfaction; a missing or unknown job is a one-line CheckpointError naming meta.json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from satrank.jobs.engine import checkpoint as ckpt
from satrank.jobs.engine.checkpoint import checkpoint_config
from satrank.models.ranker.heads import HeadSpec, serving_specs
from satrank.models.ranker.task import RankerTask, TeacherSpec, needs_teacher
from satrank.models.serving.module import KINDS, Stage1Heads, build_model, merge_lora
from satrank.pipeline import config as cfgio

TEACHER_FILE = "teacher.json"
JOB_KINDS = {"train": "ranker", "dpo": "easq", "pretrain": "click", "satisfaction": "satisfaction"}


def run_checkpoint(run: str | Path, prefer: Sequence[str] = ("best", "checkpoint")) -> Path:
    """The checkpoint directory of a run: the first of RUN/best, RUN/checkpoint (or RUN itself) that exists."""
    run = Path(run)
    for name in prefer:
        try:
            return ckpt.resolve(run / name)
        except ckpt.CheckpointError:
            continue
    return ckpt.resolve(run)


def kind_of(meta: Dict[str, Any], path: Path) -> str:
    """The model kind of a checkpoint from meta.json's `extra.job`; CheckpointError naming the file."""
    job = (meta.get("extra") or {}).get("job")
    if job == "propensity":
        raise ckpt.CheckpointError(f"{path / 'meta.json'}: job 'propensity' is not a ranking model (it predicts "
                                   "P(questionnaire answered)); score a train, dpo, pretrain or satisfaction run")
    if job not in JOB_KINDS:
        raise ckpt.CheckpointError(f"{path / 'meta.json'}: extra.job is {job!r}, expected one of {sorted(JOB_KINDS)} "
                                   "(the job that wrote the checkpoint decides how it is served)")
    return JOB_KINDS[job]


def checkpoint_model_keys(path: Path) -> List[str]:
    """Parameter/buffer names of the model part of a DCP checkpoint (without the "model." prefix)."""
    from satrank.jobs.engine.trusted_dcp import read_state_metadata

    md = read_state_metadata(path / ckpt.STATE_DIR).state_dict_metadata
    return sorted(k[len("model."):] for k in md if k.startswith("model."))


# ------------------------------------------------------------------------------------------ teacher g
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


def satisfaction_teacher(run_s: str | Path, data) -> Tuple[TeacherSpec, Path]:
    """(TeacherSpec, checkpoint dir) of a satrank.jobs.satisfaction run (RUN_S/best, else RUN_S/checkpoint): g is
    built from RUN_S's own config; the run must be a satrank.jobs.satisfaction run written for these features."""
    try:
        path = run_checkpoint(run_s)
    except ckpt.CheckpointError as exc:
        raise ckpt.CheckpointError(f"--satisfaction: {exc}") from None
    scfg = checkpoint_config(path)
    spec = TeacherSpec(scfg.embeddings, scfg.pretrain.tower, scfg.satisfaction)
    ckpt.check_checkpoint(path, data, spec.emb, what="--satisfaction", expect_job="satisfaction")
    return spec, path


def check_resumed_teacher(resume: str | Path, spec: Optional[TeacherSpec], source: Optional[Path]) -> None:
    """CheckpointError unless `spec` (this run's g, from --satisfaction `source`) is the g the ranker run `resume` was
    trained with (its teacher.json, `source` aside): the restore loads that g's weights and RUN/teacher.json is
    rewritten from `spec`, so another g would fail late or leave a teacher.json that no longer fits the checkpoint."""
    path = ckpt.resolve(resume)
    run_dir = path.parent if path.name in ("best", "checkpoint") else path
    tfile = next((p for p in (run_dir / TEACHER_FILE, path / TEACHER_FILE) if p.is_file()), None)
    if tfile is None:
        return  # a run without teacher.json: the restore's own checks decide
    theirs = json.loads(tfile.read_text()).get("teacher")
    mine = json.loads(json.dumps(teacher_to_dict(spec, str(source))))["teacher"]  # as teacher.json reads back

    def spec_of(t: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        return None if t is None else {k: v for k, v in t.items() if k != "source"}

    if spec_of(theirs) != spec_of(mine):
        was, now = ("no g" if t is None else f"g from {t['source']}" for t in (theirs, mine))
        raise ckpt.CheckpointError(f"--resume {resume}: trained with {was} ({tfile}), this run has {now} (another "
                                   f"satisfaction model or model: section); resume with the ones it was trained with")


def build_task(cfg, teacher: Optional[TeacherSpec], seed: int) -> RankerTask:
    torch.manual_seed(seed)
    return RankerTask(cfg.data, cfg.embeddings, cfg.model, cfg.loss, teacher if needs_teacher(cfg.model) else None,
                      seed=seed)


def run_teacher(run_dir: Path, path: Path, what: str) -> TeacherSpec:
    """The TeacherSpec of a ranker run (RUN/teacher.json, written by satrank.jobs.train)."""
    tfile = next((p for p in (run_dir / TEACHER_FILE, path / TEACHER_FILE) if p.is_file()), None)
    if tfile is None:
        raise ckpt.CheckpointError(f"{what}: the ranker needs its satisfaction model g but "
                                   f"{run_dir / TEACHER_FILE} (written by satrank.jobs.train) is missing")
    return teacher_from_dict(json.loads(tfile.read_text()))


# ------------------------------------------------------------------------------------------ unsharded model
@dataclass
class LoadedModel:
    model: nn.Module  # unsharded, materialised, eval mode, LoRA merged; outputs keyed by head name
    kind: str
    cfg: Any  # satrank.jobs.config.SatrankConfig of the run (the checkpoint's config.yaml)
    meta: Dict[str, Any]  # the checkpoint's meta.json
    path: Path  # checkpoint directory
    run_dir: Path
    teacher: Any
    lora: Dict[str, Any]
    specs: List[HeadSpec]  # served heads (satrank.models.ranker.heads.serving_specs of the run config)


def load_model(model_path: str | Path, kind: Optional[str] = None) -> LoadedModel:
    """The model of a run directory or checkpoint, unsharded on CPU; CheckpointError naming the problem
    when the path is not a checkpoint, its meta.json names no servable job, or the rebuilt model does not
    match it. `kind` (one of KINDS) overrides meta.json."""
    path = run_checkpoint(model_path)
    meta = ckpt.read_meta(path)
    cfg = checkpoint_config(path)
    if kind is not None and kind not in KINDS:
        raise ckpt.CheckpointError(f"--kind {kind!r} is not one of {list(KINDS)}")
    kind = kind or kind_of(meta, path)
    keys = checkpoint_model_keys(path)
    run_dir = path.parent if path.name in ("best", "checkpoint") else path
    teacher = None
    if kind in ("ranker", "easq") and needs_teacher(cfg.model):
        teacher = run_teacher(run_dir, path, str(model_path))
    torch.manual_seed(0)
    model = build_model(kind, cfg, teacher)
    unknown = sorted(set(keys) - set(model.state_dict()))
    if unknown:
        raise ckpt.CheckpointError(
            f"{path}: the checkpoint holds {len(unknown)} tensor(s) the rebuilt {kind} model lacks, e.g. "
            f"{unknown[:5]} (a different model class, or adapters this job does not know how to rebuild)")
    ckpt.load_checkpoint(path, model)
    if kind == "easq":  # a satrank.jobs.dpo run: serve the main heads with the EASQ adapters folded in
        easq_cfg = model.easq_cfg
        model = model.serving_task()
        lora = {**merge_lora(model), "easq": {"pathway": easq_cfg.pathway, "targets": list(easq_cfg.targets),
                                              "folded": "merged into user_proj / item_proj + item_in",
                                              "id_targets": list(easq_cfg.id_targets),  # teacher-only, not served
                                              "satisfaction_head": "not served (main heads only)"}}
    else:
        lora = merge_lora(model)
    if kind in ("click", "satisfaction"):
        model = Stage1Heads(model)
    return LoadedModel(model.eval(), kind, cfg, meta, path, run_dir, teacher, lora, serving_specs(cfg.model, cfg.loss))

"""The EASQ online job's model and figures (satrank.jobs.dpo is its command line): the model rebuilt from a stage-2 run
(RUN_MAIN) with the EASQ pathway installed, the before/after evaluation (main heads + the satisfaction head) and
the final metrics (prequential AUC, backbone drift, counts, propensity report). See docs/easq.md.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from satrank.jobs.engine.checkpoint import CheckpointError, check_checkpoint
from satrank.jobs.engine.collectives import all_gather_objects
from satrank.jobs.engine.loop import synced_pairs
from satrank.jobs.engine.readers import evaluation_loader, first_batch
from satrank.jobs.engine.checkpoint import checkpoint_config
from satrank.jobs.engine.evaluation import evaluate_all
from satrank.jobs.engine.runs import TEACHER_FILE, build_task, run_checkpoint, teacher_from_dict
from satrank.models.easq.task import EasqTask
from satrank.models.metrics.ranking import auc_or_nan
from satrank.models.metrics.stage1_eval import auc_vs_drawn_truth, canonical_order, row_ids
from satrank.models.ranker.task import TeacherSpec, needs_teacher
from satrank.pipeline.errors import DataError

TRUE_P_SATISFIED = "true_p_satisfied"  # truth column of the simulator (satrank.pipeline.sim.simulate)
INIT_MAP = {"sparse_arch.": "task.sparse_arch.", "ranker.ranker.": "task.ranker.ranker.ranker."}  # RUN_MAIN -> EasqTask


def read_teacher(run_main: Path) -> Optional[Dict[str, Any]]:
    """RUN_MAIN/teacher.json (the frozen g's spec) as a dict, or None when the run has none."""
    tfile = Path(run_main) / TEACHER_FILE
    return json.loads(tfile.read_text()) if tfile.is_file() else None


def easq_run_config(run_main: Path, cfg_cli: Any) -> Tuple[Any, Path, Optional[TeacherSpec]]:
    """(run config, RUN_MAIN's checkpoint, RUN_MAIN's g or None): RUN_MAIN's own config with this run's `reader:`,
    `easq:`, `train:` and `dpo_train:`. Not collective: satrank.jobs.dpo checks it (config_checks.check_easq_run)
    before any process group."""
    path = run_checkpoint(run_main)
    cfg = checkpoint_config(path)
    cfg.reader, cfg.easq, cfg.train, cfg.dpo_train = cfg_cli.reader, cfg_cli.easq, cfg_cli.train, cfg_cli.dpo_train
    tdict = read_teacher(run_main)
    teacher = teacher_from_dict(tdict) if tdict is not None else None
    if needs_teacher(cfg.model) and teacher is None:
        raise CheckpointError(f"--init {run_main}: the model needs its satisfaction model g but "
                              f"{Path(run_main) / TEACHER_FILE} is missing")
    return cfg, path, teacher


def check_continuation(out: Path, run_cfg: Any, propensity: Optional[Path]) -> None:
    """The dpo checkpoint in --out continues only with RUN_MAIN's features (`run_cfg`), as many ranks and the same
    --propensity. Not collective: satrank.jobs.dpo calls it before any process group, so a refusal writes nothing."""
    meta = check_checkpoint(out, run_cfg.data, run_cfg.embeddings, what=f"--out {out} (continuing it)",
                            expect_job="dpo")
    ranks = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; the process group does not exist yet
    if meta["world_size"] != ranks:
        raise CheckpointError(f"{out}/checkpoint was written by {meta['world_size']} ranks; resume with as many "
                              f"(got {ranks})")
    theirs, mine = meta["extra"].get("propensity"), None if propensity is None else str(propensity)
    if theirs != mine:
        raise CheckpointError(f"{out}/checkpoint was trained with --propensity {theirs}; resume with the same "
                              f"(got {mine})")


def easq_task(cfg: Any, teacher: Optional[TeacherSpec], seed: int) -> EasqTask:
    """The stage-2 RankerTask of `cfg` with its EASQ pathway (`cfg.easq`) installed: what jobs.dpo trains, and what
    jobs.evaluate rebuilds to read a dpo run."""
    return EasqTask(build_task(cfg, teacher, seed=seed), cfg.easq)


def build_easq(run_main: Path, cfg_cli: Any, seed_of) -> Tuple[EasqTask, Any, Path, Dict[str, str]]:
    """(EasqTask, run config, RUN_MAIN's checkpoint, key map) from `easq_run_config`; `seed_of(cfg)` gives the seed
    the task is built with. Weights are loaded after sharding."""
    cfg, path, teacher = easq_run_config(run_main, cfg_cli)
    module = easq_task(cfg, teacher, seed_of(cfg))
    mapping = dict(INIT_MAP)
    if module.task.g is not None:
        mapping["g."] = "task.g."
    return module, cfg, path, mapping


def _sat_head_columns(dmp, cfg, uri: Path, rt) -> Optional[Dict[str, torch.Tensor]]:
    """The satisfaction head's logit, `answered`, `satisfied`, `true_p_satisfied` (when the data has it) and the
    row ids of every row of the split `uri`, gathered from all ranks (collective); None without rows."""
    if not uri.exists():
        return None
    loader = evaluation_loader(cfg, uri)
    try:
        template = first_batch(loader)
    except DataError:
        template = None
    if not all(all_gather_objects(template is not None)):
        return None
    cols: Dict[str, List[torch.Tensor]] = {}
    was = dmp.training
    dmp.eval()
    try:
        with torch.no_grad():
            for batch, real in synced_pairs(loader, rt.device, "pad", template):
                _, out = dmp(batch)
                if real:
                    got = {"logit": out["sat_head_logit"], "satisfied": batch.labels["satisfied"],
                           "answered": batch.labels["questionnaire_answered"], **row_ids(batch)}
                    if TRUE_P_SATISFIED in batch.truth:
                        got["true_p"] = batch.truth[TRUE_P_SATISFIED]
                    for k, v in got.items():
                        cols.setdefault(k, []).append(v.detach().cpu())
    finally:
        dmp.train(was)
    parts = all_gather_objects({k: torch.cat(v) for k, v in cols.items()})
    keys = {k for p in parts for k in p}
    return {k: torch.cat([p[k] for p in parts if k in p]) for k in keys} if keys else None


def sat_head_auc(dmp, cfg, uri: Path, rt) -> Dict[str, Any]:
    """The satisfaction head's AUC on the split `uri`: `auc` against `satisfied` on the ANSWERED rows (the only
    observed labels: a small, biased sample) and, where the data has `true_p_satisfied` (the simulator),
    `auc_true_all` against a label drawn from it with a fixed seed over ALL rows in a canonical row order (the
    same draw as stage 1's `auc_true_all`, whatever the world size; `auc_true_all_ceiling` is the truth's own
    AUC on that draw). One pass over the split. Collective. {"auc": None, "rows": 0} without answers."""
    a = _sat_head_columns(dmp, cfg, uri, rt)
    out: Dict[str, Any] = {"auc": None, "rows": 0}
    m = a["answered"] > 0.5 if a is not None else None
    if m is not None and bool(m.any()):
        lg, lb = a["logit"][m], a["satisfied"][m]
        out = {"auc": auc_or_nan(lg, lb), "rows": int(lg.numel()), "satisfied_share": float(lb.mean())}
    if a is not None and "true_p" in a:
        order = torch.from_numpy(canonical_order(a))
        out.update(auc_vs_drawn_truth(a["logit"][order], a["true_p"][order], 0))
    return out


def evaluate_run(dmp, cfg, ecfg, data_dir: Path, rt) -> Dict[str, Any]:
    """satrank.jobs.evaluate.evaluate_all (main heads, DIR/test) + the satisfaction head on DIR/valid and DIR/test."""
    out = evaluate_all(dmp, cfg, ecfg, data_dir, rt)
    out["sat_head"] = {split: sat_head_auc(dmp, cfg, data_dir / split, rt) for split in ("valid", "test")}
    return out


def prequential(step) -> Tuple[List[Dict[str, Any]], Optional[float], int]:
    """Collective: (every rank's columns + rows, the prequential satisfaction AUC on the answered rows of all ranks
    (None without any), their number). The logits come from the forward that trained on each batch."""
    parts = all_gather_objects({**step.columns(), "rows": step.rows, "pair_sums": step.pair_sums.cpu()})
    lg, lb = torch.cat([p["logits"] for p in parts]), torch.cat([p["labels"] for p in parts])
    return parts, (auc_or_nan(lg, lb) if lg.numel() else None), int(lg.numel())

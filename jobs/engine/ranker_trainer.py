"""The Trainer of the stage-2 ranker (satrank.jobs.train): tells the task its epoch (L_S vs L_S^mix, eq. 18) and
closes each epoch's label correction (eqs. 17-18) on every rank's losses, gathered by the Trainer (the loss
itself never communicates); the fits are logged and travel in the checkpoints with the task's state."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from satrank.jobs.engine.runtime import get_logger
from satrank.jobs.engine.trainer import Trainer
from satrank.models.ranker.task import find_task

TEACHER_MAP = {"sparse_arch.": "g.sparse_arch.", "arch.tower.": "g.arch.tower.", "arch.head.": "g.arch.head."}  # RUN_S -> g


def teacher_map(teacher: Any) -> Dict[str, str]:
    """RUN_S -> g key prefixes for this TeacherSpec: TEACHER_MAP, plus the MF bias of a `satisfaction.form: mf` g."""
    extra = {"arch.mf_bias": "g.arch.mf_bias"} if teacher.satisfaction.form == "mf" else {}
    return {**TEACHER_MAP, **extra}
log = get_logger("train")


class RankerTrainer(Trainer):
    """Trainer whose epoch hooks drive the ranker task's epoch and label correction; `corrections`: the fits."""

    corrections: List[Dict[str, Any]]

    def on_epoch_start(self, epoch: int) -> None:
        find_task(self.dmp).set_epoch(epoch)

    def epoch_end_payload(self, epoch: int) -> Optional[torch.Tensor]:
        return find_task(self.dmp).epoch_losses()  # this rank's label-correction losses (None without)

    def on_epoch_end(self, epoch: int, gathered: Optional[List[torch.Tensor]] = None) -> None:
        fit = find_task(self.dmp).end_epoch(epoch, torch.cat(gathered) if gathered else None)
        if fit:
            rec = {"event": "label_correction", "epoch": epoch, **fit}
            self.corrections = getattr(self, "corrections", []) + [rec]
            self.writer.log(rec)
            log.info("label correction fitted on epoch %d losses: %s", epoch, fit)

"""The stage-2 train task (SAQRec sec. 4.3-4.4, Algorithm 1 lines 8-10) as one DMP-shardable module.

    RankerTask.forward(batch) -> (loss, outputs)      like torchrec's DLRMTrain

Submodules:
  sparse_arch   the ranker's own trainable tables (satrank.embeddings.tables.SparseArch).
  ranker        RankerFromSparse(build_ranker(...)): SID, MLSE, fusion and towers (satrank.models.ranker.saqrec).
  g             the stage-1 satisfaction model (satrank.models.stage1.tasks.SatisfactionModel) with its OWN tables,
                frozen: its lookups run under torch.no_grad() (no graph reaches a table, so FBGEMM's
                fused optimizers never fire) and its dense part has requires_grad=False and stays in
                eval mode. The job loads its weights from the satisfaction run. It exists only when
                MLSE or MTL needs it (mlse=false and mtl=false, or variant=click_only: no g at all).
                It is built without its propensity submodule (loss forced to `naive`): stage 2 needs
                g's scores, never rho.
  teacher       table-free leaf that turns g's lookups into the two signals of the paper:
                  (a) MLSE history scores s_hat_j = g(u, j) for every hist_click item j (eq. 11),
                      passed to the ranker through RankerInputs.extras (satrank.models.ranker.saqrec.PrecomputedScorer);
                  (b) pseudo-labels s_hat = sigmoid(g(u, i)) for the candidate (eq. 16).
                Each is computed only when its consumer exists (MLSE on / satisfaction tower on).
  loss_fn       table-free leaf: MultiTaskLoss (eqs. 15-19, label correction eqs. 17-18) -> (loss, outputs).

The forward body only calls the two SparseArches with `batch.sparse` and passes their outputs to
table-free leaves, so TrainPipelineSparseDist's fx tracer finds and pipelines all four sharded
collections (EBC + EC of each arch). Ablations (paper Table 3) come from `model:`: sid, mlse, mtl,
variant=click_only; "without unbiased pre-training" is the same task given a satisfaction run
trained with `satisfaction.loss: naive`.

Outputs (detached): one per head of satrank.models.ranker.heads under the head's name, its raw value
(click, satisfaction, skip and extra heads: logits; watch_time: log1p seconds); pseudo_satisfaction
and pseudo_satisfaction_logit (g, with mtl). With model.served_satisfaction: teacher (the default) the
`satisfaction` output is g's logit for the candidate and the tower's s_f moves to satisfaction_tower, so
every consumer (evaluation fusion, scoring, export) ranks by g's IPS estimate; `tower` serves s_f. And,
when the batch has labels, loss and loss/<part> for each MultiTaskLoss part plus
loss/satisfaction_bce = eq. 16 against the pseudo-labels (comparable across epochs, unlike
L_S^mix). The label-correction state (the fitted Beta mixture) travels in the module's
state_dict as loss_fn's extra state, so checkpoints carry it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from satrank.embeddings.config import EmbeddingConfig
from satrank.embeddings.tables import META, SparseArch, SparseOutput
from satrank.models.stage1.config import SatisfactionConfig, TowerConfig
from satrank.models.ranker.losses import MultiTaskLoss
from satrank.models.ranker.config import ModelConfig, MultiTaskLossConfig
from satrank.models.ranker.saqrec import PrecomputedScorer, RankerFromSparse, build_ranker
from satrank.models.stage1.tasks import SatisfactionModel
from satrank.pipeline.features import DataConfig

HISTORY_SCORES = "hist_click_satisfaction"  # RankerInputs.extras key of the MLSE scores
PSEUDO = "pseudo_satisfaction"
PSEUDO_LOGIT = "pseudo_satisfaction_logit"  # g(u, i) before the sigmoid: the served satisfaction under `teacher`
SAT_TOWER = "satisfaction_tower"  # s_f when the served `satisfaction` is g's (model.served_satisfaction: teacher)


@dataclasses.dataclass
class TeacherSpec:
    """How the frozen satisfaction model g was built (from the satisfaction run's resolved config)."""

    emb: EmbeddingConfig
    tower: TowerConfig
    satisfaction: SatisfactionConfig


def needs_teacher(model: ModelConfig) -> bool:
    """g is needed for MLSE's history scores or for the satisfaction tower's pseudo-labels."""
    return model.use_mlse or model.use_satisfaction


class Teacher(nn.Module):
    """Leaf: g's lookups -> {HISTORY_SCORES: [B, L] probabilities, PSEUDO: [B] probabilities}.

    g is an argument of forward (RankerTask.g owns it); everything runs under no_grad in eval mode.
    `history_calls` counts calls of g's history scorer (tests check MLSE-off never calls it).
    """

    def __init__(self, history: str, scores: bool, pseudo: bool) -> None:
        super().__init__()
        self.history, self.scores, self.pseudo = history, scores, pseudo
        self.history_calls = 0

    def forward(self, sparse: SparseOutput, dense: torch.Tensor, g: SatisfactionModel) -> Dict[str, torch.Tensor]:
        out: Dict[str, torch.Tensor] = {}
        with torch.no_grad():
            if self.scores:
                self.history_calls += 1
                out[HISTORY_SCORES] = g.score_history(sparse, feature=self.history, dense=dense).detach()
            if self.pseudo:
                logit, _ = g.arch(sparse.pooled, sparse.sequences, dense)
                out[PSEUDO] = torch.sigmoid(logit).detach()
                out[PSEUDO_LOGIT] = logit.detach()
        return out


class RankerLoss(nn.Module):
    """Leaf: MultiTaskLoss over the ranker's outputs -> (loss or None, detached outputs).

    `epoch` (0-based, set by the job through RankerTask.set_epoch) selects L_S vs L_S^mix (eq. 18).
    Training feeds the label-correction reservoir; evaluation does not. Without labels (candidate
    sets) the loss is None in eval mode and an error in training mode.
    """

    def __init__(self, loss_cfg: MultiTaskLossConfig, model_cfg: ModelConfig, seed: int = 0) -> None:
        super().__init__()
        self.mtl = MultiTaskLoss(loss_cfg, model_cfg, seed=seed)
        self.gamma = loss_cfg.gamma
        self.served_teacher = model_cfg.use_satisfaction and model_cfg.served_satisfaction == "teacher"
        self.epoch = 0

    def forward(self, out: Dict[str, torch.Tensor], labels: Dict[str, torch.Tensor],
                teacher: Dict[str, torch.Tensor], l2: nn.Module) -> Tuple[Optional[torch.Tensor], Dict[str, Any]]:
        """`l2`: the module whose parameters the L2 term (loss.gamma) covers (RankerTask.l2_module)."""
        res: Dict[str, Any] = {spec.name: out[spec.name].detach() for spec in self.mtl.heads if spec.name in out}
        pseudo = teacher.get(PSEUDO)
        if pseudo is not None:
            res[PSEUDO] = pseudo
        if self.served_teacher and "satisfaction" in res:  # g serves; the tower stays a reported auxiliary
            res[SAT_TOWER], res["satisfaction"] = res["satisfaction"], teacher[PSEUDO_LOGIT]
        if "click" not in labels:
            if self.training:
                raise ValueError(f"ranker: training batch has no label 'click' (labels present: {sorted(labels)})")
            return None, res
        params = l2.parameters() if self.gamma > 0 else None
        parts = self.mtl(out, labels, self.epoch, pseudo_satisfaction=pseudo, params=params, record=self.training)
        loss = parts.pop("loss")
        res["loss"] = loss.detach()
        res.update({f"loss/{k}": v for k, v in parts.items()})
        if "satisfaction" in out:
            res["loss/satisfaction_bce"] = F.binary_cross_entropy_with_logits(
                out["satisfaction"].detach(), pseudo.to(out["satisfaction"].dtype))
        res["rows"] = torch.tensor(float(out["click"].shape[0]), device=out["click"].device)
        return loss, res

    def epoch_losses(self) -> Optional[torch.Tensor]:
        """This rank's label-correction reservoir of the epoch (None without label correction)."""
        return self.mtl.epoch_losses()

    def end_epoch(self, epoch: int, losses: Optional[torch.Tensor] = None) -> Dict[str, float]:
        """Close training epoch `epoch` (fits the label-correction mixture when due) on `losses`, every rank's
        `epoch_losses()` concatenated in rank order (gathered by the trainer; not a collective)."""
        return self.mtl.end_epoch(epoch, losses)

    # The fitted label-correction state rides in state_dict as ONE float64 tensor (DCP reshards and
    # saves tensors reliably; nested Python objects it does not round-trip):
    # [lo, hi, fitted_epoch, has_table, table (lookup_size), has_bmm, alphas (2), betas (2), weights (2)].
    def get_extra_state(self) -> torch.Tensor:
        c = self.mtl.corrector
        if c is None:
            return torch.zeros(1, dtype=torch.float64)
        st = c.state_dict()
        table = torch.zeros(c.lookup_size, dtype=torch.float64) if st["table"] is None else st["table"].double()
        bmm = torch.zeros(6, dtype=torch.float64) if st["bmm"] is None else st["bmm"].double().reshape(-1)
        head = torch.tensor([st["lo"], st["hi"], st["fitted_epoch"], float(st["table"] is not None)], dtype=torch.float64)
        return torch.cat([head, table, torch.tensor([float(st["bmm"] is not None)], dtype=torch.float64), bmm])

    def set_extra_state(self, state: torch.Tensor) -> None:
        c = self.mtl.corrector
        if c is None:
            return
        v = torch.as_tensor(state, dtype=torch.float64).reshape(-1)
        n = c.lookup_size
        if v.numel() != 4 + n + 7:
            raise ValueError(f"label-correction state has {v.numel()} values, expected {4 + n + 7} "
                             f"(loss.bmm_lookup_size={n}); was the checkpoint written with another config?")
        has_bmm = v[4 + n] > 0.5
        c.load_state_dict({"lo": float(v[0]), "hi": float(v[1]), "fitted_epoch": int(v[2]),
                           "table": v[4:4 + n].clone() if v[3] > 0.5 else None,
                           "bmm": v[5 + n:].reshape(3, 2).clone() if has_bmm else None})


class RankerTask(nn.Module):
    """SAQRec (or the click-only baseline) with its frozen teacher g; see the module doc."""

    def __init__(
        self,
        data: DataConfig,
        emb: EmbeddingConfig,
        model: ModelConfig,
        loss: MultiTaskLossConfig,
        teacher: Optional[TeacherSpec] = None,
        sparse_device: torch.device = META,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.data, self.model_cfg = data, model
        self.sparse_arch = SparseArch(data, emb, device=sparse_device)
        ranker = build_ranker(model, data, self.sparse_arch.feature_dim, PrecomputedScorer(HISTORY_SCORES))
        self.ranker = RankerFromSparse(ranker, data)
        self.g: Optional[SatisfactionModel] = None
        self.teacher: Optional[Teacher] = None
        if needs_teacher(model):
            if teacher is None:
                raise ValueError("ranker: model.mlse / model.mtl need the stage-1 satisfaction model g "
                                 "(pass --satisfaction RUN_S); switch both off to train without it")
            self.g = SatisfactionModel(data, teacher.emb, teacher.tower,
                                       dataclasses.replace(teacher.satisfaction, loss="naive"), None, sparse_device)
            self.g.arch.requires_grad_(False)
            self.teacher = Teacher(model.histories.click, scores=model.use_mlse, pseudo=model.use_satisfaction)
        self.loss_fn = RankerLoss(loss, model, seed=seed)
        # submodule path of what the L2 term covers: the dense ranker; EASQ sets its backbone (install_easq)
        self.l2_path = "ranker"
        self.train(True)

    @property
    def heads(self):
        return self.ranker.ranker.heads

    def l2_module(self) -> nn.Module:
        """The submodule at `l2_path`, passed to the loss for its L2 term (registered once, under the ranker)."""
        return self.get_submodule(self.l2_path)

    def train(self, mode: bool = True) -> "RankerTask":
        super().train(mode)
        if self.g is not None:
            self.g.eval()  # frozen: dropout off, always
        return self

    def set_epoch(self, epoch: int) -> None:
        self.loss_fn.epoch = int(epoch)

    def epoch_losses(self) -> Optional[torch.Tensor]:
        """RankerLoss.epoch_losses: what the epoch-end fit needs from this rank."""
        return self.loss_fn.epoch_losses()

    def end_epoch(self, epoch: int, losses: Optional[torch.Tensor] = None) -> Dict[str, float]:
        return self.loss_fn.end_epoch(epoch, losses)

    def forward(self, batch) -> Tuple[Optional[torch.Tensor], Dict[str, Any]]:
        sp = self.sparse_arch(batch.sparse)
        signals: Dict[str, torch.Tensor] = {}
        if self.g is not None:
            with torch.no_grad():
                gsp = self.g.sparse_arch(batch.sparse)
            signals = self.teacher(gsp, batch.dense, self.g)
        out = self.ranker(sp, batch.dense, signals)
        return self.loss_fn(out, batch.labels, signals, self.l2_module())


def find_task(model: nn.Module) -> RankerTask:
    """The RankerTask inside a model (itself, or wrapped by DistributedModelParallel / DDP)."""
    for m in model.modules():
        if isinstance(m, RankerTask):
            return m
    raise TypeError(f"no RankerTask inside {type(model).__name__}")

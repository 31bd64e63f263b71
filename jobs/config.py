"""The whole typed config of a satrank run: every section, loaded from YAML plus `--set` overrides."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from embeddings.config import EmbeddingConfig
from pipeline import config as cfgio
from pipeline.features import DataConfig
from pipeline.reader_config import ReaderConfig
from models.config import PretrainConfig, PropensityConfig, SatisfactionConfig
from models.ranker_config import ModelConfig, MultiTaskLossConfig
from models.easq_config import EasqConfig
from jobs.train_config import TrainConfig, TrainOverrides
from models.evaluation import EvaluationConfig
from pipeline.sim_world import SimulateConfig
from jobs.serve_config import ExportConfig, ScoreConfig

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "sim.yaml"


@dataclass
class SatrankConfig:
    data: DataConfig = field(default_factory=DataConfig)
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    embeddings: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    simulate: SimulateConfig = field(default_factory=SimulateConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    propensity: PropensityConfig = field(default_factory=PropensityConfig)
    satisfaction: SatisfactionConfig = field(default_factory=SatisfactionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: MultiTaskLossConfig = field(default_factory=MultiTaskLossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)  # jobs.trainer, every training job
    pretrain_train: TrainOverrides = field(default_factory=TrainOverrides)  # jobs.pretrain's changes to train:
    propensity_train: TrainOverrides = field(default_factory=TrainOverrides)
    satisfaction_train: TrainOverrides = field(default_factory=TrainOverrides)
    ranker_train: TrainOverrides = field(default_factory=TrainOverrides)  # jobs.train (stage 2)'s changes to train:
    dpo_train: TrainOverrides = field(default_factory=TrainOverrides)  # jobs.dpo (stage 3)'s changes to train:
    evaluate: EvaluationConfig = field(default_factory=EvaluationConfig)  # models.evaluation, jobs.evaluate / jobs.train
    easq: EasqConfig = field(default_factory=EasqConfig)  # stage 3 (models.easq_config, jobs.dpo)
    score: ScoreConfig = field(default_factory=ScoreConfig)  # jobs.score (fusion of the towers)
    export: ExportConfig = field(default_factory=ExportConfig)  # jobs.export


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> SatrankConfig:
    """Load a run config; the embedded default `configs/sim.yaml` when `path` is None."""
    return cfgio.load(SatrankConfig, path or DEFAULT_CONFIG, overrides)

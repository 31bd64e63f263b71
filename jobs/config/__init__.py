"""The whole typed config of a satrank run: every section, loaded from YAML plus `--set` overrides."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from satrank.embeddings.config import EmbeddingConfig
from satrank.pipeline import config as cfgio
from satrank.pipeline.features import DataConfig
from satrank.pipeline.reader_config import ReaderConfig
from satrank.models.stage1.config import PretrainConfig, PropensityConfig, SatisfactionConfig
from satrank.models.ranker.config import ModelConfig, MultiTaskLossConfig
from satrank.models.easq.config import EasqConfig
from satrank.jobs.config.train import TrainConfig, TrainOverrides
from satrank.models.metrics.ranker_eval import EvaluationConfig
from satrank.pipeline.sim.world import SimulateConfig
from satrank.jobs.config.serve import ExportConfig, ScoreConfig

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "sim.yaml"


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
    train: TrainConfig = field(default_factory=TrainConfig)  # satrank.jobs.engine.trainer, every training job
    pretrain_train: TrainOverrides = field(default_factory=TrainOverrides)  # satrank.jobs.pretrain's changes to train:
    propensity_train: TrainOverrides = field(default_factory=TrainOverrides)
    satisfaction_train: TrainOverrides = field(default_factory=TrainOverrides)
    ranker_train: TrainOverrides = field(default_factory=TrainOverrides)  # satrank.jobs.train (stage 2)'s changes to train:
    dpo_train: TrainOverrides = field(default_factory=TrainOverrides)  # satrank.jobs.dpo (stage 3)'s changes to train:
    evaluate: EvaluationConfig = field(default_factory=EvaluationConfig)  # satrank.models.metrics.ranker_eval, satrank.jobs.evaluate / satrank.jobs.train
    easq: EasqConfig = field(default_factory=EasqConfig)  # stage 3 (satrank.models.easq.config, satrank.jobs.dpo)
    score: ScoreConfig = field(default_factory=ScoreConfig)  # satrank.jobs.score (fusion of the towers)
    export: ExportConfig = field(default_factory=ExportConfig)  # satrank.jobs.export

    def validate(self, path: str) -> None:
        """Cross-section values checked on every load (a stored run config too): the attention heads divide their
        table's dim. The rules that build models are satrank.jobs.config_checks.check_config's (every job, at parse)."""
        from satrank.jobs.config_checks import check_transformer_heads

        check_transformer_heads(self)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> SatrankConfig:
    """Load a run config; the embedded default `configs/sim.yaml` when `path` is None."""
    return cfgio.load(SatrankConfig, path or DEFAULT_CONFIG, overrides)

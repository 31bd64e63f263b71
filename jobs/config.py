"""The whole typed config of a satrank run: every section, loaded from YAML plus `--set` overrides."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from pipeline import config as cfgio
from pipeline.features import DataConfig
from pipeline.reader_config import ReaderConfig
from pipeline.sim_world import SimulateConfig

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "sim.yaml"


@dataclass
class SatrankConfig:
    data: DataConfig = field(default_factory=DataConfig)
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    simulate: SimulateConfig = field(default_factory=SimulateConfig)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> SatrankConfig:
    """Load a run config; the embedded default `configs/sim.yaml` when `path` is None."""
    return cfgio.load(SatrankConfig, path or DEFAULT_CONFIG, overrides)

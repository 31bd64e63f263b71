"""Serving settings: the `score:` (satrank.jobs.score) and `export:` (satrank.jobs.export) config sections.

Why separate from the run config: what a model IS (data contract, tables, towers) comes from the
checkpoint's own config.yaml; how it is SERVED (fusion weights, batch size, int8) is chosen when
scoring or exporting, possibly for the same checkpoint in several ways. So these jobs read only
these two sections from --config / --set; `--set` on any other section is refused, not ignored.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Literal, Optional, Sequence

from satrank.models.common.fusion import FusionConfig
from satrank.pipeline import config as cfgio
from satrank.pipeline.config import ConfigError

SECTIONS = ("score", "export")


@dataclass
class ScoreConfig:
    """`score:` batch scoring of candidate sets (satrank.jobs.score) and the fusion every artifact bakes in."""

    fusion: FusionConfig = field(default_factory=FusionConfig)
    batch_size: int = 4096  # rows per forward
    num_workers: int = 0  # DataLoader reader processes per rank (0 = read in the scoring process)
    on_bad_row: Literal["error", "skip"] = "error"  # skip: rejected rows are counted per shard, never scored
    device: Optional[str] = None  # null = cuda:<local_rank> when available, else cpu; "cpu" forces CPU
    # ranker / easq kinds: the user side once per request of each batch (satrank.models.serving.request
    # RequestBatchScorer), same scores as per row within float rounding; false = the model's forward per row
    request_level: bool = True

    def validate(self, path: str) -> None:
        if self.batch_size <= 0:
            raise ConfigError(f"{path}.batch_size: must be > 0, got {self.batch_size}")
        if self.num_workers < 0:
            raise ConfigError(f"{path}.num_workers: must be >= 0, got {self.num_workers}")
        if self.device is not None and self.device != "cpu" and not self.device.startswith("cuda"):
            raise ConfigError(f"{path}.device: expected null, 'cpu' or 'cuda', got {self.device!r}")


@dataclass
class ExportConfig:
    """`export:` the self-contained serving artifact (satrank.jobs.export)."""

    int8: bool = False  # also export model_int8.pt: tables in FBGEMM's 8-bit rowwise format
    eval_split: str = "test"  # labelled split under --data: int8 AUC change and the export check
    eval_rows: int = 20000  # rows of it (file order) scored by both artifacts
    trace_batch_size: int = 64  # rows of the synthetic example batch the module is traced with
    check_atol: float = 1.0e-5  # traced fp32 artifact vs eager model: max abs difference allowed
    # request-level vs model.pt on DIR/candidates: MLSE ranks history items by g's float score, and two items within
    # an ulp can swap levels between the two batch shapes (docs/serving.md); at most this share of the requests may
    # exceed check_atol, each by no more than check_flip_atol, and every one is listed in the manifest
    check_flip_share: float = 0.01
    check_flip_atol: float = 0.01

    def validate(self, path: str) -> None:
        if not self.eval_split or "/" in self.eval_split:
            raise ConfigError(f"{path}.eval_split: must name a split directory under --data, got {self.eval_split!r}")
        for key in ("eval_rows", "trace_batch_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{path}.{key}: must be > 0, got {getattr(self, key)}")
        if self.check_atol <= 0:
            raise ConfigError(f"{path}.check_atol: must be > 0, got {self.check_atol}")
        if not 0 <= self.check_flip_share < 1 or self.check_flip_atol < self.check_atol:
            raise ConfigError(f"{path}: check_flip_share must be in [0, 1) and check_flip_atol >= check_atol, got "
                              f"{self.check_flip_share} and {self.check_flip_atol}")


@dataclass
class ServeConfig:
    score: ScoreConfig = field(default_factory=ScoreConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


def serve_config_from_raw(raw: Dict[str, Any], overrides: Sequence[str] = (), where: str = "config") -> ServeConfig:
    """ServeConfig from a raw config mapping (other sections ignored) plus `--set` overrides, which
    may only touch score.* / export.*."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key.split(".", 1)[0] not in SECTIONS:
            raise ConfigError(
                f"--set {key}: serving jobs take the model's data/model sections from its checkpoint; "
                f"only {'.*, '.join(SECTIONS)}.* can be set here")
    defaults = cfgio.to_dict(ServeConfig())
    sub = {s: _merge(defaults[s], raw.get(s)) for s in SECTIONS}
    sub = cfgio.apply_overrides(sub, overrides)
    try:
        return cfgio.from_dict(ServeConfig, sub)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load_serve_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ServeConfig:
    """`score:` and `export:` of a YAML file (default configs/sim.yaml; absent sections = defaults)."""
    from satrank.jobs.config import DEFAULT_CONFIG

    path = path or DEFAULT_CONFIG
    return serve_config_from_raw(cfgio.load_yaml(path), overrides, str(path))


def _merge(default: Any, given: Any) -> Any:
    if given is None:
        return default
    if isinstance(default, dict) and isinstance(given, dict):
        out = dict(default)
        for k, v in given.items():
            out[k] = _merge(default.get(k), v) if k in default else v
        return out
    return given


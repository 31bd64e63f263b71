"""The one batch type used by train, eval, score and export: KJT + dense + labels (+ ids, truth).

`Batch` implements TorchRec's `Pipelineable` so `TrainPipelineSparseDist` can copy it to the
device and overlap input distribution with compute.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

LABEL_NAMES = ("click", "watch_time_s", "skip", "questionnaire_answered", "satisfied")


def _map(d: Dict[str, torch.Tensor], fn) -> Dict[str, torch.Tensor]:
    return {k: fn(v) for k, v in d.items()}


@dataclass
class Batch(Pipelineable):
    """One reader batch.

    sparse: KeyedJaggedTensor, keys = DataConfig.sparse_names (single-valued features have
        length 1 per row; sequences are jagged, oldest first, truncated to max_len).
    dense:  float32 [B, n_dense], transforms applied.
    labels: float32 [B] per name in LABEL_NAMES that the data has (candidate sets have none), plus one
        per column of `data.labels.extra` under its column name (labels of extra heads);
        `satisfied` is 0 where not answered: always mask it with `questionnaire_answered`.
    ids:    int64 [B] raw `user_id`, `item_id`, `timestamp`, `request_id` (those present), for
        joins, grouping and exactly-once accounting; never model inputs.
    truth:  float32 [B] per `true_*` column (evaluation only).
    position: reader position after this batch (plain data, see satrank.pipeline.reader); not a tensor.
    """

    sparse: KeyedJaggedTensor
    dense: torch.Tensor
    labels: Dict[str, torch.Tensor] = field(default_factory=dict)
    ids: Dict[str, torch.Tensor] = field(default_factory=dict)
    truth: Dict[str, torch.Tensor] = field(default_factory=dict)
    position: Optional[Any] = None

    @property
    def size(self) -> int:
        return int(self.dense.shape[0])

    def __len__(self) -> int:
        return self.size

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        mv = lambda t: t.to(device=device, non_blocking=non_blocking)  # noqa: E731
        return Batch(
            sparse=self.sparse.to(device=device, non_blocking=non_blocking),
            dense=mv(self.dense),
            labels=_map(self.labels, mv),
            ids=_map(self.ids, mv),
            truth=_map(self.truth, mv),
            position=self.position,
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.sparse.record_stream(stream)
        self.dense.record_stream(stream)
        for d in (self.labels, self.ids, self.truth):
            for t in d.values():
                t.record_stream(stream)

    def pin_memory(self) -> "Batch":
        pin = lambda t: t.pin_memory()  # noqa: E731
        return Batch(
            sparse=self.sparse.pin_memory(),
            dense=pin(self.dense),
            labels=_map(self.labels, pin),
            ids=_map(self.ids, pin),
            truth=_map(self.truth, pin),
            position=self.position,
        )

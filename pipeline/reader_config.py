"""Reader settings (the `reader:` config section of configs/*.yaml), read by satrank.pipeline.reader.BatchLoader."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from satrank.pipeline.config import ConfigError


@dataclass
class ReaderConfig:
    batch_size: int = 1024
    num_workers: int = 2  # DataLoader worker processes per rank (0 = read in the main process)
    shuffle: bool = True  # shuffle fragment order per epoch and rows within the shuffle buffer
    shuffle_buffer_rows: int = 16384  # bounded: rows are permuted within windows of this size
    seed: int = 0
    on_bad_row: Literal["error", "skip"] = "error"  # skip = drop the row, count it with its reason
    drop_last: bool = False

    def validate(self, path: str) -> None:
        if self.batch_size <= 0:
            raise ConfigError(f"{path}.batch_size: must be > 0, got {self.batch_size}")
        if self.num_workers < 0:
            raise ConfigError(f"{path}.num_workers: must be >= 0, got {self.num_workers}")
        if self.shuffle_buffer_rows <= 0:
            raise ConfigError(f"{path}.shuffle_buffer_rows: must be > 0")
        if self.seed < 0:
            raise ConfigError(f"{path}.seed: must be >= 0 (it seeds numpy SeedSequence), got {self.seed}")

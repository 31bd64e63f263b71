"""Shared test fixtures: the sim config's data/reader sections and canonical Parquet shards.

The shards are real Parquet written with pyarrow (satrank.pipeline.sim.testdata): several files with several
row groups each, histories of realistic lengths and unique (user_id, item_id, timestamp) keys.
`write_bad` writes one small file with chosen columns replaced, dropped or raw bytes, for the
bad-input tests.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import pyarrow as pa
import pytest

from satrank.pipeline import config as cfgio
from satrank.pipeline.features import DataConfig
from satrank.pipeline.reader_config import ReaderConfig
from satrank.pipeline.sim.testdata import make_table, write_dataset, write_table

ROOT = Path(__file__).resolve().parent.parent
SIM = ROOT / "configs" / "sim.yaml"


def sim_sections() -> Tuple[DataConfig, ReaderConfig]:
    raw = cfgio.load_yaml(SIM)
    return cfgio.from_dict(DataConfig, raw["data"], "data"), cfgio.from_dict(ReaderConfig, raw["reader"], "reader")


@pytest.fixture
def data_cfg() -> DataConfig:
    return sim_sections()[0]


@pytest.fixture
def reader_cfg() -> Callable[..., ReaderConfig]:
    """ReaderConfig factory: the sim.yaml reader section with small batches, fields overridable."""
    base = dataclasses.replace(sim_sections()[1], batch_size=128, num_workers=0)

    def make(**changes) -> ReaderConfig:
        cfg = dataclasses.replace(base, **changes)
        cfg.validate("reader")
        return cfg
    return make


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory) -> Path:
    """3 files x 1000 rows, row groups of 300 (300/300/300/100): 12 fragments, 3000 unique keys."""
    root = tmp_path_factory.mktemp("shards") / "train"
    write_dataset(root, n_files=3, rows_per_file=1000, row_group_rows=300, seed=7)
    return root


@pytest.fixture
def write_bad(tmp_path) -> Callable[..., Tuple[Path, Path]]:
    """write_bad(replace={col: array}, drop=[cols], n=20, raw=bytes) -> (directory, file)."""
    counter = [0]

    def write(replace: Optional[Dict[str, pa.Array]] = None, drop: Sequence[str] = (), n: int = 20,
              raw: Optional[bytes] = None, with_labels: bool = True) -> Tuple[Path, Path]:
        counter[0] += 1
        root = tmp_path / f"bad{counter[0]}"
        path = root / "part-00000.parquet"
        if raw is not None:
            root.mkdir(parents=True)
            path.write_bytes(raw)
            return root, path
        table = make_table(n, seed=3, with_labels=with_labels)
        for name, arr in (replace or {}).items():
            i = table.schema.get_field_index(name)
            table = table.set_column(i, name, arr) if i >= 0 else table.append_column(name, arr)
        table = table.drop_columns(list(drop))
        write_table(table, path, row_group_rows=max(1, n // 2))
        return root, path
    return write


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Small-tensor tests run far faster with one intra-op thread on a 2-core machine."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

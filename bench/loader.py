"""Loader benchmark: BatchLoader rows/s against a plain pyarrow.dataset scan of the same files.

Why: the reader must not be the bottleneck of training; its target is >= 0.5 of the raw scan
rate and >= 200k rows/s per core with histories of 50/20/5 ids. Prints ONE JSON line.

    python bench/loader.py [--data DIR] [--config CFG] [--batch-size N] [--workers W]

Without --data a temporary canonical dataset (full histories, --rows rows) is written first.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path


import pyarrow  # noqa: E402
import pyarrow.dataset as pads  # noqa: E402
import torch  # noqa: E402

from satrank.pipeline import config as cfgio  # noqa: E402
from satrank.pipeline.features import DataConfig  # noqa: E402
from satrank.pipeline.reader import BatchLoader  # noqa: E402
from satrank.pipeline.reader_config import ReaderConfig  # noqa: E402
from satrank.pipeline.sim.testdata import write_dataset  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "sim.yaml"


def _cpu_seconds() -> tuple:
    """(CPU seconds of this process, of its reaped children: the DataLoader workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


def bench_reader(data: str, data_cfg: DataConfig, reader_cfg: ReaderConfig) -> dict:
    loader = BatchLoader(data, data_cfg, reader_cfg, rank=0, world_size=1)
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    rows = ids = 0
    for batch in loader:
        rows += batch.size
        ids += batch.sparse.values().numel()
    wall = time.perf_counter() - t0
    cpu1 = _cpu_seconds()
    main_cpu, worker_cpu = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    stats = loader.stats()
    assert stats["rows_emitted"] == rows, (stats, rows)
    return {"rows": rows, "wall_s": wall, "cpu_s": main_cpu + worker_cpu, "main_cpu_s": main_cpu,
            "worker_cpu_s": worker_cpu, "ids_per_row": ids / max(rows, 1),
            "files": len(loader.files), "fragments": len(loader.fragments),
            "columns": loader.converter.columns_for(pads.dataset(loader.files[0], filesystem=loader.fs,
                                                                 format="parquet").schema),
            "filesystem": loader.fs, "paths": loader.files}


def bench_raw(fs, paths, columns) -> dict:
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    rows = 0
    for rb in pads.dataset(paths, filesystem=fs, format="parquet").to_batches(columns=columns):
        rows += rb.num_rows
    cpu1 = _cpu_seconds()
    return {"rows": rows, "wall_s": time.perf_counter() - t0, "cpu_s": sum(cpu1) - sum(cpu0)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="directory (or URI) of Parquet shards, or a simulate output (its train/ is "
                    "read); default: generate a temporary canonical dataset")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML with `data:` and `reader:` sections")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--workers", type=int)
    ap.add_argument("--rows", type=int, default=600_000, help="rows of the generated dataset")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each reader; the best is reported")
    args = ap.parse_args(argv)

    raw = cfgio.apply_overrides(cfgio.load_yaml(args.config), args.set)
    data_cfg = cfgio.from_dict(DataConfig, raw["data"], "data")
    reader_cfg = cfgio.from_dict(ReaderConfig, raw.get("reader", {}), "reader")
    if args.batch_size is not None:
        reader_cfg.batch_size = args.batch_size
    if args.workers is not None:
        reader_cfg.num_workers = args.workers
    reader_cfg.validate("reader")

    with tempfile.TemporaryDirectory(prefix="satrank-bench-") as tmp:
        data = args.data
        if data is not None and os.path.isdir(os.path.join(data, "train")):  # a simulate output: read its train split
            data = os.path.join(data, "train")
        if data is None:
            data = os.path.join(tmp, "train")
            write_dataset(data, n_files=8, rows_per_file=-(-args.rows // 8), row_group_rows=65536, full_histories=True)
        runs = [bench_reader(data, data_cfg, reader_cfg) for _ in range(args.repeat)]
        best = min(runs, key=lambda r: r["wall_s"])
        raws = [bench_raw(best["filesystem"], best["paths"], best["columns"]) for _ in range(args.repeat)]
        raw_best = min(raws, key=lambda r: r["wall_s"])

    reader_rps = best["rows"] / best["wall_s"]
    raw_rps = raw_best["rows"] / raw_best["wall_s"]
    print(json.dumps({
        "reader_rows_per_s": round(reader_rps), "raw_rows_per_s": round(raw_rps),
        "ratio": round(reader_rps / raw_rps, 3),
        "reader_rows_per_cpu_s": round(best["rows"] / best["cpu_s"]),
        "raw_rows_per_cpu_s": round(raw_best["rows"] / raw_best["cpu_s"]),
        "reader_main_cpu_us_per_row": round(best["main_cpu_s"] / best["rows"] * 1e6, 3),
        "reader_worker_cpu_us_per_row": round(best["worker_cpu_s"] / best["rows"] * 1e6, 3),
        "rows": best["rows"], "files": best["files"], "fragments": best["fragments"],
        "ids_per_row": round(best["ids_per_row"], 1), "batch_size": reader_cfg.batch_size,
        "workers": reader_cfg.num_workers, "shuffle": reader_cfg.shuffle, "generated": args.data is None,
        "cpu_count": os.cpu_count(), "machine": platform.machine(), "processor": platform.processor(),
        "python": platform.python_version(), "torch": torch.__version__, "pyarrow": pyarrow.__version__,
    }))


if __name__ == "__main__":
    main()

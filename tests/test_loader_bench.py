"""bench/loader.py's CPU accounting: the DataLoader workers are forked by the multiprocessing forkserver, not by
the bench process, so the bench reads their CPU from the forkserver's reaped children. Before, it printed a worker
CPU of exactly 0 and a rows-per-CPU-second figure of the main process alone."""
from __future__ import annotations

from _bench_module import load_bench
from satrank.pipeline.sim.testdata import write_dataset


def test_bench_reader_counts_the_forkserver_workers_cpu(tmp_path, data_cfg, reader_cfg):
    write_dataset(tmp_path / "d", n_files=2, rows_per_file=20_000, row_group_rows=4096, full_histories=True)
    bench = load_bench("loader")
    run = bench.bench_reader(str(tmp_path / "d"), data_cfg, reader_cfg(batch_size=1024, num_workers=2))
    assert run["rows"] == 40_000
    # two workers each converting 20k rows of 100 ids: far above the 10 ms tick; 0.0 was the bug
    assert run["worker_cpu_s"] > 0.05, run
    assert run["cpu_s"] == run["main_cpu_s"] + run["worker_cpu_s"]

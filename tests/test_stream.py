"""The online stream source (satrank.jobs.engine.stream.ShardStream) on real shards, one process: shards in file-name
order, each row once, a mid-shard stop resumed from the saved state with nothing lost or repeated, shards in
flight ('.'-prefixed) invisible until renamed, and the timestamp-order check."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from satrank.jobs.engine.stream import ShardStream, pending_shards, timestamp_ordered
from satrank.pipeline.errors import DataError
from satrank.pipeline.sim.testdata import dataset_keys, write_dataset


def _keys(batch):
    return [int(t) for t in batch.ids["timestamp"].tolist()]


def _drain(stream: ShardStream, stop_after=None):
    """Consume the stream like the online loop (mark after each step); stop after `stop_after` batches."""
    seen, n = [], 0
    for loader in stream.loaders(is_main=True):
        for batch in loader:
            seen += _keys(batch)
            stream.mark(loader)
            n += 1
            if stop_after is not None and n >= stop_after:
                return seen
    return seen


def test_every_row_once_in_file_order_and_resume_mid_shard(dataset_dir, data_cfg, reader_cfg):
    rcfg = reader_cfg(batch_size=128, shuffle=True)  # the stream reads in order whatever the reader says
    all_ts = [k[2] for k in dataset_keys(dataset_dir)]
    whole = _drain(ShardStream(dataset_dir, data_cfg, rcfg))
    assert whole == all_ts  # file-name (= time) order, no shuffle, every row once

    first = ShardStream(dataset_dir, data_cfg, rcfg)
    part = _drain(first, stop_after=10)  # 10 batches of 128: inside the second shard (1000 rows each)
    assert first.state() == {"done": ["part-00000.parquet"]} and first.rank_state()["file"] == "part-00001.parquet"
    resumed = ShardStream(dataset_dir, data_cfg, rcfg)
    resumed.load(first.state(), first.rank_state())
    rest = _drain(resumed)
    assert part + rest == all_ts  # nothing lost, nothing repeated
    assert resumed.done == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert timestamp_ordered(resumed.consumed_files())


def test_in_flight_shards_are_invisible_and_an_empty_split_is_refused_unless_followed(tmp_path):
    split = tmp_path / "train"
    (a,) = write_dataset(split, n_files=1, rows_per_file=50, row_group_rows=50)
    os.replace(a, split / ".part-00000.parquet")  # a producer's write in flight
    with pytest.raises(DataError):
        pending_shards(split, [], follow=False)
    assert pending_shards(split, [], follow=True) == []
    os.replace(split / ".part-00000.parquet", a)
    assert pending_shards(split, [], follow=True) == [a]
    assert pending_shards(split, [Path(a).name], follow=True) == []


def test_timestamp_order_is_checked_across_files(tmp_path):
    files = write_dataset(tmp_path / "train", n_files=2, rows_per_file=40, row_group_rows=20)
    assert timestamp_ordered(files)
    assert not timestamp_ordered(list(reversed(files)))

"""Reader behaviour on real Parquet: exact KJT layout and vocabulary policies, batch sizes, row
accounting, row_filter, deterministic shuffling, resume, candidate sets, shard discovery."""
from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from satrank.pipeline import config as cfgio
from satrank.pipeline.convert import table_to_batch
from satrank.pipeline.errors import DataError
from satrank.pipeline.features import DataConfig
from satrank.pipeline.reader import BatchLoader, list_shards
from satrank.pipeline.sim.testdata import dataset_keys, make_table, write_dataset, write_table

HAND_CFG = {
    "sparse": [
        {"name": "user_id", "column": "user_id", "vocab_size": 10},
        {"name": "item_id", "column": "item_id", "vocab_size": 10},
        {"name": "author_id", "column": "author_id", "vocab_size": 4, "out_of_range": "hash"},
        {"name": "category_id", "column": "category_id", "vocab_size": 3, "out_of_range": "oov"},
    ],
    "sequence": [
        {"name": "hist_click", "column": "hist_click", "vocab_size": 10, "max_len": 3},
        {"name": "hist_satisfied", "column": "hist_satisfied", "vocab_size": 10, "max_len": 2, "out_of_range": "oov"},
        {"name": "hist_dissatisfied", "column": "hist_dissatisfied", "vocab_size": 10, "max_len": 2,
         "out_of_range": "hash"},
        {"name": "hist_skip", "column": "hist_skip", "vocab_size": 10, "max_len": 2, "optional": True},
    ],
    "dense": [{"name": "duration_s", "column": "duration_s", "transform": "log1p"}],
    "truth_columns": ["true_p_click"],
}


def _hand_file(root):
    ints = lambda v: pa.array(v, pa.int64())  # noqa: E731
    lists = lambda v: pa.array(v, pa.list_(pa.int64()))  # noqa: E731
    table = pa.table({
        "user_id": ints([1, 2, 3]), "item_id": ints([4, 5, 6]), "timestamp": ints([100, 101, 102]),
        "request_id": ints([7, 7, 8]), "author_id": ints([1, 5, 9]), "category_id": ints([0, 3, 7]),
        "hist_click": lists([[1, 2, 3, 4, 5], [], [6]]),
        "hist_satisfied": lists([[1, 12], [11, 2, 3], [4]]),
        "hist_dissatisfied": lists([[13], [], [2, 14]]),
        "duration_s": pa.array([0.0, 1.0, 9.0], pa.float32()),
        "click": pa.array([1, 0, 1], pa.int8()), "watch_time_s": pa.array([2.5, 0.0, 7.0], pa.float32()),
        "skip": pa.array([0, 1, 0], pa.int8()), "questionnaire_answered": pa.array([1, 0, 1], pa.int8()),
        "satisfied": pa.array([0, None, 1], pa.int8()),
        "true_p_click": pa.array([0.25, 0.5, 0.75], pa.float32()),
    })
    return write_table(table, root / "hand.parquet")


@pytest.mark.parametrize("workers", [0, 2])  # with 2 workers one slot has no fragment at all
def test_kjt_layout_truncation_and_vocab_policies_exact_on_hand_made_file(tmp_path, reader_cfg, workers):
    _hand_file(tmp_path)
    cfg = cfgio.from_dict(DataConfig, HAND_CFG, "data")
    loader = BatchLoader(tmp_path, cfg, reader_cfg(batch_size=8, shuffle=False, num_workers=workers))
    (batch,) = list(loader)
    kjt = batch.sparse
    assert kjt.keys() == ["user_id", "item_id", "author_id", "category_id",
                          "hist_click", "hist_satisfied", "hist_dissatisfied", "hist_skip"]
    assert kjt.lengths().tolist() == [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                                      3, 0, 1, 2, 2, 1, 1, 0, 2, 0, 0, 0]
    assert kjt.values().tolist() == [1, 2, 3, 4, 5, 6,
                                     1, 1, 1,  # author_id: hash 1, 5 % 4, 9 % 4
                                     0, 3, 3,  # category_id: oov row 3 for 3 and 7
                                     3, 4, 5, 6,  # hist_click: the last 3 ids (most recent)
                                     1, 10, 2, 3, 4,  # hist_satisfied: 12 -> oov row 10; 11 truncated away
                                     3, 2, 4]  # hist_dissatisfied: hash 13 % 10, 14 % 10
    assert kjt.values().dtype == torch.int64
    torch.testing.assert_close(batch.dense[:, 0], torch.tensor([0.0, math.log(2.0), math.log(10.0)]))
    assert batch.dense.shape == (3, 1) and batch.dense.dtype == torch.float32
    assert batch.labels["click"].tolist() == [1.0, 0.0, 1.0]
    assert batch.labels["watch_time_s"].tolist() == [2.5, 0.0, 7.0]
    assert batch.labels["satisfied"].tolist() == [0.0, 0.0, 1.0]  # null (not answered) reads as 0
    assert batch.labels["questionnaire_answered"].tolist() == [1.0, 0.0, 1.0]
    assert batch.ids["timestamp"].tolist() == [100, 101, 102] and batch.ids["request_id"].tolist() == [7, 7, 8]
    assert batch.ids["user_id"].dtype == torch.int64
    assert batch.truth["true_p_click"].tolist() == [0.25, 0.5, 0.75]
    stats = loader.stats()
    assert stats["oov_hits"] == {"author_id": 2, "category_id": 2, "hist_satisfied": 1, "hist_dissatisfied": 2}
    assert (stats["rows_read"], stats["rows_emitted"], stats["rows_rejected_total"]) == (3, 3, 0)
    same, same_stats = table_to_batch(pq.read_table(tmp_path / "hand.parquet"), cfg)  # in-memory twin
    assert torch.equal(same.sparse.lengths(), kjt.lengths()) and torch.equal(same.sparse.values(), kjt.values())
    assert same_stats["oov_hits"] == stats["oov_hits"]


def _read(loader):
    batches = list(loader)
    keys = [k for b in batches for k in zip(b.ids["user_id"].tolist(), b.ids["item_id"].tolist(),
                                            b.ids["timestamp"].tolist())]
    return batches, keys


@pytest.mark.parametrize("workers", [0, 2])
def test_every_row_once_full_batches_and_a_partial_last_per_slot(dataset_dir, data_cfg, reader_cfg, workers):
    loader = BatchLoader(dataset_dir, data_cfg, reader_cfg(batch_size=128, num_workers=workers))
    batches, keys = _read(loader)
    assert sorted(keys) == sorted(dataset_keys(dataset_dir)) and len(set(keys)) == 3000
    last = {b.position["slot"]: i for i, b in enumerate(batches)}
    assert all(b.size == 128 for i, b in enumerate(batches) if i not in last.values())
    assert sum(b.size for b in batches) == 3000
    assert all(b.sparse.stride() == b.size == b.dense.shape[0] for b in batches)
    stats = loader.stats()
    assert stats["rows_read"] == stats["rows_emitted"] == 3000
    assert all(p["done"] for p in loader.state_dict()["slots"].values())


def test_drop_last_drops_the_partial_batch_and_counts_it(dataset_dir, data_cfg, reader_cfg):
    loader = BatchLoader(dataset_dir, data_cfg, reader_cfg(batch_size=128, num_workers=2, drop_last=True))
    batches, keys = _read(loader)
    assert all(b.size == 128 for b in batches)
    stats = loader.stats()
    assert stats["rows_emitted"] == len(keys) == 128 * len(batches)
    assert stats["rows_dropped"] == 3000 - len(keys) > 0
    assert stats["rows_read"] == 3000


def test_order_is_deterministic_per_seed_and_epoch_and_changes_across_epochs(dataset_dir, data_cfg, reader_cfg):
    cfg = reader_cfg(batch_size=100, num_workers=2, shuffle=True, shuffle_buffer_rows=128, seed=5)
    a = BatchLoader(dataset_dir, data_cfg, cfg)
    b = BatchLoader(dataset_dir, data_cfg, cfg)
    _, keys_a = _read(a)
    _, keys_b = _read(b)
    assert keys_a == keys_b
    b.set_epoch(1)
    _, keys_b1 = _read(b)
    assert keys_b1 != keys_a and sorted(keys_b1) == sorted(keys_a)
    _, keys_seed = _read(BatchLoader(dataset_dir, data_cfg, reader_cfg(
        batch_size=100, num_workers=2, shuffle=True, shuffle_buffer_rows=128, seed=6)))
    assert keys_seed != keys_a and sorted(keys_seed) == sorted(keys_a)
    _, keys_plain = _read(BatchLoader(dataset_dir, data_cfg, reader_cfg(batch_size=100, num_workers=0,
                                                                         shuffle=False)))
    assert keys_plain == dataset_keys(dataset_dir)  # no shuffle, one slot: file order


def test_row_filter_emits_only_answered_rows_and_counts_the_rest(dataset_dir, data_cfg, reader_cfg):
    loader = BatchLoader(dataset_dir, data_cfg, reader_cfg(num_workers=2), row_filter="questionnaire_answered")
    batches, keys = _read(loader)
    answered = sum(pq.read_table(p, columns=["questionnaire_answered"]).column(0).to_numpy().sum()
                   for p in sorted(dataset_dir.glob("*.parquet")))
    assert 0 < len(keys) == answered < 3000
    assert all(bool((b.labels["questionnaire_answered"] == 1).all()) for b in batches)
    stats = loader.stats()
    assert stats["rows_filtered"] == 3000 - answered
    assert stats["rows_read"] == stats["rows_emitted"] + stats["rows_rejected_total"] + stats["rows_filtered"]


def test_stats_account_for_every_row_with_skip_and_filter(tmp_path, data_cfg, reader_cfg):
    table = make_table(400, seed=1)
    bad_user = np.zeros(400, bool)
    bad_user[[3, 50, 201]] = True
    user = pa.array(table.column("user_id").to_numpy(), mask=bad_user)
    dur = table.column("duration_s").to_numpy().copy()
    dur[[7, 50, 333]] = np.nan  # row 50 is bad twice: counted once, under its first problem (user_id)
    table = table.set_column(0, "user_id", user).set_column(table.schema.get_field_index("duration_s"),
                                                            "duration_s", pa.array(dur))
    write_table(table, tmp_path / "d" / "part-0.parquet", row_group_rows=128)
    loader = BatchLoader(tmp_path / "d", data_cfg, reader_cfg(num_workers=2, batch_size=64, on_bad_row="skip"),
                         row_filter="questionnaire_answered")
    _, keys = _read(loader)
    bad = bad_user | np.isnan(dur)
    answered = table.column("questionnaire_answered").to_numpy() == 1
    stats = loader.stats()
    assert stats["rows_rejected"] == {"null:user_id": 3, "non_finite:duration_s": 2}
    assert stats["rows_filtered"] == int((~bad & ~answered).sum())
    assert stats["rows_emitted"] == len(keys) == int((~bad & answered).sum())
    assert stats["rows_read"] == 400 == stats["rows_emitted"] + 5 + stats["rows_filtered"]


def test_resume_from_json_state_neither_skips_nor_repeats(dataset_dir, data_cfg, reader_cfg):
    cfg = reader_cfg(batch_size=100, num_workers=2, shuffle=True, shuffle_buffer_rows=128, seed=3)
    first = BatchLoader(dataset_dir, data_cfg, cfg)
    seen = []
    for i, batch in enumerate(first):
        seen += batch.ids["timestamp"].tolist()
        if i == 11:
            break
    state = json.loads(json.dumps(first.state_dict()))
    second = BatchLoader(dataset_dir, data_cfg, cfg)
    second.load_state_dict(state)
    rest = [t for b in second for t in b.ids["timestamp"].tolist()]
    assert len(seen) == 1200 and not set(seen) & set(rest)
    assert sorted(seen + rest) == sorted(k[2] for k in dataset_keys(dataset_dir))
    assert second.stats()["rows_emitted"] == 3000  # counts carry over from the saved state
    # the loop left early continues too: the same loader picks up where it stopped
    more = [t for b in first for t in b.ids["timestamp"].tolist()]
    assert sorted(more) == sorted(rest)
    # a pass that ran to the end makes the next iteration read the epoch again
    assert len([t for b in first for t in b.ids["timestamp"].tolist()]) == 3000


def test_state_can_give_back_batches_that_were_prefetched_but_not_consumed(dataset_dir, data_cfg, reader_cfg):
    cfg = reader_cfg(batch_size=100, num_workers=2, shuffle=True, shuffle_buffer_rows=128)
    first = BatchLoader(dataset_dir, data_cfg, cfg)
    batches = []
    for batch in first:
        batches.append(batch.ids["timestamp"].tolist())
        if len(batches) == 12:
            break
    state = first.state_dict(unconsumed=3)  # e.g. a training pipeline holding 3 batches not yet trained
    second = BatchLoader(dataset_dir, data_cfg, cfg)
    second.load_state_dict(json.loads(json.dumps(state)))
    rest = [t for b in second for t in b.ids["timestamp"].tolist()]
    consumed = [t for b in batches[:9] for t in b]
    assert set(t for b in batches[9:] for t in b) <= set(rest)  # given back: read again
    assert sorted(consumed + rest) == sorted(k[2] for k in dataset_keys(dataset_dir))
    with pytest.raises(ValueError, match="unconsumed"):
        first.state_dict(unconsumed=13)


def test_restore_refuses_other_slot_count_file_list_or_order(dataset_dir, data_cfg, reader_cfg, tmp_path):
    cfg = reader_cfg(num_workers=2)
    state = BatchLoader(dataset_dir, data_cfg, cfg).state_dict()
    with pytest.raises(ValueError, match="slots"):
        BatchLoader(dataset_dir, data_cfg, reader_cfg(num_workers=3)).load_state_dict(state)
    with pytest.raises(ValueError, match="slots"):
        BatchLoader(dataset_dir, data_cfg, cfg, rank=0, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        BatchLoader(dataset_dir, data_cfg, reader_cfg(num_workers=2, seed=9)).load_state_dict(state)
    other = tmp_path / "other"
    write_dataset(other, n_files=2, rows_per_file=100, row_group_rows=50)
    with pytest.raises(ValueError, match="different file list"):
        BatchLoader(other, data_cfg, cfg).load_state_dict(state)


def test_candidate_sets_read_without_labels(tmp_path, data_cfg, reader_cfg):
    write_dataset(tmp_path / "candidates", n_files=2, rows_per_file=150, row_group_rows=64, with_labels=False)
    loader = BatchLoader(tmp_path / "candidates", data_cfg, reader_cfg(num_workers=2), with_labels=False)
    batches, keys = _read(loader)
    assert len(keys) == 300 and all(b.labels == {} for b in batches)
    assert set(batches[0].truth) == {"true_p_click", "true_p_satisfied", "true_p_answered"}
    assert "request_id" in batches[0].ids
    with pytest.raises(DataError, match="'click'.*missing"):
        BatchLoader(tmp_path / "candidates", data_cfg, reader_cfg())


def test_list_shards_sorts_recurses_and_ignores_hidden_files(tmp_path):
    for rel in ["b/part-1.parquet", "a/part-2.parquet", "a/part-0.parquet", "_SUCCESS", "a/.part-3.parquet.tmp",
                "_temporary/x.parquet", "notes.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    fs, files = list_shards(str(tmp_path))
    assert [f[len(str(tmp_path)) + 1:] for f in files] == ["a/part-0.parquet", "a/part-2.parquet", "b/part-1.parquet"]
    _, same = list_shards(f"file://{tmp_path}")
    assert same == files
    with pytest.raises(DataError, match="no such file"):
        list_shards(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no \\*.parquet"):
        list_shards(str(tmp_path / "empty"))


def test_each_rank_reads_a_disjoint_share(dataset_dir, data_cfg, reader_cfg):
    cfg = reader_cfg(num_workers=2, shuffle=True)
    shares = [_read(BatchLoader(dataset_dir, data_cfg, cfg, rank=r, world_size=2))[1] for r in range(2)]
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(dataset_keys(dataset_dir))
    assert all(len(s) > 0 for s in shares)


def test_batches_larger_than_the_shuffle_window_keep_every_row_intact(dataset_dir, data_cfg, reader_cfg):
    """Batches gathered from several windows and files (through the worker transport) carry, row by
    row, exactly the ids and histories of the source row."""
    source = {}
    for path in sorted(dataset_dir.glob("*.parquet")):
        t = pq.read_table(path)
        cols = {c: t.column(c).to_pylist() for c in ["timestamp", "user_id", "author_id", "hist_click",
                                                      "hist_satisfied", "hist_dissatisfied", "hist_skip", "click"]}
        for i, ts in enumerate(cols["timestamp"]):
            source[ts] = {c: v[i] for c, v in cols.items()}
    loader = BatchLoader(dataset_dir, data_cfg, reader_cfg(batch_size=500, num_workers=2, shuffle_buffer_rows=64))
    seen = 0
    for batch in loader:
        per_key = batch.sparse.to_dict()
        for r, ts in enumerate(batch.ids["timestamp"].tolist()):
            row = source[ts]
            assert per_key["user_id"].values()[r].item() == row["user_id"]
            assert per_key["author_id"].values()[r].item() == row["author_id"] % 4096  # hash policy
            for h in ("hist_click", "hist_satisfied", "hist_dissatisfied", "hist_skip"):
                jt = per_key[h]
                lo, hi = jt.offsets()[r].item(), jt.offsets()[r + 1].item()
                assert jt.values()[lo:hi].tolist() == row[h]
            assert batch.labels["click"][r].item() == row["click"]
        seen += batch.size
    assert seen == 3000 and loader.stats()["rows_emitted"] == 3000


def test_files_must_agree_on_optional_columns(tmp_path, data_cfg, reader_cfg):
    write_table(make_table(50, first_row=0), tmp_path / "part-0.parquet")
    write_table(make_table(50, first_row=50).drop_columns(["request_id"]), tmp_path / "part-1.parquet")
    with pytest.raises(DataError, match="part-1.parquet.*optional columns"):
        BatchLoader(tmp_path, data_cfg, reader_cfg())

"""Bad input never passes silently: each problem is a DataError naming the file and the column
(and the row), or, under on_bad_row=skip, a dropped row counted under its reason."""
from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pytest

from satrank.pipeline.errors import DataError
from satrank.pipeline.reader import BatchLoader
from satrank.pipeline.sim.testdata import make_table

N = 20


def _read_all(root, data_cfg, reader_cfg, **kw):
    loader = BatchLoader(root, data_cfg, reader_cfg, **kw)
    return loader, sum(b.size for b in loader)


def _error(root, data_cfg, reader_cfg) -> str:
    with pytest.raises(DataError) as info:
        _read_all(root, data_cfg, reader_cfg)
    return str(info.value)


def _column(name, n=N, seed=3):
    return make_table(n, seed=seed).column(name).to_numpy(zero_copy_only=False)


def _assert_names(msg, path, column=None, row=None):
    assert str(path) in msg, msg
    if column is not None:
        assert f"'{column}'" in msg, msg
    if row is not None:
        assert f"row {row}:" in msg, msg


def test_missing_column_names_file_and_column(write_bad, data_cfg, reader_cfg):
    root, path = write_bad(drop=["item_id"])
    msg = _error(root, data_cfg, reader_cfg())
    _assert_names(msg, path, "item_id")
    assert "missing" in msg


@pytest.mark.parametrize("column,array", [
    ("user_id", pa.array([str(i) for i in range(N)])),
    ("item_id", pa.array(np.arange(N, dtype=np.float64))),
    ("duration_s", pa.array([str(i) for i in range(N)])),
    ("click", pa.array([str(i % 2) for i in range(N)])),
])
def test_wrong_arrow_type_names_file_and_column(write_bad, data_cfg, reader_cfg, column, array):
    root, path = write_bad(replace={column: array})
    msg = _error(root, data_cfg, reader_cfg())
    _assert_names(msg, path, column)
    assert "Arrow type" in msg


def test_sequence_column_that_is_not_a_list(write_bad, data_cfg, reader_cfg):
    root, path = write_bad(replace={"hist_click": pa.array(np.arange(N, dtype=np.int64))})
    msg = _error(root, data_cfg, reader_cfg())
    _assert_names(msg, path, "hist_click")
    assert "list" in msg


def test_null_id_names_file_column_and_row(write_bad, data_cfg, reader_cfg):
    mask = np.zeros(N, bool)
    mask[13] = True
    root, path = write_bad(replace={"user_id": pa.array(_column("user_id"), mask=mask)})
    msg = _error(root, data_cfg, reader_cfg())
    _assert_names(msg, path, "user_id", row=13)
    assert "null" in msg


def test_negative_id_names_the_value(write_bad, data_cfg, reader_cfg):
    item = _column("item_id").copy()
    item[4] = -3
    root, path = write_bad(replace={"item_id": pa.array(item)})
    msg = _error(root, data_cfg, reader_cfg())
    _assert_names(msg, path, "item_id", row=4)
    assert "negative" in msg and "-3" in msg


def test_id_out_of_vocabulary_under_error_policy(write_bad, data_cfg, reader_cfg):
    item = _column("item_id").copy()
    item[17] = 50000  # sim.yaml: item_id vocab_size 50000, out_of_range: error
    root, path = write_bad(replace={"item_id": pa.array(item)})
    msg = _error(root, data_cfg, reader_cfg(num_workers=2))  # raised in a worker, re-raised here
    _assert_names(msg, path, "item_id", row=17)
    assert "vocab_size 50000" in msg and "50000" in msg


def test_history_id_out_of_vocabulary_and_null_element(write_bad, data_cfg, reader_cfg):
    hist = make_table(N, seed=3).column("hist_satisfied").to_pylist()
    hist[6] = [1, 2, 99999]
    root, path = write_bad(replace={"hist_satisfied": pa.array(hist, pa.list_(pa.int64()))})
    msg = _error(root, data_cfg, reader_cfg())
    _assert_names(msg, path, "hist_satisfied", row=6)
    assert "99999" in msg
    hist[6] = [1, None]
    root, path = write_bad(replace={"hist_satisfied": pa.array(hist, pa.list_(pa.int64()))})
    _assert_names(_error(root, data_cfg, reader_cfg()), path, "hist_satisfied", row=6)


def test_corrupt_file_names_the_file(write_bad, data_cfg, reader_cfg):
    root, path = write_bad(raw=b"PAR1" + bytes(range(256)) * 4 + b"PAR1")
    msg = _error(root, data_cfg, reader_cfg())
    _assert_names(msg, path)
    assert "not a readable Parquet file" in msg


def test_empty_zero_byte_file_names_the_file(write_bad, data_cfg, reader_cfg):
    root, path = write_bad(raw=b"")
    msg = _error(root, data_cfg, reader_cfg())
    _assert_names(msg, path)
    assert "0 bytes" in msg


def test_file_without_rows_names_the_file(write_bad, data_cfg, reader_cfg):
    root, path = write_bad(n=0)
    _assert_names(_error(root, data_cfg, reader_cfg()), path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_a_dense_feature(write_bad, data_cfg, reader_cfg, bad):
    dur = _column("duration_s").copy()
    dur[9] = bad
    root, path = write_bad(replace={"duration_s": pa.array(dur)})
    msg = _error(root, data_cfg, reader_cfg())
    _assert_names(msg, path, "duration_s", row=9)
    assert "NaN or infinite" in msg


def test_nan_in_a_label(write_bad, data_cfg, reader_cfg):
    watch = _column("watch_time_s").copy()
    watch[2] = np.nan
    root, path = write_bad(replace={"watch_time_s": pa.array(watch)})
    _assert_names(_error(root, data_cfg, reader_cfg()), path, "watch_time_s", row=2)
    click = _column("click").astype(np.float32)
    click[5] = np.nan  # a float click column is accepted, its NaN is not
    root, path = write_bad(replace={"click": pa.array(click)})
    _assert_names(_error(root, data_cfg, reader_cfg()), path, "click", row=5)


def test_label_not_binary_negative_watch_time_and_satisfied_inconsistent(write_bad, data_cfg, reader_cfg):
    click = _column("click").copy()
    click[1] = 2
    root, path = write_bad(replace={"click": pa.array(click)})
    assert "not 0/1" in _error(root, data_cfg, reader_cfg())
    watch = _column("watch_time_s").copy()
    watch[3] = -1.0
    root, path = write_bad(replace={"watch_time_s": pa.array(watch)})
    _assert_names(_error(root, data_cfg, reader_cfg()), path, "watch_time_s", row=3)
    answered = np.zeros(N, np.int8)
    answered[0] = 1  # answered but satisfied is null
    root, path = write_bad(replace={"questionnaire_answered": pa.array(answered),
                                    "satisfied": pa.array(np.zeros(N, np.int8), mask=np.ones(N, bool))})
    msg = _error(root, data_cfg, reader_cfg())
    _assert_names(msg, path, "satisfied", row=0)
    root, path = write_bad(replace={"questionnaire_answered": pa.array(np.zeros(N, np.int8)),
                                    "satisfied": pa.array(np.ones(N, np.int8))})
    assert "questionnaire_answered == 0" in _error(root, data_cfg, reader_cfg())


def test_skip_policy_drops_and_counts_each_bad_row_with_its_reason(write_bad, data_cfg, reader_cfg):
    n = 60
    t = make_table(n, seed=3)
    user_null = np.zeros(n, bool)
    user_null[[0, 1]] = True
    item = t.column("item_id").to_numpy().copy()
    item[[2, 3, 4]] = [-1, 50000, 70000]
    dur = t.column("duration_s").to_numpy().copy()
    dur[[5, 6]] = [np.nan, np.inf]
    watch = t.column("watch_time_s").to_numpy().copy()
    watch[7] = -2.0
    hist = t.column("hist_click").to_pylist()
    hist[8] = [3, None]
    hist[9] = [60000]
    answered = t.column("questionnaire_answered").to_numpy().copy()
    sat = t.column("satisfied").to_numpy(zero_copy_only=False).copy()
    answered[10], sat[10] = 1, np.nan  # answered, satisfied null
    answered[11], sat[11] = 0, 1  # not answered, satisfied present
    root, _ = write_bad(n=n, replace={
        "user_id": pa.array(t.column("user_id").to_numpy(), mask=user_null), "item_id": pa.array(item),
        "duration_s": pa.array(dur), "watch_time_s": pa.array(watch),
        "hist_click": pa.array(hist, pa.list_(pa.int64())),
        "questionnaire_answered": pa.array(answered),
        "satisfied": pa.array(np.nan_to_num(sat).astype(np.int8), mask=np.isnan(sat)),
    })
    loader, rows_out = _read_all(root, data_cfg, reader_cfg(on_bad_row="skip", num_workers=2, batch_size=16))
    stats = loader.stats()
    assert stats["rows_rejected"] == {
        "null:user_id": 2, "negative:item_id": 1, "out_of_vocab:item_id": 2, "non_finite:duration_s": 2,
        "negative:watch_time_s": 1, "null_element:hist_click": 1, "out_of_vocab:hist_click": 1,
        "missing_when_answered:satisfied": 1, "present_when_unanswered:satisfied": 1,
    }
    assert rows_out == stats["rows_emitted"] == n - 12
    assert stats["rows_read"] == n == rows_out + stats["rows_rejected_total"]


def test_row_filter_column_must_exist(write_bad, data_cfg, reader_cfg):
    root, path = write_bad()
    with pytest.raises(DataError, match=re.escape(f"{path}: column 'is_answered' (row_filter) is missing")):
        BatchLoader(root, data_cfg, reader_cfg(), row_filter="is_answered")

"""The source converters (satrank.pipeline.sources): tiny datasets in their official layouts (tests/_source_fixtures.py)
are converted once per module; the output passes jobs.check_data and trains jobs.pretrain one epoch under torchrun
(2 gloo ranks) with the written DIR/satrank.yaml; hand-placed rows map to exactly the values worked out by hand
(labels, causal histories that leave out the impression itself, same-time and later events); every input row is
accounted for (rows in = rows out + rows rejected); a bad row is refused naming file, column and row.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from _source_fixtures import (COAT_ITEM_BLOCKS, COAT_USER_BLOCKS, TRIPLETS_TEST, TRIPLETS_TRAIN, write_coat,
                              write_kuairand, write_triplets)
from _stage1_helpers import launch, ok

FAST = ["--set", "reader.num_workers=0", "--set", "reader.batch_size=32"]
KUAIRAND = "satrank.pipeline.sources.kuairand"
RATINGS = "satrank.pipeline.sources.ratings"


def convert(module, *args):
    """Run a converter in this process (no torch start-up): (exit code, captured stderr lines)."""
    import contextlib
    import io
    import importlib

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = importlib.import_module(module).main([str(a) for a in args])
    return code, err.getvalue().strip().splitlines()


def rows_of(out: Path, split: str, user: int) -> list:
    table = pq.read_table(out / split)
    return table.filter(pc.equal(table["user_id"], user)).to_pylist()


def report(out: Path) -> dict:
    return json.loads((out / "convert.json").read_text())


def converted(factory, name, write, module, *args):
    """(source dir, converted dir) of the fixture `write` writes, converted once with `args`."""
    root = factory.mktemp(name)
    src = write(root / "src")
    code, err = convert(module, *args, "--src", src, "--out", root / "out")
    assert code == 0, err
    return src, root / "out"


@pytest.fixture(scope="module")
def kuairand(tmp_path_factory):
    return converted(tmp_path_factory, "kuairand", write_kuairand, KUAIRAND)


@pytest.fixture(scope="module")
def triplets(tmp_path_factory):
    return converted(tmp_path_factory, "triplets", write_triplets, RATINGS, "--format", "triplets")


@pytest.fixture(scope="module")
def coat(tmp_path_factory):
    return converted(tmp_path_factory, "coat", write_coat, RATINGS, "--format", "coat", "--positive-threshold", "4")


def check_and_train(out: Path, tmp: Path) -> None:
    """jobs.check_data on every split (train under torchrun, 2 ranks; valid/test through the same conversion in
    this process) and one epoch of jobs.pretrain (2 ranks), both with --config DIR/satrank.yaml as written."""
    from satrank.jobs.config import load_config
    from satrank.pipeline.convert import table_to_batch
    from satrank.pipeline.items import ItemTable

    config = out / "satrank.yaml"
    proc = ok(launch(2, "satrank.jobs.check_data", "--config", config, "--data", out / "train", "--out", tmp / "check",
                     *FAST))
    assert "0 item id(s) without a row" in proc.stdout
    checked = json.loads((tmp / "check" / "metrics.json").read_text())
    assert checked["rows_read"] == checked["rows_emitted"] == report(out)["rows_written_by_split"]["train"]
    cfg = load_config(config)
    items = ItemTable.load(str(out), cfg.data.items, cfg.data)
    for split in ("valid", "test"):
        batch, stats = table_to_batch(pq.read_table(out / split), cfg.data, file=split, items=items)
        assert stats["rows_emitted"] == report(out)["rows_written_by_split"][split] > 0
    ok(launch(2, "satrank.jobs.pretrain", "--config", config, "--data", out, "--out", tmp / "pretrain", *FAST,
              "--set", "pretrain_train.epochs=1"))
    assert json.loads((tmp / "pretrain" / "metrics.json").read_text())["test"]["rows"] > 0


def test_causal_histories_by_hand():
    """Only events strictly before the row's time (same-time events and the row itself are out), oldest first, the
    most recent max_len kept; per kind mask; rows in any order."""
    from satrank.pipeline.sources.histories import causal_histories

    user, time, item = [0, 0, 0, 1, 0], [1, 2, 2, 1, 3], [10, 11, 12, 13, 14]
    kinds = {"all": np.ones(5, bool), "odd": np.array(item) % 2 == 1}
    out = causal_histories(np.array(user), np.array(time), np.array(item), kinds, {"all": 2, "odd": 5})
    assert out["all"].type == pa.list_(pa.int64())
    assert out["all"].to_pylist() == [[], [10], [10], [], [11, 12]]
    assert out["odd"].to_pylist() == [[], [], [], [], [11]]


# ---------------------------------------------------------------------------------------------------- KuaiRand
def test_kuairand_checks_and_trains(kuairand, tmp_path):
    check_and_train(kuairand[1], tmp_path)


def test_kuairand_hand_rows(kuairand):
    """User 100 (dense id 0): videos 5000, 5003, 5006 (ids 0, 1, 2) on the first date, 5009 (3) in the random log on
    the second, 5012 (4) on the last date (valid). 5003 and 5006 share a time_ms: neither is in the other's history."""
    out = kuairand[1]
    train, valid, test = (rows_of(out, s, 0) for s in ("train", "valid", "test"))
    t0 = 1649376000
    pick = ["item_id", "timestamp", "click", "watch_time_s", "duration_s", "skip", "questionnaire_answered",
            "satisfied", "hist_click", "hist_satisfied", "hist_dissatisfied", "hist_skip"]
    assert [[r[k] for k in pick] for r in train] == [
        [0, t0 + 1, 1, 12.0, 10.0, 0, 1, 1, [], [], [], []],
        [1, t0 + 2, 1, 2.5, 11.0, 1, 1, 0, [0], [0], [], []],
        [2, t0 + 2, 0, 0.0, 12.0, 1, 0, None, [0], [0], [], []]]
    assert [[r[k] for k in pick] for r in test] == [
        [3, t0 + 86400, 1, 7.0, 13.0, 0, 0, None, [0, 1], [0], [1], [1, 2]]]
    assert [[r[k] for k in pick] for r in valid] == [  # the random-log event (3) is in the later history
        [4, t0 + 2 * 86400, 1, 14.0, 14.0, 0, 1, 1, [0, 1, 3], [0], [1], [1, 2]]]
    assert [r["author_id"] for r in train] == [1, 2, 3]  # authors 900, 901, 902 -> 1, 2, 3 (0 = none)
    assert [r["category_id"] for r in train] == [1, 2, 3]  # first tags 1, 2, 3 -> 1, 2, 3 (0 = no tag)
    vocab = pq.read_table(out / "vocab" / "user_id.parquet").to_pydict()
    assert vocab["raw"][:3] == [100, 101, 102] and vocab["index"][:3] == [0, 1, 2]
    items = pq.read_table(out / "items").to_pydict()
    assert items["duration_s"][5:8] == [15.0, 16.0, 17.0]  # video 7 has no video_duration: its log's duration_ms
    assert items["category_id"][5] == 0  # video 5 has no tag


def test_kuairand_accounting(kuairand):
    r = report(kuairand[1])
    assert r["rows_in"] == sum(r["rows_in_by_file"].values()) == 5 + 300 + 60
    assert r["rows_in"] == r["rows_out"] + r["rows_rejected"] and r["rows_rejected"] == 0
    assert sum(r["rows_written_by_split"].values()) == r["rows_out"]
    assert r["rows_written_by_split"]["test"] == 61 and r["valid_dates"] == [20220410]


def _edit_csv(path: Path, row: int, column: str, value: str) -> None:
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    fields = lines[row + 1].split(",")
    fields[header.index(column)] = value
    lines[row + 1] = ",".join(fields)
    path.write_text("\n".join(lines) + "\n")


def test_kuairand_bad_row(kuairand, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(kuairand[0], src)
    log = src / "log_standard_4_22_to_5_08_pure.csv"
    _edit_csv(log, 7, "is_click", "2")
    _edit_csv(log, 9, "video_id", "999999")  # a video without a feature row: always counted, never an error
    code, err = convert(KUAIRAND, "--src", src, "--out", tmp_path / "out")
    assert code == 1 and len(err) == 1
    assert f"{log}: row 7 (line 9), column 'is_click': not 0/1 (value 2)" in err[0]
    assert not (tmp_path / "out").exists()
    code, err = convert(KUAIRAND, "--src", src, "--out", tmp_path / "out", "--on-bad-row", "skip")
    assert code == 0, err
    r = report(tmp_path / "out")
    assert r["rows_rejected_by_reason"] == {"not_binary:is_click": 1, "no_video_features_row:video_id": 1}
    assert r["rows_in"] == 365 == r["rows_out"] + 2
    code, err = convert(KUAIRAND, "--src", src, "--out", tmp_path / "out")
    assert code == 2 and "not empty; pass --overwrite" in err[0]


# ---------------------------------------------------------------------------------------------------- ratings
def test_triplets_check_and_train(triplets, tmp_path):
    check_and_train(triplets[1], tmp_path)
    config, data = triplets[1] / "satrank.yaml", triplets[1]
    ok(launch(None, "satrank.jobs.propensity", "--config", config, "--data", data,
              "--out", tmp_path / "propensity", *FAST, "--set", "propensity_train.epochs=1"))
    # the whole chain on rating data: g, then the stage-2 ranker, whose validation split is all clicked
    ok(launch(None, "satrank.jobs.satisfaction", "--config", config, "--data", data, "--init", tmp_path / "pretrain",
              "--propensity", tmp_path / "propensity", "--out", tmp_path / "satisfaction", *FAST,
              "--set", "satisfaction_train.epochs=1"))
    ok(launch(None, "satrank.jobs.train", "--config", config, "--data", data, "--satisfaction", tmp_path / "satisfaction",
              "--out", tmp_path / "ranker", *FAST, "--set", "ranker_train.epochs=1",
              "--set", "evaluate.loo_negatives=3"))  # the fixture's users rated most of its 30 items
    ranker = json.loads((tmp_path / "ranker" / "metrics.json").read_text())
    assert ranker["valid"]["click_auc"] is None and "click has one class" in ranker["valid"]["undefined"]["click_auc"]
    assert ranker["fit"]["monitor_used"] == "sat_auc_answered", ranker["fit"]  # selection falls back, logged


def test_coat_check_and_train(coat, tmp_path):
    check_and_train(coat[1], tmp_path)


def test_triplets_hand_rows(triplets):
    """User 1 (id 0) rated songs 3 (5), 7 (2), 12 (4), 20 (1) in train, songs 5 (4), 9 (3) in the MAR test: ids are
    raw - 1. The MAR rows come after all training rows and see every rated one; a training row sees only the rated
    rows of smaller (pseudo-)timestamp, never itself."""
    out = triplets[1]
    train = rows_of(out, "train", 0)
    mar = rows_of(out, "valid", 0) + rows_of(out, "test", 0)
    rated = {r["item_id"]: r for r in train if r["rating"] is not None}
    assert {i: (r["rating"], r["click"], r["questionnaire_answered"], r["satisfied"]) for i, r in rated.items()} == {
        2: (5, 1, 1, 1), 6: (2, 1, 1, 0), 11: (4, 1, 1, 1), 19: (1, 1, 1, 0)}
    assert sorted((r["item_id"], r["rating"], r["satisfied"]) for r in mar) == [(4, 4, 1), (8, 3, 0)]
    for r in mar:
        assert sorted(r["hist_click"]) == [2, 6, 11, 19] and r["click"] == 1 and r["watch_time_s"] == 0.0
        assert sorted(r["hist_satisfied"]) == [2, 11] and sorted(r["hist_dissatisfied"]) == [6, 19]
    when = {r["item_id"]: r["timestamp"] for r in train}
    for r in train:
        assert r["item_id"] not in r["hist_click"]
        assert r["hist_click"] == sorted((i for i in rated if when[i] < r["timestamp"]), key=when.get)
    unrated = [r for r in train if r["rating"] is None]
    assert len(unrated) == 4 * 4 and all(r["click"] == r["questionnaire_answered"] == 0 for r in unrated)
    assert all(r["satisfied"] is None and r["item_id"] not in rated for r in unrated)


def test_triplets_accounting_and_bad_row(triplets, tmp_path):
    r = report(triplets[1])
    assert r["rows_in"] == (4 + 14 * 12) + (2 + 14 * 5) == r["rows_out"] + r["rows_rejected"]
    written = sum(r["rows_written_by_split"].values())
    assert written == r["rows_out"] + r["rows_added"]["unrated_train"]
    src = tmp_path / "src"
    shutil.copytree(triplets[0], src)
    lines = (src / TRIPLETS_TEST).read_text().splitlines()
    lines[3] = lines[3].rsplit("\t", 1)[0] + "\tfive"
    lines[5] = lines[5].rsplit("\t", 1)[0] + "\t9"
    (src / TRIPLETS_TEST).write_text("\n".join(lines) + "\n")
    code, err = convert(RATINGS, "--format", "triplets", "--src", src, "--out", tmp_path / "out")
    assert code == 1 and len(err) == 1
    assert f"{src / TRIPLETS_TEST}: row 3 (line 4), column 'rating': not an integer (value 'five')" in err[0]
    code, err = convert(RATINGS, "--format", "triplets", "--src", src, "--out", tmp_path / "out", "--on-bad-row",
                        "skip")
    assert code == 0, err
    r = report(tmp_path / "out")
    assert r["rows_rejected_by_reason"] == {f"{TRIPLETS_TEST}:not_integer:rating": 1,
                                            f"{TRIPLETS_TEST}:out_of_range:rating": 1}
    assert r["rows_in"] == 244 == r["rows_out"] + 2
    assert TRIPLETS_TRAIN in json.dumps(r["rows_in_by_file"])


def test_coat_hand_rows_and_side_features(coat, tmp_path):
    src, out = coat
    train, mar = rows_of(out, "train", 0), rows_of(out, "valid", 0) + rows_of(out, "test", 0)
    rated = sorted((r["item_id"], r["rating"], r["satisfied"]) for r in train if r["rating"] is not None)
    assert rated == [(1, 5, 1), (4, 2, 0)]
    assert [(r["item_id"], r["satisfied"], sorted(r["hist_click"]), r["hist_satisfied"], r["hist_dissatisfied"])
            for r in mar] == [(2, 1, [1, 4], [1], [4])]
    users = np.loadtxt(src / "user_item_features" / "user_features.ascii", dtype=int)
    items = np.loadtxt(src / "user_item_features" / "item_features.ascii", dtype=int)
    age = users[0, COAT_USER_BLOCKS[0]:sum(COAT_USER_BLOCKS[:2])].argmax()
    color = items[2, sum(COAT_ITEM_BLOCKS[:2]):sum(COAT_ITEM_BLOCKS[:3])].argmax()
    assert mar[0]["user_age"] == age and mar[0]["item_color"] == color
    r = report(out)
    assert r["rows_in"] == 2 + 11 * 6 + 1 + 11 * 4 == r["rows_out"] + r["rows_rejected"]
    bad = tmp_path / "src"
    shutil.copytree(src, bad)
    matrix = (bad / "train.ascii").read_text().splitlines()
    cells = matrix[3].split()
    cells[5] = "7"
    matrix[3] = " ".join(cells)
    (bad / "train.ascii").write_text("\n".join(matrix) + "\n")
    code, err = convert(RATINGS, "--format", "coat", "--src", bad, "--out", tmp_path / "out")
    assert code == 1 and len(err) == 1
    assert f"{bad / 'train.ascii'}: row 3 (line 4), matrix column 5, column 'rating': rating outside 1..5 (value 7)" \
        in err[0]

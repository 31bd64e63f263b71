"""The item attribute table (data.items, pipeline/items.py): loader errors name file/column/row; derived
`<history>__<attribute>` sequences equal a numpy reference through the reader (workers included) with
exact row accounting; on_missing error/default; a 2-rank sharded SparseArch serves them from the
attribute tables; check_data counts missing ids and attribute mismatches; the default config
(history: []) leaves keys and fingerprints as they were."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent

from _items_world import (MISSING, item_attributes, items_data, reference, table_from_impressions,  # noqa: E402
                          write_items, write_world)
from _synthetic import emb_config  # noqa: E402
from satrank.embeddings.sharding import _constraints  # noqa: E402
from satrank.embeddings.tables import feature_signature, table_specs  # noqa: E402
from satrank.pipeline.config import ConfigError  # noqa: E402
from satrank.pipeline.convert import table_to_batch  # noqa: E402
from satrank.pipeline.errors import DataError  # noqa: E402
from satrank.pipeline.items import ItemTable  # noqa: E402
from satrank.pipeline.reader import BatchLoader  # noqa: E402
from satrank.pipeline.reader_config import ReaderConfig  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("items_world")
    write_world(root)
    return root


def _load_error(tmp_path, **change) -> str:
    """The DataError of loading a table whose columns are item_attributes() with `change` applied."""
    cols = {**item_attributes(), **change}
    cols = {k: v for k, v in cols.items() if v is not None}
    write_items(tmp_path, cols)
    with pytest.raises(DataError) as err:
        ItemTable.load(tmp_path, items_data().items, items_data())
    return str(err.value)


# ------------------------------------------------------------------ loader
def test_loader_errors_name_file_column_row_and_id(tmp_path):
    ids = item_attributes()["item_id"].copy()
    ids[5] = ids[2]
    msg = _load_error(tmp_path, item_id=ids)
    assert "part-00000.parquet: column 'item_id', row 5: duplicate item id" in msg and "first at" in msg, msg
    assert "\n" not in msg
    msg = _load_error(tmp_path, category_id=None)
    assert "part-00000.parquet: column 'category_id' (item table) is missing" in msg, msg
    author = item_attributes()["author_id"].tolist()
    author = pa.array(author[:4] + [None] + author[5:])
    msg = _load_error(tmp_path, author_id=author)
    assert "column 'author_id', row 4: null value" in msg, msg
    ids = item_attributes()["item_id"].copy()
    ids[9] = 30  # item vocab is 30
    msg = _load_error(tmp_path, item_id=ids)
    assert "column 'item_id', row 9: item id 30 is outside the item vocabulary 0..29" in msg, msg
    msg = _load_error(tmp_path, duration_s=pa.array(["x"] * len(ids)))
    assert "column 'duration_s' (item table) has Arrow type string" in msg, msg
    with pytest.raises(DataError, match="data.items: the item attribute table: .*items: no such file"):
        ItemTable.load(tmp_path / "nowhere", items_data().items, items_data())


def test_lookup_applies_the_attribute_policies_and_reads_missing_items_as_zero(tmp_path):
    write_items(tmp_path, item_attributes())
    table = ItemTable.load(tmp_path, items_data().items, items_data())
    ids = np.array([0, 3, 7, 6, -1, 30])  # 7 has no row; -1 and 30 are outside the vocabulary
    got = table.lookup(ids)
    assert got["author_id"].tolist() == [0, 15 % 12, 0, 30 % 17 % 12, 0, 0]  # author 5 * id % 17, hash vocab 12
    assert got["category_id"].tolist() == [0, 3, 0, 5, 0, 0]  # category id % 7; 6 >= vocab 5: the oov row 5
    assert table.has(ids).tolist() == [True, True, False, True, False, False]
    assert got["duration_s"].dtype == np.float32 and got["duration_s"][1] == 3.5


# ------------------------------------------------------------------ config
def test_config_names_the_key_of_an_unknown_feature():
    with pytest.raises(ConfigError, match=r"data\.items\.history: \['hist_nope'\] name no feature of data.sequence"):
        items_data(history=["hist_nope"])
    with pytest.raises(ConfigError, match=r"data\.items\.sparse: \['genre'\] name no feature of data.sparse"):
        items_data(sparse=["genre"])
    with pytest.raises(ConfigError, match=r"data\.items\.on_missing"):
        items_data(on_missing="ignore")


def test_default_config_keeps_batch_keys_and_fingerprint(world):
    plain = items_data(history=[])
    none = dataclasses.replace(plain, items=None)
    assert plain.sparse_names == none.sparse_names == ["user_id", "item_id", "author_id", "category_id",
                                                       "hist_click", "hist_satisfied"]
    assert feature_signature(plain, emb_config()) == feature_signature(none, emb_config())
    batch = next(iter(BatchLoader(world / "train", plain, ReaderConfig(batch_size=16, num_workers=0),
                                  with_labels=False)))
    assert batch.sparse.keys() == none.sparse_names
    derived = items_data(history=["hist_click"])
    assert derived.sparse_names[6:] == ["hist_click__author_id", "hist_click__category_id"]
    specs = {s.name: s for s in table_specs(derived, emb_config())}
    assert specs["author"].sequence and specs["author"].feature_names == ("author_id", "hist_click__author_id")
    with pytest.raises(ConfigError, match="embeddings.tables.category.sharding: data_parallel cannot serve"):
        _constraints(list(specs.values()), "cpu")  # _synthetic's category table is data_parallel


# ------------------------------------------------------------------ reader
@pytest.mark.parametrize("workers", [0, 2])
def test_derived_sequences_equal_the_numpy_reference(world, workers):
    data = items_data(history=["hist_click", "hist_satisfied"])
    table = pa.concat_tables(pq.read_table(p) for p in sorted((world / "train").glob("*.parquet")))
    loader = BatchLoader(world / "train", data, ReaderConfig(batch_size=32, num_workers=workers, seed=1),
                         with_labels=False)
    got = {}
    for batch in loader:
        kjt = batch.sparse.to_dict()
        ts = batch.ids["timestamp"].tolist()
        for name in [f.name for f in data.derived_sequences]:
            hist = name.split("__")[0]
            assert kjt[name].lengths().tolist() == kjt[hist].lengths().tolist()
            for t, vals in zip(ts, kjt[name].to_dense()):
                got.setdefault(name, {})[t] = vals.tolist()
    stats = loader.stats()
    assert stats["rows_read"] == stats["rows_emitted"] == table.num_rows
    missing = 0
    for name in got:
        hist, attr = name.split("__")
        want, miss, mapped = reference(table, data, hist, attr)
        assert got[name] == want, name
        assert stats["oov_hits"].get(name, 0) == mapped and mapped > 0, (name, stats["oov_hits"])
        missing += miss if attr == "author_id" else 0
    assert missing > 0 and sum(stats["items"].values()) == missing, stats["items"]


def test_on_missing_error_names_file_row_and_id_and_skipped_rows_stay_accounted(tmp_path):
    table = write_world(tmp_path, n=60, files=1)
    hists = table.column("hist_click").to_pylist()
    row = next(i for i, h in enumerate(hists) if any(x in MISSING for x in h[-6:]))
    item = next(x for x in hists[row][-6:] if x in MISSING)
    data = items_data(history=["hist_click"], on_missing="error")
    with pytest.raises(DataError) as err:
        list(BatchLoader(tmp_path / "train", data, ReaderConfig(batch_size=8, num_workers=0, shuffle=False),
                         with_labels=False))
    msg = str(err.value)
    assert f"part-00000.parquet: column 'hist_click', row {row}: item id {item} has no row" in msg, msg
    # a row rejected for another reason is not an item error, and rows in = out + rejected
    uid = table.column("user_id").to_pylist()
    bad = [i for i, h in enumerate(hists) if any(x in MISSING for x in h[-6:])]
    for i in bad:
        uid[i] = -1
    fixed = table.set_column(0, "user_id", pa.array(uid, pa.int64()))
    pq.write_table(fixed, tmp_path / "train" / "part-00000.parquet")
    items = ItemTable.load(tmp_path, data.items, data)
    batch, stats = table_to_batch(fixed, data, with_labels=False, on_bad_row="skip", items=items)
    rejected = sum(stats["rows_rejected"].values())
    assert stats["rows_read"] == 60 == stats["rows_emitted"] + rejected
    assert rejected == len(bad) and batch.size == 60 - len(bad) and "items" not in stats


def test_a_converter_without_the_table_refuses_derived_features():
    with pytest.raises(DataError, match=r"data.items.history \['hist_click'\] derives history attributes"):
        table_to_batch(pa.table({"x": [1]}), items_data(history=["hist_click"]), with_labels=False)


# ------------------------------------------------------------------ sharded lookup (2 gloo ranks)
def test_two_rank_sharded_lookup_serves_history_attributes_from_the_attribute_tables(world, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "_dist_items.py"), str(world), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["max_diff"] == {k: 0.0 for k in res["max_diff"]}, res["max_diff"]
    assert res["ids"]["hist_click__author_id"] == res["ids"]["hist_click"] > res["ids"]["item_id"] == 300
    assert min(res["rows_per_rank"]) > 0
    ec = res["plan"]["sparse_arch.ec"]
    assert ec["author"]["sharding_type"] == "row_wise" and ec["author"]["ranks"] == [0, 1]
    assert ec["category"]["sharding_type"] == "table_wise" and "author" not in res["plan"].get("sparse_arch.ebc", {})


# ------------------------------------------------------------------ check_data
def _check_data(data_dir: Path, out: Path, *sets: str) -> subprocess.CompletedProcess:
    """`python -m satrank.jobs.check_data` (1 process) on the sim config with a table written for it."""
    cmd = [sys.executable, "-m", "satrank.jobs.check_data", "--data", str(data_dir / "train"), "--out", str(out),
           "--set", "reader.num_workers=0"]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=240)


def test_check_data_counts_missing_ids_and_attribute_mismatches(tmp_path):
    from satrank.pipeline.sim.testdata import make_table

    table = make_table(200, seed=4)
    items = table.column("item_id").to_numpy()
    hist0 = table.column("hist_click").to_pylist()[1][-1]
    gone = {int(items[0]), int(hist0)}
    ids = np.array(sorted(set(range(50000)) - gone), dtype=np.int64)
    dur = (ids % 97 + 3).astype(np.float32)
    write_items(tmp_path, {"item_id": ids, "author_id": ids % 5000, "category_id": ids % 64, "duration_s": dur})
    author = table.column("author_id").to_numpy().copy()
    author[[5, 6]] += 1
    table = table.set_column(table.schema.get_field_index("author_id"), "author_id", pa.array(author))
    table = table.set_column(table.schema.get_field_index("duration_s"), "duration_s",
                             pa.array((items % 97 + 3).astype(np.float32)))
    (tmp_path / "train").mkdir()
    pq.write_table(table, tmp_path / "train" / "part-00000.parquet")
    want_missing = int(np.isin(items, list(gone)).sum())
    for h in ("hist_click", "hist_satisfied", "hist_dissatisfied", "hist_skip"):
        max_len = {"hist_click": 50, "hist_satisfied": 20, "hist_dissatisfied": 5, "hist_skip": 20}[h]
        want_missing += sum(sum(x in gone for x in lst[-max_len:]) for lst in table.column(h).to_pylist())
    proc = _check_data(tmp_path, tmp_path / "run", "data.items.on_missing=default")
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["items_rows"] == 50000 - len(gone) and m["items_missing"] == want_missing, m
    mismatched_rows = {5, 6} - {i for i in range(200) if items[i] in gone}
    assert m["items_attr_mismatch"] == {"author_id": len(mismatched_rows), "category_id": 0, "duration_s": 0}, m
    assert m["rows_read"] == m["rows_emitted"] == 200
    assert "item table" in proc.stdout and f"{want_missing} item id(s) without a row" in proc.stdout

    proc = _check_data(tmp_path, tmp_path / "err")
    assert proc.returncode == 1 and not (tmp_path / "err" / "metrics.json").exists()
    line = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(line) == 1 and "part-00000.parquet" in line[0] and "has no row in the item table" in line[0], line
    assert any(f"item id {g} has no row" in line[0] for g in gone), line


def test_check_data_without_a_table_says_so(tmp_path):
    write_world(tmp_path, n=40, files=1)
    (tmp_path / "items" / "part-00000.parquet").unlink()
    (tmp_path / "items").rmdir()
    from satrank.pipeline.sim.testdata import make_table

    pq.write_table(make_table(40, seed=1), tmp_path / "train" / "part-00000.parquet")
    proc = _check_data(tmp_path, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "no item table at <data dir>/items (data.items.dir)" in proc.stdout
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["items_table"] is None


# ------------------------------------------------------------------ a training job on the one data path
def test_pretrain_trains_on_two_ranks_with_history_attributes(tmp_path):
    """A simulated world + its item table: check_data finds it consistent, and the 2-rank click-model job
    (TrainPipelineSparseDist, DCP checkpoint) trains with hist_click__author_id & co. in its batches."""
    data = tmp_path / "world"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sim = [sys.executable, "-m", "satrank.pipeline.sim.simulate", "--out", str(data), "--users", "300",
           "--items", "400", "--impressions", "20000", "--seed", "1"]
    assert subprocess.run(sim, cwd=ROOT, env=env, capture_output=True, timeout=240).returncode == 0
    table_from_impressions(data)
    proc = _check_data(data, tmp_path / "check")
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = json.loads((tmp_path / "check" / "metrics.json").read_text())
    assert m["items_missing"] == 0 and set(m["items_attr_mismatch"].values()) == {0}, m
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--monitor-interval=0.2", "-m", "satrank.jobs.pretrain", "--data", str(data),
           "--out", str(tmp_path / "run"), "--set", "data.items.history=[hist_click,hist_satisfied]",
           "--set", "reader.num_workers=0", "--set", "train.epochs=1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert sorted(plan["sparse_arch.ec"]) == ["author", "category", "item"], plan  # shared by pooled + sequences
    meta = (tmp_path / "run" / "checkpoint" / "meta.json").read_text()
    assert "hist_satisfied__category_id" in meta  # the feature fingerprint names the derived features
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["auc"] > 0.6

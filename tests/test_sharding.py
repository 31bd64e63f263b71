"""Embedding tables from the data contract, SparseArch, seeded init, and sharding over 2 gloo ranks
(torchrun) compared step by step with the same model unsharded."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchrec.sparse.jagged_tensor import JaggedTensor

ROOT = Path(__file__).resolve().parent.parent

from _synthetic import batch_from_rows, data_config, emb_config, make_rows  # noqa: E402
from satrank.embeddings.tables import SparseArch, padded, table_init_rows, table_specs  # noqa: E402
from satrank.jobs.config import load_config  # noqa: E402
from satrank.pipeline.config import ConfigError, from_dict  # noqa: E402
from satrank.pipeline.features import DataConfig  # noqa: E402


def torchrun(script: str, *args: str, timeout: int = 120) -> None:
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / script), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    plain, piped = tmp_path_factory.mktemp("plain"), tmp_path_factory.mktemp("pipeline")
    torchrun("_dist_sharding.py", str(plain))
    torchrun("_dist_sharding.py", str(piped), "--pipeline")
    return (json.loads((plain / "result.json").read_text()), json.loads((piped / "result.json").read_text()))


# ------------------------------------------------------------------ tables from the data contract


def test_tables_follow_data_config_item_table_shared_by_candidate_and_histories():
    specs = {s.name: s for s in table_specs(data_config(), emb_config())}
    assert list(specs) == ["user", "item", "author", "category"]
    assert specs["item"].sequence and specs["item"].feature_names == ("item_id", "hist_click", "hist_satisfied")
    assert not specs["user"].sequence and specs["user"].feature_names == ("user_id",)
    assert specs["category"].num_rows == 6  # vocab 5 + 1 oov row
    assert specs["author"].num_rows == 12  # hash policy: no extra row
    assert {s.name: s.sharding for s in specs.values()} == {
        "user": "row_wise", "item": "row_wise", "author": "table_wise", "category": "data_parallel"}


def test_default_config_embeddings_section_covers_every_table():
    cfg = load_config()
    specs = {s.name: s for s in table_specs(cfg.data, cfg.embeddings)}
    assert specs["item"].sequence and len(specs["item"].feature_names) == 5  # item_id + 4 histories
    assert set(specs) == set(cfg.embeddings.tables)
    assert all(s.dim == cfg.embeddings.dim for s in specs.values())


def test_unknown_table_in_embeddings_section_is_an_error():
    with pytest.raises(ConfigError, match=r"embeddings.tables: \['itme'\] name no table"):
        table_specs(data_config(), emb_config(tables={"itme": {"sharding": "row_wise"}}))


def test_sequence_tables_with_different_dims_are_an_error():
    raw = {"sparse": [{"name": "item_id", "column": "item_id", "vocab_size": 9, "table": "item"}],
           "sequence": [{"name": "h1", "column": "h1", "vocab_size": 9, "max_len": 2, "table": "item"},
                        {"name": "h2", "column": "h2", "vocab_size": 4, "max_len": 2, "table": "author"}]}
    with pytest.raises(ConfigError, match="need one dim"):
        table_specs(from_dict(DataConfig, raw), emb_config(tables={"author": {"dim": 4}}))


def test_bad_sharding_type_names_the_key():
    with pytest.raises(ConfigError, match="embeddings.tables.item.sharding"):
        load_config(overrides=["embeddings.tables.item.sharding=diagonal"])


# ------------------------------------------------------------------ SparseArch (unsharded)


def test_padded_is_left_aligned_with_mask():
    jt = JaggedTensor(values=torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]]), lengths=torch.tensor([2, 0, 1]))
    x, mask = padded(jt, 3)
    assert x.tolist() == [[[1, 10], [2, 20], [0, 0]], [[0, 0], [0, 0], [0, 0]], [[3, 30], [0, 0], [0, 0]]]
    assert mask.tolist() == [[True, True, False], [False, False, False], [True, False, False]]


def test_sparse_arch_looks_up_its_features_from_the_full_batch_kjt():
    data = data_config()
    arch = SparseArch(data, emb_config()).materialize(seed=1)
    rows = make_rows(data, 5, seed=2)
    out = arch(batch_from_rows(data, rows).sparse)  # KJT carries keys of both collections
    assert sorted(out.pooled) == ["author_id", "category_id", "item_id", "user_id"]
    assert sorted(out.sequences) == ["hist_click", "hist_satisfied"]
    user_w = arch.ebc.embedding_bags["user"].weight
    item_w = arch.ec.embeddings["item"].weight
    assert torch.equal(out.pooled["user_id"], user_w[rows["user_id"]])
    assert torch.equal(out.pooled["item_id"], item_w[rows["item_id"]])  # from the EC, length-1 rows
    seq = out.sequences["hist_click"]
    assert seq.lengths().tolist() == [len(h) for h in rows["hist_click"]]
    flat = [i for h in rows["hist_click"] for i in h]
    assert torch.equal(seq.values(), item_w[flat])  # the candidate and the history share one table


def test_seeded_init_is_a_function_of_seed_table_and_row():
    full = table_init_rows(3, "item", 20000, 4, 0, 20000)
    assert torch.equal(table_init_rows(3, "item", 20000, 4, 8190, 8200), full[8190:8200])  # across a block edge
    assert not torch.equal(table_init_rows(4, "item", 20000, 4, 0, 10), full[:10])
    assert not torch.equal(table_init_rows(3, "user", 20000, 4, 0, 10), full[:10])
    assert float(full.abs().max()) <= (1 / 20000) ** 0.5


# ------------------------------------------------------------------ sharded over 2 ranks


def test_two_rank_sharded_training_matches_unsharded_per_step(dist_results):
    r, _ = dist_results
    assert r["world_size"] == 2
    assert all(v == 0.0 for v in r["init_max_diff"].values()), r["init_max_diff"]
    assert len(r["sharded_losses"]) == len(r["unsharded_losses"]) == 6
    for step, (a, b) in enumerate(zip(r["sharded_losses"], r["unsharded_losses"])):
        assert abs(a - b) < 1e-5, (step, a, b)
    for key, d in r["final_max_diff"].items():
        assert d < 1e-5, (key, d)
    # the comparison is not vacuous: every table moved far more than the tolerance
    tables = {k: v for k, v in r["final_change"].items() if ".weight" in k and "sparse_arch" in k}
    assert len(tables) == 4 and min(tables.values()) > 0.05, tables


def test_data_parallel_optimizer_gives_data_parallel_tables_their_own_rule(tmp_path):
    """embeddings.data_parallel_optimizer: Adam on the data_parallel table beside fused row-wise Adagrad tables;
    the 2-rank sharded run matches an unsharded model stepped with those two rules, per step."""
    torchrun("_dist_sharding.py", str(tmp_path), "--dp-adam")
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["plan"]["sparse_arch.ebc"]["category"]["sharding_type"] == "data_parallel"
    for step, (a, b) in enumerate(zip(r["sharded_losses"], r["unsharded_losses"])):
        assert abs(a - b) < 1e-5, (step, a, b)
    for key, d in r["final_max_diff"].items():
        assert d < 1e-5, (key, d)
    assert r["final_change"]["sparse_arch.ebc.embedding_bags.category.weight"] > 0.005  # Adam moved it


def test_plan_uses_the_configured_sharding_types(dist_results):
    r, _ = dist_results
    plan = r["plan"]
    assert plan["sparse_arch.ec"]["item"]["sharding_type"] == "row_wise"
    assert plan["sparse_arch.ebc"]["user"]["sharding_type"] == "row_wise"
    assert plan["sparse_arch.ebc"]["author"]["sharding_type"] == "table_wise"
    assert plan["sparse_arch.ebc"]["category"]["sharding_type"] == "data_parallel"
    assert plan["sparse_arch.ec"]["item"]["ranks"] == [0, 1]
    assert len(plan["sparse_arch.ec"]["item"]["shards"]) == 2
    assert "sparse_arch.ec.item: row_wise" in r["plan_text"]
    assert "sparse_arch.ebc.author: table_wise" in r["plan_text"]


def test_train_pipeline_sparse_dist_pipelines_both_collections(dist_results):
    _, p = dist_results
    assert p["pipelined"] == ["ShardedEmbeddingBagCollection", "ShardedEmbeddingCollection"]
    for key, d in p["final_max_diff"].items():
        assert d < 1e-5, (key, d)

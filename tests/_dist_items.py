"""torchrun script for tests/test_items.py: the derived history attribute features served by sharded tables.

Each of 2 gloo ranks reads its share of the world in tests/_items_world.py through BatchLoader (data.items.history
= [hist_click]), looks the batch KJT up in a SparseArch sharded by the planner + DistributedModelParallel
(item and author row_wise, category table_wise: an EmbeddingCollection table cannot be data_parallel) and sends
the ids and embeddings to rank 0, which compares them with the gathered whole tables. Writes OUT/result.json on rank 0.

usage: torchrun --standalone --nproc_per_node=2 tests/_dist_items.py WORLD OUT
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from _items_world import items_data
from _synthetic import emb_config
from satrank.embeddings.sharding import full_state_dict, plan_to_dict, shard_model
from satrank.embeddings.tables import SparseArch
from satrank.jobs.engine.collectives import all_gather_objects
from satrank.jobs.engine.runtime import init_runtime, write_json_atomic
from satrank.pipeline.reader import BatchLoader
from satrank.pipeline.reader_config import ReaderConfig

SEED = 3
CHECKS = {  # feature -> table its rows come from
    "hist_click__author_id": "author", "author_id": "author", "hist_click__category_id": "category",
    "category_id": "category", "hist_click": "item", "item_id": "item",
}


class Lookup(nn.Module):
    """A SparseArch plus one dense parameter (DMP wraps the dense part in DDP, which needs one)."""

    def __init__(self, data, emb):
        super().__init__()
        self.sparse_arch = SparseArch(data, emb)
        self.scale = nn.Linear(1, 1)

    def forward(self, kjt):
        return self.sparse_arch(kjt)


def run(rt, world: Path, out: Path) -> None:
    """Look up this rank's rows sharded; rank 0 checks every feature's embeddings against its whole table."""
    data = items_data(history=["hist_click"])
    emb = emb_config(tables={"item": {"sharding": "row_wise"}, "user": {"sharding": "row_wise"},
                             "author": {"sharding": "row_wise"}, "category": {"sharding": "table_wise"}})
    torch.manual_seed(SEED)
    dmp, _ = shard_model(Lookup(data, emb), emb, rt, seed=SEED, dense_optimizer="sgd")
    loader = BatchLoader(world / "train", data, ReaderConfig(batch_size=64, num_workers=0, shuffle=False),
                         with_labels=False)
    mine = []
    with torch.no_grad():
        for batch in loader:
            res = dmp(batch.sparse)
            kjt = batch.sparse.to_dict()
            for name in CHECKS:
                emb_out = res.sequences[name].values() if name in res.sequences else res.pooled[name]
                mine.append((name, kjt[name].values().tolist(), emb_out.tolist()))
    everyone = all_gather_objects(mine)
    tables = full_state_dict(dmp)
    if not rt.is_main:
        return
    weight = {t: next(v for k, v in tables.items() if k.endswith(f".{t}.weight")) for t in set(CHECKS.values())}
    diff, ids_seen = {n: 0.0 for n in CHECKS}, {n: 0 for n in CHECKS}
    for name, ids, vecs in (item for rank in everyone for item in rank):
        want = weight[CHECKS[name]][torch.tensor(ids, dtype=torch.long)]
        diff[name] = max(diff[name], float((torch.tensor(vecs) - want).abs().max()) if ids else 0.0)
        ids_seen[name] += len(ids)
    keys = sorted(tables)
    write_json_atomic(out / "result.json", {
        "max_diff": diff, "ids": ids_seen, "rows_per_rank": [sum(len(i) for n, i, _ in r if n == "item_id")
                                                             for r in everyone],
        "plan": plan_to_dict(dmp.plan), "table_keys": keys,
    })


def main() -> None:
    rt = init_runtime(seed=SEED, device="cpu")
    try:
        run(rt, Path(sys.argv[1]), Path(sys.argv[2]))
    finally:
        rt.close()


if __name__ == "__main__":
    main()

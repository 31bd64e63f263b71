"""torchrun entry for tests/test_reader_distributed.py: every rank reads its share with a BatchLoader.

    torchrun --standalone --nproc_per_node=2 tests/_reader_worker.py --data DIR --out DIR --tag NAME
        [--shuffle] [--full-epoch-first] [--epoch E] [--stop-after ROWS] [--state-in FILE] [--state-out FILE]

Each rank writes OUT/NAME-rank{r}.json: the (user_id, item_id, timestamp) keys it read in epoch E,
the rows each of its (rank, worker) slots delivered ("slot_rows") and its stats. With --stop-after
the rank stops once it has read that many rows; --state-out then saves the loader states of all
ranks, gathered and merged on rank 0, as one JSON file.
--full-epoch-first first reads the whole epoch 0 into OUT/full-rank{r}.json (saves a launch).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


import torch.distributed as dist  # noqa: E402

from satrank.pipeline import config as cfgio  # noqa: E402
from satrank.pipeline.features import DataConfig  # noqa: E402
from satrank.pipeline.reader import BatchLoader  # noqa: E402
from satrank.pipeline.reader_config import ReaderConfig  # noqa: E402

SIM = Path(__file__).resolve().parent.parent / "configs" / "sim.yaml"


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _read(loader: BatchLoader, stop_after) -> dict:
    keys: list = []
    slot_rows: dict = {}
    for batch in loader:
        ids = batch.ids
        keys += zip(ids["user_id"].tolist(), ids["item_id"].tolist(), ids["timestamp"].tolist())
        slot = str(batch.position["slot"])
        slot_rows[slot] = slot_rows.get(slot, 0) + batch.size
        if stop_after is not None and len(keys) >= stop_after:
            break
    return {"keys": keys, "slot_rows": slot_rows, "stats": loader.stats()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--shuffle", action="store_true")
    ap.add_argument("--full-epoch-first", action="store_true")
    ap.add_argument("--epoch", type=int, default=0)
    ap.add_argument("--stop-after", type=int)
    ap.add_argument("--state-in")
    ap.add_argument("--state-out")
    args = ap.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    data_cfg = cfgio.from_dict(DataConfig, cfgio.load_yaml(SIM)["data"], "data")
    reader_cfg = ReaderConfig(batch_size=64, num_workers=2, shuffle=args.shuffle, shuffle_buffer_rows=128, seed=11)
    loader = BatchLoader(args.data, data_cfg, reader_cfg)  # rank and world size from the process group
    if args.full_epoch_first:
        _write_json(Path(args.out) / f"full-rank{rank}.json", _read(loader, None))
    if args.state_in:
        loader.load_state_dict(json.loads(Path(args.state_in).read_text()))
    loader.set_epoch(args.epoch)
    _write_json(Path(args.out) / f"{args.tag}-rank{rank}.json", _read(loader, args.stop_after))
    if args.state_out:
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, loader.state_dict())
        if rank == 0:
            _write_json(Path(args.state_out), BatchLoader.merge_state_dicts(states))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Script for tests/test_checkpoint.py. Modes (OUT is a directory shared by the runs):

  save  OUT  (torchrun, 2 ranks) save at step 0, train 3 steps sharded, save again (replacing it)
             to RUN=OUT/run2 with DCP; write the
             gathered weights to OUT/full2.pt and, after one more step, OUT/full2_next.pt; then the uneven-batches loop runs (rank 0: 3 batches,
             rank 1: 1) with policy pad and stop -> OUT/loop.json
  load1 OUT  (plain python, world 1) load OUT/run2 with optimizer; compare to OUT/full2.pt, train on
             one repeated batch, save OUT/run1 and OUT/full1.pt -> OUT/load1.json
  load2 OUT  (torchrun, 2 ranks) load OUT/run1 (written by 1 rank) -> OUT/load2.json
"""
from __future__ import annotations

import sys
from pathlib import Path


import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from _synthetic import ToyModel, batch_from_rows, data_config, emb_config, make_rows, rank_slice  # noqa: E402
from satrank.embeddings.sharding import full_state_dict, shard_model  # noqa: E402
from satrank.jobs.engine.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from satrank.jobs.config import load_config  # noqa: E402
from satrank.jobs.engine.loop import run_loop  # noqa: E402
from satrank.jobs.engine.runtime import init_runtime, write_json_atomic  # noqa: E402

SEED, B = 3, 16


def build(rt, seed=SEED):
    data, emb = data_config(), emb_config()
    torch.manual_seed(seed)
    dmp, opt = shard_model(ToyModel(data, emb), emb, rt, dense_lr=0.01, seed=seed)
    return data, dmp, opt


def train(rt, data, dmp, opt, batches):
    losses = []
    for rows in batches:
        loss, _ = dmp(batch_from_rows(data, rows, *rank_slice(B, rt.rank, rt.world_size)))
        loss.backward()
        opt.step()
        opt.zero_grad()
        t = loss.detach().clone()
        dist.all_reduce(t)
        losses.append(t.item() / rt.world_size)
    return losses


def diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a) if set(a) == set(b) else float("inf")


def mode_save(rt, out: Path) -> None:
    data, dmp, opt = build(rt)
    save_checkpoint(out / "run2", dmp, opt, extra={"epoch": 0, "step": 0})  # replaced below
    if rt.is_main:
        (out / "run2" / "checkpoint.tmp-stale").mkdir()  # leftover of an interrupted save
    train(rt, data, dmp, opt, [make_rows(data, B, i) for i in range(3)])
    save_checkpoint(out / "run2", dmp, opt, extra={"epoch": 1, "step": 3},
                    rank_extra={"rank": rt.rank, "file": f"part-{rt.rank}", "row": 10 * rt.rank},
                    config=load_config())
    full = full_state_dict(dmp)
    train(rt, data, dmp, opt, [make_rows(data, B, 77)])  # the step load1 takes after loading
    full_next = full_state_dict(dmp)
    if rt.is_main:
        torch.save(full, out / "full2.pt")
        torch.save(full_next, out / "full2_next.pt")

    # uneven batches: rank 0 has 3, rank 1 has 1; each step does a collective forward/backward
    result = {}
    for policy in ("pad", "stop"):
        mine = [batch_from_rows(data, make_rows(data, 4, 100 + i)) for i in range(3 if rt.rank == 0 else 1)]
        seen = []

        def step(batch, real):
            loss, _ = dmp(batch)
            (loss * (1.0 if real else 0.0)).backward()
            opt.step()
            opt.zero_grad()
            seen.append(bool(real))

        stats = run_loop(mine, step, rt, policy=policy)
        result[policy] = {"seen": seen, "stats": vars(stats)}
    gathered = [None] * rt.world_size
    dist.all_gather_object(gathered, result)
    if rt.is_main:
        write_json_atomic(out / "loop.json", gathered)


def mode_load1(rt, out: Path) -> None:
    data, dmp, opt = build(rt, seed=SEED + 100)  # different init, overwritten by the load
    fresh = full_state_dict(dmp)
    meta = load_checkpoint(out / "run2", dmp, opt)
    loaded = full_state_dict(dmp)
    ref = torch.load(out / "full2.pt", weights_only=True)
    rows = make_rows(data, B, 77)
    losses = train(rt, data, dmp, opt, [rows])
    after_one = full_state_dict(dmp)  # equals the 2-rank model's next step iff optimizer state was restored
    losses += train(rt, data, dmp, opt, [rows] * 5)
    save_checkpoint(out / "run1", dmp, opt, extra={"epoch": 2, "step": 9}, rank_extra={"rank": 0})
    torch.save(full_state_dict(dmp), out / "full1.pt")
    write_json_atomic(out / "load1.json", {
        "fresh_vs_saved": diff(fresh, ref), "loaded_vs_saved": diff(loaded, ref), "losses": losses,
        "next_step_vs_2rank": diff(after_one, torch.load(out / "full2_next.pt", weights_only=True)),
        "extra": meta["extra"], "rank_extra": meta["rank_extra"], "world_size": meta["world_size"],
        "plan_files": sorted(p.name for p in (out / "run2" / "checkpoint").iterdir()),
    })


def mode_load2(rt, out: Path) -> None:
    data, dmp, opt = build(rt, seed=SEED + 5)
    meta = load_checkpoint(out / "run1" / "checkpoint", dmp, opt)
    loaded = full_state_dict(dmp)
    # one more identical step on both sides would need the 1-rank optimizer state; check the loss
    rows = make_rows(data, B, 77)
    losses = train(rt, data, dmp, opt, [rows] * 2)
    if rt.is_main:
        ref = torch.load(out / "full1.pt", weights_only=True)
        write_json_atomic(out / "load2.json", {"loaded_vs_saved": diff(loaded, ref), "losses": losses,
                                              "extra": meta["extra"]})


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    rt = init_runtime(seed=SEED, device="cpu")  # load1 runs without torchrun: a 1-process world
    try:
        {"save": mode_save, "load1": mode_load1, "load2": mode_load2}[mode](rt, out)
    finally:
        rt.close()


if __name__ == "__main__":
    main()

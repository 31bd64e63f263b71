"""torchrun script for tests/test_sharding.py: train the test model sharded over the world (row-wise
item EC table, table-wise and data-parallel EBC tables, fused rowwise_adagrad) on per-rank halves
of fixed global batches; rank 0 also trains the same model unsharded (plain modules, torchrec's
RowWiseAdagrad, same seeds) on the whole global batches. Writes OUT/result.json on rank 0.

usage: torchrun --standalone --nproc_per_node=2 tests/_dist_sharding.py OUT [--pipeline] [--dp-adam]
(--dp-adam: embeddings.data_parallel_optimizer = Adam, so the data_parallel table follows its own rule)
"""
from __future__ import annotations

import sys
from pathlib import Path


import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from _synthetic import ToyModel, batch_from_rows, data_config, emb_config, global_batches, rank_slice  # noqa: E402
from satrank.embeddings.sharding import full_state_dict, plan_summary, plan_to_dict, shard_model, torch_embedding_optimizer  # noqa: E402
from satrank.jobs.engine.runtime import init_runtime, write_json_atomic  # noqa: E402

SEED, STEPS, GLOBAL_B, DENSE_LR = 7, 6, 32, 0.01


def sharded_run(rt, data, emb, batches, use_pipeline: bool):
    torch.manual_seed(SEED)
    model = ToyModel(data, emb)
    dmp, opt = shard_model(model, emb, rt, dense_lr=DENSE_LR, seed=SEED, dense_optimizer="sgd")
    init = full_state_dict(dmp)
    lo, hi = rank_slice(GLOBAL_B, rt.rank, rt.world_size)
    local = [batch_from_rows(data, rows, lo, hi) for rows in batches]
    losses, pipelined = [], []
    if use_pipeline:
        from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

        pipe = TrainPipelineSparseDist(dmp, opt, rt.device)
        it = iter(local)
        for _ in range(STEPS):
            pipe.progress(it)  # returns the model's second output; losses are not exposed
        pipelined = sorted(type(m).__name__ for m in pipe._pipelined_modules)
    else:
        for b in local:
            loss, _ = dmp(b)
            loss.backward()
            opt.step()
            opt.zero_grad()
            t = loss.detach().clone()
            dist.all_reduce(t)
            losses.append(t.item() / rt.world_size)
    final = full_state_dict(dmp)
    return dmp, init, final, losses, pipelined


def unsharded_run(data, emb, batches):
    torch.manual_seed(SEED)
    model = ToyModel(data, emb)
    model.sparse_arch.materialize(SEED)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dp = [p for n, p in model.sparse_arch.named_parameters()
          if emb.table_sharding(n.split(".")[-2]) == "data_parallel"]  # <coll>.<embeddings>.<table>.weight
    fused = [p for p in model.sparse_arch.parameters() if all(p is not q for q in dp)]
    emb_opts = [torch_embedding_optimizer(fused, emb.optimizer), torch_embedding_optimizer(dp, emb.dp_optimizer())]
    dense_opt = torch.optim.SGD(model.over.parameters(), lr=DENSE_LR)
    losses = []
    for rows in batches:
        loss, _ = model(batch_from_rows(data, rows))
        loss.backward()
        for opt in (*emb_opts, dense_opt):
            opt.step()
            opt.zero_grad()
        losses.append(loss.item())
    return init, {k: v.detach().clone() for k, v in model.state_dict().items()}, losses


def max_diff(a, b):
    return {k: float((a[k] - b[k]).abs().max()) for k in sorted(a)}


def run(rt, out: Path, use_pipeline: bool, dp_adam: bool = False) -> None:
    data = data_config()
    emb = emb_config(data_parallel_optimizer={"type": "adam", "lr": 0.01, "weight_decay": 1.0e-3}) if dp_adam \
        else emb_config()
    batches = global_batches(data, STEPS, GLOBAL_B, SEED)
    dmp, s_init, s_final, s_losses, pipelined = sharded_run(rt, data, emb, batches, use_pipeline)
    if rt.is_main:
        u_init, u_final, u_losses = unsharded_run(data, emb, batches)
        write_json_atomic(out / "result.json", {
            "world_size": rt.world_size,
            "sharded_losses": s_losses,
            "unsharded_losses": u_losses,
            "init_max_diff": max_diff(s_init, u_init),
            "final_max_diff": max_diff(s_final, u_final),
            "final_change": max_diff(u_final, u_init),
            "plan": plan_to_dict(dmp.plan),
            "plan_text": plan_summary(dmp.plan),
            "pipelined": pipelined,
        })


def main() -> None:
    rt = init_runtime(seed=SEED, device="cpu")
    try:
        run(rt, Path(sys.argv[1]), "--pipeline" in sys.argv, "--dp-adam" in sys.argv)
    finally:
        rt.close()


if __name__ == "__main__":
    main()

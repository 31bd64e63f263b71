"""Helper for tests/test_ranking_metrics.py, launched by `torchrun --standalone --nproc_per_node=2`:
each rank feeds MetricAccumulator different, unevenly sized batches, gathers over gloo and writes
what it saw (gathered tensors + standard_metrics) to OUT_DIR/rank{r}.json, atomically."""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from satrank.models.metrics.ranking import MetricAccumulator, standard_metrics


def rank_batches(rank: int):
    """Deterministic per-rank data; also rebuilt by the test for the single-process reference."""
    g = torch.Generator().manual_seed(100 + rank)
    out = []
    for b in range(2 + rank):                       # rank 0: 2 batches, rank 1: 3 batches
        n = 5 + 3 * b + rank
        scores = torch.rand(n, 4, generator=g)
        out.append({
            "loo_ranks": 1.0 + (scores[:, 1:] > scores[:, :1]).sum(1).double(),
            "click_pred": torch.rand(n, generator=g),
            "click": (torch.rand(n, generator=g) < 0.5).long(),
            "user_id": torch.randint(0, 4, (n,), generator=g),
            "watch_time_pred": torch.rand(n, generator=g),
            "watch_time_s": torch.rand(n, generator=g) * 10,
            "score": torch.rand(n, generator=g),
            "true_p_satisfied": torch.rand(n, generator=g),
            "request_id": torch.randint(0, 3, (n,), generator=g) + 10 * rank,
            "row": torch.arange(n) + 1000 * b + 100000 * rank,
        })
    return out


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    acc = MetricAccumulator()
    for batch in rank_batches(rank):
        acc.update(**batch)
    gathered = acc.compute()
    result = {
        "world": dist.get_world_size(),
        "local_rows": int(acc.local()["row"].numel()),
        "tensors": {k: v.tolist() for k, v in gathered.items()},
        "metrics": standard_metrics(gathered),
    }
    path = os.path.join(out_dir, f"rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

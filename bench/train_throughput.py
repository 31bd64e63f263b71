"""Training-throughput benchmark of the full stage-2 task (SAQRec + frozen teacher g). Prints ONE JSON line.

Why: the TorchRec path (sharded SparseArch, FBGEMM fused optimizer, TrainPipelineSparseDist) must
not cost more than it brings; so in the same run it measures
  torchrec_samples_per_s  RankerTask sharded by satrank.embeddings.sharding.shard_model in a 1-process world
                          (DMP, fused rowwise Adagrad on the tables, dense Adam), stepped by
                          TrainPipelineSparseDist;
  plain_samples_per_s     the SAME dense model (same RankerTask, ranker and g's dense parts) whose two
                          SparseArches are replaced by plain torch.nn.EmbeddingBag / nn.Embedding tables
                          (sparse gradients, torch Adagrad), stepped by a plain loop; ratio = torchrec / plain,
                          both on the reference path (reference attention, fp32);
  flops_ratio             achieved model FLOP/s of the first path of --paths (default fast; FLOPs of one step counted with
                          torch.utils.flop_counter.FlopCounterMode on the plain model, whose dense part
                          is identical; embedding lookups count 0) over the FLOP/s of a plain float32
                          matmul measured in the same process with the same threads.
  speedup_vs_reference_path  the SAME sharded model and batch stepped on each path of --paths in turn
                          (blocks interleaved within every round), samples/s fast / reference, median of the
                          per-round ratios; path_samples_per_s gives each path's median samples/s. A path is
                          (model.attention, train.precision): fast = (fused, bf16), fused_fp32 = (fused, fp32),
                          reference = (reference, fp32); bf16 autocasts the forward as jobs.train does
                          (Trainer._forward), the backward runs outside it.
  flops_ratio_bf16        achieved FLOP/s of the fast path over a bf16 matmul's FLOP/s (the fast path's peak).
Every history is full by default: hist_click 50, hist_satisfied 20, hist_dissatisfied 5 (and hist_skip 20);
`--histories uniform` draws each row's lengths uniformly from 0..max_len (about half the positions padded),
default vocabularies of configs/sim.yaml, one batch of reader.batch_size rows reused per step. `--data DIR`
instead takes the batch from DIR/train (reader.batch_size rows drawn at random with seed 0): the histories a
training step really sees (on the default world hist_click is about half full, hist_satisfied and
hist_dissatisfied mostly empty), where the fused path's work on valid positions only pays more. Both models
live in the same process and are timed in alternating blocks (median block), so a shared machine's
fluctuating load does not favour either.

    python bench/train_throughput.py [--config CFG] [--batch-size N] [--steps S] [--rounds R] [--threads T]
                                     [--paths fast,fused_fp32,reference] [--histories full|uniform]
                                     [--data DIR]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List


import torch  # noqa: E402
from torch import nn  # noqa: E402
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor  # noqa: E402

from satrank.embeddings.tables import SparseOutput, table_specs  # noqa: E402
from satrank.jobs.config import load_config  # noqa: E402
from satrank.models.common.encoders import HistoryEncoder  # noqa: E402
from satrank.models.common.towers import TransformerHistoryEncoder  # noqa: E402
from satrank.models.ranker.task import RankerTask, TeacherSpec  # noqa: E402
from satrank.pipeline.convert import table_to_batch  # noqa: E402
from satrank.pipeline.sim.testdata import make_table  # noqa: E402


class PlainSparseArch(nn.Module):
    """SparseArch's interface (forward(kjt) -> SparseOutput) on plain torch tables."""

    def __init__(self, data, emb) -> None:
        super().__init__()
        self.data, self.emb = data, emb
        self.tables = nn.ModuleDict()
        self.table_of: Dict[str, str] = {}
        self.sequence_tables = set()
        for s in table_specs(data, emb):
            self.tables[s.name] = (nn.Embedding(s.num_rows, s.dim, sparse=True) if s.sequence
                                   else nn.EmbeddingBag(s.num_rows, s.dim, mode="sum", sparse=True))
            if s.sequence:
                self.sequence_tables.add(s.name)
            for f in s.feature_names:
                self.table_of[f] = s.name
        self.seq_names = [f.name for f in data.sequence]

    def forward(self, kjt: KeyedJaggedTensor) -> SparseOutput:
        pooled, sequences = {}, {}
        for name in [f.name for f in self.data.sparse]:
            jt, t = kjt[name], self.table_of[name]
            if t in self.sequence_tables:
                pooled[name] = self.tables[t](jt.values())
            else:
                pooled[name] = self.tables[t](jt.values(), jt.offsets()[:-1])
        for name in self.seq_names:
            jt = kjt[name]
            sequences[name] = JaggedTensor(values=self.tables[self.table_of[name]](jt.values()), lengths=jt.lengths())
        return SparseOutput(pooled=pooled, sequences=sequences)


def build_task(cfg, seed: int) -> RankerTask:
    torch.manual_seed(seed)
    teacher = TeacherSpec(cfg.embeddings, cfg.pretrain.tower, cfg.satisfaction)
    return RankerTask(cfg.data, cfg.embeddings, cfg.model, cfg.loss, teacher, seed=seed)


def time_steps(step, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps if steps else 0.0


PATHS = {"fast": ("fused", "bf16"), "fused_fp32": ("fused", "fp32"), "reference": ("reference", "fp32")}


def torchrec_stepper(cfg, batch, rt, precision: Dict[str, str]):
    """(step function, holders) of the sharded task stepped by TrainPipelineSparseDist on `batch` forever;
    the forward runs under bf16 autocast while precision["now"] == "bf16" (as Trainer._forward does)."""
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from satrank.embeddings.sharding import shard_model

    dmp, opt = shard_model(build_task(cfg, 0), cfg.embeddings, rt, dense_lr=1e-3, seed=0, planner_batch_size=batch.size)

    def forward(b):
        with torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=precision["now"] == "bf16"):
            loss, out = dmp(b)
        return loss.float(), out

    pipe = TrainPipelineSparseDist(dmp, opt, rt.device, custom_model_fwd=forward)

    class Forever:
        def __iter__(self):
            return self

        def __next__(self):
            return batch

    it = Forever()
    return (lambda: pipe.progress(it)), [pipe, dmp, opt]


def plain_model(cfg):
    task = build_task(cfg, 0)
    task.sparse_arch = PlainSparseArch(cfg.data, cfg.embeddings)
    task.g.sparse_arch = PlainSparseArch(cfg.data, cfg.embeddings)
    use_attention(task, "reference")  # compared with the torchrec model on the reference path
    sparse = [p for n, p in task.named_parameters() if ".tables." in n and p.requires_grad]
    dense = [p for n, p in task.named_parameters() if ".tables." not in n and p.requires_grad]
    return task, torch.optim.Adagrad(sparse, lr=cfg.embeddings.optimizer.lr), torch.optim.Adam(dense, lr=1e-3)


def plain_step(task, opt_sparse, opt_dense, batch) -> None:
    opt_sparse.zero_grad(set_to_none=True)
    opt_dense.zero_grad(set_to_none=True)
    loss, _ = task(batch)
    loss.backward()
    opt_sparse.step()
    opt_dense.step()


def use_attention(model: nn.Module, path: str) -> int:
    """Switch every history encoder of `model` (ranker and g) to attention `path`; returns how many."""
    encoders = [m for m in model.modules() if isinstance(m, (HistoryEncoder, TransformerHistoryEncoder))]
    for m in encoders:
        m.attention = path
    return len(encoders)


def matmul_flops_per_s(n: int = 1024, steps: int = 10, rounds: int = 5, dtype=torch.float32) -> float:
    """[n, n] @ [n, n] FLOP/s in `dtype` (2 n^3 per product), median of `rounds` blocks."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    time_steps(lambda: torch.mm(a, b), 0, 3)
    return 2.0 * n ** 3 / statistics.median(time_steps(lambda: torch.mm(a, b), steps, 0) for _ in range(rounds))


def rows_of(split: Path, n: int):
    """n rows of the Parquet split drawn at random (seed 0): a batch of the data a training step sees."""
    import numpy as np
    import pyarrow.dataset as ds

    table = ds.dataset(split, format="parquet").to_table()
    if table.num_rows < n:
        raise SystemExit(f"bench/train_throughput: {split} has {table.num_rows} rows, fewer than the batch {n}")
    return table.take(np.sort(np.random.default_rng(0).choice(table.num_rows, n, replace=False)))


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None)
    p.add_argument("--batch-size", type=int, default=None, help="rows per step (default reader.batch_size)")
    p.add_argument("--steps", type=int, default=4, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=5, help="alternating timed blocks per model (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--paths", default="fast,fused_fp32,reference",
                   help=f"paths timed on the same sharded model, of {list(PATHS)}; fast and reference give the speedup")
    p.add_argument("--histories", choices=["full", "uniform"], default="full",
                   help="full: every history at max_len; uniform: lengths uniform in 0..max_len per row")
    p.add_argument("--data", type=Path, default=None,
                   help="take the batch from DIR/train (rows drawn at random, seed 0) instead of --histories")
    args = p.parse_args(argv)
    paths = [a for a in args.paths.split(",") if a]
    if not paths or any(a not in PATHS for a in paths) or len(set(paths)) != len(paths):
        p.error(f"--paths: distinct values of {list(PATHS)}, got {args.paths!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    bs = args.batch_size or cfg.reader.batch_size
    table = make_table(bs, seed=0, full_histories=args.histories == "full") if args.data is None \
        else rows_of(args.data / "train", bs)
    batch, _ = table_to_batch(table, cfg.data)
    lens = {f.name: float(batch.sparse[f.name].lengths().float().mean()) for f in cfg.data.sequence}

    from satrank.jobs.engine.runtime import init_runtime

    rt = init_runtime(seed=0, device="cpu")
    try:
        task, o_s, o_d = plain_model(cfg)
        task.train()
        plain = lambda: plain_step(task, o_s, o_d, batch)  # noqa: E731
        precision = {"now": "fp32"}
        trec, holders = torchrec_stepper(cfg, batch, rt, precision)

        def use_path(name: str) -> int:
            precision["now"] = PATHS[name][1]
            return use_attention(holders[1], PATHS[name][0])

        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)  # the dense part is identical in both models: count it once
        with counter:
            plain()
        step_flops = counter.get_total_flops()
        plain_times, path_times = [], {a: [] for a in paths}
        time_steps(plain, 0, args.warmup)
        for a in paths:
            use_path(a)
            time_steps(trec, 0, args.warmup)
        n_enc = 0
        for _ in range(args.rounds):  # alternate blocks: a shared machine's load hits every variant alike
            plain_times.append(time_steps(plain, args.steps, 0))
            for a in paths:
                n_enc = use_path(a)
                path_times[a].append(time_steps(trec, args.steps, 0))
        use_path(paths[0])
        trec_times = path_times["reference" if "reference" in paths else paths[0]]  # plain runs the same path
        plain_sec, trec_sec = statistics.median(plain_times), statistics.median(trec_times)
        path_sps = {a: round(bs / statistics.median(t), 1) for a, t in path_times.items()}
        speedup = (round(statistics.median(r / f for f, r in zip(path_times["fast"], path_times["reference"])), 3)
                   if {"fast", "reference"} <= set(paths) else None)
        del holders, trec, task, o_s, o_d
    finally:
        rt.close()
    mm, mm_bf16 = matmul_flops_per_s(), matmul_flops_per_s(dtype=torch.bfloat16)
    trec_sps, plain_sps = bs / trec_sec, bs / plain_sec
    achieved = step_flops * path_sps[paths[0]] / bs  # the first path's (default: fast) model FLOP/s
    print(json.dumps({
        "bench": "train_throughput", "model": "saqrec full (sid, mlse, mtl, watch_time) + frozen g",
        "batch_size": bs, "batch": str(args.data / "train") if args.data else f"generated, {args.histories} histories",
        "history_lengths": lens, "threads": torch.get_num_threads(), "steps": args.steps * args.rounds,
        "torchrec_samples_per_s": round(trec_sps, 1), "plain_samples_per_s": round(plain_sps, 1),
        "ratio": round(trec_sps / plain_sps, 3), "step_flops": step_flops,
        "paths": {a: dict(zip(("attention", "precision"), PATHS[a])) for a in paths}, "history_encoders": n_enc,
        "path_samples_per_s": path_sps, "speedup_vs_reference_path": speedup,
        "achieved_flops_per_s": achieved, "matmul_flops_per_s": mm, "flops_ratio": round(achieved / mm, 4),
        "matmul_bf16_flops_per_s": mm_bf16,
        "flops_ratio_bf16": round(achieved / mm_bf16, 4),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())

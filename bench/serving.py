"""Serving benchmark: batch-scoring throughput (satrank.jobs.score on N ranks) and the exported artifact's latency.

Why: candidate sets are scored offline at scale and the artifact answers online requests; both costs
belong in the report. Prints ONE JSON line:
  score_rows_per_s   satrank.jobs.score with --nproc ranks (torchrun, gloo): rows scored / scoring wall time
                     (model load and process start excluded; the manifest's run record)
  p50_ms_100 / p99_ms_100, p50_ms_1000 / p99_ms_1000   latency of model.pt (TorchScript, fp32, CPU,
                     `--threads` intra-op threads) for one request of 100 candidates / 10 requests of
                     100, inputs already tensors (the Parquet -> tensor step of satrank.jobs.serve_check excluded)

    python bench/serving.py [--work DIR] [--requests 1000] [--nproc 2] [--iters 300]

The model is the SAQRec ranker of configs/sim.yaml (full vocabularies, teacher g inside) with its
seeded initial weights: cost does not depend on training, so no training run is needed. The candidate
world is simulated (satrank.pipeline.sim.simulate) with `--requests` requests of 100 candidates in shards of 10.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402


def make_world(work: Path, requests: int) -> Path:
    from satrank.pipeline.sim.world import SimulateConfig
    from satrank.pipeline.sim.simulate import simulate

    data = work / "data"
    if not (data / "world.json").exists():
        cfg = SimulateConfig(impressions=20000, candidate_requests=requests, candidates_per_request=100,
                             shard_rows=100 * max(1, requests // 10))  # whole requests per shard
        simulate(data, cfg, overwrite=True)
    return data


def make_model(work: Path) -> Path:
    """An untrained ranker checkpoint (+ teacher.json) in satrank.jobs.train's format."""
    from satrank.jobs.engine.checkpoint import save_checkpoint
    from satrank.jobs.config import load_config
    from satrank.jobs.engine.runs import TEACHER_FILE, teacher_to_dict
    from satrank.models.ranker.task import TeacherSpec
    from satrank.models.serving.module import build_model

    run = work / "run"
    if not (run / "checkpoint" / "meta.json").exists():
        cfg = load_config()
        teacher = TeacherSpec(cfg.embeddings, cfg.pretrain.tower, cfg.satisfaction)
        torch.manual_seed(0)
        save_checkpoint(run, build_model("ranker", cfg, teacher), extra={"job": "train"}, config=cfg)
        (run / TEACHER_FILE).write_text(json.dumps(teacher_to_dict(teacher, None)))
    return run


def score_throughput(work: Path, data: Path, run: Path, nproc: int) -> dict:
    out = work / f"scores{nproc}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--monitor-interval=0.1",
           f"--nproc_per_node={nproc}", "-m", "satrank.jobs.score", "--model", str(run), "--candidates",
           str(data / "candidates"), "--out", str(out), "--overwrite"]
    env = dict(os.environ)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"satrank.jobs.score failed:\n{res.stderr[-3000:]}")
    run_rec = json.loads((out / "_manifest.json").read_text())["runs"][-1]
    return {"score_rows_per_s": run_rec["rows_per_s"], "score_rows": run_rec["rows_scored"],
            "score_wall_s": run_rec["scoring_wall_s"], "score_job_s": round(time.perf_counter() - t0, 2)}


def latency(work: Path, data: Path, run: Path, iters: int, threads: int) -> dict:
    from satrank.jobs.export import export
    from satrank.models.serving.check import Features, load_module, verify_artifact
    from satrank.jobs.config.serve import load_serve_config

    art = work / "artifact"
    export(run, art, load_serve_config(), data, overwrite=True)
    manifest = verify_artifact(art)
    module = load_module(art, manifest)
    first = sorted((data / "candidates").glob("part-*.parquet"))[0]
    feats = Features(pq.read_table(first), manifest["features"], str(first))
    torch.set_num_threads(threads)
    out = {"latency_threads": threads, "artifact_mb": round(sum(p.stat().st_size for p in art.iterdir()) / 2**20, 2)}
    with torch.no_grad():
        for rows in (100, 1000):
            n_batches = max(1, feats.n // rows)
            inputs = [feats.inputs(i * rows, (i + 1) * rows) for i in range(n_batches)]
            for i in range(30):  # warm-up: TorchScript's profiling executor specialises on the first calls
                module(*inputs[i % n_batches])
            times = []
            for i in range(iters):
                t0 = time.perf_counter()
                module(*inputs[i % n_batches])
                times.append((time.perf_counter() - t0) * 1e3)
            out[f"p50_ms_{rows}"] = round(float(np.percentile(times, 50)), 3)
            out[f"p99_ms_{rows}"] = round(float(np.percentile(times, 99)), 3)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    p.add_argument("--requests", type=int, default=1000, help="candidate requests (100 candidates each)")
    p.add_argument("--nproc", type=int, default=2, help="scoring ranks")
    p.add_argument("--iters", type=int, default=300, help="timed calls per batch size")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for the latency measurement")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="satrank-bench-serving-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = make_world(work, args.requests)
        run = make_model(work)
        result = {"bench": "serving", **score_throughput(work, data, run, args.nproc), "nproc": args.nproc,
                  **latency(work, data, run, args.iters, args.threads), "model": "saqrec ranker (sim.yaml, untrained)",
                  "cpus": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__}
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Serving benchmark: batch-scoring throughput (satrank.jobs.score on N ranks) and the exported artifact's latency.

Why: candidate sets are scored offline at scale and the artifact answers online requests; both costs
belong in the report. Prints ONE JSON line:
  score_rows_per_s   satrank.jobs.score with --nproc ranks (torchrun, gloo): rows scored / scoring wall time
                     (model load and process start excluded; the manifest's run record), request-level
                     (score.request_level: true, the default: the user side once per request of a batch)
  score_rows_per_s_per_row   the same job with score.request_level=false (the full model per row), same run
  score_request_speedup      score_rows_per_s / score_rows_per_s_per_row
  score_rows_per_s_num_workers_1   request-level with score.num_workers=1 (a reader worker per rank; the
                     default 0 reads in the scoring process: no worker server to start; on 2 cores workers compete)
  p50_ms_100 / p99_ms_100   latency of the per-candidate model.pt (TorchScript, fp32, CPU, `--threads`
                     intra-op threads, default 1) for one request of 100 candidates (one row each)
  p50_ms_1000 / p99_ms_1000   the request-level model_request.pt (satrank.models.serving.request) for ONE
                     request of 1,000 candidates (user side once)
  per_candidate_p50_ms_1000 / per_candidate_p99_ms_1000   model.pt on the same request as 1,000 rows
  request_speedup_1000  per_candidate_p99_ms_1000 / p99_ms_1000
  request_p50_ms_100 / request_p99_ms_100   model_request.pt for one request of 100 candidates
                     Inputs are already tensors (the Parquet -> tensor step of serve_check excluded).

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


def score_throughput(work: Path, data: Path, run: Path, nproc: int, request_level: bool = True, *sets: str) -> dict:
    """One satrank.jobs.score run on `nproc` ranks, request-level or per row (plus `sets`: further score.* overrides)
    -> its figures (keys suffixed `_per_row` for the per-row path)."""
    suffix = ("" if request_level else "_per_row") + "".join(f"_{v.split('.')[-1].replace('=', '_')}" for v in sets)
    out = work / f"scores{nproc}{suffix}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--monitor-interval=0.1",
           f"--nproc_per_node={nproc}", "-m", "satrank.jobs.score", "--model", str(run), "--candidates",
           str(data / "candidates"), "--out", str(out), "--overwrite",
           "--set", f"score.request_level={str(request_level).lower()}", *[x for v in sets for x in ("--set", v)]]
    env = dict(os.environ)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"satrank.jobs.score failed:\n{res.stderr[-3000:]}")
    run_rec = json.loads((out / "_manifest.json").read_text())["runs"][-1]
    if run_rec["request_level"] != request_level:
        raise RuntimeError(f"satrank.jobs.score ran request_level={run_rec['request_level']}, asked {request_level}")
    return {f"score_rows_per_s{suffix}": run_rec["rows_per_s"], f"score_rows{suffix}": run_rec["rows_scored"],
            f"score_wall_s{suffix}": run_rec["scoring_wall_s"],
            f"score_job_s{suffix}": round(time.perf_counter() - t0, 2)}


def score_both(work: Path, data: Path, run: Path, nproc: int) -> dict:
    """The job request-level and per row on the same candidates, one after the other, and their ratio; then
    request-level with one reader worker per rank (score.num_workers=1; the default reads in-process)."""
    out = {**score_throughput(work, data, run, nproc, True), **score_throughput(work, data, run, nproc, False),
           **score_throughput(work, data, run, nproc, True, "score.num_workers=1")}
    out["score_request_speedup"] = round(out["score_rows_per_s"] / out["score_rows_per_s_per_row"], 2)
    return out


def _timed(module, inputs: list, iters: int, warmup: int = 30) -> tuple:
    """(p50, p99) in ms of `module(*inputs[i % len(inputs)])` after `warmup` calls (TorchScript's profiling
    executor specialises on the first calls)."""
    for i in range(warmup):
        module(*inputs[i % len(inputs)])
    times = []
    for i in range(iters):
        t0 = time.perf_counter()
        module(*inputs[i % len(inputs)])
        times.append((time.perf_counter() - t0) * 1e3)
    return round(float(np.percentile(times, 50)), 3), round(float(np.percentile(times, 99)), 3)


def one_request(feats, iface: dict, candidates: int) -> tuple:
    """Request-level inputs of ONE request: the first request's user (ids, histories) and `candidates`
    candidates taken from the candidate rows in file order (cycled if there are fewer)."""
    from satrank.models.serving.check import request_inputs, request_rows

    user, hv, hl, _, _ = request_inputs(feats, request_rows(feats.ids["request_id"])[0], iface)
    rows = np.arange(candidates) % feats.n
    names = feats.keys[:len(feats.single)]
    items = np.stack([feats.single[names.index(k)][rows] for k in iface["item_keys"]])
    return user, hv, hl, torch.from_numpy(items), torch.from_numpy(np.ascontiguousarray(feats.dense[rows]))


def latency(work: Path, data: Path, run: Path, iters: int, threads: int) -> dict:
    """Per-candidate model.pt on 1 request of 100 rows and 10 of 100; then ONE request of 1,000 candidates
    through model_request.pt (user side once) and through model.pt (its user repeated on 1,000 rows)."""
    from satrank.jobs.export import export
    from satrank.models.serving.check import Features, load_module, per_candidate_inputs, verify_artifact
    from satrank.jobs.config.serve import load_serve_config

    art = work / "artifact"
    export(run, art, load_serve_config(), data, overwrite=True)
    manifest = verify_artifact(art)
    module = load_module(art, manifest)
    iface = manifest["request_interface"]
    request = load_module(art, manifest, iface["file"])
    first = sorted((data / "candidates").glob("part-*.parquet"))[0]
    feats = Features(pq.read_table(first), manifest["features"], str(first))
    torch.set_num_threads(threads)
    out = {"latency_threads": threads, "artifact_mb": round(sum(p.stat().st_size for p in art.iterdir()) / 2**20, 2)}
    with torch.no_grad():
        batches = [feats.inputs(i * 100, (i + 1) * 100) for i in range(max(1, feats.n // 100))]
        out["p50_ms_100"], out["p99_ms_100"] = _timed(module, batches, iters)
        req = one_request(feats, iface, 1000)
        out["p50_ms_1000"], out["p99_ms_1000"] = _timed(request, [req], iters)
        per = per_candidate_inputs(req, iface, manifest["features"]["keys"])
        out["per_candidate_p50_ms_1000"], out["per_candidate_p99_ms_1000"] = _timed(module, [per], iters)
        req100 = one_request(feats, iface, 100)
        out["request_p50_ms_100"], out["request_p99_ms_100"] = _timed(request, [req100], iters)
    out["request_speedup_1000"] = round(out["per_candidate_p99_ms_1000"] / out["p99_ms_1000"], 1)
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
        result = {"bench": "serving", **score_both(work, data, run, args.nproc), "nproc": args.nproc,
                  **latency(work, data, run, args.iters, args.threads), "model": "saqrec ranker (sim.yaml, untrained)",
                  "cpus": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__}
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

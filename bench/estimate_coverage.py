"""Coverage of the offline estimates on the simulator (issue 18): do the intervals hold the truth?

    .venv/bin/python bench/estimate_coverage.py --seeds 0-19 [--impressions 100000] [--nproc 1]

Per seed it simulates a small world (configs/sim.yaml at --users / --items / --impressions, simulate.seed =
train.seed = the seed) and runs stage 1 as a user would (torchrun: the click model, the LEARNED propensity
model, the satisfaction model g with the IPS loss and `--propensity`). The satisfaction job's own metrics.json
carries `estimates` (satrank.models.metrics.offline_estimates): naive, IPS, SNIPS and DR estimates of g's
loss and AUC on all impressions of the test split (the headline: held out) and of the validation split, each
with a bootstrap 95% interval (rho clipped at satisfaction.estimate_clip), and beside them the truth from the
simulator's true_p_satisfied; and (b) of the module with g as the ranker (`top_k`: the mean satisfaction of each
user's top evaluate.offline_k logged rows by g). This bench counts, over the seeds, how often each interval
covers the truth and the mean signed error (estimate - truth) with its standard error over seeds, so the
naive estimate's bias is shown as a number. Nothing here sees the truth except the final comparison.

It prints ONE JSON line. Runs live under --out/seed<k>/ and a stage whose metrics.json exists is reused
(bench/_stages.py's `stage`), so an interrupted bench resumes.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stages import ROOT, WORLDS, stage  # noqa: E402  (bench/_stages.py: one torchrun stage, reused)

FORMS = ("naive", "ips", "snips", "dr")


def parse_seeds(text: str) -> List[int]:
    """"0-19" or "0,3,5" -> seed list."""
    out: List[int] = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out += list(range(int(lo), int(hi) + 1))
        elif part:
            out.append(int(part))
    return out


def run_seed(seed: int, base: Path, nproc: int, world: List[str]) -> dict:
    """Stage 1 of one small world; returns the satisfaction job's metrics.json."""
    run = base / f"seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    common = [f"--config={WORLDS['default']}", f"--set=simulate.seed={seed}", f"--set=train.seed={seed}",
              *[f"--set={w}" for w in world]]
    data = run / "data"
    if not (data / "world.json").is_file():
        with open(run / "simulate.log", "w") as fh:
            subprocess.run([sys.executable, "-m", "satrank.pipeline.sim.simulate", "--out", str(data), "--overwrite",
                            "--quiet", *common], check=True, stdout=fh, stderr=subprocess.STDOUT)
    d = ["--data", str(data)]
    stage(run, "pretrain", nproc, "satrank.jobs.pretrain", d, common)
    stage(run, "propensity", nproc, "satrank.jobs.propensity", d, common)
    init = ["--init", str(run / "pretrain"), "--propensity", str(run / "propensity")]
    return stage(run, "sat_ips", nproc, "satrank.jobs.satisfaction", [*d, *init], common)


def summarise(estimates: List[dict], quantity: str) -> Dict[str, dict]:
    """Per form: seeds covered, mean signed error and its standard error over seeds, mean interval width."""
    out: Dict[str, dict] = {}
    for form in FORMS:
        rows = [(e[quantity][form], e["truth"][quantity]) for e in estimates
                if form in e.get(quantity, {}) and e.get("truth")]
        rows = [(est, t) for est, t in rows if math.isfinite(est["value"]) and math.isfinite(t)]
        if not rows:
            continue
        err = [est["value"] - t for est, t in rows]
        n = len(err)
        mean = sum(err) / n
        sd = math.sqrt(sum((x - mean) ** 2 for x in err) / (n - 1)) if n > 1 else float("nan")
        covered = sum(1 for est, t in rows if math.isfinite(est["lo"]) and est["lo"] <= t <= est["hi"])
        out[form] = {"seeds": n, "covered": covered, "coverage": round(covered / n, 3),
                     "mean_error": round(mean, 5), "se_error": round(sd / math.sqrt(n), 5),
                     "mean_width": round(sum(est["hi"] - est["lo"] for est, _ in rows) / n, 5)}
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="bench/estimate_coverage.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0-19", help="e.g. 0-19 or 0,1,2")
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--items", type=int, default=1500)
    p.add_argument("--impressions", type=int, default=100000)
    p.add_argument("--nproc", type=int, default=1, help="torchrun ranks per stage")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_estimate_coverage")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every stage (repeatable)")
    a = p.parse_args(argv)
    seeds = parse_seeds(a.seeds)
    world = [f"simulate.users={a.users}", f"simulate.items={a.items}", f"simulate.impressions={a.impressions}",
             *a.overrides]
    started = time.time()
    metrics = {s: run_seed(s, a.out, a.nproc, world) for s in seeds}
    splits = {"test": [metrics[s].get("test") or {} for s in seeds], "valid": [metrics[s] for s in seeds]}
    missing = [s for s, m in zip(seeds, splits["test"]) if not m.get("estimates")]
    if missing:
        raise SystemExit(f"bench/estimate_coverage: seeds {missing} have no test `estimates` in sat_ips/metrics.json "
                         "(the satisfaction job needs --propensity and a test split with truth)")
    out = {"bench": "estimate_coverage", "seeds": seeds, "world": world, "nproc": a.nproc,
           "clip": metrics[seeds[0]]["test"]["estimates"]["clip"]}
    for split, ms in splits.items():  # test: the held-out split (headline); valid: the one RUN/best was chosen on
        est = [m["estimates"] for m in ms]
        out[split] = {"answered_rows": [m.get("answered_rows") for m in ms], "rows": [m.get("rows_all") for m in ms],
                      "loss": summarise(est, "loss"), "auc": summarise(est, "auc"), "top_k": summarise(est, "top_k")}
    out["wall_s"] = round(time.time() - started, 1)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

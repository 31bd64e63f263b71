"""Alignment bench (issue 15): does the pipeline rank for TRUE satisfaction better than click-only?

    .venv/bin/python bench/alignment.py --world default --seeds 0,1,2 [--arms ...] [--set key=value ...]

Per seed it simulates a fresh world (configs/sim.yaml or configs/sim_alt.yaml, simulate.seed = the seed,
train.seed = the seed), then runs the stages as a user would (torchrun, `--nproc` ranks):
stage 1 (click model, propensity, g with IPS and with the naive loss), stage 2 (click-only and full
SAQRec, plus any Table 3 ablation asked for), stage 3 (EASQ online DPO on top of full SAQRec, and its
DPO-off control: the same job with easq.dpo_weight=0). Every arm's figures come from the jobs' own
metrics.json (jobs.train evaluates on DIR/test and the candidate sets; jobs.dpo reports `after`).
It prints ONE JSON line: per arm and seed true_sat@10, true_click@10, hr@10, click_auc (and the
oracles), stage-1 ideal_loss_all / auc_true_all of IPS and naive, and the paired differences against
click-only (SAQRec and ablations) and against the DPO-off control (DPO) with the number of seeds won.
With --frontier W1,W2 (e.g. 1.25,1.5) the DPO-off control is also evaluated at those `evaluate.fusion_sat_weight`s
(jobs.evaluate on the dpo run): raising the weight trades true_click@10 for true_sat@10 at no click-AUC cost, and
`dpo_vs_frontier` is DPO's true_sat@10 minus the control's at DPO's true_click@10 on that curve (linear between the
measured weights; docs/alignment.md, "What DPO's gain is"). With --online-shards N stages 1 and 2 train without
the last N (time-ordered) train shards and jobs.dpo streams only those: DPO on rows nobody trained on (by default
it replays DIR/train, the rows g learned); e.g. --set simulate.impressions=300000 --online-shards 2.

Runs live under --out/<world>/seed<k>/<stage>; a stage whose metrics.json exists is reused (metrics.json
is written atomically at a job's end), so an interrupted bench resumes; --fresh starts a seed over.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stages import ROOT, WORLDS, stage  # noqa: E402  (one torchrun stage, reused when it has metrics.json)

ABLATIONS = {  # paper Table 3: arm -> (satisfaction run, --set overrides of jobs.train)
    "wo_unbiased": ("sat_naive", []),
    "wo_sid": ("sat_ips", ["model.sid=false"]),
    "wo_mlse": ("sat_ips", ["model.mlse=false"]),
    "wo_mtl": ("sat_ips", ["model.mtl=false"]),
}
ARMS = ["click_only", "saqrec", "dpo", "dpo_off", *ABLATIONS]
METRICS = ["true_sat@10", "true_click@10", "hr@10", "click_auc", "true_sat@10_oracle_sat", "true_sat@10_oracle_click"]
STAGE1 = ["ideal_loss_all", "auc_true_all"]


def frontier_at(points: List[tuple], click: float) -> Optional[float]:
    """true_sat@10 of a control's fusion-weight curve at true_click@10 = `click`, linear between the two measured
    points around it; `points` are (true_sat@10, true_click@10) pairs, one per weight; None outside their range."""
    pts = sorted(points, key=lambda p: p[1])
    for (s0, c0), (s1, c1) in zip(pts, pts[1:]):
        if c0 <= click <= c1:
            return s0 if c1 == c0 else s0 + (s1 - s0) * (click - c0) / (c1 - c0)
    return None


def vs_frontier(per_seed: Dict[int, Dict[str, dict]], weights: List[float]) -> Optional[dict]:
    """DPO's true_sat@10 minus its control's at DPO's true_click@10 on the control's fusion-weight curve, per seed."""
    diffs = []
    for r in per_seed.values():
        if "dpo" not in r or "dpo_off" not in r:
            continue
        curve = [(r["dpo_off"]["true_sat@10"], r["dpo_off"]["true_click@10"])]
        curve += [(r[f"dpo_off_fusion{w}"]["true_sat@10"], r[f"dpo_off_fusion{w}"]["true_click@10"]) for w in weights]
        at = frontier_at(curve, r["dpo"]["true_click@10"])
        diffs.append(None if at is None else round(r["dpo"]["true_sat@10"] - at, 4))
    known = [d for d in diffs if d is not None]
    if not diffs:
        return None
    return {"per_seed": diffs, "mean": round(statistics.mean(known), 4) if known else None,
            "seeds_above": sum(d > 0 for d in known), "seeds": len(diffs)}


def time_windows(data: Path, run: Path, online_shards: int) -> tuple:
    """(past, online): views of DIR (symlinks) whose train/ holds the first shards, resp. the last `online_shards`
    (train shards are time ordered); valid, test, candidates, items and world.json are DIR's own."""
    shards = sorted((data / "train").glob("part-*.parquet"))
    if not 0 < online_shards < len(shards):
        raise SystemExit(f"bench: --online-shards {online_shards}: {data / 'train'} has {len(shards)} shards")
    views = (run / "past", run / "online")
    for view, picked in zip(views, (shards[:-online_shards], shards[-online_shards:])):
        (view / "train").mkdir(parents=True, exist_ok=True)
        for name in ("valid", "test", "candidates", "items", "world.json"):
            if not (view / name).exists():
                (view / name).symlink_to(data / name)
        for f in picked:
            if not (view / "train" / f.name).exists():
                (view / "train" / f.name).symlink_to(f)
    return views


def run_seed(world: str, seed: int, arms: List[str], base: Path, nproc: int, overrides: List[str],
             frontier: List[float] = (), online_shards: int = 0) -> Dict[str, dict]:
    """Every stage of one seed's world; returns {arm or stage-1 name: metrics}. With `online_shards` > 0 stages 1
    and 2 train on the earlier train shards and jobs.dpo streams the last ones, which they never saw."""
    run = base / world / f"seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    common = [f"--config={WORLDS[world]}", f"--set=simulate.seed={seed}", f"--set=train.seed={seed}",
              *[f"--set={o}" for o in overrides]]
    data = run / "data"
    if not (data / "world.json").is_file():
        with open(run / "simulate.log", "w") as fh:  # its summary line stays out of the bench's one JSON line
            subprocess.run([sys.executable, "-m", "satrank.pipeline.sim.simulate", "--out", str(data), "--overwrite",
                            "--quiet", *common], check=True, stdout=fh, stderr=subprocess.STDOUT)
    d = ["--data", str(data)]
    d_dpo = d
    if online_shards:
        past, online = time_windows(data, run, online_shards)
        d, d_dpo = ["--data", str(past)], ["--data", str(online)]
    res: Dict[str, dict] = {}
    stage(run, "pretrain", nproc, "satrank.jobs.pretrain", d, common)
    stage(run, "propensity", nproc, "satrank.jobs.propensity", d, common)
    init = ["--init", str(run / "pretrain"), "--propensity", str(run / "propensity")]
    res["g_ips"] = stage(run, "sat_ips", nproc, "satrank.jobs.satisfaction", [*d, *init], common)
    res["g_naive"] = stage(run, "sat_naive", nproc, "satrank.jobs.satisfaction", [*d, *init],
                           [*common, "--set=satisfaction.loss=naive"])
    train = "satrank.jobs.train"
    if "click_only" in arms:
        res["click_only"] = stage(run, "click_only", nproc, train, d, [*common, "--set=model.variant=click_only"])
    if any(a in arms for a in ("saqrec", "dpo", "dpo_off")):
        res["saqrec"] = stage(run, "saqrec", nproc, train, [*d, "--satisfaction", str(run / "sat_ips")], common)
    for arm, (sat, sets) in ABLATIONS.items():
        if arm in arms:
            res[arm] = stage(run, arm, nproc, train, [*d, "--satisfaction", str(run / sat)],
                             [*common, *[f"--set={s}" for s in sets]])
    for arm, sets in (("dpo", []), ("dpo_off", ["easq.dpo_weight=0.0"])):
        if arm in arms:
            m = stage(run, arm, nproc, "satrank.jobs.dpo",
                      [*d_dpo, "--init", str(run / "saqrec"), "--propensity", str(run / "propensity")],
                      [*common, *[f"--set={s}" for s in sets]])
            res[arm] = {**m.get("after", {}), "dpo_ramp": m.get("dpo_ramp"),
                        "prequential_sat_auc": m.get("prequential_sat_auc")}
    if "dpo_off" in arms:
        for w in frontier:  # the control re-read at another fusion weight (its click head and click AUC unchanged)
            res[f"dpo_off_fusion{w}"] = stage(run, f"dpo_off_fusion{w}", nproc, "satrank.jobs.evaluate",
                                              [*d_dpo, "--model", str(run / "dpo_off")],
                                              [*common, f"--set=evaluate.fusion_sat_weight={w}"])
    return res


def paired(per_seed: Dict[int, Dict[str, dict]], arm: str, base: str, key: str = "true_sat@10") -> Optional[dict]:
    """Mean ratio and difference of `key` (arm over base) across seeds, and how many seeds the arm won."""
    pairs = [(r[arm].get(key), r[base].get(key)) for r in per_seed.values() if arm in r and base in r]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    if not pairs:
        return None
    return {"ratio_mean": round(statistics.mean(a / b for a, b in pairs), 4),
            "diff_mean": round(statistics.mean(a - b for a, b in pairs), 4),
            "seeds_won": sum(a > b for a, b in pairs), "seeds": len(pairs)}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="bench/alignment.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--world", choices=sorted(WORLDS), default="default")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated world + training seeds")
    p.add_argument("--arms", default="click_only,saqrec,dpo,dpo_off",
                   help=f"comma-separated, from {','.join(ARMS)}")
    p.add_argument("--nproc", type=int, default=2, help="torchrun ranks per stage")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_alignment")
    p.add_argument("--fresh", action="store_true", help="delete the seeds' earlier runs first")
    p.add_argument("--frontier", default="", metavar="W1,W2",
                   help="fusion weights at which to re-read the DPO-off control (dpo_vs_frontier); e.g. 1.25,1.5")
    p.add_argument("--online-shards", type=int, default=0, metavar="N",
                   help="stages 1-2 train without the last N train shards, jobs.dpo streams only those (a fresh "
                        "window); 0 = jobs.dpo replays DIR/train")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every stage (repeatable)")
    a = p.parse_args(argv)
    arms = [x for x in a.arms.split(",") if x]
    unknown = [x for x in arms if x not in ARMS]
    if unknown:
        p.error(f"--arms: unknown {unknown}; choose from {ARMS}")
    seeds = [int(s) for s in a.seeds.split(",") if s != ""]
    frontier = [float(w) for w in a.frontier.split(",") if w != ""]
    started = time.time()
    per_seed: Dict[int, Dict[str, dict]] = {}
    for seed in seeds:
        if a.fresh and (a.out / a.world / f"seed{seed}").exists():
            shutil.rmtree(a.out / a.world / f"seed{seed}")
        per_seed[seed] = run_seed(a.world, seed, arms, a.out, a.nproc, a.overrides, frontier, a.online_shards)

    out: Dict[str, object] = {"bench": "alignment", "world": a.world, "seeds": seeds, "overrides": a.overrides,
                              "online_shards": a.online_shards,
                              "wall_s": round(time.time() - started, 1)}
    out["stage1"] = {g: {k: [per_seed[s][g].get(k) for s in seeds] for k in STAGE1} for g in ("g_ips", "g_naive")}
    out["stage1"]["ips_below_naive_ideal_loss_seeds"] = sum(
        per_seed[s]["g_ips"]["ideal_loss_all"] < per_seed[s]["g_naive"]["ideal_loss_all"] for s in seeds)
    shown = [x for x in ["click_only", "saqrec", *ABLATIONS, "dpo_off", "dpo"] if x in per_seed[seeds[0]]]
    out["arms"] = {x: {k: [per_seed[s][x].get(k) for s in seeds] for k in METRICS} for x in shown}
    for x in ("dpo", "dpo_off"):
        if x in out["arms"]:
            out["arms"][x]["dpo_ramp"] = [per_seed[s][x].get("dpo_ramp") for s in seeds]
            out["arms"][x]["prequential_sat_auc"] = [per_seed[s][x].get("prequential_sat_auc") for s in seeds]
    vs: Dict[str, object] = {}
    for x in ["saqrec", *ABLATIONS]:
        if x in shown and "click_only" in shown:
            vs[f"{x}_vs_click_only"] = {k: paired(per_seed, x, "click_only", k) for k in ("true_sat@10", "click_auc", "hr@10")}
    for x in ABLATIONS:
        if x in shown and "saqrec" in shown:
            vs[f"saqrec_vs_{x}"] = paired(per_seed, "saqrec", x)
    if "dpo" in shown and "dpo_off" in shown:
        vs["dpo_vs_dpo_off"] = {k: paired(per_seed, "dpo", "dpo_off", k) for k in ("true_sat@10", "click_auc", "hr@10")}
        if frontier:
            vs["dpo_vs_frontier"] = vs_frontier(per_seed, frontier)
            out["arms"]["dpo_off_fusion"] = {str(w): {k: [per_seed[s][f"dpo_off_fusion{w}"].get(k) for s in seeds]
                                                      for k in ("true_sat@10", "true_click@10")} for w in frontier}
    out["paired"] = vs
    print(json.dumps(out, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The README's main job: every pipeline stage end to end on the embedded default world.

Thin orchestration only: it simulates the default world, then launches each stage's own CLI under
torchrun with N local ranks (exactly the commands a user would type), and prints a summary.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

from satrank.pipeline.sim import simulate


def torchrun(nproc: int, module: str, *args: str) -> None:
    """Run `torchrun --standalone --nproc_per_node=nproc -m module args...`; raise on failure."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--monitor-interval=0.5", "-m", module, *args]  # default 5 s: each stage would idle seconds at exit
    print(f"\n$ {' '.join(['torchrun', *cmd[3:]])}", flush=True)
    started = time.time()
    subprocess.run(cmd, check=True)
    print(f"[demo] {module} finished in {time.time() - started:.1f}s", flush=True)


SINGLE_PROCESS = {"export"}  # stages that are not distributed


def stages(out: Path, nproc: int, common: List[str]) -> List[tuple]:
    """(name, module, args) for every stage after simulation, in pipeline order."""
    data = str(out / "data")
    run = [
        ("check-data", "satrank.jobs.check_data", ["--data", f"{data}/train", "--out", str(out / "check_data"), *common]),
        # stage 1 of SAQRec (Algorithm 1): click model, propensity model, satisfaction model on frozen tables
        ("pretrain", "satrank.jobs.pretrain", ["--data", data, "--out", str(out / "pretrain"), *common]),
        ("propensity", "satrank.jobs.propensity", ["--data", data, "--out", str(out / "propensity"), *common]),
        ("satisfaction", "satrank.jobs.satisfaction", ["--data", data, "--init", str(out / "pretrain"),
                                               "--propensity", str(out / "propensity"),
                                               "--out", str(out / "satisfaction"), *common]),
        # stage 2 (satrank.jobs.train): the full SAQRec ranker with the frozen satisfaction model g, then its evaluation
        ("train", "satrank.jobs.train", ["--data", data, "--satisfaction", str(out / "satisfaction"),
                                 "--out", str(out / "train"), *common]),
        # the baseline the alignment is measured against: the same ranker trained on clicks only
        ("click-only", "satrank.jobs.train", ["--data", data, "--out", str(out / "click_only"), *common,
                                              "--set=model.variant=click_only"]),  # no g: no --satisfaction
    ]
    # stage 3 (EASQ, satrank.jobs.dpo): online alignment of the stage-2 ranker; runs once the `train` stage is listed
    names = [name for name, _, _ in run]
    if "train" in names:
        rho = ["--propensity", str(out / "propensity")] if "propensity" in names else []
        run.insert(names.index("train") + 1, ("dpo", "satrank.jobs.dpo", ["--data", data, "--init", str(out / "train"),
                                                                   *rho, "--out", str(out / "dpo"), *common]))
    # serving: batch-score the simulated candidate sets with the stage-2 ranker, then export it
    run += [
        ("score", "satrank.jobs.score", ["--model", str(out / "train"), "--candidates", f"{data}/candidates",
                                 "--out", str(out / "score"), "--overwrite"]),
        ("export", "satrank.jobs.export", ["--model", str(out / "train"), "--data", data, "--out", str(out / "export"),
                                   "--overwrite"]),
    ]
    # a rerun of the demo replaces its own runs (the world was simulated afresh): the jobs refuse an existing
    # --out without --overwrite (satrank.jobs.engine.run_dir)
    return [(name, module, [*args, "--overwrite"] if module in RUN_JOBS and "--overwrite" not in args else args)
            for name, module, args in run]


RUN_JOBS = ("satrank.jobs.pretrain", "satrank.jobs.propensity", "satrank.jobs.satisfaction", "satrank.jobs.train",
            "satrank.jobs.dpo", "satrank.jobs.evaluate")


def dpo_gate_line(dpo: dict, run: Path) -> str:
    """Whether L_DPO acted: its ramp at the end, and the gate (the satisfaction head's prequential answered-AUC
    against easq.ramp_threshold) that holds it at 0 until the head is good enough to be the reference."""
    from satrank.pipeline.config import load_yaml

    threshold = load_yaml(run / "checkpoint" / "config.yaml").get("easq", {}).get("ramp_threshold")
    preq = dpo.get("prequential_sat_auc")
    line = (f"[demo] DPO ramp at the end: {dpo.get('dpo_ramp')} (satisfaction head's prequential answered-AUC "
            f"{'n/a' if preq is None else f'{preq:.3f}'}, ramp threshold {threshold})")
    if not dpo.get("dpo_ramp"):
        line += ": the gate stayed shut, so the change above is the pathway and the behaviour losses, not L_DPO"
    return line


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="satrank demo", description=__doc__)
    parser.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    parser.add_argument("--nproc", type=int, default=2, help="local ranks per stage (default: 2)")
    parser.add_argument("--config", default=None, help="config file (default: configs/sim.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    out = Path(args.out)
    common = ([f"--config={args.config}"] if args.config else []) + [f"--set={o}" for o in args.overrides]

    print(f"[demo] simulating the default world into {out / 'data'}", flush=True)
    sim_args = ["--out", str(out / "data"), "--overwrite", *common]
    if simulate.main(sim_args) != 0:
        return 1
    for name, module, stage_args in stages(out, args.nproc, common):
        torchrun(1 if name in SINGLE_PROCESS else args.nproc, module, *stage_args)

    summary = {"world": json.loads((out / "data" / "world.json").read_text())}
    for name, _, _ in stages(out, args.nproc, common):
        metrics = out / name.replace("-", "_") / "metrics.json"
        if metrics.is_file():
            summary[name] = json.loads(metrics.read_text())
    print("\n[demo] summary\n" + json.dumps(summary, indent=2, default=str))
    if "train" in summary:  # the stage-2 evaluation table (satrank.models.metrics.ranker_eval.METRIC_KEYS, DIR/test + candidates)
        from satrank.jobs.engine.evaluation import format_table

        print("\n[demo] stage-2 evaluation (SAQRec, best validation checkpoint)\n"
              + format_table({"SAQRec": summary["train"]}), flush=True)
        dpo = summary.get("dpo", {})
        if "before" in dpo and "after" in dpo:
            print("\n[demo] stage-3 EASQ online DPO, before -> after\n"
                  + format_table({"before DPO": dpo["before"], "after DPO": dpo["after"]}), flush=True)
            print(dpo_gate_line(dpo, out / "dpo"), flush=True)
        print("\n[demo] alignment: true satisfaction of each ranking on the candidate sets (oracles rank by the truth)\n"
              + alignment_table(summary), flush=True)
    from satrank.jobs.report import build_report

    print(f"\n[demo] report (curves, reliability, estimates, trade-off, tables): "
          f"{build_report([out], out / 'report.html', f'satrank demo: {out}')}", flush=True)
    return 0


def alignment_table(summary: dict) -> str:
    """click-only, SAQRec, EASQ after DPO and the two oracles: true_sat@k / true_click@k / hr@k / click_auc."""
    from satrank.jobs.engine.evaluation import format_table

    saqrec = summary["train"]
    k = next((key.split("@")[1].split("_")[0] for key in saqrec if key.startswith("true_sat@")), "10")
    keys = [f"true_sat@{k}", f"true_click@{k}", f"true_sat@{k}_headroom_share", f"hr@{k}", "click_auc"]
    rows = {"click-only": summary.get("click-only", {}), "SAQRec": saqrec}
    if "after" in summary.get("dpo", {}):
        rows["EASQ after DPO"] = summary["dpo"]["after"]
    for oracle in ("sat", "click"):
        rows[f"oracle by true_p_{'satisfied' if oracle == 'sat' else 'click'}"] = {
            f"true_sat@{k}": saqrec.get(f"true_sat@{k}_oracle_{oracle}"),
            f"true_click@{k}": saqrec.get(f"true_click@{k}_oracle_{oracle}")}
    return format_table(rows, keys)


if __name__ == "__main__":
    sys.exit(main())

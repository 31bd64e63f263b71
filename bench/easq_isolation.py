"""EASQ's isolated satisfaction pathway against a plain auxiliary satisfaction tower, answers ten times sparser.

Issue 5's comparison (docs/easq.md, "Isolated vs shared"), rerunnable: one simulated world, one stage-2 ranker, the
training split's questionnaire answers thinned to 10 % (`sparsify`), then satrank.jobs.dpo once per arm and seed with DPO
off, so the arms differ only in where L_sat's gradient goes. The baseline (`plain`: `easq.pathway: shared`, the
satisfaction head on the ranker's features with their graph, trained with the model's one optimizer) runs in the
same invocation on the same data and seeds; prints ONE JSON line with every arm's satisfaction-head AUC per seed and
the paired differences against `plain`.

    python bench/easq_isolation.py [--seeds 0,1,2,3,4] [--arms isolated,plain] [--work DIR]
    python bench/easq_isolation.py --keep 1.0 --arms isolated_fast_dpo --baseline isolated_fast

The second form is the DPO measurement: every answer kept, DPO at the default weight against its DPO-off control
(`diff_vs_baseline` then holds DPO's true_sat@10 gain and click-AUC change per seed).

World W2: 300 users, 60 items, 10 authors, 40,000 impressions (seed 5), common questionnaires (answer_bias -3.7, ~11 %
answered) so that after thinning each item keeps about six answers. Seed s = which answers are kept
(`sparsify(seed=s)`) and `train.seed` (the satisfaction head's initial weights). Every arm: 1 rank, rho = 1 (the
unweighted BCE on answered rows), behaviour losses on, the thinned stream passed PASSES times. The AUC is
`after.sat_head.{valid,test}`: `auc_true_all` on every row of the split against a label drawn from the simulator's
`true_p_satisfied` (stage 1's fixed draw) and `auc` on its answered rows (untouched by the thinning).
About 80 s per seed for two arms side by side on a 2-core CPU, plus ~1 min to build the world. --work must not hold
an earlier invocation's thinned data (thinning refuses an existing directory).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent

WORLD = {"users": 300, "items": 60, "authors": 10, "impressions": 40000, "candidate_requests": 60,
         "candidates_per_request": 20, "shard_rows": 8000, "row_group_rows": 500, "seed": 5, "answer_bias": -3.7,
         # the answer mechanism docs/easq.md's comparison was measured on (the defaults before answer_w_watch)
         "answer_w_click": 2.0, "answer_w_watch": 0.0, "answer_w_satisfied": 0.3}
KEEP, PASSES = 0.1, 4
# small vocabularies and tables (the same as the serving tests' RUN_OVERRIDES); 60 items leave no user 99 unseen
# ones, so leave-one-out ranks against 20 negatives
SETS = ["data.sparse.user_id.vocab_size=300", "data.sparse.item_id.vocab_size=400", "data.sparse.author_id.vocab_size=64",
        *[f"data.sequence.{h}.vocab_size=400" for h in ("hist_click", "hist_satisfied", "hist_dissatisfied", "hist_skip")],
        "embeddings.dim=16", "model.dropout=0.0", "reader.num_workers=0", "reader.batch_size=256",
        "evaluate.loo_negatives=20"]
MAIN_SETS = ["model.mlse=false", "model.mtl=false", "ranker_train.epochs=2"]  # a click/watch ranker, no stage-1 chain
# every arm: DPO off (the comparison is where L_sat's gradient goes), the backbone at the configured dense lr
# the ranker has no g (MAIN_SETS), so the pathway learns from the answers alone: no distillation from g, and DPO's
# pairs are the answered ones alone (no online pairs ordered by g), at the beta these arms were measured with
COMMON = ["easq.dpo_weight=0", "easq.distill_weight=0", "train.dense_lr=0.001", "easq.reward_pairs=none",
          "easq.beta=1.0"]
ARMS: Dict[str, List[str]] = {
    # EASQ's pathway at the default settings: LoRA + head behind stop-gradients, its own Adam at easq.lr
    "isolated": ["easq.pathway=isolated", "easq.lr=0.001"],
    # the baseline: a plain auxiliary tower on shared parameters; its head's Adam has the backbone's settings, which
    # is exactly one optimizer for the whole model (Adam updates each parameter from its own gradients alone)
    "plain": ["easq.pathway=shared", "easq.lr=0.001"],
    # ablations (docs/easq.md): a faster pathway, a shared tower whose head gets its own faster Adam, one fast Adam
    "isolated_fast": ["easq.pathway=isolated", "easq.lr=0.01"],
    "shared_own_adam": ["easq.pathway=shared", "easq.lr=0.01"],
    "shared_fast_all": ["easq.pathway=shared", "easq.lr=0.01", "train.dense_lr=0.01"],
    "isolated_id_adapters": ["easq.pathway=isolated", "easq.lr=0.01", "easq.id_targets=[user_id,item_id]"],
    # the pathway with its LoRA scaled to nothing: the satisfaction head alone on stop-gradient features
    "isolated_no_lora": ["easq.pathway=isolated", "easq.lr=0.001", "easq.alpha=1e-8"],
    # DPO on (the default weight, a short ramp once the gate opens): compare with isolated_fast, its DPO-off control
    "isolated_fast_dpo": ["easq.pathway=isolated", "easq.lr=0.01", "easq.dpo_weight=0.03", "easq.ramp_updates=50"],
}
BASELINE = "plain"


def sparsify(src: Path, dst: Path, keep: float, seed: int = 0, passes: int = 1) -> dict:
    """dst = src with DIR/train's questionnaire answers thinned: each answered row keeps its answer with probability
    `keep` (numpy seed `seed`), the others become unanswered (questionnaire_answered 0, satisfied null, as the
    data contract requires); every other column and split is untouched (valid/test/candidates are symlinks).
    passes > 1 lists the train shards that many times (symlinks part-N.. after the originals): a job that streams
    DIR/train once then sees every row `passes` times, in the same order each pass."""
    if not 0.0 < keep <= 1.0 or passes < 1:
        raise ValueError(f"sparsify: keep must be in (0, 1] and passes >= 1, got keep={keep}, passes={passes}")
    dst.mkdir(parents=True)  # refuses an existing directory: thinning twice into one would multiply the passes
    for split in ("valid", "test", "candidates"):
        if (src / split).exists():
            os.symlink((src / split).resolve(), dst / split)
    (dst / "train").mkdir()
    rng = np.random.default_rng(seed)
    files = sorted((src / "train").glob("part-*.parquet"))
    before = after = 0
    for f in files:
        pf = pq.ParquetFile(f)
        t = pf.read()
        ans = t.column("questionnaire_answered").to_numpy() == 1
        kept = ans & (rng.random(len(ans)) < keep)
        before, after = before + int(ans.sum()), after + int(kept.sum())
        o, s = t.schema.get_field_index("questionnaire_answered"), t.schema.get_field_index("satisfied")
        sat = t.column(s).to_pylist()
        t = t.set_column(o, t.field(o), pa.array(kept.astype(np.int8), t.field(o).type))
        t = t.set_column(s, t.field(s), pa.array([v if k else None for v, k in zip(sat, kept)], t.field(s).type))
        pq.write_table(t, dst / "train" / f.name, row_group_size=pf.metadata.row_group(0).num_rows)
    for k in range(1, passes):
        for i, f in enumerate(files):
            os.symlink(f.name, dst / "train" / f"part-{k * len(files) + i:05d}.parquet")
    return {"answered": before, "kept": after, "train_rows": sum(pq.ParquetFile(f).metadata.num_rows for f in files)}


def torchrun(nproc: int, module: str, *args) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--monitor-interval=0.2",
            f"--nproc_per_node={nproc}", "-m", module, *map(str, args)]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _sets(overrides: Sequence[str]) -> List[str]:
    return [x for o in overrides for x in ("--set", o)]


def _check(proc: subprocess.CompletedProcess, what: str) -> None:
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def build_world(work: Path) -> Dict[str, Path]:
    """work/world (the simulated splits) and work/main (the stage-2 ranker: satrank.jobs.train, 2 ranks, 2 epochs)."""
    from satrank.pipeline.sim.world import SimulateConfig
    from satrank.pipeline.sim.simulate import simulate

    world, main = work / "world", work / "main"
    simulate(world, SimulateConfig(**WORLD), overwrite=True)
    _check(subprocess.run(torchrun(2, "satrank.jobs.train", "--data", world, "--out", main, *_sets(SETS + MAIN_SETS)),
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900), "satrank.jobs.train (stage 2)")
    return {"world": world, "main": main}


def run_arms(data: Path, main: Path, out: Path, seed: int, arms: Sequence[str], parallel: int = 2) -> Dict[str, dict]:
    """satrank.jobs.dpo once per arm on `data` (1 rank each, `parallel` side by side); returns each run's metrics.json."""
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"--arms: unknown arm(s) {unknown}; choose from {sorted(ARMS)}")
    result: Dict[str, dict] = {}
    for start in range(0, len(arms), parallel):
        batch = list(arms[start:start + parallel])
        procs = {a: subprocess.Popen(torchrun(1, "satrank.jobs.dpo", "--data", data, "--init", main, "--out", out / a,
                                              "--checkpoint-every", "0",
                                              *_sets(SETS + COMMON + ARMS[a] + [f"train.seed={seed}"])),
                                     cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for a in batch}  # each run is deterministic on its own, whatever runs beside it
        errors = {a: p.communicate(timeout=900)[1] for a, p in procs.items()}  # wait for every run of the batch
        for a, p in procs.items():
            if p.returncode != 0:
                raise RuntimeError(f"satrank.jobs.dpo, arm {a!r}, seed {seed} failed (exit {p.returncode}):\n{errors[a][-4000:]}")
            result[a] = json.loads((out / a / "metrics.json").read_text())
    return result


HEAD_KEYS = ("all_valid", "all_test", "answered_valid", "answered_test", "prequential", "click_auc", "true_sat@10",
             "backbone_drift", "dpo_ramp")


def head_aucs(m: Mapping) -> Dict[str, float]:
    """The satisfaction head's AUCs after the run: all rows (drawn truth) and answered rows, valid and test."""
    sh = m["after"]["sat_head"]
    return {"all_valid": sh["valid"]["auc_true_all"], "all_test": sh["test"]["auc_true_all"],
            "answered_valid": sh["valid"]["auc"], "answered_test": sh["test"]["auc"],
            "prequential": m["prequential_sat_auc"], "click_auc": m["after"]["click_auc"],
            "true_sat@10": m["after"]["true_sat@10"], "backbone_drift": m["backbone_drift"], "dpo_ramp": m["dpo_ramp"]}


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated thinning / train seeds")
    ap.add_argument("--arms", default="isolated,plain", help=f"comma-separated, from {','.join(ARMS)}")
    ap.add_argument("--baseline", default=BASELINE, help=f"the arm the others are paired with (default {BASELINE})")
    ap.add_argument("--keep", type=float, default=KEEP,
                    help=f"share of the training answers kept (default {KEEP}; 1.0 keeps every answer, the DPO regime)")
    ap.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = [a for a in args.arms.split(",") if a]
    baseline = args.baseline
    if baseline not in arms:
        arms.append(baseline)
    unknown = [a for a in arms if a not in ARMS]  # refused before the world is built, not after
    if unknown:
        ap.error(f"--arms/--baseline: unknown arm(s) {unknown}; choose from {sorted(ARMS)}")
    if not 0.0 < args.keep <= 1.0:
        ap.error(f"--keep must be in (0, 1], got {args.keep}")
    with tempfile.TemporaryDirectory(prefix="easq_isolation_") as tmp:
        work = args.work or Path(tmp)
        paths = build_world(work)
        per_seed = {}
        for s in seeds:
            data = work / f"thinned_s{s}"
            counts = sparsify(paths["world"], data, args.keep, seed=s, passes=PASSES)
            runs = run_arms(data, paths["main"], work / f"runs_s{s}", s, arms)
            per_seed[s] = {"kept_answers": counts["kept"], **{a: head_aucs(m) for a, m in runs.items()}}
    keys = ("all_valid", "all_test", "answered_valid", "answered_test", "true_sat@10", "click_auc")
    diffs = {a: {k: [per_seed[s][a][k] - per_seed[s][baseline][k] for s in seeds] for k in keys}
             for a in arms if a != baseline}
    out = {"bench": "easq_isolation", "baseline": baseline, "world": WORLD, "keep": args.keep, "passes": PASSES,
           "seeds": seeds, "per_seed": per_seed,
           "mean": {a: {k: float(np.mean([per_seed[s][a][k] for s in seeds])) for k in HEAD_KEYS} for a in arms},
           "diff_vs_baseline": {a: {k: {"mean": float(np.mean(v)), "wins": int(sum(x > 0 for x in v)), "of": len(v)}
                                    for k, v in d.items()} for a, d in diffs.items()},
           "machine": f"{platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}"}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()

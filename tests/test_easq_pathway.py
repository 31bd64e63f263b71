"""Issue 5's comparison: EASQ's isolated satisfaction pathway vs a plain auxiliary satisfaction tower on shared
parameters (`easq.pathway: shared`), with the questionnaire answers of the training stream made ten times sparser.

Regime (docs/easq.md, "Isolated vs shared"): one small simulated world (fixed seed) whose questionnaires are
common (answer_bias -3.7), a stage-2 ranker trained on it (jobs.train, 1 epoch, MLSE/MTL off so no stage-1 chain
is needed), then the training split's answers thinned to 10 % (`sparsify`, fixed seed: answered rows not kept
become unanswered); DIR/valid keeps every answer, so the satisfaction head's AUC is measured on all answered
validation rows (~130 here; the figures in docs/easq.md come from a world 3x larger, over seeds). The propensity
model is a jobs.propensity run on the thinned data (rho for L_sat's IPS weights, clip 0.005). Both arms: the same
init, data, seeds, steps and settings; DPO off (dpo_weight 0: the comparison is about where L_sat's gradient goes,
not about alignment); behaviour losses on; easq.lr 0.01; the
thinned stream passed twice (its shards listed twice) so the heads see the few answers more than once; 1 rank
per arm, the two arms side by side.

What is asserted: the comparison is like-for-like (same steps, rows, and the satisfaction head starts from the same
weights, so the `before` AUCs are identical), and the mechanism differs as designed: on the shared pathway L_sat's
gradient reaches the tables and the backbone, which memorise the repeated training answers (prequential AUC over the
passes far above the isolated pathway's: measured 0.655 vs 0.507), and with L_sat alone the shared backbone moves
where the isolated one stays bit-identical (tests/test_dpo_job.py). What is NOT asserted: that the isolated head's
validation AUC is the higher. It was not, here (0.585 isolated vs 0.598 shared) nor over seeds on the larger world
(docs/easq.md: within seed noise, the shared head ahead on average, both ~0.53-0.61 against a ceiling of 0.76), so
this test records the AUCs in the runs' metrics.json and does not bet on their order.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.test_score import RUN_OVERRIDES, env, torchrun  # noqa: E402
from tests.test_stage1_jobs import launch, ok  # noqa: E402

# the serving world's vocabularies (RUN_OVERRIDES), more impressions and common questionnaires
WORLD = {"users": 300, "items": 400, "authors": 50, "impressions": 12000, "candidate_requests": 60,
         "candidates_per_request": 20, "shard_rows": 2400, "row_group_rows": 500, "seed": 5, "answer_bias": -3.7,
         # the answer mechanism docs/easq.md's comparison was measured on (the defaults before answer_w_watch)
         "answer_w_click": 2.0, "answer_w_watch": 0.0, "answer_w_satisfied": 0.3}
KEEP, PASSES = 0.1, 2
SETS = [x for o in RUN_OVERRIDES for x in ("--set", o)]
ARM = [*SETS, "--set", "easq.dpo_weight=0", "--set", "easq.clip=0.005", "--checkpoint-every", "0"]
# the two arms: EASQ's pathway and an auxiliary tower on shared parameters, the head of each with its own Adam at
# the same easq.lr (docs/easq.md also measures a plain tower trained at the backbone's optimizer settings)
ARMS = {"isolated": ["easq.pathway=isolated", "easq.lr=0.01"],
        "shared": ["easq.pathway=shared", "easq.lr=0.01"]}


def sparsify(src: Path, dst: Path, keep: float, seed: int = 0, passes: int = 1) -> dict:
    """dst = src with DIR/train's questionnaire answers thinned: each answered row keeps its answer with probability
    `keep` (numpy seed `seed`), the others become unanswered (questionnaire_answered 0, satisfied null, as the
    data contract requires); every other column and split is untouched (valid/test/candidates are symlinks).
    passes > 1 lists the train shards that many times (symlinks part-N.. after the originals): a job that streams
    DIR/train once then sees every row `passes` times, in the same order each pass."""
    dst.mkdir(parents=True)
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
    return {"answered": before, "kept": after}


@pytest.fixture(scope="module")
def comparison(tmp_path_factory) -> dict:
    from pipeline.sim_world import SimulateConfig
    from pipeline.simulate import simulate

    base = tmp_path_factory.mktemp("pathway")
    world, sparse, multi = base / "world", base / "sparse", base / "sparse_x3"
    simulate(world, SimulateConfig(**WORLD), overwrite=True)
    counts = sparsify(world, sparse, KEEP, seed=0)
    sparsify(world, multi, KEEP, seed=0, passes=PASSES)
    ok(launch(2, "jobs.train", "--data", world, "--out", base / "main", *SETS, "--set", "model.mlse=false",
              "--set", "model.mtl=false", "--set", "ranker_train.epochs=1"))
    ok(launch(2, "jobs.propensity", "--data", sparse, "--out", base / "propensity", *SETS, "--set", "train.epochs=1",
              "--set", "propensity.behaviour=[]"))  # rho(u, i): the regime the figures were measured in
    runs = {arm: base / arm for arm in ARMS}
    procs = [subprocess.Popen(torchrun(1, "-m", "jobs.dpo", "--data", str(multi), "--init", str(base / "main"),
                                       "--propensity", str(base / "propensity"), "--out", str(runs[arm]), *ARM,
                                       *[x for o in sets for x in ("--set", o)]),
                              env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for arm, sets in ARMS.items()]  # one rank each, side by side (each run is deterministic on its own)
    for p in procs:
        _, err = p.communicate(timeout=400)
        assert p.returncode == 0, err[-4000:]
    return {"counts": counts, **{arm: json.loads((r / "metrics.json").read_text()) for arm, r in runs.items()}}


def test_isolated_and_shared_pathways_compared_like_for_like_on_ten_times_sparser_answers(comparison):
    iso, shr, counts = comparison["isolated"], comparison["shared"], comparison["counts"]
    assert 0.07 * counts["answered"] < counts["kept"] < 0.13 * counts["answered"]  # ten times sparser
    assert iso["pathway"] == "isolated" and shr["pathway"] == "shared"
    # like for like: the same stream, steps and start (the satisfaction head's initial weights included)
    assert iso["steps"] == shr["steps"] and iso["rows"] == shr["rows"] == PASSES * 9600
    assert iso["prequential_answered_rows"] == shr["prequential_answered_rows"] == PASSES * counts["kept"]
    assert iso["before"]["sat_head"] == shr["before"]["sat_head"]
    assert iso["before"]["click_auc"] == shr["before"]["click_auc"]
    for m in (iso, shr):
        assert m["propensity"]["tables_changed"] == [] and m["propensity"]["answered_rows"] == PASSES * counts["kept"]
        valid = m["after"]["sat_head"]["valid"]
        assert valid["rows"] > 100 and 0.0 <= valid["auc"] <= 1.0  # recorded; their order is not asserted
    # the mechanism: on the shared pathway L_sat trains the tables and the backbone, which memorise the few
    # (IPS-weighted) answers seen again on every pass; the isolated head, reading stop-gradient features, cannot
    assert shr["prequential_sat_auc"] > iso["prequential_sat_auc"] + 0.08, (shr["prequential_sat_auc"],
                                                                           iso["prequential_sat_auc"])
    for arm in ARMS:
        m = comparison[arm]
        print(arm, {split: (round(v["auc_true_all"], 4), round(v["auc"], 4)) for split, v in m["after"]["sat_head"].items()},
              "preq %.4f drift %.4f click %.4f" % (m["prequential_sat_auc"], m["backbone_drift"], m["after"]["click_auc"]))

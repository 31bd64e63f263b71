"""satrank.jobs.dpo end to end on 2 gloo ranks: a tiny simulated world and a briefly trained stage-2 ranker
(tests/test_score.py's fixture), then the online EASQ job: before/after metrics, exactly-once consumption
across a kill + restart (--log-keys), a zero backbone drift when only L_sat trains, and rho from a frozen
stage-1 propensity run (--propensity; satrank.jobs.propensity run once on the same world, tests/test_stage1_jobs.py's
launcher): the buffered rho are that model's outputs for those rows and its tables stay bit-identical.

`dpo_with_propensity(world)` (cached in the world directory, with per-id adapters `easq.id_targets`) is also the satrank.jobs.dpo run that
tests/test_easq_serving.py scores and exports."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

from satrank.models.metrics.stage1_eval import ID_ORDER, canonical_order, sample_labels  # noqa: E402
from satrank.models.metrics.ranking import auc  # noqa: E402
from tests.test_score import RUN_OVERRIDES, build_world, env, kill_tree, torchrun  # noqa: E402
from tests.test_stage1_jobs import launch, ok  # noqa: E402

SETS = [x for o in RUN_OVERRIDES for x in ("--set", o)] + ["--set", "easq.pairs_per_step=16",
                                                             "--set", "easq.auc_min_per_class=5",
                                                             "--set", "easq.ramp_threshold=0.0",
                                                             "--set", "easq.ramp_updates=2",
                                                             "--set", "reader.batch_size=128"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    return build_world(tmp_path_factory.getbasetemp() / "serving_world")


def dpo_cmd(world, out: Path, *extra: str) -> list:
    return torchrun(2, "-m", "satrank.jobs.dpo", "--data", str(world["data"]), "--init", str(world["run"]),
                    "--out", str(out), *SETS, *extra)


ID_ADAPTERS = ("--set", "easq.id_targets=[user_id,item_id]")  # per-id LoRA rows on the satisfaction path
CLIP = ("--set", "easq.clip=0.005")  # the world's answer rate is ~2%: the default M = 0.05 clips most rho


def propensity_run(world) -> Path:
    """A satrank.jobs.propensity run (1 epoch, 2 ranks) on the serving world, with its vocabularies; cached."""
    run = world["data"].parent / "propensity"
    if not (run / "checkpoint" / "meta.json").is_file():
        sets = [x for o in RUN_OVERRIDES for x in ("--set", o)]
        ok(launch(2, "satrank.jobs.propensity", "--data", world["data"], "--out", run, *sets, "--set", "train.epochs=1"))
    return run


def dpo_with_propensity(world) -> Path:
    """satrank.jobs.dpo --propensity on the serving world (2 ranks, checkpoint at the end only); cached."""
    run = world["data"].parent / "dpo_propensity"
    if not (run / "metrics.json").is_file():
        res = subprocess.run(dpo_cmd(world, run, "--propensity", str(propensity_run(world)), *CLIP, *ID_ADAPTERS,
                                     "--checkpoint-every", "0"), env=env(), capture_output=True, text=True, timeout=400)
        assert res.returncode == 0, res.stderr[-4000:]
    return run


def all_keys(data: Path) -> set:
    t = pa.concat_tables([pq.read_table(f, columns=["user_id", "item_id", "timestamp"])
                          for f in sorted((data / "train").glob("*.parquet"))])
    return set(zip(*(t.column(c).to_pylist() for c in ("user_id", "item_id", "timestamp")))), t.num_rows


def logged(out: Path) -> list:
    rows = np.concatenate([np.load(out / f"keys-rank{r}.npy") for r in (0, 1)])
    return [tuple(int(x) for x in r) for r in rows]


def test_dpo_job_writes_before_and_after_metrics_and_consumes_every_row_once(world, tmp_path):
    out = tmp_path / "run"
    res = subprocess.run(dpo_cmd(world, out, "--log-keys", "--checkpoint-every", "0"), env=env(),
                         capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    m = json.loads((out / "metrics.json").read_text())
    for block in ("before", "after"):
        for k in ("click_auc", "sat_auc_answered", "true_sat@10"):
            assert k in m[block]
    assert m["before"]["click_auc"] is not None and m["prequential_sat_auc"] is not None
    assert m["backbone_drift"] > 0 and m["timestamp_ordered"] is True
    assert m["propensity"] is None and m["pathway"] == "isolated"  # no --propensity: rho = 1
    for block in ("before", "after"):
        assert m[block]["sat_head"]["valid"]["rows"] > 0 and m[block]["sat_head"]["test"]["auc"] is not None
    # all-rows AUC against a label drawn from the truth: every valid row, the stage-1 draw (canonical order)
    t = pq.read_table(world["data"] / "valid")
    cols = {f"id_{k}": torch.from_numpy(t.column(k).to_numpy().astype(np.int64)) for k in ID_ORDER}
    order = torch.from_numpy(canonical_order(cols))
    true_p = torch.from_numpy(t.column("true_p_satisfied").to_numpy().astype(np.float32))[order]
    ceiling = auc(true_p, sample_labels(true_p, 0))
    for block in ("before", "after"):
        v = m[block]["sat_head"]["valid"]
        assert v["rows_all"] == t.num_rows and v["auc_true_all_ceiling"] == ceiling
        assert 0.0 < v["auc_true_all"] < 1.0
    assert m["before"]["sat_head"]["valid"]["auc_true_all"] != m["after"]["sat_head"]["valid"]["auc_true_all"]
    keys, n = all_keys(world["data"])
    got = logged(out)
    assert len(got) == n == m["rows"] and set(got) == keys


def test_killed_after_first_checkpoint_and_restarted_consumes_each_remaining_row_exactly_once(world, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(dpo_cmd(world, out, "--log-keys", "--checkpoint-every", "3"), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoint" / "meta.json").is_file():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint before the run ended"
        time.sleep(0.2)
    kill_tree(proc.pid)
    proc.wait()
    meta = json.loads((out / "checkpoint" / "meta.json").read_text())
    assert 0 < meta["extra"]["rows"]
    res = subprocess.run(dpo_cmd(world, out, "--log-keys", "--checkpoint-every", "3"), env=env(),
                         capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    keys, n = all_keys(world["data"])
    got = logged(out)
    assert len(got) == n and set(got) == keys  # union = all rows, no duplicates


def test_follow_waits_for_shards_that_land_later_and_consumes_each_row_once(world, tmp_path):
    """--follow, the production shape: started with only the first train shard, the job catches up, checkpoints and
    waits; the later shards land while it waits (written under a dot name and renamed, as a producer does, so no
    rank reads half a file) and are consumed, every row exactly once over both ranks; with no new shard for
    --max-wait-s it ends on its own."""
    data = tmp_path / "data"
    data.mkdir()
    for split in ("valid", "test", "candidates"):
        (data / split).symlink_to(world["data"] / split)
    shards = sorted((world["data"] / "train").glob("part-*.parquet"))
    assert len(shards) >= 2
    (data / "train").mkdir()
    shutil.copy(shards[0], data / "train" / shards[0].name)
    out, log = tmp_path / "run", tmp_path / "stderr.log"
    with log.open("w") as err:  # a file, not a pipe: nobody reads the job's log while it runs
        proc = subprocess.Popen(dpo_cmd({"data": data, "run": world["run"]}, out, "--log-keys", "--follow",
                                        "--max-wait-s", "6", "--poll-s", "0.2", "--checkpoint-every", "1000"),
                                env=env(), stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        deadline, meta = time.time() + 300, out / "checkpoint" / "meta.json"
        while not (meta.is_file() and json.loads(meta.read_text())["extra"]["done"] == [shards[0].name]):
            assert proc.poll() is None, log.read_text()[-4000:]  # it must wait, not end, when caught up
            assert time.time() < deadline, "the job never caught up with the first shard"
            time.sleep(0.2)
        for f in shards[1:]:  # land the rest while it waits
            shutil.copy(f, data / "train" / f".{f.name}")
            (data / "train" / f".{f.name}").rename(data / "train" / f.name)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    assert proc.returncode == 0, log.read_text()[-4000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["shards"] == [f.name for f in shards] and m["timestamp_ordered"] is True
    keys, n = all_keys(world["data"])
    got = logged(out)
    assert len(got) == n == m["rows"] and set(got) == keys


def test_sat_only_with_dpo_weight_zero_leaves_the_backbone_bit_identical(world, tmp_path):
    out = tmp_path / "run"
    res = subprocess.run(dpo_cmd(world, out, "--sat-only", "--set", "easq.dpo_weight=0", "--checkpoint-every", "0"),
                         env=env(), capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["backbone_drift"] == 0.0 and m["prequential_answered_rows"] > 0


# ---------------------------------------------------------------------------------------------- --propensity
def _expected_rho(world, run_p: Path) -> dict:
    """(user_id, request_id, item_id) -> rho of every train row, from RUN_P's propensity model loaded unsharded in
    this process (built like the job builds it: satrank.models.stage1.tasks.PropensityModel from RUN_P's own config)."""
    import torch

    from satrank.jobs.engine import checkpoint as ckpt
    from satrank.jobs.engine.checkpoint import checkpoint_config
    from satrank.models.stage1.tasks import PropensityModel
    from satrank.pipeline.reader import BatchLoader
    from satrank.pipeline.reader_config import ReaderConfig

    data = checkpoint_config(ckpt.resolve(world["run"])).data
    pcfg = checkpoint_config(ckpt.resolve(run_p))
    model = PropensityModel(data, pcfg.embeddings, pcfg.propensity)
    model.sparse_arch.materialize(seed=123)  # overwritten by the checkpoint
    ckpt.load_checkpoint(run_p, model)
    model.eval()
    out = {}
    rcfg = ReaderConfig(batch_size=512, num_workers=0, shuffle=False)
    with torch.no_grad():
        for batch in BatchLoader(world["data"] / "train", data, rcfg, rank=0, world_size=1):
            rho = model(batch)[1]["propensity"]
            keys = zip(*(batch.ids[k].tolist() for k in ("user_id", "request_id", "item_id")))
            for key, r in zip(keys, rho.tolist()):
                assert key not in out, f"train key {key} is not unique"
                out[key] = r
    return out


def test_propensity_run_gives_the_buffered_rho_and_stays_frozen(world):
    import torch

    run_p = propensity_run(world)
    run = dpo_with_propensity(world)
    m = json.loads((run / "metrics.json").read_text())
    p = m["propensity"]
    assert p["run"] == str(run_p) and p["keys_loaded"] > 0 and p["tables"]
    assert p["tables_changed"] == [] and p["dense_changed"] == []  # frozen: bit-identical after every step
    assert p["answered_rows"] == m["prequential_answered_rows"] > 20
    assert 0.0 < p["rho_mean_answered"] < 0.5 and p["clip"] == 0.005
    expected = _expected_rho(world, run_p)
    step = json.loads((run / "checkpoint" / "meta.json").read_text())["extra"]["step"]
    stored = [torch.load(run / "easq_state" / f"step-{step}" / f"rank{r}.pt", weights_only=True)["buffer"]
              for r in (0, 1)]
    rho = torch.cat([b["rho"] for b in stored])
    keys = [k for b in stored for k in zip(b["user"].tolist(), b["request"].tolist(), b["item"].tolist())]
    want = torch.tensor([expected[k] for k in keys], dtype=torch.float64)
    assert len(keys) == p["answered_rows"]  # every answered row is in a buffer (bounds not reached)
    assert not bool((rho == 1.0).all()) and float(rho.std()) > 1e-3
    torch.testing.assert_close(rho, want, rtol=1e-5, atol=1e-6)
    ipw = torch.cat([b["ipw"] for b in stored])
    torch.testing.assert_close(ipw, 1.0 / want.clamp_min(0.005), rtol=1e-5, atol=1e-6)  # the pair weights' factors


def test_propensity_argument_must_be_a_propensity_run_for_these_features(world, tmp_path, capsys):
    from satrank.jobs.dpo import main

    common = ["--data", str(world["data"]), "--init", str(world["run"]), "--out", str(tmp_path / "o")]
    assert main([*common, "--propensity", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert "--propensity: checkpoint" in err and "does not exist" in err
    assert main([*common, "--propensity", str(world["run"])]) == 1  # a satrank.jobs.train run
    err = capsys.readouterr().err
    assert "--propensity" in err and "expected a satrank.jobs.propensity run" in err
    assert not (tmp_path / "o").exists()


def test_shared_pathway_sat_only_moves_the_backbone(world, tmp_path):
    """The baseline's L_sat reaches the backbone (cf. the isolated pathway above: drift exactly 0)."""
    out = tmp_path / "run"
    res = subprocess.run(dpo_cmd(world, out, "--sat-only", "--set", "easq.dpo_weight=0", "--set", "easq.pathway=shared",
                                 "--checkpoint-every", "0"), env=env(), capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["pathway"] == "shared" and m["backbone_drift"] > 0 and m["prequential_answered_rows"] > 0


def test_demo_says_whether_the_dpo_gate_opened(world):
    from satrank.jobs.demo import dpo_gate_line

    run = dpo_with_propensity(world)  # its config.yaml has easq.ramp_threshold 0 (SETS)
    m = json.loads((run / "metrics.json").read_text())
    opened = dpo_gate_line({**m, "dpo_ramp": 1.0}, run)
    assert "ramp at the end: 1.0" in opened and "ramp threshold 0.0" in opened and "stayed shut" not in opened
    assert f"prequential answered-AUC {m['prequential_sat_auc']:.3f}" in opened
    shut = dpo_gate_line({**m, "dpo_ramp": 0.0}, run)
    assert "ramp at the end: 0.0" in shut and "the gate stayed shut" in shut and "not L_DPO" in shut

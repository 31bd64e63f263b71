"""jobs.dpo end to end on 2 gloo ranks: a tiny simulated world and a briefly trained stage-2 ranker
(tests/test_score.py's fixture), then the online EASQ job: before/after metrics, exactly-once consumption
across a kill + restart (--log-keys), and a zero backbone drift when only L_sat trains."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.test_score import RUN_OVERRIDES, build_world, env, kill_tree, torchrun  # noqa: E402

SETS = [x for o in RUN_OVERRIDES for x in ("--set", o)] + ["--set", "easq.pairs_per_step=16",
                                                             "--set", "easq.auc_min_per_class=5",
                                                             "--set", "easq.ramp_threshold=0.0",
                                                             "--set", "easq.ramp_updates=2",
                                                             "--set", "reader.batch_size=128"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    return build_world(tmp_path_factory.getbasetemp() / "serving_world")


def dpo_cmd(world, out: Path, *extra: str) -> list:
    return torchrun(2, "-m", "jobs.dpo", "--data", str(world["data"]), "--init", str(world["run"]),
                    "--out", str(out), *SETS, *extra)


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


def test_sat_only_with_dpo_weight_zero_leaves_the_backbone_bit_identical(world, tmp_path):
    out = tmp_path / "run"
    res = subprocess.run(dpo_cmd(world, out, "--sat-only", "--set", "easq.dpo_weight=0", "--checkpoint-every", "0"),
                         env=env(), capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["backbone_drift"] == 0.0 and m["prequential_answered_rows"] > 0

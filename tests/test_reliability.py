"""Reliability (issue 17), the parts landed so far: a crafted checkpoint never executes code, duplicate
YAML keys are refused with the line, JSON/YAML outputs follow the user's umask like Parquet outputs, and
negative timestamps or non-finite truth values are refused (or counted under on_bad_row=skip)."""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.distributed.checkpoint as dcp

from satrank.jobs.config import load_config
from satrank.jobs.engine.run_dir import RunDirClaim, RunDirError, claim_run_dir
from satrank.jobs.engine.trusted_dcp import CheckpointTrustError, read_state_metadata, trusted_load
from satrank.pipeline.atomic import write_json_atomic, write_text_atomic
from satrank.pipeline.config import ConfigError
from satrank.pipeline.errors import DataError
from satrank.pipeline.reader import BatchLoader


class _CreatesAFile:
    """A pickle payload that would create `target` when unpickled by a plain pickle.load."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def _save_state(state_dir: Path) -> dict:
    state = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "step": torch.tensor(7),
             "h": torch.ones(2, dtype=torch.bfloat16)}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(state_dir)), no_dist=True)
    return state


def test_genuine_dcp_metadata_passes_the_trust_boundary_and_loads_exactly(tmp_path):
    saved = _save_state(tmp_path / "state")
    md = read_state_metadata(tmp_path / "state")
    assert sorted(md.state_dict_metadata) == ["h", "step", "w"]
    into = {k: torch.zeros_like(v) for k, v in saved.items()}
    trusted_load(into, tmp_path / "state")
    for k in saved:
        assert torch.equal(into[k], saved[k])


@pytest.mark.parametrize("how", ["metadata", "load"])
def test_crafted_metadata_that_would_create_a_file_is_refused_and_the_file_never_appears(tmp_path, how):
    _save_state(tmp_path / "state")
    target = tmp_path / "pwned"
    with open(tmp_path / "state" / ".metadata", "wb") as f:
        pickle.dump(_CreatesAFile(target), f)
    # the payload is live: a plain pickle.load (what DCP's FileSystemReader does) creates the file
    shutil.copy(tmp_path / "state" / ".metadata", tmp_path / "probe.pkl")
    with open(tmp_path / "probe.pkl", "rb") as f:
        pickle.load(f)
    assert target.exists()
    target.unlink()
    with pytest.raises(CheckpointTrustError, match=r"state/\.metadata: refused to load: .* asks for pathlib\.Path\.touch"):
        if how == "metadata":
            read_state_metadata(tmp_path / "state")
        else:
            trusted_load({"w": torch.zeros(3, 4)}, tmp_path / "state")
    assert not target.exists()


def test_metadata_that_is_not_a_pickle_or_not_metadata_is_refused_naming_the_file(tmp_path):
    _save_state(tmp_path / "state")
    meta = tmp_path / "state" / ".metadata"
    meta.write_bytes(b"not a pickle")
    with pytest.raises(CheckpointTrustError, match=r"state/\.metadata: unreadable checkpoint metadata"):
        read_state_metadata(tmp_path / "state")
    with open(meta, "wb") as f:
        pickle.dump({"a": [1, 2]}, f)
    with pytest.raises(CheckpointTrustError, match=r"state/\.metadata: not a DCP checkpoint metadata file \(holds dict\)"):
        read_state_metadata(tmp_path / "state")


def test_duplicate_yaml_keys_are_refused_with_file_and_line(tmp_path):
    cfg = tmp_path / "dup.yaml"
    cfg.write_text("reader:\n  batch_size: 64\n  batch_size: 128\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml', line 3: duplicate key 'batch_size' \(first at line 2\)"):
        load_config(cfg)
    cfg.write_text("reader: {batch_size: 64}\nreader: {batch_size: 128}\n")
    with pytest.raises(ConfigError, match=r"line 2: duplicate key 'reader' \(first at line 1\)"):
        load_config(cfg)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_json_and_text_outputs_get_the_umask_mode_like_plain_files(tmp_path, mask):
    old = os.umask(mask)
    try:
        write_json_atomic(tmp_path / "m.json", {"a": 1})
        write_text_atomic(tmp_path / "c.yaml", "a: 1\n")
        (tmp_path / "plain").write_text("x")
    finally:
        os.umask(old)
    want = 0o666 & ~mask
    assert (tmp_path / "plain").stat().st_mode & 0o777 == want
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == want
    assert (tmp_path / "c.yaml").stat().st_mode & 0o777 == want


def test_negative_timestamp_names_file_column_and_row(write_bad, data_cfg, reader_cfg):
    ts = np.arange(20, dtype=np.int64) + 1_000
    ts[13] = -5
    root, path = write_bad(replace={"timestamp": pa.array(ts)})
    with pytest.raises(DataError, match=rf"{path}: column 'timestamp', row 13: negative timestamp \(value -5\)"):
        sum(b.size for b in BatchLoader(root, data_cfg, reader_cfg()))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None])
def test_non_finite_or_null_truth_value_is_refused_or_counted(write_bad, data_cfg, reader_cfg, bad):
    x = np.full(20, 0.5).tolist()
    x[7] = bad
    root, path = write_bad(replace={"true_p_satisfied": pa.array(x, type=pa.float32())})
    with pytest.raises(DataError, match=rf"{path}: column 'true_p_satisfied', row 7: null, NaN or infinite truth"):
        sum(b.size for b in BatchLoader(root, data_cfg, reader_cfg()))
    loader = BatchLoader(root, data_cfg, reader_cfg(on_bad_row="skip"))
    assert sum(b.size for b in loader) == 19
    stats = loader.stats()
    assert stats["rows_rejected"] == {"non_finite:true_p_satisfied": 1} and stats["rows_read"] == 20


def _owned_run(root: Path, job: str, with_checkpoint: bool = True) -> Path:
    run = root / f"run_{job}"
    if with_checkpoint:
        (run / "checkpoint").mkdir(parents=True)
        (run / "checkpoint" / "meta.json").write_text(json.dumps({"format": 1, "extra": {"job": job}}))
    else:
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps({"job": job}))
    return run


def test_a_new_or_empty_out_is_claimed_as_new_and_resume_from_elsewhere_is_allowed(tmp_path):
    assert claim_run_dir(tmp_path / "absent", "train") == RunDirClaim("new")
    (tmp_path / "empty").mkdir()
    assert claim_run_dir(tmp_path / "empty", "train") == RunDirClaim("new")
    old = _owned_run(tmp_path, "train")
    assert claim_run_dir(tmp_path / "fresh", "train", resume=old) == RunDirClaim("resume", old)


def test_another_jobs_run_is_refused_naming_both_jobs_unless_overwrite(tmp_path):
    run = _owned_run(tmp_path, "pretrain")
    with pytest.raises(RunDirError, match=r"holds a satrank\.jobs\.pretrain run, not a satrank\.jobs\.train run"):
        claim_run_dir(run, "train")
    with pytest.raises(RunDirError, match="holds a satrank.jobs.pretrain run"):
        claim_run_dir(run, "train", resume=run)
    assert claim_run_dir(run, "train", overwrite=True) == RunDirClaim("overwrite")
    other = _owned_run(tmp_path, "evaluate", with_checkpoint=False)
    with pytest.raises(RunDirError, match=r"holds a satrank\.jobs\.evaluate run"):
        claim_run_dir(other, "dpo")


def test_own_run_needs_resume_or_overwrite_except_after_a_torchrun_restart(tmp_path):
    run = _owned_run(tmp_path, "train")
    with pytest.raises(RunDirError, match=rf"already holds a satrank\.jobs\.train run; pass --resume {run}"):
        claim_run_dir(run, "train")
    assert claim_run_dir(run, "train", resume=run) == RunDirClaim("resume", run)
    assert claim_run_dir(run, "train", restart_count=1) == RunDirClaim("resume", run)
    no_ckpt = _owned_run(tmp_path / "b", "train", with_checkpoint=False)
    with pytest.raises(RunDirError, match="already holds"):
        claim_run_dir(no_ckpt, "train", restart_count=2)  # restarted before its first checkpoint: no silent reuse
    with pytest.raises(RunDirError, match="exclude each other"):
        claim_run_dir(run, "train", resume=run, overwrite=True)


def test_dpo_continues_its_own_run_in_place_and_a_restart_before_any_record_starts_afresh(tmp_path):
    run = _owned_run(tmp_path, "dpo")
    assert claim_run_dir(run, "dpo", resume_in_place=True) == RunDirClaim("resume", run)
    with pytest.raises(RunDirError, match=r"holds a satrank\.jobs\.dpo run, not a satrank\.jobs\.train run"):
        claim_run_dir(run, "train", resume_in_place=True)
    (tmp_path / "died").mkdir()
    (tmp_path / "died" / "teacher.json").write_text("{}")  # written before the first checkpoint, then killed
    assert claim_run_dir(tmp_path / "died", "dpo", restart_count=1) == RunDirClaim("new")
    with pytest.raises(RunDirError, match="holds no satrank run"):
        claim_run_dir(tmp_path / "died", "dpo")  # without a restart it is somebody else's directory


@pytest.mark.parametrize("job", ["train", "evaluate"])
def test_a_job_pointed_at_another_run_exits_2_with_one_line_and_writes_nothing(tmp_path, job):
    import subprocess
    import sys

    run = _owned_run(tmp_path, "pretrain")
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    args = {"train": ["--satisfaction", str(tmp_path)], "evaluate": ["--model", str(run)]}[job]
    proc = subprocess.run([sys.executable, "-m", f"satrank.jobs.{job}", "--data", str(tmp_path), *args, "--out", str(run)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert f"holds a satrank.jobs.pretrain run, not a satrank.jobs.{job} run" in last and "--overwrite" in last
    assert "Traceback" not in proc.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files


def test_a_foreign_non_empty_directory_or_a_file_is_refused(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(RunDirError, match="is not empty and holds no satrank run"):
        claim_run_dir(tmp_path / "mine", "train")
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunDirError, match="exists and is not a directory"):
        claim_run_dir(tmp_path / "f", "train")
    bad = _owned_run(tmp_path, "train")
    (bad / "checkpoint" / "meta.json").write_text("{not json")
    with pytest.raises(RunDirError, match=r"meta\.json is unreadable"):
        claim_run_dir(bad, "train")


def _crafted_run(root: Path, target: Path) -> Path:
    """A run directory that looks like a train run but whose DCP metadata pickle would create `target`."""
    from satrank.jobs.engine.checkpoint import FORMAT

    run = root / "crafted"
    (run / "checkpoint" / "state").mkdir(parents=True)
    with open(run / "checkpoint" / "state" / ".metadata", "wb") as f:
        pickle.dump(_CreatesAFile(target), f)
    (run / "checkpoint" / "meta.json").write_text(json.dumps({"format": FORMAT, "extra": {"job": "train"}}))
    return run


@pytest.mark.parametrize("job", ["export", "evaluate"])
def test_a_crafted_run_directory_is_refused_by_the_jobs_before_any_code_runs(tmp_path, job):
    import subprocess
    import sys

    target = tmp_path / "pwned"
    run = _crafted_run(tmp_path, target)
    args = {"export": ["--model", str(run), "--out", str(tmp_path / "out")],
            "evaluate": ["--model", str(run), "--data", str(tmp_path), "--out", str(tmp_path / "out")]}[job]
    proc = subprocess.run([sys.executable, "-m", f"satrank.jobs.{job}", *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert f"satrank {job}: error" in last and "refused to load" in last and "pathlib.Path.touch" in last, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not target.exists()


def test_every_checkpoint_path_goes_through_the_trust_boundary(tmp_path):
    from satrank.jobs.engine.checkpoint import CheckpointError, read_meta, resolve

    target = tmp_path / "pwned"
    run = _crafted_run(tmp_path, target)
    for call in (lambda: resolve(run), lambda: resolve(run / "checkpoint"), lambda: read_meta(run)):
        with pytest.raises(CheckpointError, match="refused to load"):
            call()
    assert not target.exists()

"""satrank.jobs.score end to end: a tiny simulated world, a SAQRec ranker trained briefly on 2 gloo ranks (its
DCP checkpoint sharded row-wise/table-wise), then real `torch.distributed.run` scoring runs.

Also a torchrun script: `python -m torch.distributed.run ... tests/test_score.py train DATA RUN` trains
the ranker (with its frozen teacher g) for a few steps and writes RUN/checkpoint + RUN/teacher.json in
satrank.jobs.train's format (the full stage-1 chain would take minutes; the checkpoint format is the same).
tests/test_export.py reuses `serving_world`.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

# a small world: vocabularies sized to it, 60 requests x 20 candidates in 6 shards of 10 requests
SIM = {"users": 300, "items": 400, "impressions": 6000, "authors": 50, "candidate_requests": 60,
       "candidates_per_request": 20, "shard_rows": 2000, "row_group_rows": 500, "seed": 5}
CAND_SHARD_ROWS = 200
RUN_OVERRIDES = ["data.sparse.user_id.vocab_size=300", "data.sparse.item_id.vocab_size=400",
                 "data.sparse.author_id.vocab_size=64",
                 *[f"data.sequence.{h}.vocab_size=400" for h in ("hist_click", "hist_satisfied", "hist_dissatisfied",
                                                                  "hist_skip")],
                 "embeddings.dim=16", "model.dropout=0.0", "reader.num_workers=0", "reader.batch_size=256"]
TRAIN_STEPS = 6
# small batches: a run lasts long enough to be killed mid-way; the same batches in every run, so scores
# of 1-rank and 2-rank runs are bitwise equal (CPU kernels are deterministic for equal shapes)
SCORE_SET = ("--set", "score.batch_size=32")


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1")
    return e


def torchrun(nproc: int, *args: str) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--monitor-interval=0.1",
            f"--nproc_per_node={nproc}", *args]


def build_world(base: Path) -> dict:
    """DATA (simulated splits + candidates in 6 shards) and RUN (a briefly trained ranker); cached."""
    done = base / "world.done"
    paths = {"data": base / "data", "run": base / "run"}
    if done.exists():
        return paths
    from satrank.pipeline.sim.simulate import simulate
    from satrank.pipeline.sim.world import SimulateConfig

    cfg = SimulateConfig(**{k: v for k, v in SIM.items() if k != "shard_rows"}, shard_rows=SIM["shard_rows"])
    simulate(paths["data"], cfg, overwrite=True)
    _reshard(paths["data"] / "candidates", CAND_SHARD_ROWS)
    res = subprocess.run(torchrun(2, __file__, "train", str(paths["data"]), str(paths["run"])), env=env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    done.write_text("ok")
    return paths


def _reshard(directory: Path, rows: int) -> None:
    """Split the simulator's candidate shard(s) into shards of `rows` rows (whole requests each)."""
    table = pa.concat_tables([pq.read_table(p) for p in sorted(directory.glob("part-*.parquet"))])
    for p in directory.glob("part-*.parquet"):
        p.unlink()
    for i, lo in enumerate(range(0, table.num_rows, rows)):
        pq.write_table(table.slice(lo, rows), directory / f"part-{i:05d}.parquet", row_group_size=64)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    return build_world(tmp_path_factory.getbasetemp() / "serving_world")


def descendants(pid: int) -> list:
    """Process ids below `pid` (torchrun starts its ranks in process groups of their own)."""
    children: dict = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(pid: int) -> None:
    """SIGSTOP the whole tree first (nothing finishes meanwhile), then SIGKILL every process of it."""
    procs = [pid, *descendants(pid)]
    for p in procs:
        try:
            os.kill(p, signal.SIGSTOP)
        except ProcessLookupError:
            pass
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def score_cmd(model: Path, candidates: Path, out: Path, *extra: str) -> list:
    return ["-m", "satrank.jobs.score", "--model", str(model), "--candidates", str(candidates), "--out", str(out), *extra]


def read_scores(out: Path) -> pa.Table:
    files = sorted(out.glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).sort_by([("request_id", "ascending"),
                                                                           ("item_id", "ascending")])


@pytest.fixture(scope="module")
def one_rank(world, tmp_path_factory) -> Path:
    """A plain single-process scoring run (no torchrun: a 1-process world)."""
    out = tmp_path_factory.mktemp("scores1")
    res = subprocess.run([sys.executable, *score_cmd(world["run"], world["data"] / "candidates", out, *SCORE_SET)],
                         env=env(), capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


# ---------------------------------------------------------------------------------------------- unit behaviour
def test_rank_is_one_for_the_best_score_of_each_request_and_ties_go_to_the_earlier_row():
    from satrank.pipeline.score_writer import rank_within_requests

    rid = np.array([7, 7, 3, 7, 3, 7])
    score = np.array([0.1, 0.5, -1.0, 0.5, 2.0, -3.0])
    assert rank_within_requests(rid, score).tolist() == [3, 1, 2, 2, 1, 4]
    with pytest.raises(ValueError, match="not finite at row 1"):
        rank_within_requests(np.array([1, 1]), np.array([0.0, np.nan]))


def test_fusion_adds_weighted_log_probabilities_and_drops_absent_heads():
    import torch

    from satrank.models.common.fusion import Fusion, FusionConfig, effective_weights
    from satrank.models.ranker.config import ModelConfig
    from satrank.models.ranker.heads import serving_specs
    from satrank.pipeline.config import ConfigError

    specs = serving_specs(ModelConfig())  # click, satisfaction, watch_time
    cfg = FusionConfig(w_click=1.0, w_sat=2.0, w_watch_time=0.5)
    y, s, h = torch.tensor([0.0, 2.0]), torch.tensor([0.0, -1.0]), torch.tensor([1.0, -0.5])
    fusion = Fusion(cfg, specs, ["click", "satisfaction", "watch_time"])
    assert fusion.outputs == ["p_click", "p_satisfied", "watch_time_pred", "score"]
    p_click, p_sat, wt, score = fusion({"click": y, "satisfaction": s, "watch_time": h})
    expected = [np.log(0.5) + 2 * np.log(0.5) + 0.5 * 1.0,
                np.log(1 / (1 + np.exp(-2))) + 2 * np.log(1 / (1 + np.exp(1))) + 0.0]  # log1p(max(expm1(h), 0))
    assert np.allclose(score.numpy(), expected, atol=1e-6)
    assert np.allclose(wt.numpy(), [np.expm1(1.0), 0.0], atol=1e-6)
    # a click-only model: no satisfaction / watch-time term, NaN outputs for them
    p_click, p_sat, wt, score = Fusion(cfg, specs, ["click"])({"click": y})
    assert torch.isnan(p_sat).all() and torch.isnan(wt).all()
    assert np.allclose(score.numpy(), np.log(1 / (1 + np.exp(-y.numpy()))), atol=1e-6)
    assert effective_weights(cfg, ["click"], specs) == {"w_click": 1.0, "w_sat": 0.0, "w_watch_time": 0.0}
    with pytest.raises(ConfigError, match="every weight on them is <= 0"):
        effective_weights(FusionConfig(w_click=0.0, w_sat=1.0), ["click"], specs)


def test_serve_config_takes_score_and_export_sections_and_refuses_other_overrides():
    from satrank.jobs.config.serve import load_serve_config
    from satrank.pipeline.config import ConfigError

    cfg = load_serve_config(None, ["score.fusion.w_sat=2.5", "export.int8=true", "score.batch_size=64"])
    assert (cfg.score.fusion.w_sat, cfg.export.int8, cfg.score.batch_size) == (2.5, True, 64)
    with pytest.raises(ConfigError, match="only score"):
        load_serve_config(None, ["data.sparse.user_id.vocab_size=5"])
    with pytest.raises(ConfigError, match="batch_size: must be > 0"):
        load_serve_config(None, ["score.batch_size=0"])


def test_score_writer_checks_rows_and_rescores_a_tampered_shard(tmp_path):
    from satrank.pipeline.errors import DataError
    from satrank.pipeline.score_writer import ScoreOutputError, ScoreWriter, scores_table

    ids = {"request_id": np.array([1, 1, 2]), "user_id": np.array([5, 5, 6]), "item_id": np.array([10, 11, 12])}
    vals = {"p_click": np.array([0.2, 0.4, 0.5], np.float32), "p_satisfied": np.full(3, np.nan, np.float32),
            "watch_time_pred": np.full(3, np.nan, np.float32), "score": np.array([-1.6, -0.9, -0.7], np.float32)}
    table = scores_table(ids, vals)
    assert table.column("p_satisfied").null_count == 3  # absent head -> null, never a made-up value
    assert table.column("rank").to_pylist() == [1, 2, 1] and table.column("item_id").to_pylist() == [11, 10, 12]
    info = {"name": "part-00000.parquet", "path": "in/part-00000.parquet", "bytes": 1, "sha256": "ab", "rows": 3}
    w = ScoreWriter(tmp_path, {"model": "m1"})
    w.prepare()
    with pytest.raises(DataError, match="4 rows in but 3 scored"):
        w.write_shard(0, table, {**info, "rows": 4}, {})
    assert not list(tmp_path.glob("part-*")) and not list(tmp_path.glob(".part-*"))  # nothing half-written
    rec = w.write_shard(0, table, info, {})
    assert w.done(0, "ab") == rec and w.done(0, "other input") is None
    (tmp_path / "part-00000.parquet").write_bytes(b"garbage")
    assert w.done(0, "ab") is None  # a damaged output is scored again, not trusted
    with pytest.raises(ScoreOutputError, match="different run"):
        ScoreWriter(tmp_path, {"model": "m2"}).prepare()


def test_score_refuses_a_directory_that_is_not_a_checkpoint(world, tmp_path, capsys):
    from satrank.jobs.score import main

    rc = main(["--model", str(world["data"]), "--candidates", str(world["data"] / "candidates"),
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and "is not a satrank checkpoint" in err and str(world["data"]) in err


def test_a_candidate_shard_missing_a_feature_is_named(world, tmp_path):
    from satrank.jobs.engine.checkpoint import checkpoint_config
    from satrank.models.serving.score import shard_info
    from satrank.pipeline.errors import DataError

    cfg = checkpoint_config(world["run"] / "checkpoint")
    t = pq.read_table(world["data"] / "candidates" / "part-00000.parquet")
    pq.write_table(t.drop_columns(["hist_satisfied"]), tmp_path / "part-00000.parquet")
    with pytest.raises(DataError, match="column 'hist_satisfied' \\(sequence feature hist_satisfied\\) is missing"):
        shard_info(str(tmp_path / "part-00000.parquet"), str(tmp_path), cfg.data)


def test_a_repeated_request_item_pair_is_refused_naming_both_rows(world, tmp_path):
    import pyarrow as pa

    from satrank.jobs.engine.checkpoint import checkpoint_config
    from satrank.models.serving.score import shard_info
    from satrank.pipeline.errors import DataError

    cfg = checkpoint_config(world["run"] / "checkpoint")
    t = pq.read_table(world["data"] / "candidates" / "part-00000.parquet")
    shard_info(str(world["data"] / "candidates" / "part-00000.parquet"), "", cfg.data)  # the clean shard passes
    pq.write_table(pa.concat_tables([t, t.slice(3, 1)]), tmp_path / "part-00000.parquet")
    rid, item = t.column("request_id")[3].as_py(), t.column("item_id")[3].as_py()
    with pytest.raises(DataError, match=rf"rows 3 and {t.num_rows} repeat \(request_id, item_id\) = \({rid}, {item}\); "
                                        "1 repeated pair"):
        shard_info(str(tmp_path / "part-00000.parquet"), str(tmp_path), cfg.data)


def test_click_model_checkpoint_scores_with_null_satisfaction(world, tmp_path):
    """The stage-1 click model scores through the same adapter: no satisfaction / watch-time head."""
    import torch

    from satrank.jobs.engine.checkpoint import save_checkpoint
    from satrank.jobs.config import load_config
    from satrank.jobs.engine.runs import load_model
    from satrank.models.common.fusion import FusionConfig
    from satrank.models.serving.module import ModelScorer, build_model
    from satrank.pipeline.reader import BatchLoader
    from satrank.pipeline.reader_config import ReaderConfig

    cfg = load_config(overrides=RUN_OVERRIDES)
    save_checkpoint(tmp_path / "click", build_model("click", cfg), extra={"job": "pretrain"}, config=cfg)
    loaded = load_model(tmp_path / "click")
    assert loaded.kind == "click"
    scorer = ModelScorer(loaded.model, FusionConfig(), cfg.data)
    assert scorer.heads == ("click",) and scorer.fusion.weights["w_sat"] == 0.0
    batch = next(iter(BatchLoader(world["data"] / "candidates", cfg.data, ReaderConfig(batch_size=50, num_workers=0,
                                                                                       shuffle=False), with_labels=False)))
    out = scorer(batch)
    assert torch.isnan(out["p_satisfied"]).all()
    assert torch.allclose(out["score"], torch.log(out["p_click"]), atol=1e-5)


# ---------------------------------------------------------------------------------------------- the job
def test_each_output_shard_has_exactly_its_input_rows_ranked_per_request(world, one_rank):
    manifest = json.loads((one_rank / "_manifest.json").read_text())
    assert manifest["complete"] and manifest["totals"] == {"shards": 6, "rows_in": 1200, "rows_out": 1200,
                                                          "rows_rejected": 0, "requests": 60}
    for i, rec in enumerate(manifest["shards"]):
        inp = pq.read_table(world["data"] / "candidates" / rec["input"])
        out = pq.read_table(one_rank / rec["output"])
        assert rec["output"] == f"part-{i:05d}.parquet" and rec["input"] == f"part-{i:05d}.parquet"
        assert rec["rows_in"] == rec["rows_out"] == inp.num_rows == out.num_rows
        key = lambda t: sorted(zip(t.column("request_id").to_pylist(), t.column("item_id").to_pylist()))  # noqa: E731
        assert key(inp) == key(out)  # the same rows, each exactly once
    t = read_scores(one_rank)
    rid, score, rank = (t.column(c).to_numpy() for c in ("request_id", "score", "rank"))
    for r in np.unique(rid):
        m = rid == r
        assert sorted(rank[m].tolist()) == list(range(1, 21))
        assert score[m][rank[m] == 1][0] == score[m].max()
    # default fusion: score = log p_click + log p_satisfied (w_watch_time = 0)
    p_click, p_sat = t.column("p_click").to_numpy(), t.column("p_satisfied").to_numpy()
    assert np.allclose(score, np.log(p_click) + np.log(p_sat), atol=1e-5)
    assert t.column("watch_time_pred").null_count == 0 and (t.column("watch_time_pred").to_numpy() >= 0).all()
    assert not list(one_rank.glob(".*tmp*"))


def test_killed_two_rank_run_resumes_without_duplicates_and_matches_one_rank(world, one_rank, tmp_path):
    out = tmp_path / "scores2"
    cmd = torchrun(2, *score_cmd(world["run"], world["data"] / "candidates", out, *SCORE_SET))
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(cmd, env=env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    try:
        while not list((out / "_shards").glob("*.json")):
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.time() < deadline, "no shard completed in time"
            time.sleep(0.01)
    finally:
        kill_tree(proc.pid)  # torchrun, both ranks and their reader workers, at once
        proc.wait()
    done = {p.name.replace(".json", ".parquet"): json.loads(p.read_text())["sha256"]
            for p in (out / "_shards").glob("*.json")}
    assert 1 <= len(done) < 6 and not (out / "_manifest.json").exists()

    res = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((out / "_manifest.json").read_text())
    last = manifest["runs"][-1]
    assert last["world_size"] == 2 and last["skipped"] == sorted(done)
    assert sorted(last["skipped"] + last["scored"]) == [f"part-{i:05d}.parquet" for i in range(6)]
    for name, digest in done.items():  # completed shards were not rewritten
        assert json.loads((out / "_shards" / name.replace(".parquet", ".json")).read_text())["sha256"] == digest
    assert {r["rank"] for r in manifest["shards"]} == {0, 1}
    two, one = read_scores(out), read_scores(one_rank)
    keys = list(zip(two.column("request_id").to_pylist(), two.column("item_id").to_pylist()))
    assert len(keys) == len(set(keys)) == 1200  # no duplicates, nothing lost
    assert two.equals(one)  # 2 ranks (killed + resumed) == 1 rank, up to row order
    assert not list(out.glob(".part-*"))  # the killed run's temp files are gone


def test_a_rerun_with_another_fusion_is_refused_in_the_same_out_dir(world, one_rank):
    res = subprocess.run([sys.executable, *score_cmd(world["run"], world["data"] / "candidates", one_rank,
                                                     "--set", "score.fusion.w_sat=3.0")],
                         env=env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "holds scores of a different run" in res.stderr and "w_sat" in res.stderr


def test_a_request_spanning_two_shards_is_an_error_naming_it(world, tmp_path):
    src = pq.read_table(world["data"] / "candidates" / "part-00000.parquet")
    (tmp_path / "cands").mkdir()
    pq.write_table(src.slice(0, 110), tmp_path / "cands" / "part-00000.parquet")  # request 6005 split 10 | 10
    pq.write_table(src.slice(110), tmp_path / "cands" / "part-00001.parquet")
    rid = src.column("request_id")[110].as_py()
    res = subprocess.run([sys.executable, *score_cmd(world["run"], tmp_path / "cands", tmp_path / "out")], env=env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "requests span several shards" in res.stderr
    assert f"request {rid} in ['part-00000.parquet', 'part-00001.parquet']" in res.stderr


# ---------------------------------------------------------------------------------------------- training script
def _train(data: Path, run: Path) -> None:
    import dataclasses

    import torch

    from satrank.embeddings.sharding import shard_model
    from satrank.jobs.engine.checkpoint import save_checkpoint
    from satrank.jobs.config import load_config
    from satrank.jobs.engine.loop import synced_pairs
    from satrank.jobs.engine.runs import TEACHER_FILE, build_task, teacher_to_dict
    from satrank.jobs.engine.runtime import init_runtime, write_json_atomic
    from satrank.models.ranker.task import TeacherSpec
    from satrank.pipeline.reader import BatchLoader

    rt = init_runtime(seed=0, device="cpu")
    try:
        cfg = load_config(overrides=RUN_OVERRIDES)
        teacher = TeacherSpec(cfg.embeddings, cfg.pretrain.tower, cfg.satisfaction)
        dmp, opt = shard_model(build_task(cfg, teacher, seed=0), cfg.embeddings, rt, dense_lr=0.01)
        loader = BatchLoader(data / "train", cfg.data, dataclasses.replace(cfg.reader, shuffle=True))
        for step, (batch, _) in enumerate(synced_pairs(loader, rt.device, "stop")):
            loss, _ = dmp(batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if step + 1 == TRAIN_STEPS:
                break
        save_checkpoint(run, dmp, opt, extra={"job": "train", "trainer": {"step": TRAIN_STEPS}}, config=cfg)
        if rt.is_main:
            write_json_atomic(run / TEACHER_FILE, teacher_to_dict(teacher, None))
            write_json_atomic(run / "metrics.json", {"click_auc": 0.5, "job": "train"})
        del dmp, opt
    finally:
        rt.close()


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "train":
    _train(Path(sys.argv[2]), Path(sys.argv[3]))
    sys.exit(0)

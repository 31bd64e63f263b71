"""DCP checkpoints across world sizes (2 ranks -> 1 -> 2), their errors, table transfer, the
uneven-batches loop helper, and the run-output helpers (CLI, metrics files)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

ROOT = Path(__file__).resolve().parent.parent

from _synthetic import ToyModel, data_config, emb_config  # noqa: E402
from satrank.jobs.engine.checkpoint import CheckpointError, load_checkpoint, load_tables_into, read_meta  # noqa: E402

SCRIPT = str(ROOT / "tests" / "_dist_checkpoint.py")


def run(cmd, timeout=120):
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT]
    run(torchrun + ["save", str(d)])
    run([sys.executable, SCRIPT, "load1", str(d)])  # plain process: world of 1
    run(torchrun + ["load2", str(d)])
    return d


def read(out, name):
    return json.loads((out / name).read_text())


def plain_model(seed=11, **data_changes):
    """Unsharded CPU model (no process group) with its own seeded init."""
    torch.manual_seed(seed)
    model = ToyModel(data_config(**data_changes), emb_config())
    model.sparse_arch.materialize(seed)
    return model


# ------------------------------------------------------------------ N ranks -> M ranks


def test_two_rank_checkpoint_loads_on_one_rank_with_identical_weights(out):
    r = read(out, "load1.json")
    assert r["fresh_vs_saved"] > 0.1  # the 1-rank model started elsewhere ...
    assert r["loaded_vs_saved"] == 0.0  # ... and holds exactly the 2-rank weights after loading
    assert r["world_size"] == 2


def test_optimizer_state_is_restored_next_step_equals_the_two_rank_step(out):
    # fused rowwise-adagrad momentum + torch states resharded 2 -> 1: one identical step agrees;
    # with fresh optimizer state this differs by ~0.2
    assert read(out, "load1.json")["next_step_vs_2rank"] < 1e-5


def test_training_continues_after_load_on_a_repeated_batch(out):
    losses = read(out, "load1.json")["losses"]
    assert len(losses) == 6 and all(map(lambda x: x == x and abs(x) < 10, losses))
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.05


def test_one_rank_checkpoint_loads_on_two_ranks(out):
    r = read(out, "load2.json")
    assert r["loaded_vs_saved"] == 0.0
    assert r["extra"] == {"epoch": 2, "step": 9}
    assert all(x == x for x in r["losses"])


def test_checkpoint_stores_extra_per_rank_state_config_and_plan(out):
    r = read(out, "load1.json")
    assert r["extra"] == {"epoch": 1, "step": 3}
    assert r["rank_extra"] == [{"rank": 0, "file": "part-0", "row": 0}, {"rank": 1, "file": "part-1", "row": 10}]
    ckpt = out / "run2" / "checkpoint"
    assert sorted(p.name for p in (out / "run2").iterdir()) == ["checkpoint"]  # no tmp/old leftovers
    cfg = yaml.safe_load((ckpt / "config.yaml").read_text())
    assert cfg["embeddings"]["optimizer"]["type"] == "rowwise_adagrad" and "data" in cfg
    plan = json.loads((ckpt / "plan.json").read_text())
    assert plan["sparse_arch.ec"]["item"]["sharding_type"] == "row_wise"
    assert "row_wise" in (ckpt / "plan.txt").read_text()
    meta = read_meta(out / "run2")  # the run dir resolves to its checkpoint/
    assert meta["signature"]["tables"]["item"] == {"rows": 30, "dim": 8}


def test_load_into_plain_unsharded_model_without_process_group(out):
    model = plain_model()
    load_checkpoint(out / "run2", model)
    ref = torch.load(out / "full2.pt", weights_only=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, ref[key]), key


# ------------------------------------------------------------------ errors


def test_path_that_is_not_a_checkpoint_is_a_clear_error(out, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="is not a satrank checkpoint: expected meta.json"):
        load_checkpoint(tmp_path, plain_model())
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope", plain_model())


def test_checkpoint_for_a_different_feature_config_names_the_mismatch(out):
    model = plain_model(author_id=20)  # author vocabulary 12 -> 20
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(out / "run2", model)
    msg = str(err.value)
    assert "different feature config" in msg
    assert "sparse.author_id.rows: checkpoint 12 vs model 20" in msg
    assert "tables.author.rows: checkpoint 12 vs model 20" in msg
    assert "item" not in msg  # only the differing fields are listed


def test_model_with_parameters_the_checkpoint_lacks_is_a_clear_error(out):
    model = plain_model()
    model.extra_head = nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match="Missing key in checkpoint state_dict: model.extra_head.weight"):
        load_checkpoint(out / "run2", model)


def test_load_tables_into_another_model_matches_tables_by_name(out):
    class Wrapper(nn.Module):  # the tables live under another path than in the checkpoint
        def __init__(self):
            super().__init__()
            self.base = plain_model(seed=21)

    target = Wrapper()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    assert load_tables_into(out / "run2", target, tables=["item", "user"]) == ["item", "user"]
    ref = torch.load(out / "full2.pt", weights_only=True)
    after = target.state_dict()
    assert torch.equal(after["base.sparse_arch.ec.embeddings.item.weight"], ref["sparse_arch.ec.embeddings.item.weight"])
    assert torch.equal(after["base.sparse_arch.ebc.embedding_bags.user.weight"],
                       ref["sparse_arch.ebc.embedding_bags.user.weight"])
    for key in ("base.sparse_arch.ebc.embedding_bags.author.weight", "base.over.mlp.0.weight"):
        assert torch.equal(after[key], before[key]), key  # untouched


def test_load_tables_into_with_a_different_shape_is_an_error(out):
    with pytest.raises(CheckpointError, match=r"table 'author': checkpoint shape \(12, 8\) vs model shape \(20, 8\)"):
        load_tables_into(out / "run2", plain_model(author_id=20), tables=["author"])


# ------------------------------------------------------------------ uneven batches


def test_uneven_batches_do_not_deadlock_pad_steps_every_batch_once(out):
    r0, r1 = read(out, "loop.json")
    assert r0["pad"]["seen"] == [True, True, True] and r1["pad"]["seen"] == [True, False, False]
    assert r0["pad"]["stats"]["steps"] == r1["pad"]["stats"]["steps"] == 3
    assert (r0["pad"]["stats"]["rows"], r1["pad"]["stats"]["rows"]) == (12, 4)  # every row once
    assert r1["pad"]["stats"]["padding_steps"] == 2


def test_uneven_batches_stop_policy_counts_what_it_did_not_step(out):
    r0, r1 = read(out, "loop.json")
    assert r0["stop"]["seen"] == r1["stop"]["seen"] == [True]
    assert (r0["stop"]["stats"]["dropped_batches"], r0["stop"]["stats"]["dropped_rows"]) == (2, 8)
    assert r1["stop"]["stats"]["dropped_batches"] == 0


# ------------------------------------------------------------------ run outputs


def test_cli_loads_config_with_overrides_and_rejects_bad_keys(tmp_path, capsys):
    from satrank.jobs.engine.cli import build_parser, parse

    parser = build_parser("satrank-x", "test job")
    args, cfg = parse(parser, ["--data", str(tmp_path), "--out", str(tmp_path / "run"),
                               "--set", "embeddings.optimizer.lr=0.2", "--set", "embeddings.tables.user.dim=16"])
    assert cfg.embeddings.optimizer.lr == 0.2 and cfg.embeddings.table_dim("user") == 16
    assert args.out == tmp_path / "run"
    with pytest.raises(SystemExit):
        parse(parser, ["--data", str(tmp_path), "--out", "o", "--set", "embeddings.optimizer.lrr=1"])
    assert "unknown key 'lrr'" in capsys.readouterr().err


def test_metrics_writer_appends_jsonl_and_writes_final_json_on_rank0_only(tmp_path):
    from satrank.jobs.engine.runtime import MetricsWriter

    with MetricsWriter(tmp_path / "a", rank=0) as w:
        w.log({"step": 1, "loss": 0.5})
        w.log({"step": 2, "loss": torch.tensor(0.25)})
        w.write_final({"auc": 0.75})
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]
    assert json.loads((tmp_path / "a" / "metrics.json").read_text()) == {"auc": 0.75}
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["metrics.json", "metrics.jsonl"]  # no temp files
    with MetricsWriter(tmp_path / "b", rank=1) as w:
        w.log({"step": 1})
        assert w.write_final({"x": 1}) is None
    assert not (tmp_path / "b").exists()

"""The whole config is checked at parse time by every job (satrank.jobs.config_checks, issue 17 / issue 20's last
item), and a refused job writes nothing: every stage's model builds (meta device), every `<stage>_train.monitor`
is a metric of its job, attention heads divide their table's dim, satrank.jobs.dpo's own model (RUN_MAIN's config
with this `easq:`) builds; a refusal is one line naming the key, exit 2, no traceback, nothing in --out. A refused
`--resume` (another feature config, another world size, another --propensity) leaves config.yaml and plan.json
byte-identical with their mtimes.

Jobs refuse before their process group exists: no torchrun is needed. The unknown stage-2 monitor runs the real
command line (`python -m`), the other refusals call the job's `main(argv)` in this process (the same code path, ~10 s
less each). The runs they are pointed at are made here: genuine DCP metadata and meta.json as save_checkpoint
writes them."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional, Tuple

import pytest
import torch
import torch.distributed.checkpoint as dcp

from satrank.jobs.config import DEFAULT_CONFIG, load_config
from satrank.jobs.config_checks import check_config, check_easq_run, ranker_metric_names
from satrank.pipeline.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RANKER_METRICS = ("['batches', 'click_auc', 'click_gauc', 'click_gauc_groups', 'click_gauc_skipped', "
                          "'eval_s', 'impression_rows', 'loss', 'loss_click', 'loss_satisfaction', 'loss_watch_time', "
                          "'padding_steps', 'rows', 'sat_answered_rows', 'sat_auc_answered', 'watch_time_mae', "
                          "'watch_time_xauc']")


def job(module: str, *args) -> Tuple[int, str]:
    """`python -m satrank.jobs.<module> args`: (exit status, stderr)."""
    proc = subprocess.run([sys.executable, "-m", f"satrank.jobs.{module}", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr


def main_of(module: str, capsys, *args) -> Tuple[int, str]:
    """satrank.jobs.<module>.main(args) in this process: (exit status, stderr)."""
    main = importlib.import_module(f"satrank.jobs.{module}").main
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse's exit (cli.parse)
        code = exc.code
    return code, capsys.readouterr().err


def refused(result: Tuple[int, str], code: int = 2) -> str:
    """The one stderr line of a refused job (no traceback, nothing else on stderr)."""
    status, err = result
    assert status == code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------------------ in-process
def test_the_shipped_configs_and_the_click_only_ablation_pass_and_leave_the_rng_alone():
    state = torch.random.get_rng_state()
    for cfg in (load_config(), load_config(DEFAULT_CONFIG.parent / "sim_alt.yaml"),
                load_config(overrides=["model.variant=click_only"]),  # distill_weight 1 is dpo's rule, not this one
                load_config(overrides=["model.mlse=false", "model.mtl=false", "model.skip_head=true"])):
        check_config(cfg)
    assert torch.equal(torch.random.get_rng_state(), state)  # built under fork_rng: the job's seeding is its own


@pytest.mark.parametrize("overrides, message", [
    (["ranker_train.monitor=click_aucc"],
     f"ranker_train.monitor: 'click_aucc' is not a metric of satrank.jobs.train; choose from {DEFAULT_RANKER_METRICS}"),
    (["ranker_train.monitor=skip_auc"], "ranker_train.monitor: 'skip_auc' is not a metric of satrank.jobs.train"),
    (["train.monitor=click_auc", "ranker_train.monitor=null"],  # inherited by pretrain first: named there
     "pretrain_train.monitor: 'click_auc' is not a metric of satrank.jobs.pretrain; choose from ["),
    (["satisfaction_train.monitor=auc_nope"], "satisfaction_train.monitor: 'auc_nope' is not a metric of "
                                              "satrank.jobs.satisfaction"),
    (["propensity_train.monitor=auc_answered"], "propensity_train.monitor: 'auc_answered' is not a metric"),
    (["dpo_train.monitor=loss"], "dpo_train.monitor: 'loss' is never used: satrank.jobs.dpo streams each shard once "
                                 "and keeps its last weights (it selects no checkpoint); set it to null"),
    (["pretrain.tower.history=hist_nope"], "pretrain.tower.history: ['hist_nope'] are not sequence features of data:"),
    (["propensity.dense=[nope]"], "propensity.dense: "),
    (["model.user_features=[nope]"], "model (satrank.jobs.train): the model cannot be built from this config: "
                                     "model.user_features: ['nope'] are not single-valued features of data.sparse"),
    (["model.extra_heads=[{name: liked, label: liked}]"],
     "model (satrank.jobs.train): the model cannot be built from this config: model.extra_heads.liked.label: "
     "'liked' is not a label column the reader loads; list it in data.labels.extra (now [])"),
    (["easq.dpo_head=skip"], "easq (satrank.jobs.dpo): the model cannot be built from this config: easq.dpo_head: "
                             "'skip' is not a head of this ranker ['click', 'satisfaction', 'watch_time']"),
    (["easq.id_targets=[hist_click]"], "easq (satrank.jobs.dpo): the model cannot be built from this config: "
                                       "easq.id_targets: 'hist_click' is neither a user feature"),
    (["model.transformer_heads=3"], "model.transformer_heads: 3 must divide the embedding dim 32 of table 'item' "
                                    "(embeddings.tables.item.dim / embeddings.dim)"),
])
def test_a_section_that_cannot_run_is_refused_naming_its_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        check_config(load_config(overrides=overrides))  # heads: already refused by load_config itself
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_the_stage2_monitors_follow_the_heads_the_model_has():
    skip = ranker_metric_names(load_config(overrides=["model.skip_head=true"]))
    assert {"skip_auc", "loss_skip"} <= skip
    check_config(load_config(overrides=["model.skip_head=true", "ranker_train.monitor=skip_auc"]))
    click_only = ranker_metric_names(load_config(overrides=["model.variant=click_only"]))
    assert "loss_satisfaction" not in click_only and "loss_watch_time" not in click_only
    assert {"click_auc", "sat_auc_answered", "loss"} <= click_only


def test_dpo_checks_its_own_model_rebuilt_from_the_init_run():
    from satrank.jobs.config_checks import config_teacher

    click_only = load_config(overrides=["model.variant=click_only"])
    with pytest.raises(ConfigError, match=r"^easq\.distill_weight 1\.0 distils g's pseudo-labels, but --init RUN_MAIN "
                                          r"has no satisfaction teacher \(model\.mtl false or variant click_only\); "
                                          r"set easq\.distill_weight=0$"):
        check_easq_run(click_only, None, "RUN_MAIN")
    no_distill = load_config(overrides=["model.variant=click_only", "easq.distill_weight=0"])
    with pytest.raises(ConfigError, match=r"^easq\.reward_pairs teacher orders the online pairs by g, but --init RUN_MAIN "
                                          r"has no satisfaction teacher .*; set easq\.reward_pairs=sat_head \(the "
                                          r"pathway's own head\) or none$"):
        check_easq_run(no_distill, None, "RUN_MAIN")
    check_easq_run(load_config(overrides=["model.variant=click_only", "easq.distill_weight=0",
                                          "easq.reward_pairs=sat_head"]), None, "RUN_MAIN")
    no_skip = load_config(overrides=["easq.dpo_head=skip", "model.skip_head=true"])
    check_config(no_skip)
    no_skip.model.skip_head = False  # RUN_MAIN trained without the head this run's easq.dpo_head names
    with pytest.raises(ConfigError, match=r"^easq \(on the ranker of --init R\): the model cannot be built from this "
                                          r"config: easq\.dpo_head: 'skip' is not a head"):
        check_easq_run(no_skip, config_teacher(no_skip), "R")


def test_an_out_under_a_file_is_refused_before_anything_is_written(tmp_path):
    from satrank.jobs.engine.run_dir import RunDirError, claim_run_dir

    (tmp_path / "f").write_text("x")
    with pytest.raises(RunDirError, match=rf"^--out {tmp_path}/f/run: {tmp_path}/f is not a directory$"):
        claim_run_dir(tmp_path / "f" / "run", "train")


# ------------------------------------------------------------------------------------------ the command line
@pytest.mark.parametrize("module, args", [("train", ["--satisfaction", "nope"]), ("check_data", [])])
def test_an_unknown_stage2_monitor_is_refused_at_parse_and_nothing_is_written(tmp_path, module, args):
    out = tmp_path / "run"
    line = refused(job(module, "--data", tmp_path, "--out", out, *args, "--set", "ranker_train.monitor=click_aucc"))
    prog = {"train": "satrank train", "check_data": "satrank check-data"}[module]
    assert line == (f"{prog}: error: ranker_train.monitor: 'click_aucc' is not a metric of satrank.jobs.train; "
                    f"choose from {DEFAULT_RANKER_METRICS}")
    assert not out.exists()


@pytest.mark.parametrize("module, setting, message", [
    ("train", "model.transformer_heads=3", "model.transformer_heads: 3 must divide the embedding dim 32 of table "
                                           "'item' (embeddings.tables.item.dim / embeddings.dim)"),
    ("dpo", "dpo_train.monitor=auc", "dpo_train.monitor: 'auc' is never used"),
    ("check_data", "easq.dpo_head=skip", "easq (satrank.jobs.dpo): the model cannot be built from this config: "
                                         "easq.dpo_head: 'skip' is not a head of this ranker"),
])
def test_heads_and_stage3_sections_are_refused_at_parse(tmp_path, capsys, module, setting, message):
    out = tmp_path / "run"
    extra = ["--init", tmp_path] if module == "dpo" else []
    line = refused(main_of(module, capsys, "--data", tmp_path, "--out", out, *extra, "--set", setting))
    assert message in line and ": error: " in line, line
    assert not out.exists()


# ------------------------------------------------------------------------------------------ refused runs write nothing
def fake_checkpoint(run: Path, job_name: str, cfg, *, world_size: int = 1, extra: Optional[Dict] = None) -> Path:
    """RUN/checkpoint as save_checkpoint lays it out (genuine DCP metadata, meta.json with the fingerprint of
    `cfg`'s features, config.yaml) plus RUN's own config.yaml, plan.json and metrics.jsonl."""
    from satrank.embeddings.tables import feature_signature
    from satrank.jobs.engine.checkpoint import FORMAT, fingerprint
    from satrank.pipeline import config as cfgio

    ckpt = run / "checkpoint"
    dcp.save({"w": torch.zeros(2)}, storage_writer=dcp.FileSystemWriter(str(ckpt / "state")), no_dist=True)
    signature = feature_signature(cfg.data, cfg.embeddings)
    meta = {"format": FORMAT, "fingerprint": fingerprint(signature), "signature": signature, "world_size": world_size,
            "extra": {"job": job_name, **(extra or {})}, "rank_extra": [None] * world_size, "has_optimizer": True}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    for where in (ckpt, run):
        (where / "config.yaml").write_text(cfgio.dump(cfg))
    (run / "plan.json").write_text(json.dumps({"plan": "as written by the first run"}))
    (run / "metrics.jsonl").write_text('{"event": "train_epoch"}\n')
    return run


def snapshot(run: Path) -> Dict[str, Tuple[bytes, int]]:
    return {str(p.relative_to(run)): (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}


def test_a_resume_refused_for_another_feature_config_leaves_the_run_untouched(tmp_path, capsys):
    run = fake_checkpoint(tmp_path / "run", "pretrain", load_config())
    before = snapshot(run)
    line = refused(main_of("pretrain", capsys, "--data", tmp_path, "--out", run, "--resume", run,
                       "--set", "embeddings.tables.user.dim=16"), code=1)
    assert line.startswith(f"satrank pretrain: error: --resume: checkpoint '{run}/checkpoint' was written for a "
                           f"different feature config (data:/embeddings: fingerprint): "), line
    assert "tables.user.dim: checkpoint 32 vs model 16" in line
    assert snapshot(run) == before  # config.yaml, plan.json, metrics.jsonl: same bytes, same mtimes


def test_a_resume_of_another_jobs_checkpoint_is_refused_before_any_write(tmp_path, capsys):
    old = fake_checkpoint(tmp_path / "old", "propensity", load_config())
    out = tmp_path / "new"
    line = refused(main_of("pretrain", capsys, "--data", tmp_path, "--out", out, "--resume", old), code=1)
    assert line == (f"satrank pretrain: error: --resume: checkpoint '{old}/checkpoint' was written by job "
                    f"'propensity', expected a satrank.jobs.pretrain run")
    assert not out.exists()


@pytest.mark.parametrize("world_size, propensity, message", [
    (2, None, "checkpoint was written by 2 ranks; resume with as many (got 1)"),
    (1, "RUN_P", "checkpoint was trained with --propensity RUN_P; resume with the same (got None)"),
])
def test_a_dpo_run_refused_to_continue_in_place_leaves_it_untouched(tmp_path, capsys, world_size, propensity,
                                                                     message):
    from satrank.jobs.config_checks import config_teacher
    from satrank.jobs.engine.runs import teacher_to_dict

    (tmp_path / "data" / "train").mkdir(parents=True)
    main_cfg = load_config()
    run_main = fake_checkpoint(tmp_path / "main", "train", main_cfg)
    (run_main / "teacher.json").write_text(json.dumps(teacher_to_dict(config_teacher(main_cfg), "RUN_S")))  # g's spec
    out = fake_checkpoint(tmp_path / "dpo", "dpo", main_cfg, world_size=world_size,
                          extra={"propensity": propensity, "step": 3})
    before = snapshot(out)
    line = refused(main_of("dpo", capsys, "--data", tmp_path / "data", "--init", run_main, "--out", out), code=1)
    assert line == f"satrank dpo: error: {out}/{message}", line
    assert snapshot(out) == before


def test_dpo_refuses_an_easq_section_the_init_run_cannot_take_before_writing(tmp_path, capsys):
    (tmp_path / "data" / "train").mkdir(parents=True)
    run_main = fake_checkpoint(tmp_path / "main", "train", load_config(overrides=["model.variant=click_only"]))
    out = tmp_path / "dpo"
    line = refused(main_of("dpo", capsys, "--data", tmp_path / "data", "--init", run_main, "--out", out))
    assert line == (f"satrank dpo: error: easq.distill_weight 1.0 distils g's pseudo-labels, but --init {run_main} has "
                    f"no satisfaction teacher (model.mtl false or variant click_only); set easq.distill_weight=0")
    assert not out.exists()


def test_dpo_refuses_a_set_on_the_init_rankers_sections_that_it_would_ignore(tmp_path, capsys):
    """jobs.dpo builds RUN_MAIN's ranker from its checkpoint: a --set on model:/loss:/data:/embeddings: that differs
    from RUN_MAIN is refused in one line before anything is written (it was silently ignored); the same value passes."""
    from satrank.jobs.config_checks import check_easq_overrides, config_teacher
    from satrank.jobs.engine.runs import teacher_to_dict

    (tmp_path / "data" / "train").mkdir(parents=True)
    run_main = fake_checkpoint(tmp_path / "main", "train", load_config())
    (run_main / "teacher.json").write_text(json.dumps(teacher_to_dict(config_teacher(load_config()), "RUN_S")))
    out = tmp_path / "dpo"
    line = refused(main_of("dpo", capsys, "--data", tmp_path / "data", "--init", run_main, "--out", out,
                           "--set", "model.served_satisfaction=tower"))
    assert line == (f"satrank dpo: error: --set model.served_satisfaction='tower': satrank.jobs.dpo builds the ranker "
                    f"of --init {run_main} as it was trained (model.served_satisfaction: 'teacher' there); only "
                    f"reader.*, easq.*, train.*, dpo_train.* and evaluate.* apply to this job: train a stage-2 run with "
                    f"that setting and pass it as --init"), line
    assert not out.exists()
    main_cfg = load_config(overrides=["model.sid=false"])
    same = ["model.sid=false", "simulate.seed=3", "easq.beta=0.5", "embeddings.tables.item.sharding=row_wise",
            "data.sparse.user_id.vocab_size=20000", "data.sparse.0.vocab_size=20000"]
    cli = load_config(overrides=same)
    check_easq_overrides(same, cli, main_cfg, "RUN_MAIN")  # equal to RUN_MAIN's, or not RUN_MAIN's sections: pass
    with pytest.raises(ConfigError, match=r"^--set loss\.watch_time_weight=2\.0: .* \(loss\.watch_time_weight: 0\.1 there\)"):
        check_easq_overrides(["loss.watch_time_weight=2"], load_config(overrides=["loss.watch_time_weight=2"]),
                             main_cfg, "RUN_MAIN")


def fake_pretrain_run(run: Path, cfg) -> Path:
    """A satrank.jobs.pretrain run of `cfg` whose DCP state holds every ClickModel tensor (zeros, the model's
    shapes): enough for the key and shape checks of satrank.jobs.satisfaction's --init."""
    from satrank.jobs.config_checks import build_on_meta
    from satrank.models.stage1.tasks import ClickModel

    fake_checkpoint(run, "pretrain", cfg)
    model = build_on_meta("pretrain", lambda: ClickModel(cfg.data, cfg.embeddings, cfg.pretrain.tower))
    state = {f"model.{k}": torch.zeros(v.shape) for k, v in model.state_dict().items() if torch.is_tensor(v)}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(run / "checkpoint" / "state"), overwrite=True),
             no_dist=True)
    return run


def test_satisfaction_refuses_an_init_run_with_another_tower_before_writing(tmp_path, capsys):
    from satrank.jobs.config_checks import build_on_meta
    from satrank.jobs.engine.checkpoint import check_prefixed
    from satrank.jobs.satisfaction import init_map
    from satrank.models.stage1.tasks import SatisfactionModel

    cfg = load_config(overrides=["satisfaction.loss=naive"])
    same = fake_pretrain_run(tmp_path / "same", cfg)
    g = build_on_meta("satisfaction", lambda: SatisfactionModel(cfg.data, cfg.embeddings, cfg.pretrain.tower,
                                                                cfg.satisfaction, cfg.propensity))
    check_prefixed(same, g, init_map(cfg.satisfaction), cfg.data, cfg.embeddings, what="--init")  # fits: passes
    narrow = fake_pretrain_run(tmp_path / "narrow", load_config(overrides=["pretrain.tower.dim=16"]))
    out = tmp_path / "run"
    line = refused(main_of("satisfaction", capsys, "--data", tmp_path, "--init", narrow, "--out", out,
                           "--set", "satisfaction.loss=naive"), code=1)
    assert line.startswith(f"satrank satisfaction: error: --init: arch.tower.") and " has shape (16, " in line, line
    assert f"in '{narrow}/checkpoint' but the model's arch.tower." in line and "(different model config?)" in line
    assert not out.exists()


def test_a_ranker_resume_with_another_satisfaction_model_is_refused_before_writing(tmp_path, capsys):
    from satrank.jobs.config_checks import config_teacher
    from satrank.jobs.engine.runs import check_resumed_teacher, teacher_to_dict

    for split in ("train", "valid", "test"):
        (tmp_path / "data" / split).mkdir(parents=True)
    cfg = load_config()
    run_s = fake_checkpoint(tmp_path / "sat", "satisfaction", cfg)
    other_s = fake_checkpoint(tmp_path / "sat16", "satisfaction", load_config(overrides=["pretrain.tower.dim=16"]))
    run = fake_checkpoint(tmp_path / "run", "train", cfg)
    (run / "teacher.json").write_text(json.dumps(teacher_to_dict(config_teacher(cfg), f"{run_s}/checkpoint")))
    check_resumed_teacher(run, config_teacher(cfg), run_s)  # the same g from elsewhere: accepted
    before = snapshot(run)
    line = refused(main_of("train", capsys, "--data", tmp_path / "data", "--satisfaction", other_s, "--resume", run,
                           "--out", run), code=1)
    assert line == (f"satrank train: error: --resume {run}: trained with g from {run_s}/checkpoint "
                    f"({run}/teacher.json), this run has g from {other_s} (another satisfaction model or model: "
                    f"section); resume with the ones it was trained with")
    assert snapshot(run) == before  # teacher.json, config.yaml, plan.json untouched

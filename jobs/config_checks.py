"""Every cross-field rule of the whole config, checked at parse time (satrank.jobs.engine.cli.parse) by every job
that loads it, so a config that cannot run is refused in one line naming the key before any process group
exists and before anything is written to --out, not an epoch (or a stage) later by the job that meets it.

`check_config(cfg)` (ConfigError naming the key path):
- `check_transformer_heads`: every attention encoder's heads divide its table's embedding dim (also run by
  satrank.jobs.config.SatrankConfig.validate, so every loaded config obeys it);
- `check_models`: the models of every stage build from the config on the meta device (no memory): the three
  stage-1 models (`pretrain:`, `propensity:`, `satisfaction:`), the stage-2 ranker (`model:`, `loss:`, with the
  satisfaction model g this config's stage 1 trains) and the stage-3 EASQ pieces (`easq:` on that ranker);
- `check_monitors`: every `<stage>_train.monitor` is a metric its job's evaluator reports (stage 1, and the
  stage-2 RankerEvaluator for `ranker_train`); `dpo_train.monitor` must stay null: satrank.jobs.dpo streams each
  shard once and keeps its last weights, it selects on nothing.
`check_easq_run(cfg, teacher, init)`: satrank.jobs.dpo's own model (RUN_MAIN's config with this config's `easq:`)
builds, and `easq.distill_weight` > 0 has the teacher g to distil (not part of `check_config`: a click-only
ablation of stage 2 is a valid use of a config whose `easq:` distils g).
`check_easq_overrides(overrides, cli, run_cfg, init)`: a satrank.jobs.dpo `--set` on a section that RUN_MAIN's
checkpoint supplies (`data:`, `embeddings:`, `model:`, `loss:`) must agree with RUN_MAIN, since the job would
otherwise ignore it silently.
`build_on_meta(what, build)`: a model built on the meta device (no memory, global RNG untouched), its build error
as one ConfigError; satrank.jobs.satisfaction checks its --init / --propensity runs' keys and shapes against one.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable, Dict, Iterable, Set

from satrank.pipeline.config import ConfigError

TRAINER_KEYS = ("loss", "rows", "batches", "padding_steps", "eval_s")  # Trainer.evaluate's own scalar keys


def check_config(cfg: Any) -> None:
    """ConfigError (one line, naming the key path) for any section of `cfg` that cannot run (module doc)."""
    check_transformer_heads(cfg)
    check_models(cfg)
    check_monitors(cfg)


# ------------------------------------------------------------------------------------------ cross-section values
def check_transformer_heads(cfg: Any) -> None:
    """Heads of the stage-2 history encoders (`model.transformer_heads`) and of the stage-1 tower's Transformer
    (`pretrain.tower.transformer_heads`, when it has one) must divide the embedding dim of the table they read."""
    tower = cfg.pretrain.tower
    for key, heads, feature, used in (
            ("model.transformer_heads", cfg.model.transformer_heads, cfg.model.item_feature, True),
            ("pretrain.tower.transformer_heads", tower.transformer_heads, tower.history,
             tower.history is not None and tower.history_encoder == "transformer")):
        if not used:
            continue
        try:
            table = cfg.data.feature(feature).table_name
        except (KeyError, AttributeError):
            continue  # an unknown feature name is reported by the model's own check, naming its key
        dim = cfg.embeddings.table_dim(table)
        if heads <= 0 or dim % heads:
            raise ConfigError(f"{key}: {heads} must divide the embedding dim {dim} of table {table!r} "
                              f"(embeddings.tables.{table}.dim / embeddings.dim)")


# ------------------------------------------------------------------------------------------ models
def build_on_meta(what: str, build: Callable[[], Any]) -> Any:
    """`build()` on the meta device with the global RNG untouched; its ValueError / KeyError as one ConfigError."""
    import torch

    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            return build()
    except ConfigError:
        raise
    except (ValueError, KeyError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        raise ConfigError(f"{what}: the model cannot be built from this config: {' '.join(str(msg).split())}") \
            from None


def config_teacher(cfg: Any):
    """The satisfaction model g a stage-1 run of `cfg` trains (TeacherSpec), None when `cfg.model` needs none."""
    from satrank.models.ranker.task import TeacherSpec, needs_teacher

    return TeacherSpec(cfg.embeddings, cfg.pretrain.tower, cfg.satisfaction) if needs_teacher(cfg.model) else None


def check_models(cfg: Any) -> None:
    """Every stage's model builds from `cfg` (meta device): stage 1, the stage-2 ranker, the stage-3 EASQ task."""
    from satrank.models.ranker.task import RankerTask
    from satrank.models.stage1.tasks import ClickModel, PropensityModel, SatisfactionModel

    p = cfg.pretrain
    build_on_meta("pretrain", lambda: ClickModel(cfg.data, cfg.embeddings, p.tower,
                                                 watch_time_weight=p.watch_time_weight, watch_time_rows=p.watch_time_rows,
                                                 watch_time_target=p.watch_time_target,
                                                 duration_feature=p.duration_feature))
    build_on_meta("propensity", lambda: PropensityModel(cfg.data, cfg.embeddings, cfg.propensity))
    build_on_meta("satisfaction", lambda: SatisfactionModel(cfg.data, cfg.embeddings, p.tower, cfg.satisfaction,
                                                            cfg.propensity))
    teacher = config_teacher(cfg)
    build_on_meta("model (satrank.jobs.train)",
                  lambda: RankerTask(cfg.data, cfg.embeddings, cfg.model, cfg.loss, teacher))
    _build_easq(cfg, teacher, "easq (satrank.jobs.dpo)")


def _build_easq(cfg: Any, teacher: Any, what: str) -> Any:
    from satrank.models.easq.task import EasqTask
    from satrank.models.ranker.task import RankerTask

    return build_on_meta(what, lambda: EasqTask(RankerTask(cfg.data, cfg.embeddings, cfg.model, cfg.loss, teacher),
                                         cfg.easq))


def check_easq_run(cfg: Any, teacher: Any, init: str) -> None:
    """satrank.jobs.dpo's model: `cfg` is RUN_MAIN's config with this run's `easq:` (easq_run.easq_run_config),
    `teacher` RUN_MAIN's g (None without one); `init` names RUN_MAIN in the message."""
    if cfg.easq.distill_weight > 0 and not cfg.model.use_satisfaction:
        raise ConfigError(f"easq.distill_weight {cfg.easq.distill_weight} distils g's pseudo-labels, but --init "
                          f"{init} has no satisfaction teacher (model.mtl false or variant click_only); "
                          f"set easq.distill_weight=0")
    if cfg.easq.reward_pairs == "teacher" and not cfg.model.use_satisfaction:
        raise ConfigError(f"easq.reward_pairs teacher orders the online pairs by g, but --init {init} has no "
                          f"satisfaction teacher (model.mtl false or variant click_only); set easq.reward_pairs=sat_head "
                          f"(the pathway's own head) or none")
    _build_easq(cfg, teacher, f"easq (on the ranker of --init {init})")


RUN_MAIN_SECTIONS = ("data", "embeddings", "model", "loss")  # satrank.jobs.dpo builds these as RUN_MAIN trained them


def _value_at(cfg: Any, path: str) -> Any:
    """The config value at a dotted key path (attributes of dataclasses, keys of mappings, list items by position
    or by their `name`, as --set addresses them: data.sparse.user_id.vocab_size); KeyError if absent."""
    node = cfg
    for part in path.split("."):
        if isinstance(node, dict):
            node = node[part]
        elif isinstance(node, (list, tuple)):
            if part.isdigit() and int(part) < len(node):  # by position first, as pipeline.config._list_index
                named = [node[int(part)]]
            else:
                named = [x for x in node if (x.get("name") if isinstance(x, dict) else getattr(x, "name", None)) == part]
            if not named:
                raise KeyError(path)
            node = named[0]
        elif hasattr(node, part):
            node = getattr(node, part)
        else:
            raise KeyError(path)
    return node


def _value_or_absent(cfg: Any, path: str) -> Any:
    try:
        return _value_at(cfg, path)
    except KeyError:
        return "<absent>"


def check_easq_overrides(overrides: Iterable[str], cli: Any, run_cfg: Any, init: str) -> None:
    """ConfigError for a `--set` of satrank.jobs.dpo on RUN_MAIN's sections (RUN_MAIN_SECTIONS) whose value differs
    from RUN_MAIN's: the job builds RUN_MAIN's ranker from its checkpoint's config, so such a --set would be ignored.
    The same value passes (a demo or bench hands every stage the same --set)."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key.split(".", 1)[0] not in RUN_MAIN_SECTIONS:
            continue
        mine, theirs = (_value_or_absent(c, key) for c in (cli, run_cfg))
        if mine != theirs:
            raise ConfigError(
                f"--set {key}={mine!r}: satrank.jobs.dpo builds the ranker of --init {init} as it was trained "
                f"({key}: {theirs!r} there); only reader.*, easq.*, train.*, dpo_train.* and evaluate.* apply to "
                f"this job: train a stage-2 run with that setting and pass it as --init")


# ------------------------------------------------------------------------------------------ monitors
def _scalars(metrics: Dict[str, Any]) -> Set[str]:
    return {*TRAINER_KEYS, *(k for k, v in metrics.items() if not isinstance(v, (dict, list)))}


def stage1_metric_names(evaluator: Any) -> Set[str]:
    """Every metric an evaluation with this stage-1 evaluator reports (Trainer.evaluate's own keys too): its
    metrics on four made-up rows with both label classes."""
    import torch

    n = 4
    half, both = torch.full((n,), 0.5), torch.tensor([0.0, 1.0, 0.0, 1.0])
    cols = {"pred": half, "label": both, "truth": half, "sat_prob": half, "answered": torch.ones(n), "satisfied": both,
            "true_p": half, "propensity": half, "id_user_id": torch.arange(n)}
    return _scalars(evaluator.metrics(cols, {}))


def ranker_metric_names(cfg: Any) -> Set[str]:
    """Every metric satrank.jobs.train's validation reports (RankerEvaluator of `cfg.model` / `cfg.loss`): its
    metrics on the columns of four made-up rows carrying every head's output and label."""
    import torch

    from satrank.models.metrics.ranker_eval import PSEUDO_KEY, RankerEvaluator

    n = 4
    half, both = torch.full((n,), 0.5), torch.tensor([0.0, 1.0, 0.0, 1.0])
    evaluator = RankerEvaluator(cfg.loss, cfg.model)
    labels = {k: both for k in ("click", "questionnaire_answered", "satisfied", "watch_time_s",
                                *(s.label for s in evaluator.heads if s.label))}
    out = {s.name: half for s in evaluator.heads}
    if "satisfaction" in out:
        out[PSEUDO_KEY] = half  # the tower learns g's pseudo-labels (a ranker with a satisfaction tower has g)
    rows = SimpleNamespace(labels=labels, ids={"user_id": torch.tensor([0, 0, 1, 1])})
    return _scalars(evaluator.metrics(evaluator.columns(rows, out), {}))


def _check_monitor(cfg: Any, stage: str, known: Iterable[str]) -> None:
    from satrank.jobs.engine.readers import stage_train_config

    monitor, known = stage_train_config(cfg, stage).monitor, sorted(known)
    if monitor not in known:
        job = "train" if stage == "ranker" else stage
        raise ConfigError(f"{stage}_train.monitor: {monitor!r} is not a metric of satrank.jobs.{job}; "
                          f"choose from {known}")


def check_monitors(cfg: Any) -> None:
    """Each `<stage>_train.monitor` (with `train.monitor` inherited) is a metric of its job's evaluator."""
    from satrank.jobs.stage1_checks import stage1_evaluator

    for stage in ("pretrain", "propensity", "satisfaction"):
        _check_monitor(cfg, stage, stage1_metric_names(stage1_evaluator(stage, cfg)))
    _check_monitor(cfg, "ranker", ranker_metric_names(cfg))
    if cfg.dpo_train.monitor is not None:
        raise ConfigError(f"dpo_train.monitor: {cfg.dpo_train.monitor!r} is never used: satrank.jobs.dpo streams "
                          f"each shard once and keeps its last weights (it selects no checkpoint); set it to null")

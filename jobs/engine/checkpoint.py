"""Checkpoints: torch.distributed.checkpoint (DCP) of a DMP model + CombinedOptimizer, with metadata.

Layout of RUN/checkpoint/ (published atomically: written to RUN/checkpoint.tmp-<token>/, then
rank 0 renames it into place after a barrier; the previous checkpoint is removed afterwards):
  state/        DCP files: {"model": model.state_dict(), "optim": optimizer.state_dict()}
  meta.json     format, feature fingerprint + signature, world size, extra / rank_extra, versions
  config.yaml   the resolved run config (satrank.pipeline.config.dump), when given
  plan.json/txt the sharding plan, when the model is a DistributedModelParallel

DCP stores every shard with its global offsets, so a checkpoint written by N ranks loads on M
ranks (any sharding plan), or into a plain unsharded model without a process group. The fused
(FBGEMM) optimizer state is part of CombinedOptimizer.state_dict() and reshards the same way.
Optimizer param_groups (learning rates) are not stored (TorchRec's KeyedOptimizer default):
schedules must derive the lr from the restored step.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch import nn

from satrank.embeddings.config import EmbeddingConfig
from satrank.embeddings.sharding import find_sparse_archs, plan_summary, plan_to_dict
from satrank.embeddings.tables import TABLE_KEY, feature_signature
from satrank.jobs.engine.collectives import all_gather_objects, broadcast_object, rank, world_size
from satrank.jobs.engine.runtime import write_json_atomic, write_text_atomic
from satrank.jobs.engine.trusted_dcp import CheckpointTrustError, TrustedReader, read_state_metadata
from satrank.pipeline import config as cfgio

# TorchRec keeps sharded tables as ShardedTensor, and torch's own DCP planners (default_planner,
# planner_helpers) touch them through the ShardedTensor API that torch 2.13 deprecates; only torch/TorchRec
# can change that, so exactly that message from exactly those modules is filtered.
warnings.filterwarnings("ignore", message=r"Please use DTensor instead and we are deprecating ShardedTensor",
                        category=FutureWarning, module=r"torch\.distributed\.checkpoint\.(default_planner|planner_helpers)")


def _shape(value: torch.Tensor) -> tuple:
    """Global shape of a plain tensor or a ShardedTensor (whose .size() warns: deprecated)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    return tuple(value.metadata().size if isinstance(value, ShardedTensor) else value.size())


FORMAT = "satrank-checkpoint/1"
STATE_DIR = "state"


class CheckpointError(ValueError):
    """Not a checkpoint, or incompatible with the model it is loaded into; the message says why."""


def _signature(model: nn.Module, data=None, emb=None, config=None) -> Dict[str, Any]:
    if data is None:
        archs = find_sparse_archs(model)
        if archs:
            data, emb = archs[0][1].data, archs[0][1].emb
        elif config is not None and hasattr(config, "data"):
            data, emb = config.data, getattr(config, "embeddings", None)
        else:
            raise CheckpointError("cannot fingerprint the features: the model has no SparseArch; pass data=")
    return feature_signature(data, emb)


def fingerprint(signature: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:16]


def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(d, dict):
        out: Dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def signature_diff(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    a, b = _flatten(saved), _flatten(current)
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            lines.append(f"{key}: checkpoint {a.get(key, '<absent>')!r} vs model {b.get(key, '<absent>')!r}")
    return lines


def _init_lazy_optimizer_state(optimizer: Any) -> None:
    """Torch optimizers (Adam...) create state at the first step; DCP loads in place, so create it
    now (KeyedOptimizer.init_state: one step on zero grads) where a sub-optimizer has none."""
    subs = getattr(optimizer, "optimizers", None)
    if subs is not None:
        for _, sub in subs:
            _init_lazy_optimizer_state(sub)
        return
    params = getattr(optimizer, "params", {})
    if params and len(optimizer.state) == 0 and hasattr(optimizer, "init_state"):
        optimizer.init_state()


def save_checkpoint(
    run_dir: str | Path,
    model: nn.Module,
    optimizer: Optional[Any] = None,
    *,
    extra: Optional[Dict[str, Any]] = None,
    rank_extra: Optional[Any] = None,
    config: Optional[Any] = None,
    data=None,
    emb=None,
    name: str = "checkpoint",
) -> Path:
    """Collective (every rank calls). Writes RUN/<name>/ atomically and returns its path.

    extra: JSON-able global state (epoch, step, ...), taken from rank 0.
    rank_extra: JSON-able per-rank state (e.g. this rank's reader position); all ranks' values are
        stored as a list indexed by rank (meta["rank_extra"]).
    config: the resolved run config dataclass (written as config.yaml).
    data/emb: DataConfig/EmbeddingConfig for the fingerprint; default: the model's SparseArch.
    """
    run_dir = Path(run_dir)
    try:  # validate on every rank before any collective, so a bad value cannot deadlock the others
        json.dumps(extra or {})
        json.dumps(rank_extra)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"save_checkpoint: extra/rank_extra must be JSON-serialisable: {exc}") from None
    signature = _signature(model, data, emb, config)
    rank_extras = all_gather_objects(rank_extra)
    token = broadcast_object(f"{int(time.time() * 1000)}-{os.getpid()}")
    tmp = run_dir / f"{name}.tmp-{token}"
    target = run_dir / name
    state: Dict[str, Any] = {"model": model.state_dict()}
    if optimizer is not None:
        _init_lazy_optimizer_state(optimizer)  # a save before the first step still loads later
        state["optim"] = optimizer.state_dict()
    _on_rank0(lambda: tmp.mkdir(parents=True, exist_ok=False), f"creating {tmp}")
    dcp.save(state, checkpoint_id=str(tmp / STATE_DIR))

    def write_meta() -> None:
        meta = {
            "format": FORMAT,
            "fingerprint": fingerprint(signature),
            "signature": signature,
            "world_size": world_size(),
            "extra": extra or {},
            "rank_extra": rank_extras,
            "has_optimizer": optimizer is not None,
            "created_unix": time.time(),
            "versions": {"torch": torch.__version__, "torchrec": _version("torchrec")},
        }
        if config is not None:
            write_text_atomic(tmp / "config.yaml", cfgio.dump(config))
        plan = getattr(model, "plan", None)
        if plan is not None and hasattr(plan, "plan"):
            write_json_atomic(tmp / "plan.json", plan_to_dict(plan))
            write_text_atomic(tmp / "plan.txt", plan_summary(plan) + "\n\n" + str(plan) + "\n")
        write_json_atomic(tmp / "meta.json", meta)  # last: its presence marks a complete checkpoint

    def publish() -> None:
        old = run_dir / f"{name}.old-{token}"
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        for stale in [old, *run_dir.glob(f"{name}.tmp-*"), *run_dir.glob(f"{name}.old-*")]:
            if stale.is_dir():  # this save's old copy, and leftovers of interrupted saves
                shutil.rmtree(stale)

    _on_rank0(write_meta, f"writing metadata into {tmp}")  # after dcp.save returned on every rank
    _on_rank0(publish, f"publishing {tmp} as {target}")
    return target


def _on_rank0(fn, what: str) -> None:
    """Run fn on rank 0; every rank learns whether it failed (so none waits forever) and raises."""
    err = None
    if rank() == 0:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            err = f"{type(exc).__name__}: {exc}"
    err = broadcast_object(err)
    if err is not None:
        raise CheckpointError(f"save_checkpoint: {what} failed on rank 0: {err}")


def _version(pkg: str) -> str:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:  # noqa: BLE001 - informational only
        return "unknown"


def resolve(path: str | Path) -> Path:
    """RUN dir or RUN/checkpoint dir -> the checkpoint dir, its DCP metadata verified; CheckpointError if it is
    neither or the metadata is not DCP's own (a crafted pickle is refused before it is built)."""
    path = Path(path)
    for cand in (path, path / "checkpoint"):
        if (cand / "meta.json").is_file() and (cand / STATE_DIR / ".metadata").is_file():
            try:  # the trust boundary: no part of a checkpoint is used before its DCP metadata passes (trusted_dcp)
                read_state_metadata(cand / STATE_DIR)
            except CheckpointTrustError as exc:
                raise CheckpointError(str(exc)) from None
            return cand
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    hint = ""
    leftovers = sorted(p.name for p in path.glob("checkpoint.old-*")) if path.is_dir() else []
    if leftovers:
        hint = f" (an interrupted save left {leftovers}; it holds the previous checkpoint)"
    raise CheckpointError(
        f"{str(path)!r} is not a satrank checkpoint: expected meta.json and {STATE_DIR}/.metadata "
        f"(written by satrank.jobs.engine.checkpoint.save_checkpoint) in it or in its checkpoint/ subdirectory{hint}"
    )


def read_meta(path: str | Path) -> Dict[str, Any]:
    ckpt = resolve(path)
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{ckpt / 'meta.json'}: not valid JSON: {exc}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt / 'meta.json'}: format {meta.get('format')!r}, expected {FORMAT!r}")
    meta["path"] = str(ckpt)
    return meta


def _dcp_load(state: Dict[str, Any], ckpt: Path, what: str) -> None:
    """dcp.load with its failures (a BaseException, raised on every rank alike) as CheckpointError."""
    try:
        dcp.load(state, storage_reader=TrustedReader(str(ckpt / STATE_DIR)))
    except CheckpointException as exc:
        causes = sorted({f"{type(e).__name__}: {e}" for e, _ in exc.failures.values()})
        raise CheckpointError(f"{what}: loading {str(ckpt)!r} failed: {'; '.join(causes)}") from None


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: Optional[Any] = None,
    *,
    data=None,
    emb=None,
) -> Dict[str, Any]:
    """Collective when distributed. Loads weights (and optimizer state if given) in place, resharding
    as needed; returns meta.json's content (meta["extra"], meta["rank_extra"], meta["world_size"]).

    CheckpointError when `path` is not a checkpoint, when its feature fingerprint differs from the
    model's (the message lists each differing feature/table field), or when an optimizer is given
    but the checkpoint has none.
    """
    meta = read_meta(path)
    current = _signature(model, data, emb)
    if meta["fingerprint"] != fingerprint(current):
        diff = signature_diff(meta["signature"], current)
        raise CheckpointError(
            f"checkpoint {meta['path']!r} was written for a different feature config: " + "; ".join(diff)
        )
    if optimizer is not None and not meta.get("has_optimizer"):
        raise CheckpointError(f"checkpoint {meta['path']!r} has no optimizer state; load it without an optimizer")
    if optimizer is not None:
        _init_lazy_optimizer_state(optimizer)
    state: Dict[str, Any] = {"model": model.state_dict()}
    if optimizer is not None:
        state["optim"] = optimizer.state_dict()
    _dcp_load(state, Path(meta["path"]), "load_checkpoint")
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optim"])
    return meta


def load_tables_into(
    path: str | Path,
    module: nn.Module,
    tables: Optional[Sequence[str]] = None,
    *,
    source_prefix: Optional[str] = None,
    target_prefix: Optional[str] = None,
) -> List[str]:
    """Initialise `module`'s embedding tables (all, or those named in `tables`) from a checkpoint,
    e.g. a satisfaction model from the base ranker. Collective when distributed.

    Tables are matched by table name, whatever the module paths in either model; shapes must
    agree. When a model holds several SparseArches with the same table name, pick one with
    source_prefix / target_prefix: the state_dict path in front of `ebc.`/`ec.` (e.g.
    "sparse_arch." or "click.sparse_arch."; checkpoint keys without the leading "model.").
    Only weights are loaded; the fused optimizer state stays fresh. Returns the tables loaded.
    """
    meta = read_meta(path)
    state_dir = Path(meta["path"]) / STATE_DIR
    saved = TrustedReader(str(state_dir)).read_metadata().state_dict_metadata
    by_table: Dict[str, List[str]] = {}
    for key in saved:
        m = TABLE_KEY.match(key[len("model."):]) if key.startswith("model.") else None
        if m and (source_prefix is None or m.group("prefix") == source_prefix):
            by_table.setdefault(m.group("table"), []).append(key)
    target = module.state_dict()
    mine: Dict[str, List[str]] = {}
    for key in target:
        m = TABLE_KEY.match(key)
        if m and (target_prefix is None or m.group("prefix") == target_prefix):
            mine.setdefault(m.group("table"), []).append(key)
    wanted = set(mine) if tables is None else set(tables)
    if wanted - set(mine):
        raise CheckpointError(f"load_tables_into: the model has no table(s) {sorted(wanted - set(mine))}; it has {sorted(mine)}")
    request: Dict[str, Any] = {}
    for table in sorted(wanted):
        if len(mine[table]) != 1:
            raise CheckpointError(f"load_tables_into: the model holds table {table!r} at {mine[table]}; pass target_prefix")
        src = by_table.get(table, [])
        if len(src) != 1:
            what = "has no" if not src else f"has several ({src}) candidates for"
            raise CheckpointError(
                f"checkpoint {meta['path']!r} {what} table {table!r} (pass source_prefix); tables: {sorted(by_table)}"
            )
        value = target[mine[table][0]]
        shape, saved_shape = _shape(value), tuple(saved[src[0]].size)
        if shape != saved_shape:
            raise CheckpointError(f"table {table!r}: checkpoint shape {saved_shape} vs model shape {shape} ({meta['path']!r})")
        request[src[0]] = value
    if request:
        _dcp_load(request, Path(meta["path"]), "load_tables_into")
    return sorted(wanted)


# ------------------------------------------------------------------ partial loads of other runs, frozen-table checks
def check_checkpoint(path: str | Path, data: Any, emb: EmbeddingConfig, *, what: str,
                     expect_job: Optional[str] = None) -> Dict[str, Any]:
    """meta.json of the checkpoint at `path` (RUN or RUN/checkpoint), after checking it exists, is a
    satrank checkpoint, was written for this feature config (fingerprint) and, with expect_job, by that
    job. Errors (CheckpointError) start with `what` (e.g. "--init"). Not collective: call it early."""
    try:
        meta = read_meta(path)
    except CheckpointError as exc:
        raise CheckpointError(f"{what}: {exc}") from None
    current = feature_signature(data, emb)
    if meta["fingerprint"] != fingerprint(current):
        diff = signature_diff(meta["signature"], current)
        raise CheckpointError(f"{what}: checkpoint {meta['path']!r} was written for a different feature config "
                              "(data:/embeddings: fingerprint): " + "; ".join(diff))
    job = (meta.get("extra") or {}).get("job")
    if expect_job is not None and job != expect_job:
        raise CheckpointError(f"{what}: checkpoint {meta['path']!r} was written by job {job!r}, expected a "
                              f"satrank.jobs.{expect_job} run")
    return meta


def check_prefixed(path: str | Path, module: nn.Module, mapping: Mapping[str, str], data: Any,
                   emb: EmbeddingConfig, *, what: str = "checkpoint", expect_job: Optional[str] = None
                   ) -> Tuple[Path, Dict[str, Any], Dict[str, str]]:
    """What `load_prefixed` checks, without loading: `module` may be built on the meta device, so a job checks
    its input runs before it writes anything. Returns (checkpoint dir, DCP request, checkpoint key -> model key)."""
    meta = check_checkpoint(path, data, emb, what=what, expect_job=expect_job)
    ckpt = Path(meta["path"])
    saved = TrustedReader(str(ckpt / STATE_DIR)).read_metadata().state_dict_metadata
    target = module.state_dict()
    request: Dict[str, Any] = {}
    target_of: Dict[str, str] = {}
    for src, dst in mapping.items():
        src_keys = [k[len("model."):] for k in saved if k.startswith("model." + src)]
        if not src_keys:
            raise CheckpointError(f"{what}: checkpoint {str(ckpt)!r} has no weights under {src!r}")
        mapped = {dst + k[len(src):]: k for k in src_keys}
        missing = sorted(k for k in target if k.startswith(dst) and k not in mapped)
        extra = sorted(k for k in mapped if k not in target)
        if missing or extra:
            raise CheckpointError(f"{what}: checkpoint {str(ckpt)!r} does not match the model under {dst!r}: "
                                  f"model keys without a checkpoint weight {missing[:6]}, checkpoint weights "
                                  f"without a model key {[mapped[k] for k in extra][:6]} (different model config?)")
        for dkey, skey in mapped.items():
            shape, saved_shape = _shape(target[dkey]), tuple(saved["model." + skey].size)
            if shape != saved_shape:
                raise CheckpointError(f"{what}: {skey} has shape {saved_shape} in {str(ckpt)!r} but the model's "
                                      f"{dkey} has {shape} (different model config?)")
            request["model." + skey] = target[dkey]
            target_of["model." + skey] = dkey
    return ckpt, request, target_of


def load_prefixed(path: str | Path, module: nn.Module, mapping: Mapping[str, str], data: Any,
                  emb: EmbeddingConfig, *, what: str = "checkpoint", expect_job: Optional[str] = None) -> List[str]:
    """Load the weights under each source prefix of a checkpoint into `module` (plain or a DMP, any world
    size; DCP reshards) under the mapped target prefix, e.g. {"sparse_arch.": "propensity.sparse_arch."}.
    Strict per prefix pair (`check_prefixed`): every source key must have a target of the same shape and every
    target key under the target prefix must be covered. Weights only (no optimizer state). Collective when
    distributed. Returns the target keys loaded."""
    ckpt, request, target_of = check_prefixed(path, module, mapping, data, emb, what=what, expect_job=expect_job)
    try:
        dcp.load(request, storage_reader=TrustedReader(str(ckpt / STATE_DIR)))
    except dcp.api.CheckpointException as exc:
        causes = sorted({f"{type(e).__name__}: {e}" for e, _ in exc.failures.values()})
        raise CheckpointError(f"{what}: loading {str(ckpt)!r} failed: {'; '.join(causes)}") from None
    # DCP fills the state_dict tensors in place; they share storage with the parameters (checked here, since
    # TorchRec's sharded modules do not accept a partial load_state_dict).
    now = module.state_dict()
    stale = [target_of[k] for k, v in request.items() if not hasattr(v, "local_shards")
             and not torch.equal(now[target_of[k]], v)]
    if stale:
        raise RuntimeError(f"load_prefixed: state_dict tensors of {stale[:4]} are copies; the load did not reach them")
    return sorted(target_of.values())  # every model key under a target prefix (check_prefixed: all covered)


def local_tables(module: nn.Module, prefix: str = "") -> Dict[str, List[torch.Tensor]]:
    """Clones of this rank's part of every embedding table under `prefix` (ShardedTensor local shards, or
    the whole tensor for unsharded / data-parallel tables): for bit-exact frozen-table checks."""
    out: Dict[str, List[torch.Tensor]] = {}
    for key, value in module.state_dict().items():
        if TABLE_KEY.match(key) and key.startswith(prefix):
            if hasattr(value, "local_shards"):
                out[key] = [s.tensor.detach().clone() for s in value.local_shards()]
            else:
                out[key] = [value.detach().clone()]
    return out


def tables_changed(before: Dict[str, List[torch.Tensor]], module: nn.Module, prefix: str = "") -> List[str]:
    """Keys whose local part differs bit-wise from `before`, over all ranks (collective)."""
    now = local_tables(module, prefix)
    mine = sorted(k for k in set(before) | set(now)
                  if k not in before or k not in now or len(before[k]) != len(now[k])
                  or not all(torch.equal(a, b) for a, b in zip(before[k], now[k])))
    return sorted({k for part in all_gather_objects(mine) for k in part})


def checkpoint_config(path: Path):
    """The resolved run config (satrank.jobs.config.SatrankConfig) stored next to a checkpoint (config.yaml)."""
    from satrank.jobs.config import load_config  # satrank.jobs.config pulls in every model config; only runs need it

    cfg_file = Path(path) / "config.yaml"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no config.yaml next to the checkpoint (was it written with config=?)")
    return load_config(cfg_file)


def propensity_run(run_p: Path, data):
    """(checkpoint dir, RUN_P's own config) of a satrank.jobs.propensity run: a checkpoint, written by satrank.jobs.propensity,
    for these features (fingerprint). The propensity model is rebuilt from RUN_P's `propensity:` section, so a
    run trained with other inputs (e.g. `propensity.behaviour`) loads without repeating its --set. Not collective."""
    try:
        path = resolve(run_p)
    except CheckpointError as exc:
        raise CheckpointError(f"--propensity: {exc}") from None
    pcfg = checkpoint_config(path)
    check_checkpoint(path, data, pcfg.embeddings, what="--propensity", expect_job="propensity")
    return path, pcfg

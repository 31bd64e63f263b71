"""Shard a model's embedding tables with TorchRec: planner -> DistributedModelParallel -> optimizers.

The TorchRec idiom (examples/golden_training/train_dlrm.py): tables are built on the meta device;
`apply_optimizer_in_backward` tags them with the FBGEMM fused optimizer chosen in the
`embeddings.optimizer` config; `EmbeddingShardingPlanner.collective_plan` plans on rank 0 and
broadcasts (so every rank shards identically), with per-table `ParameterConstraints` pinning the
configured sharding type; DMP allocates the local shards and DDP-wraps the dense rest; the dense
optimizer (KeyedOptimizerWrapper) and the fused one are combined in one `CombinedOptimizer`.
One code path for CPU/gloo and CUDA/nccl (compute kernel `fused` runs on CPU via fbgemm-gpu-cpu).

Deviations from stock TorchRec, each checked against an unsharded model in tests/test_sharding.py:
- data_parallel tables use TorchRec's DENSE kernel, which has no fused optimizer; they get the
  configured embedding optimizer (`embeddings.data_parallel_optimizer` if set, else `embeddings.optimizer`)
  in its torch form (after DDP's all-reduce) at optimizer.step().
  FBGEMM warns on every backward through that kernel (no autograd kernel registered), so the default
  config shards even tiny tables table_wise, where the fused kernel serves them;
- TorchRec 1.8 lists row_wise for pooled (EBC) tables on CUDA only; it runs on CPU/gloo as well,
  so the EBC sharder here allows it on CPU too.
FBGEMM's CPU kernels offer rowwise_adagrad, exact_adagrad and sgd (not adam): checked up front.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec import optim as trec_optim
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from satrank.embeddings.config import EmbeddingConfig, FusedOptimizerConfig
from satrank.embeddings.tables import TABLE_KEY, SparseArch, TableSpec, init_embedding_weights
from satrank.pipeline.config import ConfigError

logger = logging.getLogger("satrank.embeddings")  # configured by satrank.jobs.engine.runtime.setup_logging

# Deprecation warnings that only TorchRec can remove, each filtered by its exact message (nothing else):
# - TorchRec 1.8's row-wise pooled sharding (comm_ops.reduce_scatter_base_pooled, and the all-gather of its
#   backward) still calls torch.distributed.reduce_scatter_tensor / all_gather_into_tensor, deprecated in
#   torch 2.13 for *_single; the warning is attributed to torch.distributed.c10d_logger.
# - TorchRec's DefaultDataParallelWrapper builds DDP with broadcast_buffers=False; its replacement
#   forward_sync_buffers=False would also sync buffers at init, a change only TorchRec can make.
for _name in ("reduce_scatter_tensor", "all_gather_into_tensor"):
    warnings.filterwarnings("ignore", message=rf"`torch\.distributed\.{_name}` is deprecated", category=FutureWarning,
                            module=r"torch\.distributed\.c10d_logger")
warnings.filterwarnings("ignore", message=r"`broadcast_buffers` is deprecated", category=FutureWarning,
                        module=r"torchrec\.distributed\.model_parallel")

_FUSED_CLASSES = {
    "rowwise_adagrad": trec_optim.RowWiseAdagrad,
    "exact_adagrad": trec_optim.Adagrad,
    "adam": trec_optim.Adam,
    "sgd": trec_optim.SGD,
}


CPU_FUSED_OPTIMIZERS = ("rowwise_adagrad", "exact_adagrad", "sgd")  # FBGEMM CPU TBE; adam is CUDA-only


class RuntimeLike(Protocol):
    """What sharding needs from satrank.jobs.engine.runtime.Runtime (kept structural: embeddings never imports jobs)."""

    rank: int
    world_size: int
    local_world_size: int
    device: torch.device


def fused_optimizer_spec(cfg: FusedOptimizerConfig) -> Tuple[type, Dict[str, Any]]:
    """(optimizer class, kwargs) for apply_optimizer_in_backward; the kwargs reach FBGEMM's TBE."""
    kwargs: Dict[str, Any] = {"lr": cfg.lr, "eps": cfg.eps}
    if cfg.weight_decay > 0:
        try:
            from fbgemm_gpu.tbe.config import WeightDecayMode  # fbgemm-gpu 1.x (split_embedding_configs no longer has it)
        except ImportError:
            from fbgemm_gpu.split_embedding_configs import WeightDecayMode

        kwargs.update(weight_decay=cfg.weight_decay, weight_decay_mode=WeightDecayMode.L2)
    if cfg.type == "adam":
        kwargs.update(beta1=cfg.beta1, beta2=cfg.beta2)
    return _FUSED_CLASSES[cfg.type], kwargs


def find_sparse_archs(model: nn.Module) -> List[Tuple[str, SparseArch]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SparseArch)]


class _EBCSharder(EmbeddingBagCollectionSharder):
    """TorchRec 1.8 offers row_wise for pooled tables only on CUDA, although the row-wise EBC
    sharding (bucketized input all-to-all, reduce-scatter output) runs on CPU/gloo too; this
    adds it on CPU so one config runs on both. tests/test_sharding.py checks it numerically."""

    def sharding_types(self, compute_device_type: str) -> List[str]:
        types = list(super().sharding_types(compute_device_type))
        if compute_device_type == "cpu" and "row_wise" not in types:
            types.append("row_wise")
        return types


def sharders() -> List[Any]:
    return [_EBCSharder(), EmbeddingCollectionSharder()]


def _constraints(specs: List[TableSpec], device_type: str) -> Dict[str, ParameterConstraints]:
    """One ParameterConstraints per table pinning its configured sharding type; errors name the
    config key when TorchRec cannot shard that kind of table that way on this device."""
    ebc_sharder, ec_sharder = sharders()
    out: Dict[str, ParameterConstraints] = {}
    for s in specs:
        allowed = (ec_sharder if s.sequence else ebc_sharder).sharding_types(device_type)
        if s.sharding not in allowed:
            kind = "EmbeddingCollection (sequence)" if s.sequence else "EmbeddingBagCollection (pooled)"
            raise ConfigError(
                f"embeddings.tables.{s.name}.sharding: {s.sharding!r} is not supported by TorchRec for "
                f"{kind} tables on {device_type}; supported: {sorted(allowed)}"
            )
        if s.sequence and s.sharding == "data_parallel" and len(s.feature_names) > 1:
            # TorchRec 1.8: a data_parallel EmbeddingCollection table serving several features of different
            # lengths (item_id + hist_*, author_id + hist_click__author_id) fails in its output split
            # (split_with_sizes ... got split_sizes=[64, 244]); refused here instead of at the first batch
            raise ConfigError(
                f"embeddings.tables.{s.name}.sharding: data_parallel cannot serve the EmbeddingCollection table "
                f"{s.name!r} used by {list(s.feature_names)} (TorchRec's data_parallel EmbeddingCollection "
                f"fails on features of different lengths); use table_wise or row_wise"
            )
        out[s.name] = ParameterConstraints(sharding_types=[s.sharding])
    return out


def plan_to_dict(plan: ShardingPlan) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """JSON-able view of a plan: module -> table -> sharding type, kernel, ranks, shard offsets/sizes."""
    out: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for module_path, module_plan in plan.plan.items():
        tables: Dict[str, Dict[str, Any]] = {}
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            shards = []
            if ps.sharding_spec is not None and hasattr(ps.sharding_spec, "shards"):
                for sm in ps.sharding_spec.shards:
                    shards.append({"offsets": list(sm.shard_offsets), "sizes": list(sm.shard_sizes),
                                   "placement": str(sm.placement)})
            tables[table] = {"sharding_type": ps.sharding_type, "compute_kernel": ps.compute_kernel,
                             "ranks": list(ps.ranks or []), "shards": shards}
        out[module_path] = tables
    return out


def plan_summary(plan: ShardingPlan) -> str:
    lines = []
    for module_path, tables in plan_to_dict(plan).items():
        for table, p in tables.items():
            lines.append(f"{module_path}.{table}: {p['sharding_type']} kernel={p['compute_kernel']} ranks={p['ranks']}")
    return "\n".join(lines)


def shard_model(
    model: nn.Module,
    cfg: EmbeddingConfig,
    runtime: RuntimeLike,
    dense_lr: float = 1e-3,
    seed: int = 0,
    dense_optimizer: str = "adam",
    dense_weight_decay: float = 0.0,
    planner_batch_size: Optional[int] = None,
) -> Tuple[DistributedModelParallel, CombinedOptimizer]:
    """Shard every SparseArch in `model` over the default process group; returns (dmp, optimizer).

    - embedding tables: sharding per `cfg.tables[...].sharding` (default `cfg.sharding`), fused
      optimizer `cfg.optimizer` applied inside backward (no step() needed for them);
    - dense parameters: DDP + `dense_optimizer` ("adam" | "adagrad" | "sgd") at `dense_lr`;
    - embedding weights are set to the seeded init of `satrank.embeddings.tables.init_embedding_weights`
      (identical for any world size / sharding); dense weights are whatever `model` holds (build it
      after seeding; DDP broadcasts rank 0's copy).
    `optimizer.step()` steps the dense part; `dmp.plan` is the ShardingPlan (see plan_to_dict).
    The plan is logged on rank 0.
    """
    archs = find_sparse_archs(model)
    if not archs:
        raise ValueError("shard_model: the model contains no satrank.embeddings.tables.SparseArch")
    opt_cls, opt_kwargs = fused_optimizer_spec(cfg.optimizer)
    specs: List[TableSpec] = [s for _, arch in archs for s in arch.specs]
    device = runtime.device
    fused_tables = [s.name for s in specs if s.sharding != "data_parallel"]
    if device.type == "cpu" and cfg.optimizer.type not in CPU_FUSED_OPTIMIZERS and fused_tables:
        raise ConfigError(
            f"embeddings.optimizer.type: {cfg.optimizer.type!r} is not available in FBGEMM's CPU kernels "
            f"(tables {fused_tables}); on CPU use one of {list(CPU_FUSED_OPTIMIZERS)}"
        )
    for path, arch in archs:
        frozen = [n for n, p in arch.named_parameters() if not p.requires_grad]
        if frozen:
            raise ValueError(
                f"shard_model: {path or 'model'} has embedding tables with requires_grad=False {frozen}; "
                "TorchRec's fused optimizer needs requires_grad=True: freeze tables by running them "
                "under torch.no_grad() instead"
            )
        _apply_optimizer_in_backward(opt_cls, arch.parameters(), dict(opt_kwargs))
    topology = TopologyFactory.create_topology(
        TrainerConfig(world_size=runtime.world_size, local_world_size=runtime.local_world_size),
        kernel_config=KernelConfig(compute_device=device.type))
    # fixed 15% reserve (the planner's default share): TorchRec deprecates its heuristic reservation,
    # which estimates dense sizes from tensors that are not materialised yet
    planner = EmbeddingShardingPlanner(topology=topology, batch_size=planner_batch_size,
                                       constraints=_constraints(specs, device.type), debug=False,
                                       storage_reservation=FixedPercentageStorageReservation(0.15))
    pg = dist.group.WORLD
    plan = planner.collective_plan(model, sharders(), pg)
    dmp = DistributedModelParallel(module=model, env=ShardingEnv.from_process_group(pg), device=device,
                                   plan=plan, sharders=sharders())
    init_embedding_weights(dmp, seed)
    if runtime.rank == 0:
        logger.info("sharding plan (%d ranks, %s):\n%s", runtime.world_size, device.type, plan_summary(plan))
    # Data-parallel tables use TorchRec's DENSE kernel (no fused optimizer): their DDP-reduced gradients get the
    # embedding optimizer (`embeddings.data_parallel_optimizer` if set), in its torch implementation, at step().
    plain = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    dp_tables = {k: p for k, p in plain.items() if TABLE_KEY.match(k)}
    dense_params = {k: p for k, p in plain.items() if k not in dp_tables}
    parts: List[Any] = [dmp.fused_optimizer]
    if dp_tables:
        parts.append(KeyedOptimizerWrapper(dp_tables, embedding_optimizer_factory(cfg.dp_optimizer())))
    if dense_params:
        parts.append(KeyedOptimizerWrapper(dense_params, dense_optimizer_factory(dense_optimizer, dense_lr, dense_weight_decay)))
    return dmp, CombinedOptimizer(parts)


def embedding_optimizer_factory(cfg: FusedOptimizerConfig) -> Callable[[Any], torch.optim.Optimizer]:
    """params -> the torch optimizer matching FBGEMM's update for `cfg` (the `embeddings.optimizer` section): the
    optimizer of data_parallel tables (TorchRec's DENSE kernel has no fused one), wherever a job groups its
    optimizers (shard_model, the EASQ job), and of unsharded reference models. Updates are dense: Adam
    moments / weight decay touch every row."""
    if cfg.type == "rowwise_adagrad":
        return lambda p: trec_optim.RowWiseAdagrad(p, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.type == "exact_adagrad":
        return lambda p: torch.optim.Adagrad(p, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.type == "adam":
        return lambda p: torch.optim.Adam(p, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                          weight_decay=cfg.weight_decay)
    return lambda p: torch.optim.SGD(p, lr=cfg.lr, weight_decay=cfg.weight_decay)


def torch_embedding_optimizer(params, cfg: FusedOptimizerConfig) -> torch.optim.Optimizer:
    """Public: the torch optimizer equivalent of the fused one (for unsharded models)."""
    return embedding_optimizer_factory(cfg)(params)


def dense_optimizer_factory(kind: str, lr: float, weight_decay: float) -> Callable[[Any], torch.optim.Optimizer]:
    """params -> the dense optimizer `kind` ("adam" | "adagrad" | "sgd", a `train.dense_optimizer`) at `lr`, for the
    non-embedding parameters; one definition for shard_model and any job that builds its own optimizer groups."""
    if kind == "adam":
        return lambda params: torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if kind == "adagrad":
        return lambda params: torch.optim.Adagrad(params, lr=lr, weight_decay=weight_decay)
    if kind == "sgd":
        return lambda params: torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"dense_optimizer: {kind!r} is not one of ['adam', 'adagrad', 'sgd']")


def full_state_dict(module: nn.Module, dst: int = 0) -> Dict[str, torch.Tensor]:
    """Collective: every rank calls; rank `dst` gets a CPU state_dict with whole tables (sharded
    tables gathered), other ranks get {}. For comparisons and export, not for checkpoints."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    rank = dist.get_rank() if dist.is_initialized() else 0
    out: Dict[str, torch.Tensor] = {}
    for key, value in module.state_dict().items():
        if isinstance(value, ShardedTensor):
            full = torch.empty(value.metadata().size, dtype=value.dtype) if rank == dst else None
            value.gather(dst=dst, out=full)
            if rank == dst:
                out[key] = full
        elif isinstance(value, torch.Tensor) and rank == dst:
            out[key] = value.detach().cpu().clone()
    return out

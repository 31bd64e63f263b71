"""Process-level runtime of a job: process group, device/backend, seeding, rank-aware logging,
progress bar and metrics files.

One code path for every launch: under `torchrun` the env (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT) defines the group; launched plainly, the job is a 1-process world on an
in-memory store, so TorchRec's DMP and collectives run unchanged. Backend is nccl when CUDA is
available, gloo otherwise.
"""
from __future__ import annotations

import gc
import json
import logging
import math
import os
import random
import sys
from datetime import timedelta
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from satrank.pipeline.atomic import json_default as _json_default
from satrank.pipeline.atomic import write_json_atomic, write_text_atomic  # noqa: F401  (re-exported for the jobs)

LOGGER_NAME = "satrank"


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    seed: int
    owns_process_group: bool  # True when init_runtime created the group (close() destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def process_group(self) -> dist.ProcessGroup:
        return dist.group.WORLD

    def barrier(self) -> None:
        if dist.is_initialized() and self.world_size > 1:
            dist.barrier()

    def progress(self, total: Optional[int] = None, desc: str = "", unit: str = "rows"):
        """satrank.jobs.engine.progress.bar on rank 0 (drawn only on a terminal); `bar.update(batch.size)`."""
        from satrank.jobs.engine.progress import bar

        return bar(desc, total, main=self.is_main, unit=unit)

    def close(self) -> None:
        """Leave together: barrier, destroy the group (if init_runtime created it), collect garbage.

        Call it after the models, optimizers and DMP wrappers are gone (keep them in a function
        that has returned; main: `rt = init_runtime(); try: run(rt) finally: rt.close()`). They
        hold the process group; if it is still alive when Python finalizes, a gloo worker thread
        can release a finished collective's tensors after the interpreter is gone and abort the
        process ("terminate called without an active exception"). Once nothing references the
        group, destroying it joins those threads here.
        """
        if self.owns_process_group and dist.is_initialized():
            gc.collect()
            self.barrier()
            dist.destroy_process_group()
            gc.collect()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer (set by torchrun)") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _attempt_store(world: int) -> Optional[dist.Store]:
    """The launcher's store under a prefix of its attempt (TORCHELASTIC_RESTART_COUNT), for a torchrun worker.

    Why: after `torchrun --max-restarts` restarts the workers, the agent's store still holds the previous
    attempt's process-group keys; gloo then reads the dead ranks' addresses and hangs in connectFullMesh
    ("Connection refused" until its timeout). A per-attempt prefix gives every attempt its own keys.
    None (init_process_group's env:// default) outside torchrun's agent store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timedelta(minutes=30))
    return dist.PrefixStore(f"satrank/attempt_{_env_int('TORCHELASTIC_RESTART_COUNT', 0)}", store)


def init_runtime(seed: int = 0, device: Optional[str] = None, debug: bool = False) -> Runtime:
    """Join (or create) the default process group, pick the device, seed, configure logging.

    device: None = cuda:<local_rank> if CUDA is available else cpu; "cpu" forces CPU/gloo.
    Every rank gets the same seed (dense weights built after this are identical on all ranks).
    """
    rank = _env_int("RANK", 0)
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    if device is not None and device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device={device!r}: expected None (auto), 'cpu' or 'cuda'")
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} requested but CUDA is not available")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
    owns = False
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ and "RANK" in os.environ:  # torchrun
            dist.init_process_group(backend=backend, rank=rank, world_size=world, store=_attempt_store(world),
                                    device_id=dev if use_cuda else None)
        else:
            if world != 1:
                raise ValueError(f"WORLD_SIZE={world} but no MASTER_ADDR/RANK: launch with torchrun")
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        owns = True
    else:
        rank, world = dist.get_rank(), dist.get_world_size()
    seed_everything(seed)
    rt = Runtime(rank, world, local_rank, local_world, dev, backend, seed, owns)
    setup_logging(rt, debug=debug)
    return rt


class _RankFilter(logging.Filter):
    def __init__(self, rank: int, world: int) -> None:
        super().__init__()
        self.tag = f"[rank {rank}/{world}]"

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank_tag = self.tag
        return True


class _FxTracingNotice(logging.Filter):
    """Drops torch's `is_fx_tracing will return true ...` deprecation notice, and nothing else. Upstream cause:
    torch.fx's own ProxyableClassMeta (TorchRec's KeyedJaggedTensor metaclass) calls the deprecated
    torch.fx._symbolic_trace.is_fx_tracing() on every construction (torch 2.13); only torch can change that.
    Reader workers build no KeyedJaggedTensor (satrank.pipeline.transport.FinalPosition), so only the main
    process would print it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("is_fx_tracing will return true")


def setup_logging(runtime: Runtime, debug: bool = False) -> logging.Logger:
    """`satrank.*` loggers print `[rank r/w] time level name: msg` to stderr; INFO on rank 0 only
    (other ranks WARNING and above) unless debug, which gives DEBUG on every rank."""
    fx_log = logging.getLogger("torch.fx._symbolic_trace")
    if not any(isinstance(f, _FxTracingNotice) for f in fx_log.filters):
        fx_log.addFilter(_FxTracingNotice())
    logger = logging.getLogger(LOGGER_NAME)
    for h in list(logger.handlers):
        if getattr(h, "_satrank", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler._satrank = True  # type: ignore[attr-defined]
    handler.addFilter(_RankFilter(runtime.rank, runtime.world_size))
    handler.setFormatter(logging.Formatter("%(rank_tag)s %(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG if debug else (logging.INFO if runtime.is_main else logging.WARNING))
    return logger


def get_logger(name: str = "") -> logging.Logger:
    """A child of the `satrank` logger (configured by init_runtime / setup_logging)."""
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)


# ------------------------------------------------------------------ atomic outputs (satrank.pipeline.atomic)


class MetricsWriter:
    """`metrics.jsonl` (one JSON object per `log` call, appended and flushed) and a final
    `metrics.json` (atomic) in `out_dir`. Only rank 0 writes; other ranks' calls are no-ops."""

    def __init__(self, out_dir: str | Path, rank: int = 0) -> None:
        self.out_dir = Path(out_dir)
        self.active = rank == 0
        self._fh = None
        if self.active:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.out_dir / "metrics.jsonl", "a")

    def log(self, record: Dict[str, Any]) -> None:
        if self._fh is None:
            return
        self._fh.write(json.dumps(record, sort_keys=True, default=_json_default) + "\n")
        self._fh.flush()

    def write_final(self, metrics: Dict[str, Any]) -> Optional[Path]:
        if not self.active:
            return None
        return write_json_atomic(self.out_dir / "metrics.json", metrics)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def finite_or_none(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None (strict JSON has no NaN), tensors/numpy scalars -> Python numbers."""
    if isinstance(obj, dict):
        return {str(k): finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        obj = obj.item()
    if hasattr(obj, "item") and not isinstance(obj, (int, float, str, bool)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj

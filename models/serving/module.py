"""Unsharded inference: a satrank model as a plain, materialised module, scored by its eval forward,
and the same model as a module of plain tensors that TorchScript can trace and torch alone can run.

Why: training shards tables with TorchRec (DMP) over N ranks; scoring and serving want one
self-contained module on any machine. A checkpoint (satrank.jobs.engine.checkpoint, DCP) stores every shard with
its global offsets, so it loads into the unsharded model built here whatever world size wrote it.

- `build_model`: the task of a run (its kind, read from the checkpoint's meta.json by
  satrank.jobs.engine.runs) rebuilt unsharded from the run config: `ranker` (satrank.models.ranker.task.RankerTask, the stage-2
  SAQRec ranker with its frozen teacher g), `easq` (satrank.models.easq.task.EasqTask, a satrank.jobs.dpo run: the
  stage-2 task + LoRA pathway + satisfaction head; after loading, `EasqTask.serving_task()` folds the
  adapters and serves the main heads), `click` (satrank.models.stage1.tasks.ClickModel) or `satisfaction`
  (satrank.models.stage1.tasks.SatisfactionModel). Tables are materialised on CPU (the checkpoint overwrites them).
- `Stage1Heads`: a stage-1 model's outputs (click_logit / sat_logit) under the ranker's head names.
- `ModelScorer`: the `Scorer` interface (Batch -> one column per served head + score) over the model's
  own eval forward (no labels: the loss is None); the heads and their columns come from the run's head
  specs (satrank.models.ranker.heads.serving_specs: p_click, p_satisfied, watch_time_pred, then any
  other head), raw values read by head name, fused by satrank.models.common.fusion.
- `PlainSparseArch`: a SparseArch's tables as plain tensors, looked up from a KJT's values/lengths
  with torch indexing only (no TorchRec/FBGEMM ops), fp32 or int8 (FBGEMM's fused 8-bit rowwise
  format: per row int8 codes, an fp32 scale and an fp32 bias, dequantised at lookup).
- `ServingModule`: forward(values, lengths, dense) -> (one value per served head, score),
  the KJT layout of satrank.pipeline.batch.Batch (keys = DataConfig.sparse_names, key-major, lengths int32)
  plus the dense matrix. It runs the model's own eval forward with every SparseArch swapped for a
  PlainSparseArch, so `torch.jit.trace` records aten ops only and the artifact loads with torch alone.
- `merge_lora`: folds LoRA adapters into their base weights when models/common/lora.py provides `merge_lora`.
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import warnings
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from satrank.embeddings.tables import TABLE_KEY, SparseArch, SparseOutput
from satrank.models.common.fusion import Fusion, FusionConfig
from satrank.models.ranker.heads import HeadSpec, serving_specs
from satrank.pipeline.batch import Batch
from satrank.pipeline.features import DataConfig

KINDS = ("ranker", "easq", "click", "satisfaction")
STAGE1_HEADS = {"click_logit": "click", "sat_logit": "satisfaction"}  # stage-1 output -> ranker head name


class Scorer(Protocol):
    """Batch -> {column of each served head, score}: float32 [B] (NaN for absent heads)."""

    heads: Tuple[str, ...]  # head names the model produces
    outputs: List[str]  # the returned columns, in order (one per served head, then score)
    specs: List[HeadSpec]  # the served heads (the run identity names them)

    def __call__(self, batch: Batch) -> Dict[str, torch.Tensor]: ...


# ------------------------------------------------------------------------------------------- models
def build_model(kind: str, cfg: Any, teacher: Any = None, seed: int = 0) -> nn.Module:
    """The task `kind` built unsharded from a run config (a satrank.jobs.config.SatrankConfig or anything with
    its sections), tables materialised on CPU, in eval mode. `teacher`: satrank.models.ranker.task.TeacherSpec
    of the ranker's g (needed when model.mlse or model.mtl is on)."""
    from satrank.embeddings.sharding import find_sparse_archs

    if kind == "ranker":
        from satrank.models.ranker.task import RankerTask

        model: nn.Module = RankerTask(cfg.data, cfg.embeddings, cfg.model, cfg.loss, teacher, seed=seed)
    elif kind == "easq":
        from satrank.models.easq.task import EasqTask
        from satrank.models.ranker.task import RankerTask

        model = EasqTask(RankerTask(cfg.data, cfg.embeddings, cfg.model, cfg.loss, teacher, seed=seed), cfg.easq)
    elif kind == "click":
        from satrank.models.stage1.tasks import ClickModel

        p = cfg.pretrain
        model = ClickModel(cfg.data, cfg.embeddings, p.tower, watch_time_weight=p.watch_time_weight,
                           watch_time_rows=p.watch_time_rows, watch_time_target=p.watch_time_target,
                           duration_feature=p.duration_feature)
    elif kind == "satisfaction":
        from satrank.models.stage1.tasks import SatisfactionModel

        model = SatisfactionModel(cfg.data, cfg.embeddings, cfg.pretrain.tower, cfg.satisfaction, cfg.propensity)
    else:
        raise ValueError(f"model kind {kind!r} is not one of {list(KINDS)}")
    for _, arch in find_sparse_archs(model):
        arch.materialize(seed)
    return model.eval()


def merge_lora(model: nn.Module) -> Dict[str, Any]:
    """Fold LoRA adapters (satrank.models.common.lora.LoRALinear) into their base weights, in place, when models/common/lora.py
    exists; returns what was done, for the export manifest."""
    if importlib.util.find_spec("satrank.models.common.lora") is None:
        return {"available": False, "merged": 0, "unmerged_branches": []}
    lora = importlib.import_module("satrank.models.common.lora")
    found = sum(1 for m in model.modules() if isinstance(m, lora.LoRALinear))
    if found:
        lora.merge_lora(model)
    # adapters used without an nn.Linear base (e.g. EASQ's item pathway) cannot be folded generically:
    # they stay in the module and are computed at serving time; the manifest lists them
    branches = [n for n, m in model.named_modules() if isinstance(m, lora.LoRABranch)]
    return {"available": True, "merged": found, "unmerged_branches": branches}


class Stage1Heads(nn.Module):
    """A stage-1 click / satisfaction model served like a ranker: its outputs renamed to head names
    (STAGE1_HEADS), so fusion, scoring and export read every kind alike."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch):
        if hasattr(self.model, "predict"):  # the satisfaction model: serving rows have no labels for rho
            loss, out = None, self.model.predict(batch)
        else:
            loss, out = self.model(batch)
        return loss, {head: out[key] for key, head in STAGE1_HEADS.items() if key in out}


def model_heads(model: nn.Module, data: DataConfig, names: Sequence[str],
                device: torch.device | str = "cpu") -> Tuple[str, ...]:
    """Which of the head `names` a model produces, found by running its eval forward on a 2-row example."""
    values, lengths, dense = example_inputs(data, 2, seed=0)
    batch = Batch(sparse=KeyedJaggedTensor(keys=data.sparse_names, values=values, lengths=lengths), dense=dense)
    with torch.no_grad():
        batch = batch.to(torch.device(device))
        _, out = model(batch)
    return tuple(n for n in names if out.get(n) is not None)


class ModelScorer:
    """`Scorer` over a model's eval forward (unsharded or any module taking a Batch -> (loss, outputs)).
    `specs`: the served heads (default: the built-in three of satrank.models.ranker.heads.serving_specs)."""

    def __init__(self, model: nn.Module, fusion_cfg: FusionConfig, data: DataConfig,
                 device: torch.device | str = "cpu", specs: Optional[Sequence[HeadSpec]] = None) -> None:
        from satrank.models.ranker.config import ModelConfig

        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.specs = list(specs) if specs is not None else serving_specs(ModelConfig())
        self.heads = model_heads(self.model, data, [s.name for s in self.specs], self.device)
        self.fusion = Fusion(fusion_cfg, self.specs, self.heads)
        self.outputs = self.fusion.outputs

    def __call__(self, batch: Batch) -> Dict[str, torch.Tensor]:
        with torch.inference_mode():
            _, out = self.model(batch.to(self.device))
            parts = self.fusion({n: out.get(n) for n in self.heads})
        return {name: t.cpu() for name, t in zip(self.outputs, parts)}


# ------------------------------------------------------------------------------------------- plain tables
def quantize_rows_int8(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FBGEMM's fused 8-bit rowwise quantisation of a [N, D] table -> (codes uint8 [N, D], scale fp32
    [N], bias fp32 [N]); row r dequantises to codes[r] * scale[r] + bias[r]."""
    import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)

    fused = torch.ops.fbgemm.FloatToFused8BitRowwiseQuantized(weight.detach().float().cpu().contiguous())
    d = weight.shape[1]
    scale = fused[:, d:d + 4].contiguous().view(torch.float32).reshape(-1)
    bias = fused[:, d + 4:d + 8].contiguous().view(torch.float32).reshape(-1)
    return fused[:, :d].contiguous(), scale.clone(), bias.clone()


def table_weights(arch: SparseArch) -> Dict[str, torch.Tensor]:
    """table name -> its full [rows, dim] weight (an unsharded, materialised SparseArch)."""
    out = {}
    for key, value in arch.state_dict().items():
        m = TABLE_KEY.match(key)
        if m is not None:
            if value.is_meta:
                raise ValueError(f"{key}: table is on the meta device; materialise or load the model first")
            out[m.group("table")] = value.detach()
    return out


class PlainSparseArch(nn.Module):
    """Drop-in for a SparseArch (same `forward(kjt) -> SparseOutput`, same data/emb/specs) reading
    only `kjt.values()` / `kjt.lengths()` and looking rows up with plain indexing.

    Sequences longer than max_len keep their last max_len ids (the reader already truncates).
    `int8=True` stores FBGEMM fused-8-bit-rowwise codes and dequantises the looked-up rows.
    """

    def __init__(self, arch: SparseArch, keys: Sequence[str], int8: bool = False) -> None:
        super().__init__()
        self.data, self.emb, self.specs = arch.data, arch.emb, arch.specs
        self.keys = list(keys)
        self.int8 = int8
        self._dims = {f.name: arch.feature_dim(f.name) for f in [*arch.data.sparse, *arch.data.sequence]}
        self.features: List[Tuple[int, str, str, int]] = []  # (key index, name, table, max_len or 0)
        for f in arch.data.sparse:
            self.features.append((self.keys.index(f.name), f.name, f.table_name, 0))
        for f in arch.data.sequence:
            self.features.append((self.keys.index(f.name), f.name, f.table_name, f.max_len))
        for table, w in table_weights(arch).items():
            if int8:
                q, scale, bias = quantize_rows_int8(w)
                self.register_buffer(f"q_{table}", q)
                self.register_buffer(f"scale_{table}", scale)
                self.register_buffer(f"bias_{table}", bias)
            else:
                self.register_buffer(f"w_{table}", w.float().clone())

    @property
    def single_features(self) -> List[str]:
        return [f.name for f in self.data.sparse]

    @property
    def sequence_features(self) -> List[str]:
        return [f.name for f in self.data.sequence]

    def feature_dim(self, feature: str) -> int:
        return self._dims[feature]

    def _rows(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        if not self.int8:
            return getattr(self, f"w_{table}")[ids]
        q, scale, bias = (getattr(self, f"{p}_{table}") for p in ("q", "scale", "bias"))
        return q[ids].float() * scale[ids].unsqueeze(-1) + bias[ids].unsqueeze(-1)

    def forward(self, kjt: KeyedJaggedTensor) -> SparseOutput:
        return self.lookup(kjt.values(), kjt.lengths(), self.keys)

    def lookup(self, values: torch.Tensor, lengths: torch.Tensor, keys: Sequence[str]) -> SparseOutput:
        """The features `keys` (any subset of this arch's features, in that key-major order) looked up from
        KJT-layout values/lengths; the request-level module looks the user's and the candidates' keys up apart."""
        lengths = lengths.long()
        n_keys = len(keys)
        offsets = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])
        starts, lens = offsets[:-1].view(n_keys, -1), lengths.view(n_keys, -1)
        pooled: Dict[str, torch.Tensor] = {}
        sequences: Dict[str, JaggedTensor] = {}
        for _, name, table, max_len in self.features:
            if name not in keys:
                continue
            k = list(keys).index(name)
            if max_len == 0:
                pooled[name] = self._rows(table, values[starts[k]])
                continue
            n = lens[k].clamp(max=max_len)
            first = starts[k] + (lens[k] - n)  # the last max_len ids of the row
            pos = torch.arange(max_len, device=values.device)
            mask = pos.unsqueeze(0) < n.unsqueeze(1)
            idx = torch.where(mask, first.unsqueeze(1) + pos.unsqueeze(0), torch.zeros_like(first).unsqueeze(1))
            rows = self._rows(table, values[idx])[mask]
            sequences[name] = JaggedTensor(values=rows, lengths=n.int(),
                                           offsets=torch.cat([n.new_zeros(1), torch.cumsum(n, 0)]))
        return SparseOutput(pooled=pooled, sequences=sequences)


def plain_copy(model: nn.Module, keys: Sequence[str], int8: bool = False) -> nn.Module:
    """A deep copy of `model` with every SparseArch replaced by a PlainSparseArch."""
    model = copy.deepcopy(model)
    swaps = [(name, m) for name, m in model.named_modules() if isinstance(m, SparseArch)]
    if not swaps:
        raise ValueError("plain_copy: the model holds no satrank.embeddings.tables.SparseArch")
    for name, arch in swaps:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, PlainSparseArch(arch, keys, int8=int8))
    return model.eval()


class ServingModule(nn.Module):
    """forward(values int64 [N], lengths int32 [K*B], dense float32 [B, D]) ->
    (one value per served head in `outputs` order, score), each float32 [B]; NaN for heads the model lacks.

    values/lengths are a KeyedJaggedTensor's, keys = `self.keys` (DataConfig.sparse_names), key-major:
    lengths[k*B + b] ids of key k for row b; single-valued keys have length 1. Ids already mapped by
    the vocabulary policies (hash / oov), sequences truncated to their max_len (last ids kept).
    """

    def __init__(self, model: nn.Module, data: DataConfig, fusion_cfg: FusionConfig, int8: bool = False,
                 specs: Optional[Sequence[HeadSpec]] = None) -> None:
        super().__init__()
        from satrank.models.ranker.config import ModelConfig

        self.keys = list(data.sparse_names)
        self.model = plain_copy(model, self.keys, int8=int8)
        specs = list(specs) if specs is not None else serving_specs(ModelConfig())
        self.heads = model_heads(self.model, data, [s.name for s in specs])
        self.fusion = Fusion(fusion_cfg, specs, self.heads)
        self.outputs = self.fusion.outputs

    def forward(self, values: torch.Tensor, lengths: torch.Tensor, dense: torch.Tensor):
        batch = Batch(sparse=KeyedJaggedTensor(keys=self.keys, values=values, lengths=lengths), dense=dense)
        _, out = self.model(batch)
        return self.fusion({n: out.get(n) for n in self.heads})


def example_inputs(data: DataConfig, batch_size: int, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random valid (values, lengths, dense) in ServingModule's layout; sequences of every length
    0..max_len occur (when batch_size allows), so a trace sees empty and full histories."""
    g = torch.Generator().manual_seed(seed)
    values, lengths = [], []
    for f in data.sparse:
        values.append(torch.randint(0, f.num_rows, (batch_size,), generator=g))
        lengths.append(torch.ones(batch_size, dtype=torch.int32))
    for f in data.sequence:
        n = (torch.arange(batch_size) % (f.max_len + 1)).to(torch.int32)
        values.append(torch.randint(0, f.num_rows, (int(n.sum()),), generator=g))
        lengths.append(n)
    dense = torch.rand(batch_size, len(data.dense), generator=g) * 3
    return torch.cat(values), torch.cat(lengths), dense


def trace(module: ServingModule, data: DataConfig, batch_size: int = 64, seed: int = 0) -> torch.jit.ScriptModule:
    """torch.jit.trace of a ServingModule on an example batch (shape checks in the model code are
    recorded as constants: TracerWarnings about them are silenced). Batch size stays dynamic."""
    example = example_inputs(data, batch_size, seed)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*is_fx_tracing.*")
        traced = torch.jit.trace(module.eval(), example, check_trace=False)
    return traced

"""Embedding tables from the data contract, and `SparseArch`: the sparse half of every satrank model.

One table per distinct `table` name in `data:` (rows = feature.num_rows). A table used by any
sequence feature lives in an `EmbeddingCollection` (unpooled lookups, so the shared item table
serves both the candidate `item_id` and every `hist_*` sequence: SAQRec §4.3.1 looks up the
candidate v_i and the histories V_r, V_{s+}, V_{s-} in the same item table); every other table lives in an
`EmbeddingBagCollection` (pooling SUM over a single id = a plain lookup). The same holds for the derived
history attributes of `data.items.history` (`hist_click__author_id` ...): they name their attribute's table,
which then moves into the EmbeddingCollection and serves the pooled `author_id` as a length-1 lookup too.

Both collections are built on the meta device (the TorchRec idiom: DMP allocates only the local
shards). Initial weights are a pure function of (seed, table name, row): `init_embedding_weights`
fills whatever part of a table a module holds (a whole CPU table, or a row/column shard inside a
`DistributedModelParallel`), so a 1-rank unsharded model and an N-rank sharded model start equal.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig as TrecEmbeddingConfig
from torchrec.modules.embedding_configs import PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from satrank.embeddings.config import EmbeddingConfig
from satrank.pipeline.config import ConfigError
from satrank.pipeline.features import DataConfig

META = torch.device("meta")
INIT_BLOCK_ROWS = 8192  # rows generated per RNG stream; a shard only generates the blocks it holds

# state_dict keys of table weights: `<prefix>ebc.embedding_bags.<table>.weight` / `<prefix>ec.embeddings.<table>.weight`
TABLE_KEY = re.compile(r"^(?P<prefix>.*?)(?P<coll>ebc\.embedding_bags|ec\.embeddings)\.(?P<table>[^.]+)\.weight$")


@dataclass(frozen=True)
class TableSpec:
    name: str
    num_rows: int
    dim: int
    feature_names: Tuple[str, ...]
    sequence: bool  # True: lives in the EmbeddingCollection (used by a sequence feature)
    sharding: str  # row_wise | table_wise | column_wise | data_parallel


def table_specs(data: DataConfig, emb: EmbeddingConfig) -> List[TableSpec]:
    """Tables in first-use order of `data.sparse_names`; errors name the offending config key."""
    order: List[str] = []
    rows: Dict[str, int] = {}
    feats: Dict[str, List[str]] = {}
    seq_tables = {f.table_name for f in data.all_sequences}
    for f in [*data.sparse, *data.all_sequences]:
        if f.table_name not in rows:
            order.append(f.table_name)
            rows[f.table_name] = f.num_rows
            feats[f.table_name] = []
        feats[f.table_name].append(f.name)
    unknown = sorted(set(emb.tables) - set(order))
    if unknown:
        raise ConfigError(f"embeddings.tables: {unknown} name no table of data:; tables are {order}")
    specs = [
        TableSpec(t, rows[t], emb.table_dim(t), tuple(feats[t]), t in seq_tables, emb.table_sharding(t))
        for t in order
    ]
    seq_dims = {s.name: s.dim for s in specs if s.sequence}
    if len(set(seq_dims.values())) > 1:
        raise ConfigError(
            f"embeddings.tables: tables used by sequence features share one EmbeddingCollection and "
            f"need one dim; got {seq_dims}"
        )
    return specs


def feature_signature(data: DataConfig, emb: Optional[EmbeddingConfig] = None) -> Dict[str, object]:
    """What a trained model depends on (names, tables, rows, dims, max_len, dense transforms), not
    I/O details such as column names. Stored in checkpoints and compared on load."""
    sig: Dict[str, object] = {
        "sparse": {f.name: {"table": f.table_name, "rows": f.num_rows} for f in data.sparse},
        "sequence": {f.name: {"table": f.table_name, "rows": f.num_rows, "max_len": f.max_len}
                     for f in data.all_sequences},  # derived <history>__<attribute> only when data.items.history
        "dense": {f.name: {"transform": f.transform} for f in data.dense},
    }
    if emb is not None:
        sig["tables"] = {s.name: {"rows": s.num_rows, "dim": s.dim} for s in table_specs(data, emb)}
    return sig


@dataclass
class SparseOutput:
    """pooled: [B, d] per single-valued feature (item_id included, from the EC's length-1 lookups).
    sequences: JaggedTensor of [sum(len), d] per sequence feature, oldest first (see `padded`)."""

    pooled: Dict[str, torch.Tensor] = field(default_factory=dict)
    sequences: Dict[str, JaggedTensor] = field(default_factory=dict)


class SparseArch(nn.Module):
    """`ebc` (pooled tables) and `ec` (tables used by sequences), both called on the full batch KJT.

    forward(kjt) -> SparseOutput. The KJT may carry keys a collection does not use; both the
    unsharded modules (lookup by key) and the sharded ones (input_dist permutes by feature
    order) select their own features. Keep forward free of data-dependent Python control flow:
    TrainPipelineSparseDist fx-traces it to find `ebc(kjt)` / `ec(kjt)` and pipeline them.
    """

    def __init__(self, data: DataConfig, emb: EmbeddingConfig, device: torch.device = META) -> None:
        super().__init__()
        self.data = data
        self.emb = emb
        self.specs: List[TableSpec] = table_specs(data, emb)
        seq_specs = [s for s in self.specs if s.sequence]
        bag_specs = [s for s in self.specs if not s.sequence]
        self.ebc: Optional[EmbeddingBagCollection] = (
            EmbeddingBagCollection(
                tables=[
                    EmbeddingBagConfig(
                        name=s.name, num_embeddings=s.num_rows, embedding_dim=s.dim,
                        feature_names=list(s.feature_names), pooling=PoolingType.SUM,
                    )
                    for s in bag_specs
                ],
                device=device,
            )
            if bag_specs
            else None
        )
        self.ec: Optional[EmbeddingCollection] = (
            EmbeddingCollection(
                tables=[
                    TrecEmbeddingConfig(
                        name=s.name, num_embeddings=s.num_rows, embedding_dim=s.dim,
                        feature_names=list(s.feature_names),
                    )
                    for s in seq_specs
                ],
                device=device,
            )
            if seq_specs
            else None
        )
        seq_tables = {s.name for s in seq_specs}
        self._bag_features = [f.name for f in data.sparse if f.table_name not in seq_tables]
        self._ec_single_features = [f.name for f in data.sparse if f.table_name in seq_tables]
        self._sequence_features = [f.name for f in data.all_sequences]

    @property
    def single_features(self) -> List[str]:
        return [f.name for f in self.data.sparse]

    @property
    def sequence_features(self) -> List[str]:
        return list(self._sequence_features)

    def feature_dim(self, feature: str) -> int:
        """Embedding dim of a sparse or sequence feature's table."""
        f = self.data.feature(feature)
        return self.emb.table_dim(f.table_name)

    def forward(self, kjt: KeyedJaggedTensor) -> SparseOutput:
        pooled: Dict[str, torch.Tensor] = {}
        sequences: Dict[str, JaggedTensor] = {}
        if self.ebc is not None:
            kt = self.ebc(kjt)
            for name in self._bag_features:
                pooled[name] = kt[name]
        if self.ec is not None:
            jts = self.ec(kjt)
            for name in self._ec_single_features:
                pooled[name] = jts[name].values()  # exactly one id per row -> [B, d]
            for name in self._sequence_features:
                sequences[name] = jts[name]
        return SparseOutput(pooled=pooled, sequences=sequences)

    def materialize(self, seed: int, device: torch.device | str = "cpu") -> "SparseArch":
        """Unsharded use: allocate meta tables on `device` and fill them with the seeded init."""
        if any(p.is_meta for p in self.parameters()):
            self.to_empty(device=device)
        init_embedding_weights(self, seed)
        return self


def padded(jt: JaggedTensor, max_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """JaggedTensor of [N, d] values -> (Tensor[B, max_len, d], mask[B, max_len] bool, True = valid).

    Left-aligned: row b holds its ids at positions 0..len_b-1 (oldest first, as stored), zeros
    after. Rows longer than `max_len` keep their first `max_len` positions; pass the feature's
    max_len (the reader already truncated to the most recent max_len ids). Differentiable.
    """
    values = jt.values()
    lengths = jt.lengths()
    offsets = jt.offsets()
    dim = values.shape[-1]
    pos = torch.arange(max_len, device=values.device)
    mask = pos.unsqueeze(0) < lengths.unsqueeze(1)
    n = values.shape[0]
    idx = torch.where(mask, offsets[:-1].unsqueeze(1) + pos.unsqueeze(0), torch.full_like(mask, n, dtype=offsets.dtype))
    table = torch.cat([values, values.new_zeros(1, dim)], dim=0)  # row n = padding
    return table[idx], mask


# ------------------------------------------------------------------ deterministic initialisation


def _block_seed(seed: int, table: str, block: int) -> int:
    digest = hashlib.sha256(f"satrank/{seed}/{table}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def table_init_rows(seed: int, table: str, num_rows: int, dim: int, start: int, end: int) -> torch.Tensor:
    """Rows [start, end) of table `table`'s initial weights, float32 on CPU.

    Uniform(-1/sqrt(num_rows), 1/sqrt(num_rows)) like TorchRec's default init; generated in
    fixed blocks of INIT_BLOCK_ROWS rows with one RNG stream per (seed, table, block), so any
    row range is reproducible without materialising the whole table.
    """
    bound = math.sqrt(1.0 / num_rows)
    first, last = start // INIT_BLOCK_ROWS, (max(end, start + 1) - 1) // INIT_BLOCK_ROWS
    parts = []
    for block in range(first, last + 1):
        b0 = block * INIT_BLOCK_ROWS
        rows = min(INIT_BLOCK_ROWS, num_rows - b0)
        g = torch.Generator().manual_seed(_block_seed(seed, table, block))
        parts.append(torch.rand(rows, dim, generator=g) * (2 * bound) - bound)
    full = torch.cat(parts, dim=0)
    return full[start - first * INIT_BLOCK_ROWS : end - first * INIT_BLOCK_ROWS]


def _fill(tensor: torch.Tensor, seed: int, table: str, num_rows: int, dim: int, row0: int, col0: int) -> None:
    rows, cols = tensor.shape
    block = table_init_rows(seed, table, num_rows, dim, row0, row0 + rows)[:, col0 : col0 + cols]
    tensor.copy_(block.to(device=tensor.device, dtype=tensor.dtype))


@torch.no_grad()
def init_embedding_weights(module: nn.Module, seed: int) -> List[str]:
    """Fill every embedding table that `module` holds (plain or DMP-sharded) with the seeded init.

    Works on a SparseArch, any model containing one, or a DistributedModelParallel around such a
    model: ShardedTensor local shards get exactly their rows/columns of the global init, plain
    tensors (unsharded or data_parallel) the whole table. Returns the state_dict keys filled.
    """
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    state = module.state_dict()
    filled = []
    for key, value in state.items():
        m = TABLE_KEY.match(key)
        if m is None:
            continue
        table = m.group("table")
        if isinstance(value, ShardedTensor):
            num_rows, dim = value.metadata().size  # .size() of a ShardedTensor warns (deprecated)
            for shard in value.local_shards():
                r0, c0 = shard.metadata.shard_offsets
                _fill(shard.tensor, seed, table, num_rows, dim, r0, c0)
        elif isinstance(value, DTensor):
            raise NotImplementedError(f"{key}: DTensor table state is not supported by init_embedding_weights")
        else:
            if value.is_meta:
                raise ValueError(f"{key}: table is still on the meta device; shard it or call SparseArch.materialize")
            num_rows, dim = value.shape
            _fill(value, seed, table, num_rows, dim, 0, 0)
        filled.append(key)
    return filled

"""EASQ's isolated questionnaire pathway around the stage-2 ranker (satrank.models.ranker.saqrec.SAQRecRanker).

A low shared layer h = W0 x of the ranker gets a LoRA branch h_lora = (alpha/r) B A sg(x):
  * target `item` (default): the candidate item-vector layer v_i = e_i + item_proj([attrs; dense]),
    i.e. h = W0 x with x = [e_i; pooled attrs; dense] and W0 = [I | W_item_proj] (+ bias); the LoRA
    sees the candidate's own item embedding, where item quality lives;
  * target `user`: the user-vector layer v_u = user_proj([pooled user features]) (an nn.Linear);
  * `id_targets` (e.g. user_id, item_id): a LoRA of that feature's embedding table (satrank.models.common.lora.LoRAEmbedding),
    (alpha/r) B a[id], added to the satisfaction head's user or item input only (teacher-only: per-id
    satisfaction capacity the main path and serving never read; DPO carries it over). The ids come in
    RankerInputs.extras under `id_extra_key(name)` (`id_extras(kjt, names)` builds them).
Two paths read that layer (sg = stop-gradient, `detach`):
  MAIN          h + sg(h_lora)   -> the ranker's fusion and behaviour towers (click, watch time, ...)
                                   which serve. Behaviour losses never reach the LoRA.
  SATISFACTION  sg(h) + h_lora   -> the satisfaction head (its own MLP over [sg(u_f), i_s, sg(u_f)*i_s
                                   (, u_s)]), the in-model teacher: L_sat reaches only LoRA + sat head.
The LoRA input x is detached too: TorchRec's fused optimizers update the tables inside backward, so
a gradient through the LoRA branch would otherwise move the embedding tables.
Both paths come from ONE ranker forward: main injects sg(h_lora) (for `item` by adding it to the
candidate embedding, v_i is linear in e_i; for `user` as the ranker's `user_delta` argument, added to
user_proj's output, which the ranker returns as `v_u` on request), and the satisfaction path reads
sg(h_main) + (h_lora - sg(h_lora)), which has the value h + h_lora and the gradient of h_lora alone. A fresh adapter (B = 0) leaves every main output bit-identical.

`easq.pathway: shared` builds the baseline instead (an ordinary auxiliary satisfaction tower): no LoRA,
no stop-gradient, the satisfaction head reads the ranker's u_f, v_i (, v_u) as they are, so L_sat
trains the backbone and the tables like any auxiliary task; the main path is the plain ranker.

`policy_forward` (dpo_mode adapter_policy) runs the ranker with frozen parameters, detached inputs and
the adapters ON, so DPO there trains the LoRA only; `reference_forward` is the same model with the
adapters OFF. `merged()` folds the adapters into a serving module. Parameter groups: backbone
(ranker incl. behaviour towers), lora (LoRA + satisfaction head), tables (SparseArch), frozen.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from satrank.models.easq.config import EasqConfig
from satrank.models.common.lora import LoRABranch, LoRAEmbedding, require
from satrank.models.ranker.saqrec import RankerInputs, SAQRecRanker, mlp

GROUP_BACKBONE, GROUP_LORA, GROUP_TABLES, GROUP_FROZEN = "backbone", "lora", "tables", "frozen"
SAT_HEAD = "sat_head"  # output key of the satisfaction head's logit


def id_extra_key(name: str) -> str:
    """RankerInputs.extras key holding the table-row ids [B] of single-valued feature `name`."""
    return f"ids:{name}"


def id_extras(kjt, names: List[str]) -> Dict[str, torch.Tensor]:
    """{id_extra_key(n): ids [B]} of the single-valued features `names` of a (model-input) KeyedJaggedTensor."""
    out = {}
    for n in names:
        if n not in kjt.keys():
            raise KeyError(f"easq.id_targets: feature {n!r} is not in the batch (have {kjt.keys()})")
        jt = kjt[n]
        if jt.lengths().numel():
            lengths = jt.lengths()
            what = f"easq.id_targets: feature {n!r} is not single-valued"
            require((lengths == 1).all(),
                    lambda: f"{what} (ids per row from {int(lengths.min())} to {int(lengths.max())})", what)
        out[id_extra_key(n)] = jt.values().long()
    return out


def detach_inputs(x: RankerInputs) -> RankerInputs:
    """A RankerInputs whose every tensor is detached (no gradient can reach the tables through it)."""
    return RankerInputs(
        user={k: v.detach() for k, v in x.user.items()},
        item=x.item.detach(),
        item_attrs={k: v.detach() for k, v in x.item_attrs.items()},
        dense=x.dense.detach(),
        duration_log1p=x.duration_log1p.detach(),
        histories={k: (V.detach(), m) for k, (V, m) in x.histories.items()},
        extras={k: v.detach() for k, v in x.extras.items()},
    )


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """requires_grad off for every parameter of `module` during the block (restored after). Autograd
    records edges when an op runs, so nothing computed inside can send gradient to these parameters.
    (torch.func.functional_call is not used: it leaves aliased submodules such as GateMLP.out, which
    is also net[-1], holding the substituted tensors after the call.)"""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, f in flags:
            m.training = f


class SatisfactionHead(nn.Module):
    """s = MLP([u, i, u * i (, u_s)]) -> one logit; u = sg(u_f), i = the item's satisfaction-path vector."""

    def __init__(self, d: int, hidden: List[int], with_user: bool) -> None:
        super().__init__()
        self.with_user = with_user
        self.net = mlp((4 if with_user else 3) * d, hidden, 1)

    def forward(self, u: torch.Tensor, i: torch.Tensor, u_s: Optional[torch.Tensor] = None) -> torch.Tensor:
        parts = [u, i, u * i]
        if self.with_user:
            parts.append(u_s)
        return self.net(torch.cat(parts, dim=-1)).squeeze(-1)


def _id_side(name: str, model_cfg) -> str:
    """`item` or `user`: which input of the satisfaction head an `easq.id_targets` feature's adapter adds to."""
    if name == model_cfg.item_feature or name in model_cfg.item_attr_features:
        return "item"
    if name in model_cfg.user_features:
        return "user"
    raise ValueError(f"easq.id_targets: {name!r} is neither a user feature (model.user_features "
                     f"{model_cfg.user_features}) nor the item or an item attribute")


class EasqRanker(nn.Module):
    """SAQRecRanker + LoRA pathway + satisfaction head. forward(RankerInputs) -> the ranker's outputs
    (main path) plus `sat_head` (satisfaction-path logit). Exposes `cfg`/`d`/`heads` like the ranker,
    so `RankerFromSparse(EasqRanker(...), data)` works unchanged."""

    def __init__(self, ranker: SAQRecRanker, cfg: EasqConfig, id_rows: Optional[Dict[str, int]] = None) -> None:
        """`id_rows`: table rows of each single-valued sparse feature (needed for `cfg.id_targets`)."""
        super().__init__()
        cfg.validate("easq")
        if not isinstance(ranker, SAQRecRanker):
            raise TypeError(f"EasqRanker wraps a SAQRecRanker, got {type(ranker).__name__}")
        if cfg.dpo_head not in ranker.heads:
            raise ValueError(f"easq.dpo_head: {cfg.dpo_head!r} is not a head of this ranker {ranker.heads}")
        self.ranker, self.easq_cfg, self.d = ranker, cfg, ranker.d
        self.cfg = ranker.cfg  # the ModelConfig, read by satrank.models.ranker.saqrec.ranker_inputs
        self.shared = cfg.pathway == "shared"
        lora = {}
        if "item" in cfg.targets:
            extra = ranker.item_proj.in_features if ranker.item_proj is not None else 0
            lora["item"] = LoRABranch(ranker.d + extra, ranker.d, cfg.rank, cfg.alpha, cfg.dropout)
        if "user" in cfg.targets:
            lora["user"] = LoRABranch(ranker.user_proj.in_features, ranker.d, cfg.rank, cfg.alpha, cfg.dropout)
        sides = {name: _id_side(name, ranker.cfg) for name in cfg.id_targets}
        for name in sides:
            if not id_rows or name not in id_rows:
                raise ValueError(f"easq.id_targets: no table size for {name!r} (a single-valued sparse feature "
                                 f"of the data; have {sorted(id_rows or {})})")
        id_lora = {name: LoRAEmbedding(int(id_rows[name]), ranker.d, cfg.rank, cfg.alpha) for name in sides}
        # shared pathway: no adapter. They were still built above, so that both pathways draw the same random
        # numbers and the satisfaction head below starts from the same weights (a like-for-like comparison).
        self.lora = nn.ModuleDict({} if self.shared else lora)
        self.id_lora = nn.ModuleDict({} if self.shared else id_lora)
        self.id_sides: Dict[str, str] = {} if self.shared else sides
        self.sat_head = SatisfactionHead(ranker.d, list(cfg.sat_head_hidden), with_user="user" in cfg.targets)

    @property
    def heads(self) -> List[str]:
        return self.ranker.heads + [SAT_HEAD]

    # ------------------------------------------------------------------ pathway inputs
    def lora_inputs(self, x: RankerInputs) -> Dict[str, torch.Tensor]:
        """Detached inputs x of each targeted layer: item [e_i; attrs; dense], user [pooled user feats]."""
        r, out = self.ranker, {}
        if "item" in self.lora:
            parts = [x.item]
            if r.item_proj is not None:
                parts += r._pick(x.item_attrs, r.cfg.item_attr_features, "item attributes")
                if r.n_dense:
                    parts.append(x.dense.to(x.item.dtype))
            out["item"] = torch.cat(parts, dim=-1).detach()
        if "user" in self.lora:
            out["user"] = torch.cat(r._pick(x.user, r.cfg.user_features, "user features"), dim=-1).detach()
        return out

    def deltas(self, x: RankerInputs) -> Dict[str, torch.Tensor]:
        """h_lora per target, [B, d]; gradient reaches only the LoRA parameters."""
        return {t: self.lora[t](v) for t, v in self.lora_inputs(x).items()}

    @property
    def id_features(self) -> List[str]:
        """Single-valued features whose ids this pathway reads from RankerInputs.extras (`id_extras`)."""
        return list(self.id_lora.keys())

    def id_deltas(self, x: RankerInputs) -> Dict[str, torch.Tensor]:
        """Sum of the id adapters per side (`user`, `item`), [B, d]: added to the satisfaction head's input only."""
        out: Dict[str, torch.Tensor] = {}
        for name, adapter in self.id_lora.items():
            key = id_extra_key(name)
            if key not in x.extras:
                raise KeyError(f"easq.id_targets: RankerInputs.extras has no {key!r} (pass id_extras(batch.sparse, "
                               f"easq.id_features) with the ranker's inputs)")
            side = self.id_sides[name]
            d = adapter(x.extras[key])
            out[side] = out[side] + d if side in out else d
        return out

    def _sat_head(self, u: torch.Tensor, i: torch.Tensor, u_s: Optional[torch.Tensor],
                  x: RankerInputs) -> torch.Tensor:
        """The satisfaction head on (u, i, u_s) plus the id adapters' user / item terms."""
        idd = self.id_deltas(x)
        if "user" in idd:
            u = u + idd["user"]
        if "item" in idd:
            i = i + idd["item"]
        return self.sat_head(u, i, u_s)

    def _run(self, x: RankerInputs, inject: Dict[str, torch.Tensor]
             ) -> Tuple[Dict[str, torch.Tensor], Optional[torch.Tensor]]:
        """One ranker forward with `inject[t]` added to layer t's output; returns (outputs, v_u), v_u (after
        the injection) only when the user layer is targeted (the satisfaction head reads it), else None."""
        if "item" in inject:
            x = dataclasses.replace(x, item=x.item + inject["item"])  # v_i = e_i + ... is linear in e_i
        out = self.ranker(x, user_delta=inject.get("user"), with_user_vector=self.sat_head.with_user)
        v_u = out.pop("v_u", None)
        return out, v_u

    # ------------------------------------------------------------------ forwards
    def forward(self, x: RankerInputs) -> Dict[str, torch.Tensor]:
        """Main outputs (h + sg(h_lora)) and `sat_head` (sg(h) + h_lora); shared pathway: the plain ranker's
        outputs and `sat_head` on its u_f, v_i (, v_u) with the graph kept (an ordinary auxiliary head)."""
        if self.shared:
            out, v_u = self._run(x, {})
            out = dict(out)
            out[SAT_HEAD] = self.sat_head(out["user"], out["item"], v_u)
            return out
        delta = self.deltas(x)
        out, v_u = self._run(x, {t: v.detach() for t, v in delta.items()})
        st = lambda h, t: h.detach() + (delta[t] - delta[t].detach()) if t in delta else h.detach()  # noqa: E731
        out = dict(out)
        out[SAT_HEAD] = self._sat_head(out["user"].detach(), st(out["item"], "item"),
                                       st(v_u, "user") if v_u is not None else None, x)
        return out

    def policy_forward(self, x: RankerInputs) -> Dict[str, torch.Tensor]:
        """Adapters ON with the backbone frozen (parameters and inputs out of the graph): gradient reaches the
        LoRA (and, through `sat_head`, the satisfaction head) only. Used by dpo_mode adapter_policy."""
        if self.shared:
            raise ValueError("policy_forward: the shared pathway has no adapters (easq.pathway: shared)")
        xd = detach_inputs(x)
        delta = self.deltas(xd)
        with _frozen(self.ranker):  # graph edges are recorded at op time: none reach the backbone
            out, v_u = self._run(xd, delta)
        out = dict(out)
        out[SAT_HEAD] = self._sat_head(out["user"].detach(), out["item"], v_u, xd)  # item = sg(v_i) + h_lora here
        return out

    @torch.no_grad()
    def reference_forward(self, x: RankerInputs) -> Dict[str, torch.Tensor]:
        """The same model with the adapters OFF, no graph, dropout off (the DPO reference policy)."""
        with _eval_mode(self.ranker):
            return self._run(x, {})[0]

    def dpo_scores(self, x: RankerInputs) -> Dict[str, torch.Tensor]:
        """Per-row scores for DPO on pair rows: `policy` (with graph), `reference` (detached), `sat_head`.
        easq: policy = main head `dpo_head`, reference = sg(sat head), one forward.
        adapter_policy: policy = main head with adapters on (LoRA-only graph), reference = adapters off."""
        head = self.easq_cfg.dpo_head
        if self.easq_cfg.dpo_mode == "easq":
            out = self.forward(x)
            self._need(out, head)
            return {"policy": out[head], "reference": out[SAT_HEAD].detach(), SAT_HEAD: out[SAT_HEAD]}
        pol = self.policy_forward(x)
        self._need(pol, head)
        ref = self.reference_forward(x)
        return {"policy": pol[head], "reference": ref[head].detach(), SAT_HEAD: pol[SAT_HEAD]}

    @staticmethod
    def _need(out: Dict[str, torch.Tensor], head: str) -> None:
        if head not in out or out[head].dim() != 1:
            heads = [k for k, v in out.items() if v.dim() == 1]
            raise KeyError(f"easq.dpo_head {head!r} is not a per-row output of the ranker (have {heads})")

    # ------------------------------------------------------------------ groups and serving
    def lora_parameters(self) -> List[nn.Parameter]:
        return list(self.lora.parameters()) + list(self.id_lora.parameters()) + list(self.sat_head.parameters())

    def backbone_parameters(self) -> List[nn.Parameter]:
        return list(self.ranker.parameters())

    @torch.no_grad()
    def merged(self) -> "ServingRanker":
        """The main path with the adapters folded in (eval mode): a copy of the ranker whose user_proj
        (target user) and item_proj (target item, attribute/dense columns) carry W0 + (alpha/r) B A,
        plus a d x d `item_in` = I + the adapter's e_i block applied to the candidate embedding (the
        identity part of v_i cannot absorb it, and the item table is shared with the histories). The id
        adapters (`id_targets`) feed the satisfaction head only, so serving has nothing of them to fold."""
        ranker = copy.deepcopy(self.ranker)
        item_in = None
        if "user" in self.lora:
            ranker.user_proj.weight += self.lora["user"].delta_weight()
        if "item" in self.lora:
            dw, d = self.lora["item"].delta_weight(), self.d
            if ranker.item_proj is not None:
                ranker.item_proj.weight += dw[:, d:]
            item_in = nn.Linear(d, d, bias=False, device=dw.device, dtype=dw.dtype)
            item_in.weight.copy_(torch.eye(d, device=dw.device, dtype=dw.dtype) + dw[:, :d])
        return ServingRanker(ranker, item_in).eval()


class ServingRanker(nn.Module):
    """Merged EASQ main path for serving: ranker(x with item <- item_in(item)); no satisfaction head."""

    def __init__(self, ranker: SAQRecRanker, item_in: Optional[nn.Linear]) -> None:
        super().__init__()
        self.ranker, self.item_in = ranker, item_in
        self.cfg, self.d = ranker.cfg, ranker.d

    @property
    def heads(self) -> List[str]:
        return self.ranker.heads

    def user_side(self, x) -> Dict[str, torch.Tensor]:
        """The ranker's user side (the adapters folded here touch only the item input): once per request."""
        return self.ranker.user_side(x)

    def score_candidates(self, state: Dict[str, torch.Tensor], x) -> Dict[str, torch.Tensor]:
        """The ranker's candidate side with item <- item_in(item)."""
        if self.item_in is not None:
            x = dataclasses.replace(x, item=self.item_in(x.item))
        return self.ranker.score_candidates(state, x)

    def forward(self, x: RankerInputs) -> Dict[str, torch.Tensor]:
        return self.score_candidates(self.user_side(x), x)


def parameter_groups(model: nn.Module) -> Dict[str, List[Tuple[str, nn.Parameter]]]:
    """(name, parameter) per optimizer group of a model holding an EasqRanker (wrapped or not):
    `lora` = LoRA + satisfaction head, `tables` = every SparseArch parameter (fused optimizers),
    `frozen` = requires_grad False (g, propensity), `backbone` = the rest (ranker + behaviour towers)."""
    from satrank.embeddings.tables import SparseArch

    lora_ids, table_ids, found = set(), set(), False
    for m in model.modules():
        if isinstance(m, EasqRanker):
            found = True
            lora_ids |= {id(p) for p in m.lora_parameters()}
        elif isinstance(m, SparseArch):
            table_ids |= {id(p) for p in m.parameters()}
    if not found:
        raise TypeError(f"parameter_groups: no EasqRanker inside {type(model).__name__}")
    groups: Dict[str, List[Tuple[str, nn.Parameter]]] = {
        GROUP_BACKBONE: [], GROUP_LORA: [], GROUP_TABLES: [], GROUP_FROZEN: []}
    for name, p in model.named_parameters():
        if id(p) in table_ids:
            groups[GROUP_TABLES].append((name, p))
        elif id(p) in lora_ids:
            groups[GROUP_LORA].append((name, p))
        elif not p.requires_grad:
            groups[GROUP_FROZEN].append((name, p))
        else:
            groups[GROUP_BACKBONE].append((name, p))
    return groups


def install_easq(task: nn.Module, cfg: EasqConfig) -> EasqRanker:
    """Wrap the SAQRecRanker of a satrank.models.ranker.task.RankerTask in an EasqRanker, in place, before
    DMP wrapping. The task's L2 term (loss.gamma, `task.l2_path`) is re-pointed at the backbone so the
    behaviour loss never reaches the LoRA. Returns the EasqRanker (task.ranker.ranker)."""
    holder = getattr(task, "ranker", None)
    base = getattr(holder, "ranker", None)
    if not isinstance(base, SAQRecRanker):
        raise TypeError(f"install_easq: expected task.ranker.ranker to be a SAQRecRanker, got {type(base).__name__}")
    data = getattr(task, "data", None)
    id_rows = {f.name: f.num_rows for f in data.sparse} if data is not None else None
    easq = EasqRanker(base, cfg, id_rows)
    holder.ranker = easq
    if hasattr(task, "l2_path"):
        task.l2_path = "ranker.ranker.ranker"  # L2 over the backbone only (EasqRanker.ranker)
    return easq

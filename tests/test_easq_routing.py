"""EASQ parameter isolation, on a real (unsharded, materialized) SparseArch + SAQRecRanker:
each loss reaches exactly its parameter groups, L_sat-only training leaves the backbone and the
embedding tables bit-identical, a fresh adapter changes nothing, and the merged serving module
matches the main path."""
from typing import Dict, List

import pytest
import torch
from torch import nn

from satrank.embeddings.tables import SparseArch
from satrank.models.easq.dpo import EasqLoss, dpo_loss
from satrank.models.easq.pathway import SAT_HEAD, EasqRanker, id_extras, install_easq, parameter_groups
from satrank.models.easq.config import EasqConfig
from satrank.models.common.lora import LoRABranch, LoRAEmbedding
from satrank.models.ranker.losses import MultiTaskLoss
from satrank.models.ranker.config import ModelConfig, MultiTaskLossConfig
from satrank.models.ranker.saqrec import RankerFromSparse, build_ranker, ranker_inputs
from satrank.pipeline.config import from_dict
from tests._synthetic import batch_from_rows, data_config, emb_config, make_rows

TOWERS = ("wt_tower.", "sat_tower.", "skip_tower.")


def _model_cfg(**kw) -> ModelConfig:
    raw = dict(sid=False, mlse=False, mtl=True, skip_head=True, dropout=0.0, user_features=["user_id"],
               item_attr_features=["author_id", "category_id"])
    raw.update(kw)
    return from_dict(ModelConfig, raw, "model")


class Net(nn.Module):
    """SparseArch + RankerFromSparse(EasqRanker): the shape of the stage-3 task (minus frozen models)."""

    def __init__(self, targets: List[str], seed: int = 0, **easq) -> None:
        super().__init__()
        self.data = data_config()
        self.arch = SparseArch(self.data, emb_config()).materialize(seed=seed)
        self.mcfg = _model_cfg()
        torch.manual_seed(seed)
        base = build_ranker(self.mcfg, self.data, self.arch.feature_dim)
        self.easq = EasqRanker(base, EasqConfig(targets=targets, **{"distill_weight": 0.0, **easq}), {f.name: f.num_rows for f in self.data.sparse})
        self.head = RankerFromSparse(self.easq, self.data)

    def forward(self, batch):
        return self.head(self.arch(batch.sparse), batch.dense, id_extras(batch.sparse, self.easq.id_features))


def _inputs(net: Net, batch):
    """The ranker's inputs of a batch, with the ids the id adapters read."""
    return ranker_inputs(net.arch(batch.sparse), batch.dense, net.mcfg, net.data,
                         id_extras(batch.sparse, net.easq.id_features))


def _trained_adapters(net: Net, seed: int = 5) -> None:
    """B != 0, as after some training, so that a leak through the LoRA would show in every gradient."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, (LoRABranch, LoRAEmbedding)):
            with torch.no_grad():
                m.B.copy_(0.3 * torch.randn(m.B.shape, generator=g))


def _batch(net: Net, n: int = 48, seed: int = 0):
    rows = make_rows(net.data, n, seed)
    b = batch_from_rows(net.data, rows)
    g = torch.Generator().manual_seed(seed + 100)
    answered = (torch.rand(n, generator=g) < 0.5).float()
    answered[:4] = 1.0
    sat = (torch.rand(n, generator=g) < 0.5).float() * answered
    sat[:2], sat[2:4] = 1.0, 0.0  # rows 0,1 satisfied, rows 2,3 dissatisfied (answered)
    b.labels.update(watch_time_s=torch.rand(n, generator=g) * 30, skip=(torch.rand(n, generator=g) < 0.3).float(),
                    questionnaire_answered=answered, satisfied=sat)
    rho = torch.rand(n, generator=g) * 0.5 + 0.01
    return b, rho


def _groups(net: Net) -> Dict[str, List[nn.Parameter]]:
    g = {"backbone": [], "towers": [], "lora": [], "sat_head": [], "tables": list(net.arch.parameters())}
    for name, p in net.easq.ranker.named_parameters():
        g["towers" if name.startswith(TOWERS) else "backbone"].append(p)
    g["lora"] = list(net.easq.lora.parameters()) + list(net.easq.id_lora.parameters())
    g["sat_head"] = list(net.easq.sat_head.parameters())
    assert all(len(v) > 0 for v in g.values()), {k: len(v) for k, v in g.items()}
    return g


def _grads(loss: torch.Tensor, params: List[nn.Parameter]) -> List[torch.Tensor]:
    return list(torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True))


def _silent(grads) -> bool:
    return all(g is None or bool((g == 0).all()) for g in grads)


def _reaches(grads) -> bool:
    return any(g is not None and bool((g != 0).any()) for g in grads)


def _losses(net: Net, batch, rho) -> Dict[str, torch.Tensor]:
    out = net(batch)
    mtl = MultiTaskLoss(MultiTaskLossConfig(label_correction=False, gamma=1e-3), net.mcfg)
    pseudo = torch.sigmoid(torch.randn(batch.size, generator=torch.Generator().manual_seed(9)))
    behaviour = mtl(out, batch.labels, epoch=0, pseudo_satisfaction=pseudo,
                    params=net.easq.backbone_parameters())["loss"]
    l_sat = EasqLoss(net.easq.easq_cfg).sat(out[SAT_HEAD], batch.labels, rho).loss
    w, l = torch.tensor([0, 1, 0]), torch.tensor([2, 3, 3])
    x = _inputs(net, batch)
    sc = net.easq.dpo_scores(x)
    l_dpo = dpo_loss(sc["policy"][w], sc["policy"][l], sc["reference"][w], sc["reference"][l], beta=0.5).loss
    return {"behaviour": behaviour, "sat": l_sat, "dpo": l_dpo}


@pytest.mark.parametrize("targets,id_targets", [(["item"], []), (["user"], []), (["item", "user"], []),
                                               (["item"], ["user_id", "item_id"])])
def test_each_loss_reaches_exactly_its_parameter_groups(targets, id_targets):
    net = Net(targets, id_targets=id_targets)
    _trained_adapters(net)
    batch, rho = _batch(net)
    losses = _losses(net, batch, rho)
    groups = _groups(net)
    allowed = {  # the design: L_sat -> LoRA + sat head; behaviour and DPO -> backbone (+ towers, tables)
        "sat": {"lora", "sat_head"},
        "behaviour": {"backbone", "towers", "tables"},
        "dpo": {"backbone", "tables"},  # DPO on the click logit u_f . v_i: no tower on its path
    }
    for lname, loss in losses.items():
        for gname, params in groups.items():
            grads = _grads(loss, params)
            if gname in allowed[lname]:
                assert _reaches(grads), f"{lname} should train {gname}"
            else:
                assert _silent(grads), f"{lname} leaked into {gname}"


def test_adapter_policy_dpo_trains_only_the_lora():
    net = Net(["item", "user"], dpo_mode="adapter_policy")
    _trained_adapters(net)
    batch, _ = _batch(net)
    x = _inputs(net, batch)
    sc = net.easq.dpo_scores(x)
    w, l = torch.tensor([0, 1]), torch.tensor([2, 3])
    loss = dpo_loss(sc["policy"][w], sc["policy"][l], sc["reference"][w], sc["reference"][l], beta=1.0).loss
    groups = _groups(net)
    for gname, params in groups.items():
        grads = _grads(loss, params)
        assert _reaches(grads) if gname == "lora" else _silent(grads), gname
    # reference = adapters off = the plain ranker in eval mode; afterwards the ranker is left trainable
    # and in training mode (eval mode switches nn.TransformerEncoderLayer to its fused path)
    assert net.easq.ranker.training and all(p.requires_grad for p in net.easq.ranker.parameters())
    net.easq.ranker.eval()
    with torch.no_grad():
        plain = net.easq.ranker(x)["click"]
    torch.testing.assert_close(sc["reference"], plain, rtol=0, atol=0)


@pytest.mark.parametrize("id_targets", [[], ["user_id", "item_id"]])
def test_sat_only_training_leaves_backbone_and_tables_bit_identical(id_targets):
    net = Net(["item", "user"], id_targets=id_targets)
    groups = parameter_groups(net)
    assert {k: len(v) > 0 for k, v in groups.items()} == {"backbone": True, "lora": True, "tables": True, "frozen": False}
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opts = [torch.optim.Adam([p for _, p in groups["backbone"]], lr=1e-2),
            torch.optim.Adam([p for _, p in groups["lora"]], lr=1e-2),
            torch.optim.Adagrad([p for _, p in groups["tables"]], lr=0.1)]
    loss_fn = EasqLoss(net.easq.easq_cfg)
    for step in range(4):
        batch, rho = _batch(net, seed=step)
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss_fn(net(batch), batch.labels, rho)["loss"].backward()
        for o in opts:
            o.step()
    lora_names = {n for n, _ in groups["lora"]}
    for name, p in net.named_parameters():
        if name in lora_names:
            continue
        assert torch.equal(p, before[name]), f"{name} moved under L_sat only"
    moved = [n for n in lora_names if not torch.equal(dict(net.named_parameters())[n], before[n])]
    assert any(".B" in n for n in moved) and any("sat_head" in n for n in moved)
    if id_targets:  # the id adapters' rows of the ids seen move too
        assert {f"easq.id_lora.{f}.A" for f in id_targets} <= set(moved)


def test_id_adapters_feed_the_satisfaction_head_only_and_start_at_zero():
    """easq.id_targets: per-id LoRA rows on the satisfaction path; main outputs and serving never see them."""
    net, plain = Net(["item"], id_targets=["user_id", "item_id"]), Net(["item"])
    batch, _ = _batch(net)
    out = net(batch)
    head = net.easq.sat_head
    plain.easq.sat_head.load_state_dict(head.state_dict())
    torch.testing.assert_close(out[SAT_HEAD], plain(batch)[SAT_HEAD], rtol=0, atol=0)  # B = 0: adds nothing
    with torch.no_grad():  # train the id adapters only (the item LoRA would move the main path by design)
        for m in net.easq.id_lora.values():
            m.B.copy_(0.3 * torch.randn(m.B.shape, generator=torch.Generator().manual_seed(5)))
    out2 = net(batch)
    assert (out2[SAT_HEAD] - out[SAT_HEAD]).abs().max() > 1e-3
    for k in net.easq.ranker.heads:  # the main path is untouched by the id adapters
        assert torch.equal(out2[k], out[k]), k
    net.eval()
    with torch.no_grad():
        served = net.easq.merged()(_inputs(net, batch))
        main = net(batch)
    assert all((served[k] - main[k]).abs().max() < 1e-5 for k in served)
    x = ranker_inputs(net.arch(batch.sparse), batch.dense, net.mcfg, net.data)  # no ids passed
    with pytest.raises(KeyError, match="easq.id_targets.*ids:user_id"):
        net.easq(x)
    with pytest.raises(ValueError, match="easq.id_targets: 'hist_click'"):
        Net(["item"], id_targets=["hist_click"])
    with pytest.raises(ValueError, match="easq.id_targets: no table size for 'user_id'"):
        EasqRanker(net.easq.ranker, EasqConfig(id_targets=["user_id"]))


def test_fresh_adapter_leaves_every_main_output_bit_identical():
    net = Net(["item", "user"])
    batch, _ = _batch(net)
    out = net(batch)
    x = _inputs(net, batch)
    plain = net.easq.ranker(x)  # the same ranker, called directly: no user_delta, no adapter
    assert set(out) == set(plain) | {SAT_HEAD}
    for k, v in plain.items():
        assert torch.equal(out[k], v), k


def test_trained_adapter_changes_the_main_path_and_merged_serving_matches_it():
    net = Net(["item", "user"])
    _trained_adapters(net)
    net.eval()
    batch, _ = _batch(net)
    x = _inputs(net, batch)
    with torch.no_grad():
        out, plain = net.easq(x), net.easq.ranker(x)
        serving = net.easq.merged()
        served = serving(x)
    assert (out["click"] - plain["click"]).abs().max() > 1e-3  # sg(h_lora) is injected into the main path
    for k in serving.heads + ["user", "item"]:
        assert (served[k] - out[k]).abs().max() < 1e-5, k
    assert SAT_HEAD not in served
    assert not serving.ranker.user_proj._forward_hooks  # the copy does not call back into the pathway


def test_the_user_layer_pathway_is_explicit_data_flow_without_hooks():
    """The user-target LoRA reaches v_u as the ranker's `user_delta` argument and comes back as its `v_u` output:
    no module holds a hook, and the satisfaction head reads exactly v_u + sg(h_lora)."""
    net = Net(["item", "user"])
    _trained_adapters(net)
    net.eval()
    batch, _ = _batch(net)
    x = _inputs(net, batch)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
    with torch.no_grad():
        delta = net.easq.deltas(x)
        out = net.easq.ranker(x, user_delta=delta["user"], with_user_vector=True)
        torch.testing.assert_close(out["v_u"], net.easq.ranker.user_vector(x) + delta["user"], rtol=0, atol=0)
        assert "v_u" not in net.easq.ranker(x) and "v_u" not in net.easq(x)  # only when asked for
        main, v_u = net.easq._run(x, {t: d for t, d in delta.items()})
        torch.testing.assert_close(main["click"], net.easq(x)["click"], rtol=0, atol=0)
        torch.testing.assert_close(v_u, out["v_u"], rtol=0, atol=0)


def test_dpo_weight_zero_ramp_keeps_the_graph_but_gives_zero_gradients():
    net = Net(["item"])
    _trained_adapters(net)
    batch, rho = _batch(net)
    x = _inputs(net, batch)
    loss_fn = EasqLoss(net.easq.easq_cfg)

    class Pairs:
        w_index, l_index, weight = torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([1.0, 2.0])

    res = loss_fn(net.easq(x), batch.labels, rho, net.easq.dpo_scores(x), Pairs())
    assert float(res["dpo_ramp"]) == 0.0 and float(res["dpo"]) > 0
    grads = _grads(res["loss"], _groups(net)["backbone"])
    assert all(g is not None for g in grads) and _silent(grads)  # present for DDP, exactly zero


def test_install_easq_on_a_ranker_task_keeps_the_behaviour_loss_off_the_lora():
    from satrank.models.ranker.task import RankerTask

    data = data_config()
    mcfg = _model_cfg(mtl=False)
    task = RankerTask(data, emb_config(), mcfg, MultiTaskLossConfig(gamma=1e-2, label_correction=False))
    task.sparse_arch.materialize(seed=0)
    easq = install_easq(task, EasqConfig(targets=["item", "user"]))
    assert task.ranker.ranker is easq
    assert task.l2_module() is easq.ranker  # the L2 term covers the backbone only, named by task.l2_path
    _trained_adapters(task)
    rows = make_rows(data, 32, 1)
    b = batch_from_rows(data, rows)
    b.labels["watch_time_s"] = torch.rand(32) * 10
    b.labels["skip"] = torch.zeros(32)
    loss, _ = task(b)
    assert _silent(_grads(loss, easq.lora_parameters()))
    assert _reaches(_grads(loss, easq.backbone_parameters()))
    groups = parameter_groups(task)
    assert {id(p) for _, p in groups["tables"]} == {id(p) for p in task.sparse_arch.parameters()}
    assert {id(p) for _, p in groups["lora"]} == {id(p) for p in easq.lora_parameters()}


def test_bad_easq_settings_are_clear_errors():
    from satrank.pipeline.config import ConfigError

    with pytest.raises(ValueError, match="easq.dpo_head: 'nope'"):
        Net(["item"], dpo_head="nope")
    with pytest.raises(ConfigError, match=r"easq.targets: \['items'\]"):
        from_dict(EasqConfig, {"targets": ["items"]}, "easq")
    with pytest.raises(ConfigError, match="easq.beta"):
        from_dict(EasqConfig, {"beta": 0.0}, "easq")


def test_id_adapter_ids_must_be_one_per_row_of_a_feature_in_the_batch():
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    kjt = KeyedJaggedTensor.from_lengths_sync(["user_id", "hist_click"], torch.tensor([3, 5, 7, 1, 2, 0]),
                                              torch.tensor([1, 1, 1, 2, 0, 0]))
    assert torch.equal(id_extras(kjt, ["user_id"])["ids:user_id"], torch.tensor([3, 5, 7]))
    with pytest.raises(ValueError, match=r"feature 'hist_click' is not single-valued \(ids per row from 0 to 2\)"):
        id_extras(kjt, ["hist_click"])
    with pytest.raises(KeyError, match="feature 'item_id' is not in the batch"):
        id_extras(kjt, ["item_id"])


@pytest.mark.parametrize("targets", [["item"], ["item", "user"]])
def test_shared_pathway_is_an_ordinary_auxiliary_head_whose_loss_reaches_backbone_and_tables(targets):
    """The baseline (easq.pathway: shared): no adapter, no stop-gradient; the main path is the plain ranker."""
    net = Net(targets, pathway="shared")
    assert len(net.easq.lora) == 0
    groups = parameter_groups(net)
    assert {id(p) for _, p in groups["lora"]} == {id(p) for p in net.easq.sat_head.parameters()}
    batch, rho = _batch(net)
    out = net(batch)
    x = _inputs(net, batch)
    plain = net.easq.ranker(x)
    for k, v in plain.items():
        assert torch.equal(out[k], v), k
    l_sat = EasqLoss(net.easq.easq_cfg).sat(out[SAT_HEAD], batch.labels, rho).loss
    backbone = [p for n, p in net.easq.ranker.named_parameters() if not n.startswith(TOWERS)]
    assert _reaches(_grads(l_sat, list(net.easq.sat_head.parameters())))
    assert _reaches(_grads(l_sat, backbone))  # e.g. user_proj, item_proj, the history encoders
    assert _reaches(_grads(l_sat, list(net.arch.parameters())))  # and the embedding tables
    if "user" in targets:  # v_u feeds the head with its graph
        assert _reaches(_grads(l_sat, list(net.easq.ranker.user_proj.parameters())))
    # the isolated pathway with the same seed: the same loss reaches neither (the routing tests above)
    iso = Net(targets)
    _trained_adapters(iso)
    out_i = iso(batch)
    l_iso = EasqLoss(iso.easq.easq_cfg).sat(out_i[SAT_HEAD], batch.labels, rho).loss
    assert _silent(_grads(l_iso, list(iso.arch.parameters())))
    assert _silent(_grads(l_iso, [p for n, p in iso.easq.ranker.named_parameters() if not n.startswith(TOWERS)]))


def test_shared_pathway_has_no_adapter_policy_and_its_merged_copy_is_the_plain_ranker():
    from satrank.pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="easq.pathway: 'shared' has no adapters"):
        from_dict(EasqConfig, {"pathway": "shared", "dpo_mode": "adapter_policy"}, "easq")
    with pytest.raises(ConfigError, match="easq.pathway"):
        from_dict(EasqConfig, {"pathway": "both"}, "easq")
    net = Net(["item", "user"], pathway="shared")
    net.eval()
    batch, _ = _batch(net)
    x = _inputs(net, batch)
    with torch.no_grad():
        served, out = net.easq.merged()(x), net.easq(x)
    assert all(torch.equal(served[k], out[k]) for k in served)


def test_both_pathways_start_the_satisfaction_head_from_the_same_weights():
    iso, shared = Net(["item", "user"], seed=3), Net(["item", "user"], seed=3, pathway="shared")
    for (n, a), (_, b) in zip(iso.easq.sat_head.named_parameters(), shared.easq.sat_head.named_parameters()):
        assert torch.equal(a, b), n

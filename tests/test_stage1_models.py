"""Stage-1 models (models/stage1/tasks.py, models/common/towers.py): padding-invariant history encoders, frozen tables in
the satisfaction model (no gradient, bit-identical after optimiser steps), weight hand-over from the
click and propensity models, label handling, config errors, and a 2-rank DMP + TrainPipelineSparseDist run
in which the frozen sharded tables stay bit-identical while the head trains."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

ROOT = Path(__file__).resolve().parent.parent

from _stage1_helpers import small_data_config  # noqa: E402
from satrank.embeddings.config import EmbeddingConfig  # noqa: E402
from satrank.jobs.config import load_config  # noqa: E402
from satrank.models.stage1.config import PropensityConfig, SatisfactionConfig, TowerConfig  # noqa: E402
from satrank.models.stage1.tasks import ClickModel, PropensityModel, SatisfactionModel  # noqa: E402
from satrank.models.common.towers import MeanHistoryEncoder, TransformerHistoryEncoder  # noqa: E402
from satrank.pipeline.batch import Batch  # noqa: E402
from satrank.pipeline.config import ConfigError, from_dict  # noqa: E402
from satrank.pipeline.features import DataConfig  # noqa: E402

data_config = small_data_config  # the shared small data contract (tests/_stage1_helpers.py)


def make_batch(data: DataConfig, n: int, seed: int, hist_lengths=None) -> Batch:
    g = torch.Generator().manual_seed(seed)
    values, lengths = [], []
    for f in data.sparse:
        values.append(torch.randint(0, f.vocab_size, (n,), generator=g))
        lengths.append(torch.ones(n, dtype=torch.int64))
    for f in data.sequence:
        hl = torch.tensor(hist_lengths) if hist_lengths is not None else torch.randint(0, f.max_len + 1, (n,), generator=g)
        values.append(torch.randint(0, f.vocab_size, (int(hl.sum()),), generator=g))
        lengths.append(hl.long())
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=data.sparse_names, values=torch.cat(values), lengths=torch.cat(lengths))
    o = (torch.rand(n, generator=g) < 0.5).float()
    s = (torch.rand(n, generator=g) < 0.6).float() * o
    labels = {"click": (torch.rand(n, generator=g) < 0.4).float(), "questionnaire_answered": o, "satisfied": s}
    return Batch(sparse=kjt, dense=torch.rand(n, 1, generator=g), labels=labels)


def materialize(model, seed=0):
    from satrank.embeddings.tables import SparseArch

    for i, m in enumerate(x for x in model.modules() if isinstance(x, SparseArch)):
        m.materialize(seed + i)
    return model


EMB = EmbeddingConfig(dim=8)


# ------------------------------------------------------------------------------ history encoders
@pytest.mark.parametrize("kind", ["mean", "transformer"])
def test_garbage_and_extra_padding_beyond_lengths_do_not_change_the_history_vector(kind):
    torch.manual_seed(0)
    enc = MeanHistoryEncoder(8) if kind == "mean" else TransformerHistoryEncoder(8, 2, 16, max_len=7)
    enc.eval()
    lengths = torch.tensor([3, 0, 5, 1])
    seq = torch.randn(4, 5, 8)
    mask = torch.arange(5).unsqueeze(0) < lengths.unsqueeze(1)
    clean = torch.where(mask.unsqueeze(-1), seq, torch.zeros_like(seq))
    ref = enc(clean, mask)
    garbage = torch.cat([seq, 1e4 * torch.randn(4, 2, 8)], dim=1)  # random junk at padded slots, 2 extra slots
    garbage = torch.where(torch.cat([mask, torch.zeros(4, 2, dtype=torch.bool)], 1).unsqueeze(-1), garbage,
                          1e4 * torch.randn(4, 7, 8))
    mask7 = torch.cat([mask, torch.zeros(4, 2, dtype=torch.bool)], dim=1)
    out = enc(garbage, mask7)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(ref[1]) == 0  # empty history -> zero vector
    # a row's vector does not depend on the other rows of the batch
    torch.testing.assert_close(enc(clean[2:3], mask[2:3]), ref[2:3], rtol=1e-5, atol=1e-5)
    if kind == "mean":
        torch.testing.assert_close(ref[0], seq[0, :3].mean(0))


def test_user_vector_of_a_row_is_independent_of_batch_mates_histories():
    torch.manual_seed(0)
    data = data_config()
    model = materialize(ClickModel(data, EMB, TowerConfig(dim=8, history_encoder="transformer"))).eval()
    b = make_batch(data, 4, seed=1, hist_lengths=[2, 5, 0, 3])
    sp = model.sparse_arch(b.sparse)
    u_all, _ = model.arch.tower(sp.pooled, sp.sequences, b.dense)
    # row 0 alone in a batch (its batch mates had histories up to 5 long, it has 2)
    kjt0 = KeyedJaggedTensor.from_jt_dict({k: _row(jt, 0) for k, jt in b.sparse.to_dict().items()})
    sp0 = model.sparse_arch(kjt0)
    u0, _ = model.arch.tower(sp0.pooled, sp0.sequences, b.dense[:1])
    torch.testing.assert_close(u0, u_all[:1], rtol=1e-5, atol=1e-6)


def _row(jt, i):
    from torchrec.sparse.jagged_tensor import JaggedTensor

    off = jt.offsets()
    return JaggedTensor(values=jt.values()[off[i]:off[i + 1]], lengths=jt.lengths()[i:i + 1])


# ------------------------------------------------------------------------------ frozen satisfaction model
def _sat(loss="dr", freeze_tower=False, tables="frozen"):
    torch.manual_seed(0)
    cfg = SatisfactionConfig(loss=loss, clip=0.05, freeze_tower=freeze_tower, tables=tables)
    return materialize(SatisfactionModel(data_config(), EMB, TowerConfig(dim=8), cfg, PropensityConfig()))


def _tables(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "embedding" in k}


def test_frozen_tables_receive_no_gradient_while_head_and_tower_do():
    model = _sat("dr")
    loss, out = model(make_batch(data_config(), 16, seed=3))
    table_params = [(n, p) for n, p in model.named_parameters() if "embedding" in n and p.requires_grad]
    # 5 tables of the satisfaction sparse arch + 5 of the propensity's: still requires_grad tensors
    # (TorchRec's fused optimizers need that); they are frozen by no_grad alone
    assert len(table_params) == 10
    assert all(not p.requires_grad for p in model.propensity.arch.parameters())
    grads = torch.autograd.grad(loss, [p for _, p in table_params], allow_unused=True, retain_graph=True)
    assert all(g is None for g in grads), [n for (n, _), g in zip(table_params, grads) if g is not None]
    trainable = [p for n, p in model.named_parameters() if n.startswith("arch.") and p.requires_grad]
    g2 = torch.autograd.grad(loss, trainable, allow_unused=True)
    assert all(g is not None for g in g2) and any(torch.count_nonzero(g) for g in g2)
    assert not any(p.requires_grad for p in model.propensity.arch.parameters())


@pytest.mark.parametrize("freeze_tower", [False, True])
def test_optimizer_steps_leave_frozen_tables_and_propensity_bit_identical(freeze_tower):
    model = _sat("ips", freeze_tower=freeze_tower)
    before = _tables(model)
    prop_before = {k: v.clone() for k, v in model.propensity.state_dict().items()}
    tower_before = {k: v.clone() for k, v in model.arch.tower.state_dict().items()}
    head_before = {k: v.clone() for k, v in model.arch.head.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for step in range(3):
        opt.zero_grad()
        loss, _ = model(make_batch(data_config(), 32, seed=10 + step))
        loss.backward()
        opt.step()
    after = _tables(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(prop_before[k], v) for k, v in model.propensity.state_dict().items())
    assert not all(torch.equal(head_before[k], v) for k, v in model.arch.head.state_dict().items())
    tower_same = all(torch.equal(tower_before[k], v) for k, v in model.arch.tower.state_dict().items())
    assert tower_same == freeze_tower
    assert not model.propensity.training  # frozen parts stay in eval mode under model.train()


@pytest.mark.parametrize("tables", ["fine_tune", "own"])
def test_trained_tables_get_gradients_and_own_loads_nothing_from_the_click_model(tables):
    """satisfaction.tables fine_tune / own: g's tables are trained by g's loss; the propensity's stay frozen."""
    model = _sat("ips", tables=tables)
    loss, _ = model(make_batch(data_config(), 16, seed=3))
    ours = [(n, p) for n, p in model.named_parameters() if n.startswith("sparse_arch.") and "embedding" in n]
    theirs = [p for n, p in model.named_parameters() if n.startswith("propensity.") and "embedding" in n]
    grads = torch.autograd.grad(loss, [p for _, p in ours] + theirs, allow_unused=True)
    used = {n for (n, _), g in zip(ours, grads) if g is not None and torch.count_nonzero(g)}
    assert {"sparse_arch.ebc.embedding_bags.user.weight", "sparse_arch.ec.embeddings.item.weight"} <= used, used
    assert all(g is None for g in grads[len(ours):])
    click = materialize(ClickModel(data_config(), EMB, TowerConfig(dim=8)), seed=5)
    copied = model.init_from_pretrain(click.state_dict())
    assert (copied == []) == (tables == "own")


def test_dot_product_adds_u_dot_v_to_the_logit_and_table_weight_decay_builds():
    from satrank.embeddings.config import FusedOptimizerConfig
    from satrank.embeddings.sharding import fused_optimizer_spec

    plain, dot = _sat("naive"), _sat("naive")
    dot.cfg.dot_product = dot.arch.dot_product = True
    dot.load_state_dict(plain.state_dict())
    plain.eval(), dot.eval()
    b = make_batch(data_config(), 8, seed=2)
    sp = plain.sparse_arch(b.sparse)
    u, v = plain.arch.tower(sp.pooled, sp.sequences, b.dense)
    torch.testing.assert_close(dot(b)[1]["sat_logit"], plain(b)[1]["sat_logit"] + (u * v).sum(-1))
    _, kwargs = fused_optimizer_spec(FusedOptimizerConfig(weight_decay=0.001))  # fbgemm-gpu 1.x: WeightDecayMode moved
    assert kwargs["weight_decay"] == 0.001 and kwargs["weight_decay_mode"].name == "L2"


def test_mf_form_is_a_logistic_mf_on_the_table_rows_with_folded_biases_and_scores_history_items_the_same_way():
    from satrank.models.stage1.tasks import mf_logit

    torch.manual_seed(0)
    cfg = SatisfactionConfig(loss="dr", clip=0.05, tables="own", form="mf")
    model = materialize(SatisfactionModel(data_config(), EMB, TowerConfig(dim=8), cfg, PropensityConfig()))
    with torch.no_grad():
        model.arch.mf_bias.fill_(0.25)
    assert mf_logit(torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, -1.0, 0.125]), torch.tensor(0.25)) == 1.875
    model.eval()
    b = make_batch(data_config(), 8, seed=3)
    sp = model.sparse_arch(b.sparse)
    e_u, e_i = sp.pooled["user_id"], sp.pooled["item_id"]  # TowerConfig's first user and item features
    want = (e_u[:, :-1] * e_i[:, :-1]).sum(-1) + e_u[:, -1] + e_i[:, -1] + 0.25
    torch.testing.assert_close(model.predict(b)["sat_logit"], want)
    # history scoring (MLSE): the candidate's own row as a one-item history gives the same logit
    hist = model.arch.history_logits(sp.pooled, sp.sequences, b.dense, e_i.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(hist, want)
    # the towers and head stay in the state dict (g's layout) but are frozen; the tables, bias and imputation train
    model.train()
    loss, _ = model(b)
    loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None and torch.count_nonzero(p.grad)}
    assert {"sparse_arch.ebc.embedding_bags.user.weight", "sparse_arch.ec.embeddings.item.weight",
            "arch.mf_bias"} <= trained, trained
    assert not any(n.startswith(("arch.tower.", "arch.head.")) for n in trained), trained
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith(("arch.tower.", "arch.head.")))
    for bad, match in ((dict(tables="frozen"), r"satisfaction\.form: mf learns in the tables themselves"),
                       (dict(tables="own", dot_product=True), r"satisfaction\.dot_product: .* with form mf set it false"),
                       (dict(form="gmf"), r"satisfaction\.form: must be one of \['mlp', 'mf'\], got 'gmf'")):
        with pytest.raises(ConfigError, match=match):
            SatisfactionConfig(**{"form": "mf", **bad}).validate("satisfaction")


def test_stage_2_loads_an_mf_g_with_its_bias_and_an_mlp_g_as_before():
    from satrank.jobs.engine.ranker_trainer import TEACHER_MAP, teacher_map
    from satrank.models.ranker.task import TeacherSpec

    def spec(form):
        return TeacherSpec(EMB, TowerConfig(dim=8), SatisfactionConfig(tables="own" if form == "mf" else "frozen",
                                                                       form=form))

    assert teacher_map(spec("mlp")) == TEACHER_MAP
    mf_map = teacher_map(spec("mf"))
    assert mf_map == {**TEACHER_MAP, "arch.mf_bias": "g.arch.mf_bias"}
    g = SatisfactionModel(data_config(), EMB, TowerConfig(dim=8), spec("mf").satisfaction, PropensityConfig())
    keys = [k for k in g.state_dict() if not k.startswith("propensity.")]
    assert all(any(k.startswith(src) for src in mf_map) for k in keys), keys  # every g weight has a mapping


def test_satisfaction_model_starts_from_click_tables_and_propensity_weights():
    data = data_config()
    torch.manual_seed(1)
    click = materialize(ClickModel(data, EMB, TowerConfig(dim=8)), seed=5)
    opt = torch.optim.SGD(click.parameters(), lr=0.5)
    loss, _ = click(make_batch(data, 16, seed=4))
    loss.backward()
    opt.step()
    prop = materialize(PropensityModel(data, EMB, PropensityConfig()), seed=9)
    sat = _sat("snips")
    copied = sat.init_from_pretrain(click.state_dict())
    assert any("sparse_arch.ec.embeddings.item.weight" == k for k in copied)
    cs, ss = click.state_dict(), sat.state_dict()
    for k in [k for k in cs if k.startswith(("sparse_arch.", "arch.tower."))]:
        assert torch.equal(cs[k], ss[k]), k
    sat.init_propensity(prop.state_dict())
    b = make_batch(data, 8, seed=6)
    prop.eval()
    _, pout = prop(b)
    _, sout = sat(b)
    torch.testing.assert_close(sout["propensity"], pout["propensity"])  # rho from the frozen submodule
    with pytest.raises(ValueError, match="naive"):
        _sat("naive").init_propensity(prop.state_dict())
    assert _sat("naive").propensity is None


def test_losses_differ_by_kind_and_stats_count_answered_rows():
    b = make_batch(data_config(), 16, seed=7)
    n_answered = int(b.labels["questionnaire_answered"].sum())
    vals = {}
    for kind in ("naive", "ips", "snips", "dr"):
        loss, out = _sat(kind)(b)
        vals[kind] = loss.item()
        assert out["stats/answered"].item() == n_answered and out["sat_prob"].shape == (16,)
    assert len(set(vals.values())) == 4


def test_propensity_model_learns_that_active_users_answer_more():
    data = data_config()
    torch.manual_seed(0)
    model = materialize(PropensityModel(data, EMB, PropensityConfig(hidden=[16])))

    def labelled(seed):
        b = make_batch(data, 256, seed=seed)
        act = b.sparse.to_dict()["user_activity"].values()
        g = torch.Generator().manual_seed(seed)
        b.labels["questionnaire_answered"] = (torch.rand(256, generator=g) < torch.where(act == 2, 0.8, 0.1)).float()
        return b, act

    rho, act = _fit_propensity(model, labelled)
    assert rho[act == 2].mean() > 0.65 and rho[act != 2].mean() < 0.2


def _fit_propensity(model, labelled, steps=60, lr=0.02):
    """Adam on labelled(step) batches, then (rho on the held-out batch labelled(999), its split key)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        b, _ = labelled(step)
        opt.zero_grad()
        model(b)[0].backward()
        opt.step()
    b, key = labelled(999)
    model.eval()
    return model(b)[1]["propensity"], key


def test_propensity_with_behaviour_inputs_learns_that_clicked_impressions_answer_more():
    """rho(u, i, click): answering that follows the click is learnable only with the click as input."""
    data = data_config()

    def labelled(seed):
        b = make_batch(data, 256, seed=seed)
        g = torch.Generator().manual_seed(seed)
        c = b.labels["click"]
        b.labels["questionnaire_answered"] = (torch.rand(256, generator=g) < torch.where(c > 0, 0.7, 0.05)).float()
        return b, c

    gaps = {}
    for behaviour in ([], ["click"]):
        torch.manual_seed(0)
        model = materialize(PropensityModel(data, EMB, PropensityConfig(hidden=[16], behaviour=behaviour)))
        rho, c = _fit_propensity(model, labelled)
        gaps[tuple(behaviour)] = float(rho[c > 0].mean() - rho[c == 0].mean())
    assert gaps[("click",)] > 0.5 and abs(gaps[()]) < 0.15, gaps


def test_behaviour_inputs_are_checked_by_config_and_by_batch():
    with pytest.raises(ConfigError, match=r"propensity\.behaviour.*'satisfied'"):
        load_config(overrides=["propensity.behaviour=[satisfied]"])
    data = data_config()
    model = materialize(PropensityModel(data, EMB, PropensityConfig(hidden=[4], behaviour=["click", "watch_time_s"])))
    b = make_batch(data, 4, seed=3)
    b.labels["watch_time_s"] = torch.tensor([0.0, 1.0, 10.0, 100.0])
    x = model.arch.behaviour_inputs(b.labels, b.dense)
    assert torch.equal(x[:, 0], b.labels["click"]) and torch.allclose(x[:, 1], torch.log1p(b.labels["watch_time_s"]))
    del b.labels["watch_time_s"]
    with pytest.raises(ValueError, match=r"propensity\.behaviour.*'watch_time_s'"):
        model(b)


def test_watch_fraction_is_the_share_watched_of_the_log1p_duration_column():
    """watch_fraction = clip(watch_time_s / duration, 0, 1), the duration read back from its log1p dense column;
    it needs the watch_time_s label, and a duration column without log1p is refused."""
    data = data_config()
    model = materialize(PropensityModel(data, EMB, PropensityConfig(hidden=[4], behaviour=["watch_fraction"])))
    b = make_batch(data, 4, seed=3)
    b.dense[:, 0] = torch.log1p(torch.tensor([10.0, 10.0, 20.0, 50.0]))
    b.labels["watch_time_s"] = torch.tensor([0.0, 5.0, 40.0, 25.0])
    x = model.arch.behaviour_inputs(b.labels, b.dense)
    assert torch.allclose(x[:, 0], torch.tensor([0.0, 0.5, 1.0, 0.5]), atol=1e-6)
    del b.labels["watch_time_s"]
    with pytest.raises(ValueError, match=r"propensity\.behaviour needs the batch labels \['watch_time_s'\]"):
        model(b)
    data.dense[0].transform = "none"
    with pytest.raises(ValueError, match="propensity.duration_feature: 'duration_s' must have transform log1p"):
        PropensityModel(data, EMB, PropensityConfig(hidden=[4], behaviour=["watch_fraction"]))


def test_click_model_watch_time_head_adds_weighted_mse_on_clicked_rows_only():
    data = data_config()
    torch.manual_seed(0)
    model = materialize(ClickModel(data, EMB, TowerConfig(dim=8), watch_time_weight=0.5))
    b = make_batch(data, 16, seed=4)
    b.labels["watch_time_s"] = torch.rand(16, generator=torch.Generator().manual_seed(4)) * 30
    loss, out = model(b)
    c = b.labels["click"]
    bce = torch.nn.functional.binary_cross_entropy_with_logits(out["click_logit"], c)
    mse = (((out["watch_time_pred"] - torch.log1p(b.labels["watch_time_s"])) ** 2) * c).sum() / c.sum()
    assert torch.allclose(loss, bce + 0.5 * mse, atol=1e-6) and torch.allclose(out["loss_watch_time"], mse)
    loss.backward()
    assert model.arch.watch_head.weight.grad.abs().sum() > 0
    plain = materialize(ClickModel(data, EMB, TowerConfig(dim=8)))
    assert plain.arch.watch_head is None and "watch_time_pred" not in plain(b)[1]


def test_click_model_fraction_target_is_bce_against_the_share_watched_on_clicked_rows():
    """watch_time_target=fraction: BCE(logit, clip(watch / duration, 0, 1)), duration = expm1 of the log1p column."""
    data = data_config()
    torch.manual_seed(0)
    model = materialize(ClickModel(data, EMB, TowerConfig(dim=8), watch_time_weight=0.5, watch_time_target="fraction"))
    b = make_batch(data, 16, seed=4)
    duration = torch.tensor([10.0, 20.0, 5.0, 40.0] * 4)
    b.dense = torch.log1p(duration).unsqueeze(1)
    watch = torch.tensor([5.0, 25.0, 0.0, 10.0] * 4)  # shares 0.5, 1 (clipped from 1.25), 0, 0.25
    b.labels["watch_time_s"] = watch
    loss, out = model(b)
    c = b.labels["click"]
    share = torch.tensor([0.5, 1.0, 0.0, 0.25] * 4)
    per = torch.nn.functional.binary_cross_entropy_with_logits(out["watch_time_pred"], share, reduction="none")
    expect = (per * c).sum() / c.sum()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(out["click_logit"], c)
    assert torch.allclose(out["loss_watch_time"], expect, atol=1e-6) and torch.allclose(loss, bce + 0.5 * expect, atol=1e-6)
    plain = ClickModel(data, EMB, TowerConfig(dim=8), watch_time_weight=0.0, watch_time_target="fraction")
    assert plain.arch.watch_head is None  # the paper's click model: the target setting is unused
    data.dense[0].transform = "none"
    with pytest.raises(ValueError, match="pretrain.duration_feature: 'duration_s' must have transform log1p"):
        ClickModel(data, EMB, TowerConfig(dim=8), watch_time_weight=0.5, watch_time_target="fraction")


def test_missing_label_raises_in_training_and_returns_no_loss_in_eval():
    data = data_config()
    b = make_batch(data, 4, seed=2)
    b.labels = {}
    model = materialize(ClickModel(data, EMB, TowerConfig(dim=8)))
    with pytest.raises(ValueError, match="'click'"):
        model(b)
    model.eval()
    loss, out = model(b)
    assert loss is None and out["click_prob"].shape == (4,)
    sat = _sat("ips").eval()
    loss, out = sat(b)
    assert loss is None and set(out) == {"sat_logit", "sat_prob", "propensity"}


def test_feature_names_are_checked_against_data_with_the_config_key():
    with pytest.raises(ConfigError, match=r"pretrain\.tower\.user_features.*'user_idd'"):
        ClickModel(data_config(), EMB, TowerConfig(user_features=["user_idd"]))
    with pytest.raises(ConfigError, match=r"propensity\.dense"):
        PropensityModel(data_config(), EMB, PropensityConfig(dense=["watch_time_s"]))
    with pytest.raises(ConfigError, match=r"pretrain\.tower\.history"):
        ClickModel(data_config(), EMB, TowerConfig(history="user_id"))


def test_embedded_config_has_stage1_sections_and_validates_clip():
    cfg = load_config()
    assert cfg.satisfaction.loss in ("naive", "ips", "snips", "dr") and cfg.satisfaction.clip > 0
    assert cfg.pretrain.tower.history == "hist_click" and cfg.propensity.hidden
    assert load_config(overrides=["satisfaction.loss=snips"]).satisfaction.loss == "snips"
    with pytest.raises(ConfigError, match=r"satisfaction\.clip"):
        load_config(overrides=["satisfaction.clip=0"])
    with pytest.raises(ConfigError, match="satisfaction.loss"):
        load_config(overrides=["satisfaction.loss=ipw"])
    assert cfg.satisfaction.resolved_estimate_clip == cfg.satisfaction.estimate_clip < cfg.satisfaction.clip
    assert load_config(overrides=["satisfaction.estimate_clip=null"]).satisfaction.resolved_estimate_clip == cfg.satisfaction.clip
    with pytest.raises(ConfigError, match=r"satisfaction\.estimate_clip"):
        load_config(overrides=["satisfaction.estimate_clip=0"])


# ------------------------------------------------------------------------------ sharded + pipelined (2 ranks)
def _worker(out_dir: str) -> None:
    """Shard a SatisfactionModel over 2 gloo ranks and train it with TrainPipelineSparseDist."""
    import torch.distributed as dist
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from satrank.embeddings.sharding import full_state_dict, shard_model
    from satrank.jobs.engine.runtime import init_runtime

    rt = init_runtime(seed=0)
    emb = from_dict(EmbeddingConfig, {"dim": 8, "tables": {"item": {"sharding": "row_wise"},
                                                           "user": {"sharding": "row_wise"},
                                                           "category": {"sharding": "data_parallel"}}}, "embeddings")
    torch.manual_seed(0)
    model = SatisfactionModel(data_config(), emb, TowerConfig(dim=8), SatisfactionConfig(loss="dr"),
                              PropensityConfig())
    dmp, opt = shard_model(model, emb, rt, dense_lr=0.05, seed=0)
    before = full_state_dict(dmp)
    pipe = TrainPipelineSparseDist(dmp, opt, rt.device)
    batches = iter([make_batch(data_config(), 16, seed=100 * s + rt.rank) for s in range(5)])
    steps = 0
    while True:
        try:
            pipe.progress(batches)
            steps += 1
        except StopIteration:
            break
    after = full_state_dict(dmp)
    if rt.rank == 0:
        tables = [k for k in before if "embedding" in k]
        result = {
            "steps": steps,
            "pipelined": sorted(type(m).__name__ for m in pipe._pipelined_modules),
            "tables": tables,
            "tables_changed": [k for k in tables if not torch.equal(before[k], after[k])],
            "head_changed": [k for k in before if k.startswith("arch.head") and not torch.equal(before[k], after[k])],
        }
        Path(out_dir, "result.json").write_text(json.dumps(result))
    dist.barrier()
    # Drop every holder of the gloo group before destroying it: otherwise the group's C++ threads
    # can outlive the interpreter and abort at exit ("terminate called without an active
    # exception", seen ~1 run in 6 under load).
    import gc

    del pipe, dmp, opt, model
    gc.collect()
    rt.close()


def test_sharded_pipelined_training_keeps_frozen_tables_identical_across_two_ranks(tmp_path):
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
         str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["steps"] == 5
    assert len(res["pipelined"]) == 4, res  # EBC + EC of the satisfaction and of the propensity sparse arch
    assert len(res["tables"]) == 10 and res["tables_changed"] == []
    assert res["head_changed"], res


if __name__ == "__main__":
    _worker(sys.argv[1])


def test_the_leak_guard_checks_watch_fraction_as_the_model_sees_it(tmp_path):
    """A share watched that splits answered from unanswered rows is refused as watch_fraction although the
    watch time alone does not split them; a share that does not is reported with its AUC."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from satrank.jobs.stage1_checks import check_behaviour_leak

    rng = np.random.default_rng(0)
    duration = rng.uniform(5.0, 60.0, 400)
    share = rng.uniform(0.0, 1.0, 400)
    for name, answered in (("leak", share > 0.6), ("fine", rng.uniform(size=400) < 0.2 + 0.5 * share)):
        (tmp_path / name / "train").mkdir(parents=True)
        pq.write_table(pa.table({"questionnaire_answered": answered.astype(np.float32),
                                 "watch_time_s": (share * duration).astype(np.float32),
                                 "duration_s": duration.astype(np.float32)}), tmp_path / name / "train" / "part-0.parquet")
    data = data_config()
    assert check_behaviour_leak(tmp_path / "leak", data, ["watch_time_s"])["auc"]["watch_time_s"] < 0.9
    with pytest.raises(ConfigError, match=r"propensity\.behaviour: watch_fraction \(column 'watch_time_s'.*determines"):
        check_behaviour_leak(tmp_path / "leak", data, ["watch_time_s", "watch_fraction"])
    report = check_behaviour_leak(tmp_path / "fine", data, ["watch_fraction"])
    assert 0.6 < report["auc"]["watch_fraction"] < 0.95
    with pytest.raises(ConfigError, match=r"propensity\.duration_feature: 'length_s' is not a dense feature"):
        check_behaviour_leak(tmp_path / "fine", data, ["watch_fraction"], duration_feature="length_s")


def test_repeated_history_items_share_the_score_of_their_first_occurrence():
    """MLSE ranks history items by g's score: repeats of one item (bitwise-equal embedding rows) must get one
    score, else last-bit noise that differs between batch shapes reorders them (model.pt vs model_request.pt)."""
    from satrank.models.stage1.tasks import repeated_items_share_a_score

    V = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [1.0, 2.0], [0.0, 0.0]],
                      [[5.0, 6.0], [5.0, 6.0], [5.0, 6.0], [7.0, 8.0]]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    eps = 1e-7  # last-bit noise on the repeats
    scores = torch.tensor([[0.5, 0.7, 0.5 + eps, 0.9], [0.2, 0.2 - eps, 0.2 + eps, 0.4]])
    out = repeated_items_share_a_score(scores, V, mask)
    assert out.tolist() == [[scores[0, 0].item(), scores[0, 1].item(), scores[0, 0].item(), scores[0, 3].item()],
                            [scores[1, 0].item()] * 3 + [scores[1, 3].item()]]
    # padding (row 0, position 3) matches nothing, not even another padding row or an all-zero item
    assert out[0, 3] == scores[0, 3]

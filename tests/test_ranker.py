"""The stage-2 ranker and its multi-task loss: ablation switches remove their parts, padding never
matters, the ranker learns, and the SparseOutput adapter wires real TorchRec lookups in."""
import math

import pytest
import torch
import torch.nn.functional as F

from satrank.models.ranker.losses import MultiTaskLoss, l2_penalty
from satrank.models.ranker.config import ModelConfig, MultiTaskLossConfig
from satrank.models.ranker.saqrec import PrecomputedScorer, RankerFromSparse, RankerInputs, SAQRecRanker, build_ranker, ranker_inputs
from satrank.pipeline.config import ConfigError, from_dict

D = 8
MAX = {"hist_click": 12, "hist_satisfied": 6, "hist_dissatisfied": 3, "hist_skip": 5}
USER = {"user_id": 8, "user_activity": 4}
ITEM = {"author_id": 8, "category_id": 4}


def _cfg(**kw) -> ModelConfig:
    kw.setdefault("dropout", 0.0)
    return from_dict(ModelConfig, kw, "model")


def _ranker(scorer=None, seed=0, **kw) -> SAQRecRanker:
    torch.manual_seed(seed)
    return SAQRecRanker(_cfg(**kw), D, MAX, USER, ITEM, n_dense=1, history_scorer=scorer)


def _inputs(B=6, seed=1, garbage=0.0) -> RankerInputs:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    hist = {}
    for i, (name, L) in enumerate(MAX.items()):
        lengths = torch.randint(0, L + 1, (B,), generator=g)
        lengths[0] = 0 if name != "hist_click" else L  # some empty and some full rows
        mask = torch.arange(L) < lengths.unsqueeze(1)
        V = torch.where(mask.unsqueeze(-1), r(B, L, D), torch.full((B, L, D), garbage))
        hist[name] = (V, mask)
    return RankerInputs(
        user={k: r(B, d) for k, d in USER.items()}, item=r(B, D), item_attrs={k: r(B, d) for k, d in ITEM.items()},
        dense=r(B, 1), duration_log1p=r(B).abs(), histories=hist,
    )


class CountingScorer:
    def __init__(self):
        self.calls = 0

    def __call__(self, x, V, mask):
        self.calls += 1
        assert not torch.is_grad_enabled()  # g is frozen: called under no_grad
        return torch.sigmoid(V.sum(-1))


def _labels(B=6, seed=2):
    g = torch.Generator().manual_seed(seed)
    return {"click": (torch.rand(B, generator=g) < 0.5).float(), "watch_time_s": torch.rand(B, generator=g) * 30,
            "skip": (torch.rand(B, generator=g) < 0.3).float()}


def test_full_saqrec_has_every_part_and_the_papers_fusion_order():
    r = _ranker(CountingScorer(), skip_head=True, use_skip_history=True)
    assert r.fusion_names == ["u_sat", "u_dis", "h_r", "u_mlse", "v_u", "h_skip"]
    out = r(_inputs())
    assert set(out) == {"click", "satisfaction", "watch_time", "skip", "user", "item", "fusion_weights"}
    assert out["fusion_weights"].shape == (6, 6)
    torch.testing.assert_close(out["click"], (out["user"] * out["item"]).sum(-1))  # eq. 14: y = u_f . v_i


def test_mlse_calls_the_history_scorer_exactly_once_per_forward_and_never_when_off():
    s = CountingScorer()
    r = _ranker(s)
    r(_inputs())
    r(_inputs(seed=5))
    assert s.calls == 2
    s_off = CountingScorer()
    r_off = _ranker(s_off, mlse=False)
    r_off(_inputs())
    assert s_off.calls == 0
    assert "u_mlse" not in r_off.fusion_names and not hasattr(r_off, "mlse")
    with pytest.raises(RuntimeError, match="history_scorer"):
        _ranker(None)(_inputs())


def test_without_sid_the_satisfied_and_dissatisfied_encoders_are_not_constructed():
    r = _ranker(CountingScorer(), sid=False)
    names = [n for n, _ in r.named_parameters()]
    assert not any(n.startswith(("enc_sat", "enc_dis", "sid.")) for n in names)
    assert r.fusion_names == ["h_r", "u_mlse", "v_u"]
    assert r.fusion.gate.out.weight.shape == (3, 3 * D)  # MLP_f: R^{3d} -> R^3, inputs removed not zeroed
    x = _inputs()
    del x.histories["hist_satisfied"], x.histories["hist_dissatisfied"]  # not read at all
    r(x)["click"].sum().backward()
    full = _ranker(CountingScorer())
    assert any(n.startswith("enc_sat") for n, _ in full.named_parameters())
    with pytest.raises(KeyError, match="hist_satisfied"):
        full(x)


def test_without_mtl_there_is_no_satisfaction_tower_and_no_satisfaction_loss():
    r = _ranker(CountingScorer(), mtl=False)
    assert not hasattr(r, "sat_tower")
    out = r(_inputs())
    assert "satisfaction" not in out
    lcfg = MultiTaskLossConfig(gamma=0.0)
    loss = MultiTaskLoss(lcfg, r.cfg)
    parts = loss(out, _labels(), epoch=0)  # no pseudo-labels needed
    assert "satisfaction" not in parts and loss.corrector is None
    expect = (F.binary_cross_entropy_with_logits(out["click"], _labels()["click"])
              + lcfg.watch_time_weight * F.huber_loss(out["watch_time"], torch.log1p(_labels()["watch_time_s"])))
    torch.testing.assert_close(parts["loss"], expect)
    # with mtl on, MLP_s exists and the satisfaction term reaches it
    r_on = _ranker(CountingScorer())
    out_on = r_on(_inputs())
    p = MultiTaskLoss(lcfg, r_on.cfg)(out_on, _labels(), epoch=0, pseudo_satisfaction=torch.full((6,), 0.7))
    p["loss"].backward()
    assert r_on.sat_tower[-1].weight.grad.abs().sum() > 0
    torch.testing.assert_close(
        p["satisfaction"], F.binary_cross_entropy_with_logits(out_on["satisfaction"].detach(), torch.full((6,), 0.7)))


def test_click_only_is_one_click_transformer_with_h_r_and_v_u_and_a_click_tower():
    r = _ranker(None, variant="click_only", skip_head=True, use_skip_history=True)  # extras ignored
    assert r.fusion_names == ["h_r", "v_u"]
    assert r.heads == ["click"]
    tops = {n.split(".")[0] for n, _ in r.named_parameters()}
    assert tops == {"enc_click", "fusion", "user_proj", "item_proj"}
    x = _inputs()
    x.histories = {"hist_click": x.histories["hist_click"]}
    out = r(x)
    assert set(out) == {"click", "user", "item", "fusion_weights"}
    parts = MultiTaskLoss(MultiTaskLossConfig(gamma=0.0), r.cfg)(out, {"click": _labels()["click"]}, epoch=5)
    assert set(parts) == {"click", "loss"}
    torch.testing.assert_close(parts["loss"], F.binary_cross_entropy_with_logits(out["click"], _labels()["click"]))


def test_skip_history_and_skip_head_add_a_sixth_fusion_input_and_a_weighted_skip_loss():
    r = _ranker(CountingScorer(), use_skip_history=True, skip_head=True, mtl=False, watch_time_head=False)
    out = r(_inputs())
    assert r.fusion_names[-1] == "h_skip" and out["fusion_weights"].shape[1] == 6
    lcfg = MultiTaskLossConfig(gamma=0.0, skip_weight=0.25)
    parts = MultiTaskLoss(lcfg, r.cfg)(out, _labels(), epoch=0)
    expect = (F.binary_cross_entropy_with_logits(out["click"], _labels()["click"])
              + 0.25 * F.binary_cross_entropy_with_logits(out["skip"], _labels()["skip"]))
    torch.testing.assert_close(parts["loss"], expect)


def test_an_extra_head_adds_its_tower_and_its_weighted_bce_term_and_needs_its_label():
    heads = [{"name": "like", "label": "like", "weight": 0.5, "hidden": [4]}]
    r = _ranker(CountingScorer(), mtl=False, watch_time_head=False, extra_heads=heads)
    assert r.heads == ["click", "like"] and r.like_tower[0].weight.shape == (4, D)
    out = r(_inputs())
    labels = {**_labels(), "like": torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])}
    parts = MultiTaskLoss(MultiTaskLossConfig(gamma=0.0), r.cfg)(out, labels, epoch=0)
    expect = (F.binary_cross_entropy_with_logits(out["click"], labels["click"])
              + 0.5 * F.binary_cross_entropy_with_logits(out["like"], labels["like"]))
    torch.testing.assert_close(parts["loss"], expect)
    parts["loss"].backward()
    assert r.like_tower[-1].weight.grad.abs().sum() > 0
    with pytest.raises(KeyError, match="label 'like' is required"):
        MultiTaskLoss(MultiTaskLossConfig(gamma=0.0), r.cfg)(r(_inputs()), _labels(), epoch=0)
    with pytest.raises(ConfigError, match="built-in head"):
        _cfg(extra_heads=[{"name": "skip", "label": "like"}])


def test_padding_garbage_in_every_history_never_changes_any_output():
    r = _ranker(CountingScorer(), use_skip_history=True, skip_head=True).eval()
    a, b = r(_inputs(garbage=0.0)), r(_inputs(garbage=1e3))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)


def test_l2_term_squared_and_norm_forms():
    r = _ranker(CountingScorer(), mtl=False)
    params = list(r.parameters())
    sq = sum(float(p.detach().pow(2).sum()) for p in params)
    assert math.isclose(float(l2_penalty(params, "squared").detach()), sq, rel_tol=1e-5)
    assert math.isclose(float(l2_penalty(params, "norm").detach()), math.sqrt(sq), rel_tol=1e-5)
    lcfg = MultiTaskLossConfig(gamma=0.01, l2_form="norm", watch_time_weight=0.0)
    out = r(_inputs())
    parts = MultiTaskLoss(lcfg, r.cfg)(out, _labels(), epoch=0, params=params)
    torch.testing.assert_close(parts["loss"], parts["click"] + 0.01 * parts["l2"])
    with pytest.raises(ValueError, match="params"):
        MultiTaskLoss(lcfg, r.cfg)(out, _labels(), epoch=0)


def test_config_section_defaults_and_validation():
    cfg = from_dict(ModelConfig, {}, "model")
    assert cfg.required_histories() == ["hist_click", "hist_satisfied", "hist_dissatisfied"]
    with pytest.raises(ConfigError, match="model.num_levels"):
        from_dict(ModelConfig, {"num_levels": 0}, "model")
    with pytest.raises(ConfigError, match="loss.n_mix"):
        from_dict(MultiTaskLossConfig, {"n_mix": 0}, "loss")
    with pytest.raises(ConfigError, match="model.variant"):
        from_dict(ModelConfig, {"variant": "sasrec"}, "model")


def _topic_task(n, seed):
    """Clicks iff the candidate's topic is the topic of the user's click history (needs the history)."""
    g = torch.Generator().manual_seed(seed)
    topics = torch.randn(4, D, generator=g) * 1.5
    ut = torch.randint(0, 4, (n,), generator=g)
    ct = torch.where(torch.rand(n, generator=g) < 0.5, ut, torch.randint(0, 4, (n,), generator=g))
    noise = lambda *s: 0.3 * torch.randn(*s, generator=g)  # noqa: E731
    hist = {}
    for name, L in MAX.items():
        lengths = torch.randint(1, L + 1, (n,), generator=g)
        mask = torch.arange(L) < lengths.unsqueeze(1)
        V = (topics[ut].unsqueeze(1) + noise(n, L, D)) * mask.unsqueeze(-1)
        hist[name] = (V, mask)
    x = RankerInputs(user={k: noise(n, d) for k, d in USER.items()}, item=topics[ct] + noise(n, D),
                     item_attrs={k: noise(n, d) for k, d in ITEM.items()}, dense=noise(n, 1),
                     duration_log1p=noise(n).abs(), histories=hist)
    return x, {"click": (ct == ut).float(), "watch_time_s": (ct == ut).float() * 10, "skip": (ct != ut).float()}


@pytest.mark.parametrize("variant", ["saqrec", "click_only"])
def test_ranker_learns_history_dependent_clicks_with_label_correction_epochs(variant):
    r = _ranker(CountingScorer(), seed=0, variant=variant)
    lcfg = from_dict(MultiTaskLossConfig, {"n_mix": 1, "gamma": 1e-6, "bmm_max_samples": 1000}, "loss")
    loss = MultiTaskLoss(lcfg, r.cfg)
    opt = torch.optim.Adam(r.parameters(), lr=1e-2)
    x, y = _topic_task(192, seed=0)
    pseudo = 0.2 + 0.6 * y["click"]
    seen_mixed = []
    for epoch in range(2):
        for _ in range(12):
            parts = loss(r(x), y, epoch, pseudo_satisfaction=pseudo, params=r.parameters())
            opt.zero_grad()
            parts["loss"].backward()
            opt.step()
        seen_mixed.append(float(parts.get("sat_mixed", torch.tensor(-1.0))))
        loss.end_epoch(epoch)
    if variant == "saqrec":
        assert seen_mixed == [0.0, 1.0]  # eq. 18: L_S^mix from epoch n_mix = 1 on
        assert 0.0 <= float(parts["lambda_mean"]) <= 1.0
    r.eval()
    xt, yt = _topic_task(512, seed=1)
    with torch.no_grad():
        p = r(xt)["click"]
    pos, neg = p[yt["click"] > 0.5], p[yt["click"] < 0.5]
    auc = float((pos.unsqueeze(1) > neg.unsqueeze(0)).float().mean())
    assert auc > 0.8, auc  # chance is 0.5: the candidate alone says nothing, the history does


def test_build_ranker_and_adapter_from_a_real_sparse_arch():
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from satrank.embeddings.config import EmbeddingConfig
    from satrank.embeddings.tables import SparseArch
    from satrank.jobs.config import DEFAULT_CONFIG
    from satrank.pipeline.config import load_yaml
    from satrank.pipeline.features import DataConfig

    data = from_dict(DataConfig, load_yaml(DEFAULT_CONFIG)["data"], "data")  # the embedded default contract
    arch = SparseArch(data, EmbeddingConfig(dim=D)).materialize(seed=0)
    cfg = _cfg(use_skip_history=True)
    scorer = CountingScorer()
    r = build_ranker(cfg, data, arch.feature_dim, history_scorer=scorer)
    B = 3
    g = torch.Generator().manual_seed(0)
    lengths, values = [], []
    for f in data.sparse:
        lengths.append(torch.ones(B, dtype=torch.int32))
        values.append(torch.randint(0, min(f.vocab_size, 64), (B,), generator=g))
    for f in data.sequence:
        ln = torch.tensor([0, 2, f.max_len], dtype=torch.int32)
        lengths.append(ln)
        values.append(torch.randint(0, 1000, (int(ln.sum()),), generator=g))
    kjt = KeyedJaggedTensor(keys=data.sparse_names, values=torch.cat(values), lengths=torch.cat(lengths))
    dense = torch.rand(B, len(data.dense))
    x = ranker_inputs(arch(kjt), dense, cfg, data)
    assert x.histories["hist_click"][0].shape == (B, 50, D)
    assert x.histories["hist_click"][1].sum(1).tolist() == [0, 2, 50]
    torch.testing.assert_close(x.duration_log1p, dense[:, 0])  # duration_s is already log1p'd by the reader
    out = r(x)
    assert out["click"].shape == (B,) and torch.isfinite(out["click"]).all() and scorer.calls == 1
    assert r.fusion_names == ["u_sat", "u_dis", "h_r", "u_mlse", "v_u", "h_skip"]
    # the leaf wrapper with scores g computed beforehand (its own tables) passed through `extras`
    r.set_history_scorer(PrecomputedScorer("hist_click_satisfaction"))
    wrapped = RankerFromSparse(r, data).eval()
    extras = {"hist_click_satisfaction": torch.rand(B, 50, generator=g)}
    direct = r(ranker_inputs(arch(kjt), dense, cfg, data, extras))
    torch.testing.assert_close(wrapped(arch(kjt), dense, extras)["click"], direct["click"], atol=0, rtol=0)
    with pytest.raises(KeyError, match="hist_click_satisfaction"):
        wrapped(arch(kjt), dense)
    with pytest.raises(ValueError, match="model.user_features.*nope"):
        build_ranker(_cfg(user_features=["nope"]), data, arch.feature_dim)

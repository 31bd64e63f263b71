"""EASQ objectives and pairs: the DPO loss on hand examples, the per-user softmax identity behind the
logit log-probabilities, the AUC-gated ramp, the pair buffer's rules (no unanswered loser, same user,
bounds, weights, checkpoint round trip, KJT round trip) and a learning test where DPO aligns the
serving head with satisfaction on held-out pairs."""
import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F

from satrank.models.easq.dpo import (DpoRamp, EasqLoss, dpo_loss, logprob_margin, pair_accuracy, pairwise_sat_loss,
                                     reward_pairs)
from satrank.models.easq.pathway import SAT_HEAD, EasqRanker
from satrank.models.easq.config import EasqConfig
from satrank.models.easq.pair_buffer import KIND_DISSATISFIED, KIND_SATISFIED, PairBuffer, fields_to_batch, row_fields
from satrank.models.ranker.config import ModelConfig
from satrank.models.ranker.saqrec import RankerInputs, SAQRecRanker
from satrank.pipeline.config import ConfigError, from_dict
from tests._synthetic import batch_from_rows, data_config, make_rows


def sp(x: float) -> float:
    return math.log1p(math.exp(x))  # softplus(x) = -log sigmoid(-x)


# ------------------------------------------------------------------------------------------ online (reward) pairs
def test_reward_pairs_are_within_user_ordered_by_the_reward_with_bradley_terry_confidence():
    users = torch.tensor([5, 3, 5, 7, 3, 5])
    reward = torch.tensor([0.1, 2.0, 0.5, 1.0, -1.0, 0.5])
    w, l, conf = reward_pairs(users, reward, max_offset=4)
    got = sorted(zip(w.tolist(), l.tolist(), [round(c, 6) for c in conf.tolist()]))
    # user 3: rows 1 (r 2.0) over 4 (r -1.0); user 5: rows 2 and 5 (r 0.5) over 0 (r 0.1), 2 vs 5 tie: no pair;
    # user 7 has one row: no pair. Confidence 2 sigmoid(|dr|) - 1
    c3, c5 = 2 / (1 + math.exp(-3.0)) - 1, 2 / (1 + math.exp(-0.4)) - 1
    assert got == sorted([(1, 4, round(c3, 6)), (2, 0, round(c5, 6)), (5, 0, round(c5, 6))])
    w1, l1, _ = reward_pairs(users, reward, max_offset=1)  # user 5's first and third rows are 2 apart
    assert sorted(zip(w1.tolist(), l1.tolist())) == [(1, 4), (2, 0)]
    with pytest.raises(ValueError, match="max_offset must be >= 1"):
        reward_pairs(users, reward, max_offset=0)


def test_reward_pairs_add_a_dpo_term_on_the_batch_rows_that_moves_the_policy_only():
    users = torch.tensor([1, 1, 2, 2, 3])
    click = torch.tensor([0.0, 1.0, 0.5, -0.5, 0.3], requires_grad=True)
    sat = torch.tensor([1.0, 0.0, -1.0, 1.0, 0.0], requires_grad=True)
    labels = {"questionnaire_answered": torch.zeros(5), "satisfied": torch.zeros(5)}
    cfg = EasqConfig(distill_weight=0.0, reward_pairs="sat_head", reward_pair_weight=2.0, ramp_updates=0,
                     sat_weight=0.0, beta=1.0)
    loss_fn = EasqLoss(cfg)
    loss_fn.ramp.started = True  # gate open: the DPO weight is cfg.dpo_weight
    res = loss_fn({"click": click, SAT_HEAD: sat}, labels, torch.ones(5), user_id=users)
    # pairs (0 over 1): policy margin 0 - 1 = -1, reference 1 - 0 = 1; (3 over 2): -0.5 - 0.5 = -1, ref 2
    c1, c2 = 2 / (1 + math.exp(-1.0)) - 1, 2 / (1 + math.exp(-2.0)) - 1
    expect = (c1 * sp(2.0) + c2 * sp(3.0)) / (c1 + c2)
    assert float(res["reward_pairs"]) == 2.0
    assert abs(float(res["dpo"]) - 2.0 * expect) < 1e-5
    res["loss"].backward()
    assert click.grad[0] < 0 < click.grad[1] and click.grad[3] < 0 < click.grad[2] and click.grad[4] == 0
    assert sat.grad is None or float(sat.grad.abs().sum()) == 0.0  # the reference is detached
    off = EasqLoss(EasqConfig(distill_weight=0.0, ramp_updates=0, sat_weight=0.0))
    assert "reward_pairs" not in off({"click": click, SAT_HEAD: sat}, labels, torch.ones(5), user_id=users)


def test_reward_pairs_within_user_click_never_pair_a_clicked_row_with_an_unclicked_one():
    users = torch.tensor([1, 1, 1, 1, 2, 2])
    clicked = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    sat = torch.tensor([0.0, 3.0, 1.0, 2.0, 0.0, 1.0])
    click = torch.zeros(6, requires_grad=True)
    labels = {"questionnaire_answered": torch.zeros(6), "satisfied": torch.zeros(6), "click": clicked}
    kw = dict(distill_weight=0.0, reward_pairs="sat_head", ramp_updates=0, sat_weight=0.0, beta=1.0)
    by_user = EasqLoss(EasqConfig(**kw))({"click": click, SAT_HEAD: sat}, labels, torch.ones(6), user_id=users)
    by_click = EasqLoss(EasqConfig(**kw, reward_pair_within="user_click"))
    res = by_click({"click": click, SAT_HEAD: sat}, labels, torch.ones(6), user_id=users)
    # user 1: C(4, 2) = 6 pairs by user; by (user, click) only (2 over 0) and (1 over 3); user 2's rows differ in click
    assert float(by_user["reward_pairs"]) == 7.0 and float(res["reward_pairs"]) == 2.0
    # both pairs: policy margin 0, reference margin 1: softplus(1) each, equal confidences
    assert abs(float(res["dpo"]) - sp(1.0)) < 1e-6
    with pytest.raises(ConfigError, match="reward_pair_within: must be user or user_click"):
        EasqConfig(reward_pair_within="click").validate("easq")


# ------------------------------------------------------------------------------------------ DPO loss
def test_dpo_loss_exact_value_on_a_hand_example():
    pw, pl = torch.tensor([2.0, 0.0], requires_grad=True), torch.tensor([0.5, 1.0])
    rw, rl = torch.tensor([1.0, 0.2]), torch.tensor([0.0, 0.2])
    out = dpo_loss(pw, pl, rw, rl, beta=0.5, weights=torch.tensor([1.0, 3.0]))
    # pair 1: 0.5 * ((2 - 0.5) - (1 - 0)) = 0.25; pair 2: 0.5 * ((0 - 1) - (0.2 - 0.2)) = -0.5
    expect = (sp(-0.25) + 3 * sp(0.5)) / 4
    assert abs(float(out.loss) - expect) < 1e-6
    assert float(out.stats["accuracy"]) == 0.25  # only pair 1 (weight 1 of 4) has policy margin > 0
    assert abs(float(out.stats["margin"]) - (0.5 + 3 * -1.0) / 4) < 1e-6
    out.loss.backward()
    assert pw.grad[0] < 0 and pw.grad[1] < 0  # descending the loss raises the winners' logits


def test_dpo_log_sigmoid_variant_on_a_hand_example():
    z = lambda v: torch.tensor([v])  # noqa: E731
    out = dpo_loss(z(1.0), z(-1.0), z(0.0), z(0.0), beta=2.0, logprob="log_sigmoid")
    ls = lambda v: -sp(-v)  # noqa: E731  log sigmoid
    assert abs(float(out.loss) - sp(-2.0 * (ls(1.0) - ls(-1.0)))) < 1e-6


def test_logit_margin_equals_the_per_user_softmax_log_prob_difference():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 7, generator=g) * 3  # 5 users x 7 candidates
    logp = torch.log_softmax(z, dim=1)  # p = softmax over the user's candidates
    w, l = torch.tensor([0, 3, 6, 2, 1]), torch.tensor([4, 1, 0, 5, 6])
    rows = torch.arange(5)
    torch.testing.assert_close(logprob_margin(z[rows, w], z[rows, l]), logp[rows, w] - logp[rows, l])


def test_reference_gets_no_gradient_and_empty_or_zero_weight_pairs_give_an_exact_zero():
    pw, pl = torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([0.0, 0.0], requires_grad=True)
    rw, rl = torch.tensor([0.5, 0.1], requires_grad=True), torch.tensor([0.0, 0.3], requires_grad=True)
    loss = dpo_loss(pw, pl, rw, rl, beta=1.0).loss
    gw, gr = torch.autograd.grad(loss, [pw, rw], allow_unused=True)
    assert gw.abs().sum() > 0 and gr is None
    zero = dpo_loss(pw, pl, rw, rl, beta=1.0, weights=torch.zeros(2)).loss
    assert float(zero) == 0.0 and zero.requires_grad
    e = torch.zeros(0, requires_grad=True)
    assert float(dpo_loss(e, e, e, e, beta=1.0).loss) == 0.0
    with pytest.raises(ValueError, match="weights must be finite and >= 0"):
        dpo_loss(pw, pl, rw, rl, beta=1.0, weights=torch.tensor([1.0, -1.0]))
    assert abs(float(pairwise_sat_loss(torch.tensor([1.0]), torch.tensor([0.0])).loss) - sp(-1.0)) < 1e-6


# ------------------------------------------------------------------------------------------ ramp
def test_pair_accuracy_counts_ties_half():
    scores = torch.tensor([3.0, 1.0, 2.0, 2.0])
    assert pair_accuracy(scores, torch.tensor([0, 1, 2]), torch.tensor([1, 0, 3])) == 0.5  # 1 + 0 + tie 1/2


def test_ramp_waits_for_the_auc_then_rises_linearly_and_stays_latched():
    ramp = DpoRamp(threshold=0.8, ramp_updates=4, window=4, min_per_class=2)
    ones = torch.ones(4)
    ramp.observe(torch.tensor([0.9, 0.1, 0.8, 0.2]), torch.tensor([0.0, 1.0, 0.0, 1.0]), ones)  # AUC 0
    assert ramp.update() == 0.0 and ramp.last_auc == 0.0
    ramp.observe(torch.tensor([5.0, 6.0]), torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0]))
    assert ramp.update() == 0.0  # window now [5, 6, 0.8, 0.2] labels [1, 1, 0, 1]: 1 negative < min_per_class
    assert ramp.auc() is None
    # unanswered rows are ignored even with perfect scores
    ramp.observe(torch.tensor([9.0, -9.0]), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert ramp.update() == 0.0
    ramp.observe(torch.tensor([-3.0, -4.0]), torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0]))  # [5, 6, -3, -4]
    weights = [ramp.update() for _ in range(5)]
    assert weights == [0.25, 0.5, 0.75, 1.0, 1.0]
    ramp.observe(torch.tensor([-5.0, 5.0, -5.0, 5.0]), torch.tensor([1.0, 0.0, 1.0, 0.0]), ones)  # AUC 0 again
    assert ramp.update() == 1.0  # latched
    clone = DpoRamp(threshold=0.8, ramp_updates=4, window=4, min_per_class=2)
    buf = io.BytesIO()
    torch.save(ramp.state_dict(), buf)
    buf.seek(0)
    clone.load_state_dict(torch.load(buf, weights_only=True))
    assert clone.weight == ramp.weight and clone.auc() == ramp.auc() == 0.0 and clone.k == ramp.k


def test_easq_loss_on_unanswered_rows_only_is_an_exact_zero_and_missing_labels_are_named():
    fn = EasqLoss(EasqConfig(distill_weight=0.0))
    s = torch.randn(6, requires_grad=True)
    labels = {"questionnaire_answered": torch.zeros(6), "satisfied": torch.zeros(6)}
    res = fn({SAT_HEAD: s}, labels, torch.full((6,), 0.2))
    assert float(res["loss"]) == 0.0 and res["loss"].requires_grad and "dpo" not in res
    with pytest.raises(KeyError, match="'questionnaire_answered'"):
        fn({SAT_HEAD: s}, {"satisfied": torch.zeros(6)}, torch.full((6,), 0.2))
    with pytest.raises(ValueError, match="needs the propensities"):
        fn({SAT_HEAD: s}, labels, None)


def test_distillation_from_g_is_weighted_bce_and_refuses_to_run_without_g():
    """distill_weight * BCE(sat head, g's pseudo-label) on every row (answered or not); no g: a named error."""
    fn = EasqLoss(EasqConfig(distill_weight=0.5))
    s = torch.tensor([0.0, 2.0, -1.0], requires_grad=True)
    pseudo = torch.tensor([0.5, 0.9, 0.2])
    labels = {"questionnaire_answered": torch.zeros(3), "satisfied": torch.zeros(3)}
    res = fn({SAT_HEAD: s}, labels, torch.full((3,), 0.2), pseudo=pseudo)
    p = torch.sigmoid(s.detach())
    expect = -(pseudo * p.log() + (1 - pseudo) * (1 - p).log()).mean()
    assert abs(float(res["distill"]) - float(expect)) < 1e-6
    assert abs(float(res["loss"]) - 0.5 * float(expect)) < 1e-6  # no answered row: L_sat is 0
    with pytest.raises(ValueError, match="distill_weight > 0 needs g's pseudo-labels"):
        fn({SAT_HEAD: s}, labels, torch.full((3,), 0.2))


# ------------------------------------------------------------------------------------------ pair buffer
def _add(buf, users, answered, satisfied, rho=None, skip=None, request=None, items=None):
    n = len(users)
    items = torch.arange(n) if items is None else torch.tensor(items)
    return buf.add({"item": items.unsqueeze(1).float()}, torch.tensor(users), torch.tensor(answered, dtype=torch.float32),
                   torch.tensor(satisfied, dtype=torch.float32), torch.full((n,), 0.5) if rho is None else torch.tensor(rho),
                   None if skip is None else torch.tensor(skip, dtype=torch.float32),
                   None if request is None else torch.tensor(request), items)


def _pairs(ps):
    items = ps.ids["item_id"]
    return sorted((int(items[w]), int(items[l])) for w, l in zip(ps.w_index, ps.l_index))


def test_unanswered_rows_are_never_a_dissatisfied_example():
    buf = PairBuffer(per_user=8, total=100)
    # user 7: one satisfied answer and four unanswered rows (satisfied=0 is only a placeholder there)
    n = _add(buf, [7, 7, 7, 7, 7], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0], skip=[0, 1, 1, 0, 1], request=[1] * 5)
    assert n == 1 and len(buf) == 1
    assert buf.sample(16).num_pairs == 0  # only one kind of answer: L_sat only
    _add(buf, [7], [1], [0], items=[9])  # an answered dissatisfied row makes the first pair
    ps = buf.sample(16)
    assert _pairs(ps) == [(0, 9)]
    kinds = ps.ids["kind"]
    assert kinds[ps.w_index].tolist() == [KIND_SATISFIED] and kinds[ps.l_index].tolist() == [KIND_DISSATISFIED]


def test_weak_pairs_need_the_switch_the_same_request_and_a_skip():
    buf = PairBuffer(per_user=8, total=100, weak_pairs=True, weak_pair_weight=0.5)
    _add(buf, [1, 1, 1, 1], [1, 0, 0, 0], [1, 0, 0, 0], rho=[0.25, 0.9, 0.9, 0.9], skip=[0, 1, 0, 1],
         request=[10, 10, 10, 11], items=[100, 101, 102, 103])
    assert buf.user_rows(1) == {"dissatisfied": [], "satisfied": [100], "skipped": [101, 103]}  # 102: not skipped
    ps = buf.sample(16)
    assert _pairs(ps) == [(100, 101)]  # 103 was skipped in another request
    assert ps.weak.tolist() == [True] and ps.weight.tolist() == [0.5 * 4.0 * 1.0]  # w(sat) * 1 (skip) * 0.5
    with pytest.raises(ValueError, match="weak_pairs needs the skip label and request_id"):
        _add(buf, [1], [1], [1])


def test_pairs_stay_within_a_user_and_fresh_rows_come_first():
    buf = PairBuffer(per_user=8, total=100, pairs_per_row=2)
    _add(buf, [1, 2, 1, 3], [1, 1, 1, 1], [1, 1, 0, 0], items=[10, 20, 11, 30])  # user 2 satisfied only, 3 dissatisfied only
    assert _pairs(buf.sample(16)) == [(10, 11)]
    _add(buf, [1, 1], [1, 1], [0, 1], items=[12, 13])
    ps = buf.sample(1)  # fresh row 12 (dissatisfied) meets the user's most recent satisfied row, 13
    assert _pairs(ps) == [(13, 12)]
    users = ps.ids["user_id"]
    assert bool((users[ps.w_index] == users[ps.l_index]).all())


def test_per_user_and_total_bounds_drop_the_oldest_rows():
    buf = PairBuffer(per_user=3, total=5)
    _add(buf, [1] * 5, [1] * 5, [1, 0, 1, 0, 1], items=[1, 2, 3, 4, 5])
    assert buf.user_rows(1) == {"dissatisfied": [4], "satisfied": [3, 5], "skipped": []} and len(buf) == 3
    _add(buf, [2, 2, 3], [1, 1, 1], [1, 0, 1], items=[6, 7, 8])  # 6 rows > total 5: item 3 (oldest) goes
    assert len(buf) == 5 and buf.user_rows(1)["satisfied"] == [5]
    assert buf.user_rows(2) == {"dissatisfied": [7], "satisfied": [6], "skipped": []}
    buf.sample(8)
    for _ in range(20):  # long streams stay bounded
        _add(buf, [4, 4], [1, 1], [1, 0], items=[40, 41])
    assert len(buf) == 5 and len(buf._order) <= 2 * buf.total + 16


def test_pair_weights_are_the_product_or_mean_of_clipped_inverse_propensities():
    for mode, expect in (("product", 2.0 * 20.0), ("mean", (2.0 + 20.0) / 2)):
        buf = PairBuffer(per_user=4, total=10, pair_weight=mode, clip=0.05)
        _add(buf, [1, 1], [1, 1], [1, 0], rho=[0.5, 0.01])  # 1/0.5 = 2; 1/max(0.01, 0.05) = 20
        assert buf.sample(4).weight.tolist() == [expect]
    with pytest.raises(ValueError, match=r"propensities of stored rows must be in \[0, 1\]"):
        _add(buf, [1], [1], [1], rho=[1.5])


def test_state_dict_round_trips_through_a_weights_only_checkpoint():
    def fill(b, start):
        g = torch.Generator().manual_seed(start)
        users = torch.randint(0, 6, (40,), generator=g).tolist()
        ans = (torch.rand(40, generator=g) < 0.6).float().tolist()
        sat = (torch.rand(40, generator=g) < 0.5).float().tolist()
        _add(b, users, ans, sat, items=list(range(start, start + 40)))

    a = PairBuffer(per_user=4, total=18, seed=3)
    fill(a, 0)
    a.sample(5)
    fill(a, 100)  # leaves fresh rows and used RNG state
    f = io.BytesIO()
    torch.save(a.state_dict(), f)
    f.seek(0)
    b = PairBuffer(per_user=4, total=18, seed=99)
    b.load_state_dict(torch.load(f, weights_only=True))
    assert len(b) == len(a) and all(b.user_rows(u) == a.user_rows(u) for u in range(6))
    for start in (200, 300):
        sa, sb = a.sample(12), b.sample(12)
        assert _pairs(sa) == _pairs(sb) and torch.equal(sa.weight, sb.weight)
        assert torch.equal(sa.rows["item"], sb.rows["item"]) and sa.num_pairs > 0
        fill(a, start)
        fill(b, start)


def test_row_fields_rebuild_the_batch_kjt_of_the_sampled_rows():
    data = data_config()
    batch = batch_from_rows(data, make_rows(data, 12, seed=4))
    fields = row_fields(batch, data)
    back = fields_to_batch(fields, data)
    for key in data.sparse_names:
        assert torch.equal(back.sparse[key].values(), batch.sparse[key].values()), key
        assert torch.equal(back.sparse[key].lengths().long(), batch.sparse[key].lengths().long()), key
    assert torch.equal(back.dense, batch.dense)
    batch.labels.update(questionnaire_answered=torch.ones(12), satisfied=(torch.arange(12) % 2).float())
    batch.ids["user_id"] = torch.zeros(12, dtype=torch.long)  # one user: every sat/dis combination pairs
    batch.ids["item_id"] = torch.arange(12)  # unique tags: a sampled row's item_id is its batch position
    buf = PairBuffer(per_user=12, total=12, pairs_per_row=12)
    assert buf.add_batch(batch, data, torch.full((12,), 0.5)) == 12
    ps = buf.sample(100)
    assert ps.num_pairs == 36
    pb = ps.batch(data)
    sub = fields_to_batch({k: v[ps.ids["item_id"]] for k, v in fields.items()}, data)
    for key in data.sparse_names:
        assert torch.equal(pb.sparse[key].values(), sub.sparse[key].values()), key
    with pytest.raises(KeyError, match="no label 'satisfied'"):
        del batch.labels["satisfied"]
        buf.add_batch(batch, data, torch.full((12,), 0.5))


# ------------------------------------------------------------------------------------------ learning
D, NU, NI = 8, 40, 400


def _world():
    g = torch.Generator().manual_seed(0)
    U, E = torch.randn(NU, 8, generator=g), torch.randn(NI, D, generator=g)
    a = F.normalize(torch.randn(D, generator=g), dim=0)
    b = F.normalize(torch.randn(D, generator=g), dim=0)
    return U, E, E @ a, E @ b  # quality q drives satisfaction, attractiveness c drives clicks


def test_dpo_aligns_the_serving_head_with_satisfaction_on_held_out_pairs():
    U, E, q, c = _world()
    train_items, test_items = torch.arange(300), torch.arange(300, NI)

    def inputs(users, items):
        B = users.numel()
        return RankerInputs(user={"user_id": U[users]}, item=E[items], item_attrs={}, dense=torch.zeros(B, 0),
                            duration_log1p=torch.zeros(B),
                            histories={"hist_click": (torch.zeros(B, 2, D), torch.zeros(B, 2, dtype=torch.bool))})

    def make():
        cfg = from_dict(ModelConfig, {"variant": "click_only", "dropout": 0.0, "user_features": ["user_id"],
                                      "item_attr_features": []}, "model")
        torch.manual_seed(0)
        ranker = SAQRecRanker(cfg, D, {"hist_click": 2}, {"user_id": 8}, {}, n_dense=0)
        return EasqRanker(ranker, EasqConfig(distill_weight=0.0, ramp_threshold=0.7, ramp_updates=20, auc_window=8192, auc_min_per_class=20, rank=4,
                                             dpo_weight=1.0))

    def rows(gen, B=64):
        users, items = torch.randint(NU, (B,), generator=gen), train_items[torch.randint(300, (B,), generator=gen)]
        click = (torch.rand(B, generator=gen) < torch.sigmoid(2 * c[items] + 0.5 * q[items])).float()
        ans = (torch.rand(B, generator=gen) < 0.3).float()
        sat = (torch.rand(B, generator=gen) < torch.sigmoid(3 * q[items])).float() * ans
        return users, items, click, ans, sat

    gh = torch.Generator().manual_seed(1)  # held-out pairs: unseen items, w has the higher quality
    hu = torch.randint(NU, (400,), generator=gh)
    i1, i2 = test_items[torch.randint(100, (400,), generator=gh)], test_items[torch.randint(100, (400,), generator=gh)]
    hw, hl = torch.where(q[i1] > q[i2], i1, i2), torch.where(q[i1] > q[i2], i2, i1)
    good = test_items[q[test_items] > 0.5]

    @torch.no_grad()
    def evaluate(m):
        m.eval()
        acc = float((m(inputs(hu, hw))["click"] > m(inputs(hu, hl))["click"]).float().mean())
        mean_sat = float(m(inputs(torch.arange(NU).repeat_interleave(good.numel()), good.repeat(NU)))["click"].mean())
        m.train()
        return acc, mean_sat

    m0 = make()  # phase 0: behaviour (click) training only
    opt = torch.optim.Adam(m0.backbone_parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(3)
    for _ in range(100):
        users, items, click, _, _ = rows(gen)
        loss = F.binary_cross_entropy_with_logits(m0(inputs(users, items))["click"], click)
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = copy.deepcopy(m0.state_dict())

    def run(with_dpo: bool):
        m = make()
        m.load_state_dict(state)
        opts = [torch.optim.Adam(m.backbone_parameters(), lr=1e-2), torch.optim.Adam(m.lora_parameters(), lr=1e-2)]
        loss_fn, buf = EasqLoss(m.easq_cfg), PairBuffer(per_user=16, total=5000)
        gen = torch.Generator().manual_seed(4)
        for _ in range(200):
            users, items, click, ans, sat = rows(gen)
            out, rho = m(inputs(users, items)), torch.full((users.numel(),), 0.3)
            buf.add({"item": items.unsqueeze(1)}, users, ans, sat, rho, item_id=items)
            ps = buf.sample(64) if with_dpo else None
            scores = m.dpo_scores(inputs(ps.ids["user_id"], ps.rows["item"][:, 0])) if ps and ps.num_pairs else None
            res = loss_fn(out, {"questionnaire_answered": ans, "satisfied": sat}, rho, scores, ps if scores else None)
            loss = F.binary_cross_entropy_with_logits(out["click"], click) + res["loss"]
            for o in opts:
                o.zero_grad()
            loss.backward()
            for o in opts:
                o.step()
            loss_fn.update()
        assert loss_fn.ramp.started and loss_fn.ramp.weight == 1.0  # the satisfaction head cleared AUC 0.7
        return evaluate(m)

    before = evaluate(m0)
    acc_a, sat_a = run(False)
    acc_b, sat_b = run(True)
    assert acc_a < 0.65 and before[0] < 0.65  # clicks alone do not rank by satisfaction
    assert acc_b > 0.85 and acc_b > acc_a + 0.25, (acc_a, acc_b)
    assert sat_b >= sat_a and sat_b >= before[1], (before, sat_a, sat_b)  # satisfied items' main score does not fall


def test_pair_summary_sums_ranks_by_name_and_takes_dpo_steps_from_rank_0():
    from satrank.jobs.engine.easq_step import PAIR_SUMS, pair_summary

    def part(**v):
        return {"pair_sums": torch.tensor([float(v[k]) for k in PAIR_SUMS], dtype=torch.float64)}

    parts = [part(answered=3, online=10, online_agreeing=6.5, dpo_steps=4),
             part(answered=2, online=30, online_agreeing=13.5, dpo_steps=4)]
    assert pair_summary(parts) == {"answered": 5, "online": 40, "online_agreement": 20.0 / 40, "dpo_steps": 4}
    none = [part(answered=1, online=0, online_agreeing=0, dpo_steps=0)]
    assert pair_summary(none) == {"answered": 1, "online": 0, "online_agreement": None, "dpo_steps": 0}

"""SID (eqs. 9-10), MLSE (eqs. 11-12) and fusion (eq. 13) against numbers worked out by hand."""
import math

import pytest
import torch

from satrank.models.ranker.sid_mlse import (
    GatedFusion,
    GateMLP,
    MultiLevelSatisfaction,
    SatisfactionDisentangle,
    history_attention,
    mlse_groups,
    zero_padding,
)

E = math.e


def _set_gate(gate: GateMLP, weight=None, bias=None):
    with torch.no_grad():
        gate.out.weight.copy_(torch.zeros_like(gate.out.weight) if weight is None else torch.tensor(weight))
        gate.out.bias.copy_(torch.zeros_like(gate.out.bias) if bias is None else torch.tensor(bias))


# H_r: three valid clicked items and one padded position holding garbage
H_R = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [9.0, -9.0]]])
M_R = torch.tensor([[True, True, True, False]])
H_POS = torch.tensor([[1.0, 0.0]])
H_NEG = torch.tensor([[0.0, 2.0]])
# eq. 9 by hand, h_{s+} = (1, 0): scores H_r h = (1, 0, 1) -> softmax (e, 1, e) / (2e + 1)
#   u_r^{s+} = (e (1,0) + (0,1) + e (1,1)) / (2e + 1) = (2e, 1 + e) / (2e + 1) = (0.8446376, 0.5776812)
UR_POS = [2 * E / (2 * E + 1), (1 + E) / (2 * E + 1)]
# h_{s-} = (0, 2): scores (0, 2, 2) -> (1, e^2, e^2) / (1 + 2e^2)
#   u_r^{s-} = ((1,0) + e^2 (0,1) + e^2 (1,1)) / (1 + 2e^2) = (1 + e^2, 2e^2) / (1 + 2e^2) = (0.5316895, 0.9366211)
UR_NEG = [(1 + E**2) / (1 + 2 * E**2), 2 * E**2 / (1 + 2 * E**2)]


def test_eq9_attention_by_hand_ignores_the_padded_position():
    torch.testing.assert_close(history_attention(H_R, M_R, H_POS), torch.tensor([UR_POS]))
    torch.testing.assert_close(history_attention(H_R, M_R, H_NEG), torch.tensor([UR_NEG]))
    torch.testing.assert_close(history_attention(H_R, M_R, H_POS), torch.tensor([[0.8446376, 0.5776812]]))


def test_eq10_with_zero_and_constructed_gate_weights():
    sid = SatisfactionDisentangle(2)
    # zero weights -> softmax gate (1/2, 1/2): u_{s+} = ((1,0) + u_r^{s+}) / 2 = (0.9223188, 0.2888406)
    _set_gate(sid.gate_pos)
    # bias (ln 3, 0) -> gate (3/4, 1/4): u_{s-} = 3/4 (0,2) + 1/4 u_r^{s-} = (0.1329224, 1.7341553)
    _set_gate(sid.gate_neg, bias=[math.log(3.0), 0.0])
    u_pos, u_neg, w_pos, w_neg = sid(H_R, M_R, H_POS, H_NEG)
    torch.testing.assert_close(u_pos, torch.tensor([[0.9223188, 0.2888406]]))
    torch.testing.assert_close(u_neg, torch.tensor([[0.1329224, 1.7341553]]))
    torch.testing.assert_close(w_neg, torch.tensor([[0.75, 0.25]]))
    # input-dependent gate: weight row (1,0,0,0) -> logits (h_{s+}[0], 0) = (1, 0) -> (e/(1+e), 1/(1+e))
    #   u_{s+} = 0.7310586 (1,0) + 0.2689414 u_r^{s+} = (0.9582166, 0.1553624)
    _set_gate(sid.gate_pos, weight=[[1.0, 0, 0, 0], [0, 0, 0, 0]])
    u_pos, *_ = sid(H_R, M_R, H_POS, H_NEG)
    torch.testing.assert_close(u_pos, torch.tensor([[0.9582166, 0.1553624]]))


def test_eq10_raw_gate_uses_mlp_outputs_as_weights():
    sid = SatisfactionDisentangle(2, activation="none")
    _set_gate(sid.gate_pos, bias=[2.0, -1.0])  # u = 2 h - u_r = (2 - 0.8446376, -0.5776812)
    _set_gate(sid.gate_neg)
    u_pos, u_neg, *_ = sid(H_R, M_R, H_POS, H_NEG)
    torch.testing.assert_close(u_pos, torch.tensor([[1.1553624, -0.5776812]]))
    torch.testing.assert_close(u_neg, torch.zeros(1, 2))


def test_empty_click_history_gives_zero_attention_output_not_nan():
    H = torch.full((2, 3, 2), float("nan"))
    m = torch.zeros(2, 3, dtype=torch.bool)
    out = history_attention(H, m, torch.ones(2, 2))
    assert torch.equal(out, torch.zeros(2, 2))


# MLSE: four clicked items, scores s_hat = (0.1, 0.9, 0.5, 0.3), N_I = 2 -> k = ceil(4/2) = 2
H_M = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 2.0]]])
S_M = torch.tensor([[0.1, 0.9, 0.5, 0.3]])
M_M = torch.ones(1, 4, dtype=torch.bool)
# sorted descending: items 1 (0.9), 2 (0.5) | 3 (0.3), 0 (0.1)
# I_1 = sigmoid(0.4) (0,1) + sigmoid(-0.4) (2,0)            = (0.8026247, 0.5986877)   [softmax(0.9, 0.5)]
# I_2 = sigmoid(0.2) (0,2) + sigmoid(-0.2) (1,0)            = (0.4501660, 1.0996680)   [softmax(0.3, 0.1)]
I1 = [0.8026247, 0.5986877]
I2 = [0.4501660, 1.0996680]


def test_eq11_eq12_by_hand_with_zero_and_constructed_gates():
    mlse = MultiLevelSatisfaction(2, num_levels=2)
    _set_gate(mlse.gate)  # uniform: u = (I_1 + I_2) / 2 = (0.6263953, 0.8491778)
    u, w = mlse(H_M, M_M, S_M)
    torch.testing.assert_close(u, torch.tensor([[0.6263953, 0.8491778]]))
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.5]]))
    _set_gate(mlse.gate, bias=[0.0, math.log(3.0)])  # (1/4, 3/4): u = (0.5382807, 0.9744229)
    u, _ = mlse(H_M, M_M, S_M)
    torch.testing.assert_close(u, torch.tensor([[0.5382807, 0.9744229]]))
    # the level representations themselves: gate weight picking I_1 only (raw gate, bias (1, 0))
    raw = MultiLevelSatisfaction(2, num_levels=2, activation="none")
    _set_gate(raw.gate, bias=[1.0, 0.0])
    torch.testing.assert_close(raw(H_M, M_M, S_M)[0], torch.tensor([I1]))
    _set_gate(raw.gate, bias=[0.0, 1.0])
    torch.testing.assert_close(raw(H_M, M_M, S_M)[0], torch.tensor([I2]))


def test_mlse_padding_with_high_scores_and_garbage_changes_nothing():
    mlse = MultiLevelSatisfaction(2, num_levels=2)
    torch.manual_seed(0)
    u0, w0 = mlse(H_M, M_M, S_M)
    H = torch.cat([H_M, torch.tensor([[[float("nan"), 5.0], [7.0, -7.0]]])], dim=1)
    S = torch.cat([S_M, torch.tensor([[100.0, float("inf")]])], dim=1)
    M = torch.cat([M_M, torch.zeros(1, 2, dtype=torch.bool)], dim=1)
    u1, w1 = mlse(H, M, S)
    torch.testing.assert_close(u1, u0, atol=0, rtol=0)
    torch.testing.assert_close(w1, w0, atol=0, rtol=0)


def test_padding_zeroed_skips_only_a_pass_the_caller_already_made():
    """padding_zeroed=True (the ranker: its history encoders write zeros at padding) gives exactly the default's
    outputs on a zero-padded H, and zero_padding is what the default applies to garbage."""
    torch.manual_seed(0)
    sid, mlse = SatisfactionDisentangle(2), MultiLevelSatisfaction(2, num_levels=2)
    H0 = zero_padding(H_R, M_R)
    assert (H0[~M_R] == 0).all() and torch.equal(H0[M_R], H_R[M_R])
    for a, b in zip(sid(H_R, M_R, H_POS, H_NEG), sid(H0, M_R, H_POS, H_NEG, padding_zeroed=True)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    scores = torch.tensor([[0.9, 0.1, 0.5, 99.0]])
    for a, b in zip(mlse(H_R, M_R, scores), mlse(H0, M_R, scores, padding_zeroed=True)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(history_attention(H0, M_R, H_POS, padding_zeroed=True), torch.tensor([UR_POS]))


def test_short_history_empty_groups_are_masked_out_of_the_gate():
    # one clicked item, N_I = 3: k = 1, group 1 holds it, groups 2 and 3 are empty -> u = h_1
    mlse = MultiLevelSatisfaction(2, num_levels=3)
    _set_gate(mlse.gate)
    H = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]])
    m = torch.tensor([[True, False]])
    u, w = mlse(H, m, torch.tensor([[0.7, 0.0]]))
    torch.testing.assert_close(u, torch.tensor([[1.0, 2.0]]))
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.0, 0.0]]))
    # no clicked item at all: u_MLSE = 0, weights all 0, no NaN
    u, w = mlse(H, torch.zeros(1, 2, dtype=torch.bool), torch.zeros(1, 2))
    assert torch.equal(u, torch.zeros(1, 2)) and torch.equal(w, torch.zeros(1, 3))


def test_group_rules_chunk_and_balanced():
    # scores (0.2, 0.9, 0.5): ranks (2, 0, 1); n = 3, N_I = 2 -> k = 2: groups (1, 0, 0)
    g = mlse_groups(torch.tensor([[0.2, 0.9, 0.5, 0.0]]), torch.tensor([[True, True, True, False]]), 2)
    assert g.tolist() == [[1, 0, 0, -1]]
    # n = 10, N_I = 9: chunk uses k = 2 (groups 0..4, four empty); balanced fills all nine
    s = torch.linspace(1, 0, 10).unsqueeze(0)
    m = torch.ones(1, 10, dtype=torch.bool)
    assert mlse_groups(s, m, 9, "chunk").tolist() == [[0, 0, 1, 1, 2, 2, 3, 3, 4, 4]]
    assert mlse_groups(s, m, 9, "balanced").tolist() == [[0, 0, 1, 2, 3, 4, 5, 6, 7, 8]]
    # ties keep history order (stable sort)
    assert mlse_groups(torch.full((1, 4), 0.5), torch.ones(1, 4, dtype=torch.bool), 2).tolist() == [[0, 0, 1, 1]]
    with pytest.raises(ValueError, match="grouping"):
        mlse_groups(s, m, 9, "quantile")


def test_mlse_batch_equals_row_by_row_computation():
    torch.manual_seed(3)
    mlse = MultiLevelSatisfaction(4, num_levels=3, hidden=[5])
    lengths = [7, 3, 1, 0, 5]
    L = 8
    H = torch.randn(5, L, 4)
    S = torch.rand(5, L)
    m = torch.arange(L) < torch.tensor(lengths).unsqueeze(1)
    u, w = mlse(H, m, S)
    for b, n in enumerate(lengths):
        ub, wb = mlse(H[b:b + 1, :max(n, 1)], m[b:b + 1, :max(n, 1)], S[b:b + 1, :max(n, 1)])
        torch.testing.assert_close(u[b:b + 1], ub, atol=1e-6, rtol=0)
        torch.testing.assert_close(w[b:b + 1], wb, atol=1e-6, rtol=0)


def test_mlse_rejects_non_finite_valid_scores():
    mlse = MultiLevelSatisfaction(2, num_levels=2)
    with pytest.raises(FloatingPointError, match="history scorer"):
        mlse(H_M, M_M, torch.tensor([[0.1, float("nan"), 0.3, 0.2]]))


def test_fusion_zero_gate_is_the_mean_and_k_follows_the_inputs():
    f = GatedFusion(["u_sat", "u_dis", "h_r", "u_mlse", "v_u"], d=2)
    assert f.gate.out.weight.shape == (5, 10)  # MLP_f: R^{5d} -> R^5
    _set_gate(f.gate)
    parts = [torch.tensor([[float(k), -float(k)]]) for k in range(5)]
    u, w = f(parts)
    torch.testing.assert_close(u, torch.tensor([[2.0, -2.0]]))
    torch.testing.assert_close(w, torch.full((1, 5), 0.2))
    with pytest.raises(ValueError, match="expects 5 inputs"):
        f(parts[:3])

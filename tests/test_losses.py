"""Stage-1 losses (models/stage1/losses.py): exact values on a hand-computed 6-row batch, clipping at rho = 0 and 1,
empty batches, NaN detection, the ideal loss, and a learned effect: IPS beats naive on eq. 2 under
feature-dependent answering."""
import math

import pytest
import torch

from satrank.models.stage1.losses import (
    LossCounters,
    bce_with_logits,
    dr_imputation_loss,
    dr_loss,
    ideal_loss,
    ips_loss,
    naive_loss,
    satisfaction_loss,
    snips_loss,
)


def logit(p):
    return math.log(p / (1 - p))


# Hand example. Probabilities s_hat chosen so each BCE is a simple log:
# row s_hat  s  o  rho   w=1/max(rho,0.1)   BCE
#  0  0.80   1  1  0.5   2                  -ln .8
#  1  0.25   0  1  0.2   5                  -ln .75
#  2  0.50   0  0  0.1   -                  (unanswered)
#  3  0.80   0  1  0.0   10 (clipped)       -ln .2
#  4  0.25   0  0  1.0   -                  (unanswered)
#  5  0.50   1  1  1.0   1                  ln 2
M = 0.1
P = [0.8, 0.25, 0.5, 0.8, 0.25, 0.5]
L0, L1, L3, L5 = -math.log(0.8), -math.log(0.75), -math.log(0.2), math.log(2)
E_HAT = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]


def batch(requires_grad=False):
    x = torch.tensor([logit(p) for p in P], dtype=torch.float64, requires_grad=requires_grad)
    s = torch.tensor([1, 0, 0, 0, 0, 1], dtype=torch.float64)
    o = torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.float64)
    rho = torch.tensor([0.5, 0.2, 0.1, 0.0, 1.0, 1.0], dtype=torch.float64)
    return x, s, o, rho


def test_naive_is_mean_bce_over_answered_rows_eq3():
    x, s, o, _ = batch()
    out = naive_loss(x, s, o)
    assert out.loss.item() == pytest.approx((L0 + L1 + L3 + L5) / 4, rel=1e-12)
    assert out.stats["answered"].item() == 4 and out.stats["empty"].item() == 0


def test_ips_weights_by_clipped_inverse_propensity_eq6_both_normalisers():
    x, s, o, rho = batch()
    num = 2 * L0 + 5 * L1 + 10 * L3 + 1 * L5
    out = ips_loss(x, s, o, rho, clip=M, normalizer="all")
    assert out.loss.item() == pytest.approx(num / 6, rel=1e-12)
    paper = ips_loss(x, s, o, rho, clip=M, normalizer="answered")
    assert paper.loss.item() == pytest.approx(num / 4, rel=1e-12)
    # rho = 0 was clipped to M (finite weight 10); rho = 1 gives weight exactly 1.
    assert out.stats["clipped"].item() == 1
    assert out.stats["weight_sum"].item() == pytest.approx(18)


def test_snips_self_normalises_by_sum_of_weights():
    x, s, o, rho = batch()
    out = snips_loss(x, s, o, rho, clip=M)
    assert out.loss.item() == pytest.approx((2 * L0 + 5 * L1 + 10 * L3 + L5) / 18, rel=1e-12)


def test_dr_uses_all_rows_and_corrects_imputed_error_on_answered():
    x, s, o, rho = batch(requires_grad=True)
    e_hat = torch.tensor(E_HAT, dtype=torch.float64, requires_grad=True)
    out = dr_loss(x, s, o, rho, e_hat, clip=M)
    expect = (sum(E_HAT) + 2 * (L0 - 0.1) + 5 * (L1 - 0.2) + 10 * (L3 - 0.4) + 1 * (L5 - 0.6)) / 6
    assert out.loss.item() == pytest.approx(expect, rel=1e-12)
    # e_hat is a fixed imputation for the prediction model: no gradient flows into it.
    (g,) = torch.autograd.grad(out.loss, e_hat, allow_unused=True)
    assert g is None or torch.count_nonzero(g) == 0


def test_dr_imputation_loss_is_propensity_weighted_squared_error_and_only_trains_e_hat():
    x, s, o, rho = batch(requires_grad=True)
    e_hat = torch.tensor(E_HAT, dtype=torch.float64, requires_grad=True)
    out = dr_imputation_loss(x, s, o, rho, e_hat, clip=M)
    expect = (2 * (L0 - 0.1) ** 2 + 5 * (L1 - 0.2) ** 2 + 10 * (L3 - 0.4) ** 2 + (L5 - 0.6) ** 2) / 6
    assert out.loss.item() == pytest.approx(expect, rel=1e-12)
    gx, ge = torch.autograd.grad(out.loss, (x, e_hat), allow_unused=True)
    assert gx is None or torch.count_nonzero(gx) == 0
    # d/de_hat_k = -2 w_k (e_k - e_hat_k) / 6 on answered rows, 0 elsewhere
    assert ge[0].item() == pytest.approx(-2 * 2 * (L0 - 0.1) / 6, rel=1e-12)
    assert ge[2].item() == 0 and ge[4].item() == 0


def test_dispatcher_routes_by_kind_and_rejects_missing_inputs():
    x, s, o, rho = batch()
    e_hat = torch.tensor(E_HAT, dtype=torch.float64)
    for kind, fn in [("ips", lambda: ips_loss(x, s, o, rho, M)), ("snips", lambda: snips_loss(x, s, o, rho, M)),
                     ("dr", lambda: dr_loss(x, s, o, rho, e_hat, M)), ("naive", lambda: naive_loss(x, s, o))]:
        got = satisfaction_loss(kind, x, s, o, rho, clip=M, imputed_error=e_hat)
        assert got.loss.item() == fn().loss.item()
    with pytest.raises(ValueError, match="propensity"):
        satisfaction_loss("ips", x, s, o, None, clip=M)
    with pytest.raises(ValueError, match="imputed_error"):
        satisfaction_loss("dr", x, s, o, rho, clip=M)
    with pytest.raises(ValueError, match="one of"):
        satisfaction_loss("ipw", x, s, o, rho, clip=M)
    with pytest.raises(ValueError, match="clip M"):
        ips_loss(x, s, o, rho, clip=0.0)
    with pytest.raises(ValueError, match="'propensity' has shape"):
        ips_loss(x, s, o, rho[:3], clip=M)


def test_extreme_propensities_zero_and_one_stay_finite_with_gradients():
    x, s, o, rho = batch(requires_grad=True)
    for kind in ("ips", "snips", "dr"):
        out = satisfaction_loss(kind, x, s, o, rho, clip=M, imputed_error=torch.tensor(E_HAT, dtype=torch.float64))
        (g,) = torch.autograd.grad(out.loss, x)
        assert torch.isfinite(g).all()
        # gradient on the rho=0 row is w=10 times the plain BCE gradient (s_hat - s) = 0.8, over |D|
        if kind in ("ips", "dr"):
            assert g[3].item() == pytest.approx(10 * 0.8 / 6, rel=1e-9)


@pytest.mark.parametrize("kind", ["naive", "ips", "snips", "dr"])
def test_batch_without_answers_gives_graph_carrying_zero_and_is_counted(kind):
    x = torch.tensor([0.3, -1.2, 2.0], requires_grad=True)
    zeros = torch.zeros(3)
    e_hat = torch.tensor([0.2, 0.4, 0.6])
    out = satisfaction_loss(kind, x, zeros, zeros, torch.full((3,), 0.3), clip=M, imputed_error=e_hat)
    expect = 0.4 if kind == "dr" else 0.0  # DR: mean imputed error, a constant for the predictor
    assert out.loss.item() == pytest.approx(expect, abs=1e-7)
    assert out.stats["empty"].item() == 1 and out.stats["answered"].item() == 0
    out.loss.backward()
    assert x.grad is not None and torch.count_nonzero(x.grad) == 0
    counters = LossCounters()
    counters.update(out.stats)
    counters.update(naive_loss(*batch()[:3]).stats)
    summary = counters.as_dict()
    assert summary["empty"] == 1 and summary["batches"] == 2 and summary["answered"] == 4


def test_nan_logits_raise_floating_point_error_naming_the_loss_and_batch():
    x, s, o, rho = batch()
    x[0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"satisfaction\[ips\].*rows=6, answered=4.*nan=1"):
        ips_loss(x, s, o, rho, clip=M)
    with pytest.raises(FloatingPointError, match=r"satisfaction\[naive\]"):
        naive_loss(x, s, o)
    rho_bad = rho.clone()
    rho_bad[1] = float("nan")
    with pytest.raises(FloatingPointError, match="weights"):
        snips_loss(batch()[0], s, o, rho_bad, clip=M)


def test_nan_logit_on_an_unanswered_row_still_raises_because_the_model_is_broken():
    x, s, o, rho = batch()
    x[2] = float("nan")  # unanswered: no label uses it, but its gradient would poison the parameters
    for kind in ("naive", "ips", "snips", "dr"):
        with pytest.raises(FloatingPointError, match=kind):
            satisfaction_loss(kind, x, s, o, rho, clip=M, imputed_error=torch.tensor(E_HAT, dtype=torch.float64))


def test_bce_weighted_masked_and_plain_mean_eq5():
    x = torch.tensor([logit(0.8), logit(0.25), 0.0], dtype=torch.float64)
    y = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    assert bce_with_logits(x, y).loss.item() == pytest.approx((L0 + L1 + math.log(2)) / 3, rel=1e-12)
    w = torch.tensor([3.0, 1.0, 5.0], dtype=torch.float64)
    mask = torch.tensor([1, 1, 0])
    assert bce_with_logits(x, y, weights=w, mask=mask).loss.item() == pytest.approx((3 * L0 + L1) / 4, rel=1e-12)
    empty = bce_with_logits(x, y, mask=torch.zeros(3))
    assert empty.loss.item() == 0 and empty.stats["empty"].item() == 1


def test_ideal_loss_is_cross_entropy_against_true_probability_eq2():
    x = torch.tensor([logit(0.8), 0.0, logit(0.25)], dtype=torch.float64)
    p = torch.tensor([0.6, 0.3, 0.25], dtype=torch.float64)
    expect = (-(0.6 * math.log(0.8) + 0.4 * math.log(0.2)) + math.log(2)
              - (0.25 * math.log(0.25) + 0.75 * math.log(0.75))) / 3
    assert ideal_loss(x, p).item() == pytest.approx(expect, rel=1e-12)


def _fit(kind, x, s, o, rho, steps=300):
    """Logistic regression on the visible feature x only (misspecified: truth also depends on z)."""
    torch.manual_seed(0)
    w = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        satisfaction_loss(kind, w[0] * x + w[1], s, o, rho, clip=0.02).loss.backward()
        opt.step()
    return w.detach()


def test_ips_beats_naive_on_ideal_loss_when_answering_depends_on_a_known_feature():
    g = torch.Generator().manual_seed(7)
    n = 20000
    x = torch.rand(n, generator=g) * 4 - 2
    z = (torch.rand(n, generator=g) < 0.5).float()          # known to the propensity, hidden from g(u,i)
    p_true = torch.sigmoid(x + 2.5 * z - 1.25)
    s_full = (torch.rand(n, generator=g) < p_true).float()
    rho = 0.04 + 0.86 * z                                     # satisfied-prone rows answer far more often
    o = (torch.rand(n, generator=g) < rho).float()
    s = s_full * o
    ideal = {}
    for kind in ("naive", "ips", "snips"):
        w = _fit(kind, x, s, o, rho)
        ideal[kind] = ideal_loss(w[0] * x + w[1], p_true).item()
    assert ideal["ips"] < ideal["naive"] - 0.01, ideal
    assert ideal["snips"] < ideal["naive"] - 0.01, ideal

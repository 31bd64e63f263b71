"""Label correction (eqs. 16-18): Beta-mixture EM, monotone lambda, eq. 16 before n_mix, detached s_mix."""
import pytest
import torch
import torch.nn.functional as F

from satrank.models.ranker.label_correction import LabelCorrector, fit_beta_mixture
from satrank.models.ranker.losses import satisfaction_loss_final


def _two_clusters(n_low=7000, n_high=3000, seed=0):
    torch.manual_seed(seed)
    low = torch.distributions.Beta(torch.tensor(2.0), torch.tensor(10.0)).sample((n_low,))  # mean 1/6
    high = torch.distributions.Beta(torch.tensor(10.0), torch.tensor(3.0)).sample((n_high,))  # mean 10/13
    return torch.cat([low, high])


def test_em_recovers_two_well_separated_beta_clusters():
    x = _two_clusters()
    bmm = fit_beta_mixture(x, iters=30)
    hi, lo = bmm.high, 1 - bmm.high
    assert abs(float(bmm.means[lo]) - 2 / 12) < 0.02
    assert abs(float(bmm.means[hi]) - 10 / 13) < 0.02
    assert abs(float(bmm.weights[hi]) - 0.3) < 0.02
    # shape too, not just means: alpha/beta within 25 % of the truth
    assert abs(float(bmm.alphas[lo]) - 2.0) / 2.0 < 0.25 and abs(float(bmm.betas[lo]) - 10.0) / 10.0 < 0.25
    assert abs(float(bmm.alphas[hi]) - 10.0) / 10.0 < 0.25 and abs(float(bmm.betas[hi]) - 3.0) / 3.0 < 0.25


def _fitted(n_mix=1, seed=0):
    c = LabelCorrector(n_mix=n_mix, iters=20, max_samples=20000)
    losses = _two_clusters(seed=seed) * 3.0  # raw losses on a (0, 3) scale
    for chunk in losses.split(1000):
        c.observe(chunk)
    stats = c.end_epoch(n_mix - 1)
    return c, stats


def test_lambda_is_monotone_in_the_loss_and_small_for_small_losses():
    c, stats = _fitted()
    assert stats["bmm_degenerate"] == 0.0 and stats["bmm_n"] == 10000
    grid = torch.linspace(-1.0, 5.0, 2001)  # beyond the fitted range on both sides too
    lam = c.lam(grid)
    assert (lam[1:] >= lam[:-1]).all()
    assert ((lam >= 0) & (lam <= 1)).all()
    assert float(c.lam(torch.tensor([0.3]))) < 0.1  # deep in the low-loss cluster: trust s_f
    assert float(c.lam(torch.tensor([2.4]))) > 0.9  # deep in the high-loss cluster: trust s_hat
    assert (c.table[1:] >= c.table[:-1]).all()


def test_before_n_mix_the_loss_is_eq16_and_the_reservoir_is_fed():
    c = LabelCorrector(n_mix=2)
    torch.manual_seed(1)
    logits, pseudo = torch.randn(64, requires_grad=True), torch.rand(64)
    for epoch in (0, 1):
        out = satisfaction_loss_final(logits, pseudo, epoch, c)
        assert out["lambda"] is None
        torch.testing.assert_close(out["loss"], F.binary_cross_entropy_with_logits(logits, pseudo), atol=0, rtol=0)
    assert c._vals.numel() == 128
    assert c.end_epoch(0) == {}  # epoch 1 does not mix yet: no fit
    assert c.table is None and c._vals.numel() == 0
    with pytest.raises(RuntimeError, match="no Beta mixture is fitted"):
        satisfaction_loss_final(logits, pseudo, 2, c)


def test_from_n_mix_the_target_is_mixed_and_detached():
    c, _ = _fitted(n_mix=1)
    torch.manual_seed(2)
    logits = (torch.randn(256) * 2).requires_grad_()
    pseudo = torch.rand(256)
    out = satisfaction_loss_final(logits, pseudo, epoch=1, corrector=c, record=False)
    lam, target = out["lambda"], out["target"]
    assert not target.requires_grad and not lam.requires_grad
    per = F.binary_cross_entropy_with_logits(logits.detach(), pseudo, reduction="none")
    torch.testing.assert_close(lam, c.lam(per))
    s_f = torch.sigmoid(logits.detach())
    torch.testing.assert_close(target, lam * pseudo + (1 - lam) * s_f)
    out["loss"].backward()
    # gradient of mean BCE with a CONSTANT target: (sigmoid(x) - s_mix) / B; a target that carried
    # the graph through s_f would add (1 - lambda) d s_f / dx terms and change it
    torch.testing.assert_close(logits.grad, (s_f - target) / 256)
    assert (lam > 0.01).any() and (lam < 0.99).any()  # the batch really mixes both ways


def test_reservoir_is_bounded_and_uniform_over_the_epoch():
    c = LabelCorrector(n_mix=1, max_samples=1000)
    for i in range(20):
        c.observe(torch.full((500,), float(i)))  # batch i holds value i
    assert c._vals.numel() == 1000
    counts = torch.bincount(c._vals.long(), minlength=20).float()
    assert counts.min() > 20 and counts.max() < 80  # ~50 per batch, not biased to late batches


def test_state_dict_roundtrip_gives_the_same_lambda():
    c, _ = _fitted()
    c2 = LabelCorrector(n_mix=1)
    c2.load_state_dict(c.state_dict())
    x = torch.linspace(0, 3, 50)
    torch.testing.assert_close(c2.lam(x), c.lam(x), atol=0, rtol=0)


def test_constant_losses_warn_and_fall_back_to_pure_pseudo_labels():
    c = LabelCorrector(n_mix=1)
    c.observe(torch.full((100,), 0.5))
    with pytest.warns(UserWarning, match="constant"):
        stats = c.end_epoch(0)
    assert stats["bmm_degenerate"] == 1.0
    assert torch.equal(c.lam(torch.tensor([0.1, 0.5, 2.0])), torch.ones(3))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="n_mix"):
        LabelCorrector(n_mix=0)
    c = LabelCorrector(n_mix=1)
    with pytest.raises(FloatingPointError, match="non-finite"):
        c.observe(torch.tensor([0.1, float("nan")]))
    with pytest.raises(ValueError, match="observed 0"):
        c.end_epoch(0)


def test_end_epoch_fits_on_the_losses_it_is_handed_like_one_corrector_seeing_every_rank():
    """The trainer gathers every rank's epoch_losses() and hands them to end_epoch (the loss never communicates):
    two 'ranks' fitting on the concatenation get the lambda of one corrector that observed all the losses."""
    losses = _two_clusters(seed=3) * 3.0
    whole = LabelCorrector(n_mix=1, iters=20, max_samples=20000)
    ranks = [LabelCorrector(n_mix=1, iters=20, max_samples=20000) for _ in range(2)]
    chunks = losses.split(1000)
    for i, chunk in enumerate(chunks):
        ranks[i % 2].observe(chunk)
    for chunk in chunks[0::2] + chunks[1::2]:  # rank order, as all_gather concatenates
        whole.observe(chunk)
    gathered = torch.cat([r.epoch_losses() for r in ranks])
    assert gathered.numel() == losses.numel()
    stats = whole.end_epoch(0)
    for r in ranks:
        assert r.end_epoch(0, gathered) == stats and r.epoch_losses().numel() == 0
        torch.testing.assert_close(r.table, whole.table, atol=0, rtol=0)
    alone = LabelCorrector(n_mix=1, iters=20, max_samples=20000)
    alone.observe(losses[:1000])
    alone.end_epoch(0)
    assert not torch.equal(alone.table, whole.table)  # one rank's share alone would give another lambda

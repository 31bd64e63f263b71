"""History encoder (eqs. 7-8): padding never matters, last valid position, empty histories, recency."""
import pytest
import torch

from satrank.models.common.encoders import HistoryEncoder


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one intra-op thread is faster and steadier than two on a shared 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _enc(d=8, max_len=10, dropout=0.0, layers=2, seed=0):
    torch.manual_seed(seed)
    return HistoryEncoder(d, max_len, layers=layers, heads=2, dropout=dropout, name="hist_click")


def _batch(lengths, L, d=8, seed=1, garbage=0.0):
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(len(lengths), L, d, generator=g)
    mask = torch.arange(L) < torch.tensor(lengths).unsqueeze(1)
    V = torch.where(mask.unsqueeze(-1), V, torch.full_like(V, garbage))
    return V, mask


@pytest.mark.parametrize("train_mode", [False, True])
def test_garbage_and_extra_width_beyond_lengths_never_change_outputs(train_mode):
    enc = _enc()
    enc.train(train_mode)  # dropout=0, so train mode is deterministic too (slow path vs fast path)
    lengths = [6, 3, 1, 0]
    V, mask = _batch(lengths, 6)
    H0, h0 = enc(V, mask)
    # garbage (huge values, NaN, inf) beyond every length, and a wider padded width (10 instead of 6)
    V2 = torch.randn(4, 10, 8) * 1e4
    V2[1, 5] = float("nan")
    V2[2, 7] = float("inf")
    V2[:, :6] = torch.where(mask.unsqueeze(-1), V, V2[:, :6])
    mask2 = torch.arange(10) < torch.tensor(lengths).unsqueeze(1)
    H1, h1 = enc(V2, mask2)
    assert torch.isfinite(H1).all() and torch.isfinite(h1).all()
    torch.testing.assert_close(h1, h0, atol=1e-6, rtol=0)
    torch.testing.assert_close(H1[:, :6], H0, atol=1e-6, rtol=0)
    assert (H1[~mask2] == 0).all() and (H0[~mask] == 0).all()  # padded rows of H are zero


def test_h_is_the_output_at_the_last_valid_position():
    enc = _enc().eval()
    V, mask = _batch([5, 2, 1], 7)
    H, h = enc(V, mask)
    for b, n in enumerate([5, 2, 1]):
        torch.testing.assert_close(h[b], H[b, n - 1], atol=0, rtol=0)


def test_empty_history_gives_the_learned_empty_vector_without_nan_in_forward_or_backward():
    enc = _enc(dropout=0.1).train()
    V, mask = _batch([0, 0, 3], 5, garbage=float("nan"))
    H, h = enc(V, mask)
    torch.testing.assert_close(h[0], enc.empty.detach(), atol=0, rtol=0)
    torch.testing.assert_close(h[1], enc.empty.detach(), atol=0, rtol=0)
    assert (H[:2] == 0).all()
    (h.sum() + H.sum()).backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert enc.empty.grad.abs().sum() > 0  # two empty rows pull on it


def test_all_empty_batch_with_zero_width_is_valid():
    enc = _enc().eval()
    H, h = enc(torch.zeros(3, 0, 8), torch.zeros(3, 0, dtype=torch.bool))
    assert H.shape == (3, 0, 8)
    torch.testing.assert_close(h, enc.empty.detach().expand(3, 8), atol=0, rtol=0)


def test_positions_count_recency_so_the_most_recent_item_gets_row_zero():
    enc = _enc(layers=1).eval()  # (a non-constant shift: pre-LayerNorm ignores constant ones)
    V, mask = _batch([2, 2], 4)
    _, h = enc(V, mask)
    with torch.no_grad():
        enc.pos.weight[3] += torch.linspace(-3, 3, 8)  # recency 3 is not used by length-2 histories
    _, h_same = enc(V, mask)
    torch.testing.assert_close(h_same, h, atol=0, rtol=0)
    with torch.no_grad():
        enc.pos.weight[0] += torch.linspace(-3, 3, 8)  # recency 0 = the most recent (last valid) item
    _, h_diff = enc(V, mask)
    assert (h_diff - h).abs().max() > 1e-2


def test_bad_mask_and_too_long_history_raise_naming_the_history():
    enc = _enc(max_len=4)
    V, mask = _batch([2], 4)
    with pytest.raises(ValueError, match="hist_click.*left-aligned"):
        enc(V, torch.tensor([[False, True, True, False]]))
    with pytest.raises(ValueError, match="hist_click.*exceeds max_len 4"):
        enc(torch.zeros(1, 5, 8), torch.zeros(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="hist_click.*bool"):
        enc(V, mask.float())
    with pytest.raises(ValueError, match="not divisible"):
        HistoryEncoder(7, 4, heads=2)

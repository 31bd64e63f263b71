"""History encoder (eqs. 7-8): padding never matters, last valid position, empty histories, recency."""
import pytest
import torch

from satrank.models.common.encoders import HistoryEncoder


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


# ------------------------------------------------------------------ fused (SDPA) vs reference attention path
def _pair(norm_first=True, layers=2, dropout=0.1, max_len=10, seed=0):
    """Two encoders with the SAME weights, one per attention path (the reference loads the fused one's state)."""
    torch.manual_seed(seed)
    fused = HistoryEncoder(8, max_len, layers=layers, heads=2, dropout=dropout, norm_first=norm_first,
                           name="hist_click", attention="fused")
    torch.manual_seed(seed + 1)  # different init, then overwritten: the state_dict carries everything
    ref = HistoryEncoder(8, max_len, layers=layers, heads=2, dropout=dropout, norm_first=norm_first,
                         name="hist_click", attention="reference")
    ref.load_state_dict(fused.state_dict())
    return fused, ref


@pytest.mark.parametrize("norm_first,layers", [(True, 2), (False, 1)])
@pytest.mark.parametrize("lengths,width", [([10, 3, 0, 1, 7], 10), ([4, 0, 2, 1], 9), ([0, 0], 5),
                                           ([10, 3, 0, 1, 7, 10, 2, 5, 0, 9, 4, 6, 1, 8, 3, 2, 10], 10)])
def test_fused_and_reference_paths_give_the_same_outputs_and_gradients(norm_first, layers, lengths, width):
    """Full-length rows, variable lengths, empty histories, a width the fused path trims (9 -> 4), and a batch
    large enough (17 rows) for the fused path's attention to run in length blocks (`token_layout`)."""
    fused, ref = _pair(norm_first=norm_first, layers=layers)
    fused.eval(), ref.eval()  # dropout 0.1 is off in eval: the two paths compute the same function
    V, mask = _batch(lengths, width, garbage=float("nan"))
    g = torch.Generator().manual_seed(7)
    wH, wh = torch.randn(len(lengths), width, 8, generator=g), torch.randn(len(lengths), 8, generator=g)
    outs = []
    for enc in (fused, ref):
        Vg = V.clone().requires_grad_(True)
        H, h = enc(Vg, mask)
        ((H * wH).sum() + (h * wh).sum()).backward()
        assert H.shape == (len(lengths), width, 8) and (H[~mask] == 0).all()
        outs.append((H.detach(), h.detach(), torch.nan_to_num(Vg.grad, nan=0.0),
                     {n: p.grad.clone() for n, p in enc.named_parameters()}))
    (H1, h1, gv1, gp1), (H2, h2, gv2, gp2) = outs
    torch.testing.assert_close(H1, H2, atol=1e-5, rtol=0)
    torch.testing.assert_close(h1, h2, atol=1e-5, rtol=0)
    assert torch.isfinite(H1).all() and torch.isfinite(h1).all()
    torch.testing.assert_close(gv1, gv2, atol=1e-5, rtol=0)
    assert gp1.keys() == gp2.keys()
    for n in gp1:
        assert torch.isfinite(gp1[n]).all(), n
        torch.testing.assert_close(gp1[n], gp2[n], atol=1e-5, rtol=1e-5, msg=n)


def test_token_layout_puts_every_valid_token_in_exactly_one_slot_of_blocks_sorted_by_length():
    """Rows sorted by length, cut into 4 blocks of equal count, each padded to its longest row; src / dst are
    inverse on the valid tokens, every other slot reads the zero row; fewer slots than B * L."""
    from satrank.models.common.encoders import token_layout

    lengths = torch.tensor([10, 3, 0, 1, 7, 10, 2, 5, 0, 9, 4, 6, 1, 8, 3, 2])
    L = 10
    valid = torch.arange(L) < lengths.unsqueeze(1)
    attend = valid.clone()
    attend[:, 0] |= lengths == 0
    layout = token_layout(attend, valid, n_blocks=4)
    n = int(valid.sum())
    assert layout.blocks == [(4, 10), (4, 7), (4, 3), (4, 1)]  # sorted: 10 10 9 8 | 7 6 5 4 | 3 3 2 2 | 1 1 0 0
    assert layout.src.numel() == layout.slots == 4 * (10 + 7 + 3 + 1) < 16 * L
    assert torch.equal(layout.rows, valid.reshape(-1).nonzero().squeeze(1))
    real = layout.src < n
    assert int(real.sum()) == n and torch.equal(torch.sort(layout.src[real]).values, torch.arange(n))
    assert torch.equal(layout.src[layout.dst], torch.arange(n))
    assert [tuple(m.shape) for m in layout.masks] == [(4, 1, 1, 10), (4, 1, 1, 7), (4, 1, 1, 3), (4, 1, 1, 1)]
    assert bool(layout.masks[-1].all())  # the two empty rows keep their dummy key
    whole = token_layout(attend, valid, n_blocks=1)
    assert whole.src is None and whole.blocks == [(16, L)] and whole.slots == 16 * L


def test_a_state_dict_saved_from_either_path_loads_into_the_other(tmp_path):
    torch.manual_seed(3)
    ref = HistoryEncoder(8, 6, layers=1, heads=2, name="hist_click", attention="reference").eval()
    torch.save(ref.state_dict(), tmp_path / "ref.pt")
    torch.manual_seed(4)
    fused = HistoryEncoder(8, 6, layers=1, heads=2, name="hist_click", attention="fused").eval()
    fused.load_state_dict(torch.load(tmp_path / "ref.pt"))  # strict: same names and shapes
    V, mask = _batch([6, 2, 0], 6)
    for a, b in zip(fused(V, mask), ref(V, mask)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.save(fused.state_dict(), tmp_path / "fused.pt")
    back = HistoryEncoder(8, 6, layers=1, heads=2, name="hist_click", attention="reference")
    back.load_state_dict(torch.load(tmp_path / "fused.pt"))
    assert list(back.state_dict()) == list(ref.state_dict())


def test_fused_path_in_training_with_dropout_has_no_nan_and_padding_keeps_valid_rows_unchanged():
    fused, _ = _pair(dropout=0.3)
    fused.train()
    V, mask = _batch([5, 0, 2], 7, garbage=float("inf"))
    H, h = fused(V, mask)
    assert torch.isfinite(H).all() and torch.isfinite(h).all() and (H[~mask] == 0).all()
    torch.testing.assert_close(h[1], fused.empty.detach(), atol=0, rtol=0)
    (H.sum() + h.sum()).backward()
    for name, p in fused.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_stage1_transformer_encoder_paths_agree():
    """The stage-1 tower's encoder (post-norm, masked mean) shares the fused attention layer."""
    from satrank.models.common.towers import TransformerHistoryEncoder

    torch.manual_seed(0)
    fused = TransformerHistoryEncoder(8, 2, 16, max_len=7, dropout=0.1, attention="fused").eval()
    ref = TransformerHistoryEncoder(8, 2, 16, max_len=7, dropout=0.1, attention="reference").eval()
    ref.load_state_dict(fused.state_dict())
    V, mask = _batch([7, 3, 0, 1], 7)
    outs = []
    for enc in (fused, ref):
        out = enc(V, mask)
        (out * torch.arange(8.0)).sum().backward()
        outs.append((out.detach(), {n: p.grad.clone() for n, p in enc.named_parameters()}))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=0)
    assert torch.count_nonzero(outs[0][0][2]) == 0  # empty history -> zero vector
    for n in outs[0][1]:
        torch.testing.assert_close(outs[0][1][n], outs[1][1][n], atol=1e-5, rtol=1e-5, msg=n)


def test_unknown_attention_path_is_refused():
    with pytest.raises(ValueError, match="hist_click.*attention must be one of"):
        HistoryEncoder(8, 4, name="hist_click", attention="flash")


def test_fast_dropout_drops_the_configured_share_and_keeps_the_mean():
    """16-bit keep masks: drop share p rounded to 1/65536, kept values scaled by 1/(1-p) exactly, off in eval."""
    from satrank.models.common.encoders import fast_dropout

    torch.manual_seed(0)
    x = torch.ones(1_000_000)
    y = fast_dropout(x, 0.1, True)
    p_eff = round(0.1 * 65536) / 65536
    assert abs((y == 0).float().mean().item() - p_eff) < 2e-3  # ~7 sigma of a binomial share
    assert torch.equal(torch.unique(y), torch.tensor([0.0, 1.0 / (1.0 - p_eff)]))
    assert abs(y.mean().item() - 1.0) < 3e-3
    assert fast_dropout(x, 0.1, False) is x and fast_dropout(x, 0.0, True) is x
    torch.manual_seed(0)
    assert torch.equal(fast_dropout(x, 0.1, True), y)  # seeded by torch's generator
    xs = torch.randn(4, 6, requires_grad=True)
    out = fast_dropout(xs, 0.5, True)
    out.sum().backward()
    torch.testing.assert_close(xs.grad, (out.detach() != 0).float() * 2.0, atol=0, rtol=0)


def test_attention_with_dropout_is_masked_softmax_times_the_keep_mask_at_v_in_fp32_and_under_bf16_autocast():
    """Training attention with dropout p: softmax of the masked scores, times `keep_mask`'s draw scaled by
    1/(1-p), at v; gradients flow as through that product; under bf16 autocast it stays in bf16 (no fp32 round
    trip of the weights) and matches the fp32 result on the same draw to bf16 precision."""
    from satrank.models.common.encoders import attention_with_dropout, keep_mask

    torch.manual_seed(1)
    B, H, L, dh = 3, 2, 5, 4
    q, k, v = (torch.randn(B, H, L, dh, requires_grad=True) for _ in range(3))
    attend = torch.arange(L) < torch.tensor([5, 2, 1]).unsqueeze(1)
    mask = attend[:, None, None, :]
    torch.manual_seed(7)
    out = attention_with_dropout(q, k, v, mask, 0.3)
    torch.manual_seed(7)
    w = torch.softmax((q @ k.transpose(-2, -1) / dh ** 0.5).masked_fill(~mask, float("-inf")), dim=-1)
    keep, scale = keep_mask(w, 0.3)
    assert keep.dtype == torch.uint8 and 0 < int(keep.sum()) < keep.numel()
    expected = (w * keep.float() * scale) @ v
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    g_out = torch.autograd.grad(out.sum(), (q, k, v))
    g_exp = torch.autograd.grad(expected.sum(), (q, k, v))
    for a, b in zip(g_out, g_exp):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.manual_seed(7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        qb, kb, vb = (t.detach().to(torch.bfloat16) for t in (q, k, v))
        out_bf16 = attention_with_dropout(qb, kb, vb, mask, 0.3)
    assert out_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(out_bf16.float(), expected.detach(), rtol=0.05, atol=0.05)


def test_the_whole_ranker_gives_the_same_outputs_on_either_attention_path_from_one_state_dict():
    """model.attention switches every history encoder; the config refuses unknown paths (model and tower)."""
    from satrank.models.ranker.config import ModelConfig
    from satrank.models.ranker.saqrec import RankerInputs, SAQRecRanker
    from satrank.models.stage1.config import TowerConfig
    from satrank.pipeline.config import ConfigError, from_dict

    max_lens = {"hist_click": 12, "hist_satisfied": 6, "hist_dissatisfied": 3, "hist_skip": 5}
    users, attrs = {"user_id": 8, "user_activity": 4}, {"author_id": 8, "category_id": 4}
    scorer = lambda x, V, mask: torch.sigmoid(V.sum(-1))  # noqa: E731
    rankers = {}
    for path in ("fused", "reference"):
        torch.manual_seed(0)
        cfg = from_dict(ModelConfig, {"attention": path, "use_skip_history": True}, "model")
        rankers[path] = SAQRecRanker(cfg, 8, max_lens, users, attrs, n_dense=1, history_scorer=scorer).eval()
    assert {m.attention for m in rankers["reference"].modules() if isinstance(m, HistoryEncoder)} == {"reference"}
    assert sum(isinstance(m, HistoryEncoder) for m in rankers["fused"].modules()) == 4
    rankers["reference"].load_state_dict(rankers["fused"].state_dict())
    g = torch.Generator().manual_seed(1)
    B, hist = 5, {}
    for name, L in max_lens.items():
        lengths = torch.randint(0, L + 1, (B,), generator=g)
        lengths[0], lengths[1] = 0, L  # an empty and a full row in every history
        mask = torch.arange(L) < lengths.unsqueeze(1)
        hist[name] = (torch.where(mask.unsqueeze(-1), torch.randn(B, L, 8, generator=g), torch.tensor(float("nan"))), mask)
    inputs = RankerInputs(user={k: torch.randn(B, d, generator=g) for k, d in users.items()},
                          item=torch.randn(B, 8, generator=g),
                          item_attrs={k: torch.randn(B, d, generator=g) for k, d in attrs.items()},
                          dense=torch.randn(B, 1, generator=g), duration_log1p=torch.rand(B, generator=g),
                          histories=hist)
    a, b = rankers["fused"](inputs), rankers["reference"](inputs)
    assert set(a) == set(b)
    for k in a:
        assert torch.isfinite(a[k]).all(), k
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=k)
    with pytest.raises(ConfigError, match="attention"):
        from_dict(ModelConfig, {"attention": "flash"}, "model")
    with pytest.raises(ConfigError, match="attention"):
        from_dict(TowerConfig, {"attention": "flash"}, "pretrain.tower")


def test_a_traced_fused_encoder_keeps_full_width_for_batches_longer_than_the_example():
    """The serving artifact is a torch.jit.trace: trimming must not bake the example's width (5) in."""
    import warnings

    torch.manual_seed(0)
    enc = HistoryEncoder(8, 10, layers=2, heads=2, name="hist_click").eval()

    class Both(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = enc

        def forward(self, V, mask):
            return self.enc(V, mask, check=False)

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(Both().eval(), _batch([4, 5, 0], 10), check_trace=False)
    for lengths in ([10, 1, 0, 7, 2], [10, 10], [3, 0, 9]):
        V, mask = _batch(lengths, 10, seed=5)
        for a, b in zip(traced(V, mask), enc(V, mask)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_the_whole_ranker_under_bf16_autocast_stays_close_to_fp32_and_trains():
    """train.precision bf16 (Trainer._forward autocasts the forward): the outputs stay within bf16 rounding
    of fp32 (largest output difference measured 0.015; bound 0.05) and every parameter gets a finite fp32
    gradient, on the fused and the reference path."""
    from satrank.models.ranker.config import ModelConfig
    from satrank.models.ranker.saqrec import RankerInputs, SAQRecRanker
    from satrank.pipeline.config import from_dict

    max_lens = {"hist_click": 12, "hist_satisfied": 6, "hist_dissatisfied": 3}
    users, attrs = {"user_id": 8, "user_activity": 4}, {"author_id": 8, "category_id": 4}
    scorer = lambda x, V, mask: torch.sigmoid(V.sum(-1))  # noqa: E731
    g = torch.Generator().manual_seed(1)
    B, hist = 64, {}
    for name, L in max_lens.items():
        lengths = torch.randint(0, L + 1, (B,), generator=g)
        mask = torch.arange(L) < lengths.unsqueeze(1)
        hist[name] = (torch.where(mask.unsqueeze(-1), torch.randn(B, L, 8, generator=g), torch.tensor(0.0)), mask)
    inputs = RankerInputs(user={k: torch.randn(B, d, generator=g) for k, d in users.items()},
                          item=torch.randn(B, 8, generator=g),
                          item_attrs={k: torch.randn(B, d, generator=g) for k, d in attrs.items()},
                          dense=torch.randn(B, 1, generator=g), duration_log1p=torch.rand(B, generator=g),
                          histories=hist)
    for path in ("fused", "reference"):
        torch.manual_seed(0)
        cfg = from_dict(ModelConfig, {"attention": path, "dropout": 0.0}, "model")
        ranker = SAQRecRanker(cfg, 8, max_lens, users, attrs, n_dense=1, history_scorer=scorer).train()
        full = ranker(inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = ranker(inputs)
        worst = max(float((half[k].detach().float() - full[k].detach()).abs().max()) for k in full)
        assert worst < 0.05, (path, worst)
        sum(v.float().sum() for v in half.values()).backward()
        for name, p in ranker.named_parameters():
            if p.requires_grad and p.grad is not None:
                assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), (path, name)

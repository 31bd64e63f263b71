"""LoRA adapters: a fresh adapter changes nothing, the update is exactly (alpha/r) B A x, merging for
serving matches the adapted layer, and apply_lora / parameter splits touch exactly the named layers."""
import pytest
import torch
from torch import nn

from satrank.models.common.lora import (LoRABranch, LoRAEmbedding, LoRALinear, apply_lora, lora_parameters, merge_lora,
                         non_lora_parameters, require)


def _randomise_B(module: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, LoRABranch):
            with torch.no_grad():
                m.B.copy_(torch.randn(m.B.shape, generator=g))


def test_fresh_adapter_leaves_the_layer_output_bit_identical():
    torch.manual_seed(0)
    base = nn.Linear(7, 5)
    x = torch.randn(11, 7)
    expect = base(x)
    layer = LoRALinear(base, rank=3, alpha=6.0)
    assert torch.equal(layer.lora.B, torch.zeros(5, 3))
    assert layer.lora.A.abs().sum() > 0  # A is random, so B's first gradient is informative
    assert torch.equal(layer(x), expect)


def test_update_is_alpha_over_rank_times_B_A_x_on_a_hand_example():
    br = LoRABranch(2, 2, rank=1, alpha=2.0)
    with torch.no_grad():
        br.A.copy_(torch.tensor([[1.0, 2.0]]))
        br.B.copy_(torch.tensor([[3.0], [4.0]]))
    # A x = 1 + 2 = 3; B (A x) = [9, 12]; scale alpha / r = 2
    assert br(torch.tensor([[1.0, 1.0]])).tolist() == [[18.0, 24.0]]
    assert br.delta_weight().tolist() == [[6.0, 12.0], [8.0, 16.0]]


def test_first_gradient_reaches_B_but_not_A_while_B_is_zero():
    torch.manual_seed(1)
    layer = LoRALinear(nn.Linear(4, 3), rank=2, alpha=4.0)
    layer(torch.randn(6, 4)).pow(2).sum().backward()
    assert torch.equal(layer.lora.A.grad, torch.zeros_like(layer.lora.A))
    assert layer.lora.B.grad.abs().sum() > 0


def test_merged_linear_matches_the_adapted_layer_within_1e5():
    torch.manual_seed(2)
    layer = LoRALinear(nn.Linear(16, 8), rank=4, alpha=8.0, dropout=0.3)
    _randomise_B(layer)
    layer.eval()  # dropout off, as when serving
    x = torch.randn(64, 16)
    merged = layer.merge()
    assert type(merged) is nn.Linear
    assert (merged(x) - layer(x)).abs().max() < 1e-5
    assert (merged(x) - layer.base(x)).abs().max() > 1e-2  # the adapter did change the layer


def test_apply_lora_wraps_exactly_the_named_layers_and_splits_parameters():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 2)))
    x = torch.randn(9, 5)
    before = net(x)
    done = apply_lora(net, ["0", "2.1"], rank=2, alpha=2.0)
    assert sorted(done) == ["0", "2.1"]
    assert isinstance(net[0], LoRALinear) and isinstance(net[2][1], LoRALinear) and type(net[2][0]) is nn.Linear
    assert torch.equal(net(x), before)  # fresh adapters
    lora_names = [n for n, _ in lora_parameters(net)]
    assert lora_names == ["0.lora.A", "0.lora.B", "2.1.lora.A", "2.1.lora.B"]
    rest = [n for n, _ in non_lora_parameters(net)]
    assert rest == ["0.base.weight", "0.base.bias", "2.0.weight", "2.0.bias", "2.1.base.weight", "2.1.base.bias"]
    _randomise_B(net)
    adapted = net(x)
    merge_lora(net)
    assert not any(isinstance(m, (LoRALinear, LoRABranch)) for m in net.modules())
    assert (net(x) - adapted).abs().max() < 1e-5


def test_apply_lora_freeze_base_leaves_only_the_adapter_trainable():
    net = nn.Sequential(nn.Linear(3, 3))
    apply_lora(net, ["0"], rank=1, alpha=1.0, freeze_base=True)
    assert [n for n, p in net.named_parameters() if p.requires_grad] == ["0.lora.A", "0.lora.B"]


def test_apply_lora_rejects_bad_targets_with_a_clear_error():
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with pytest.raises(ValueError, match="no submodule 'nope'"):
        apply_lora(net, ["nope"], 1, 1.0)
    with pytest.raises(TypeError, match="'1' is a ReLU"):
        apply_lora(net, ["1"], 1, 1.0)
    with pytest.raises(ValueError, match="repeated"):
        apply_lora(net, ["0", "0"], 1, 1.0)
    apply_lora(net, ["0"], 1, 1.0)
    with pytest.raises(ValueError, match="already has a LoRA"):
        apply_lora(net, ["0"], 1, 1.0)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoRABranch(3, 3, rank=0, alpha=1.0)
    with pytest.raises(ValueError, match="input has 4 features, expected 3"):
        LoRABranch(3, 3, rank=1, alpha=1.0)(torch.zeros(2, 4))


def test_embedding_adapter_starts_at_zero_and_is_a_low_rank_update_of_the_table():
    torch.manual_seed(0)
    ad = LoRAEmbedding(num_rows=9, out_features=5, rank=2, alpha=4.0)
    ids = torch.tensor([0, 3, 3, 8])
    assert torch.equal(ad(ids), torch.zeros(4, 5))
    with torch.no_grad():
        ad.B.copy_(torch.randn(5, 2))
    expect = 2.0 * ad.A[ids] @ ad.B.t()  # (alpha / r) B a[id], by hand
    torch.testing.assert_close(ad(ids), expect, rtol=0, atol=1e-6)
    torch.testing.assert_close(ad.delta_table()[ids], expect, rtol=0, atol=1e-6)
    assert lora_parameters(nn.Sequential(ad)) == [("0.A", ad.A), ("0.B", ad.B)]
    with pytest.raises(ValueError, match=r"ids must be in \[0, 9\), got \[0, 9\]"):
        ad(torch.tensor([0, 9]))
    with pytest.raises(TypeError, match="int32/int64"):
        ad(torch.tensor([0.0]))


def test_input_checks_raise_on_cpu_and_assert_on_device_with_the_static_text(monkeypatch):
    with pytest.raises(ValueError, match="^ids 7 and 9$"):
        require(torch.tensor(False), lambda: "ids 7 and 9", "ids out of range")
    require(torch.tensor(True), lambda: 1 / 0, "never read")  # the message is built only on failure
    asserted = []  # off the CPU: a device-side assert, no host sync, so no values in its text
    monkeypatch.setattr(torch, "_assert_async", lambda cond, msg: asserted.append((cond.device.type, msg)))
    require(torch.tensor(False, device="meta"), lambda: 1 / 0, "ids out of range")
    assert asserted == [("meta", "ids out of range (rerun on CPU for the values)")]

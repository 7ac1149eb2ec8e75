"""LoRA and ReLoRA*: the merge preserves the function; a reset re-draws A, zeroes B and its state."""

import torch
from torch import nn

from conftest import assert_rounded_once
from sst_dist.engines.torch import TorchBackend
from sst_dist.lowrank import LoRALinear, ReLoRAController, apply_lora


def test_lora_starts_as_the_base_layer_and_merge_preserves_function():
    torch.manual_seed(0)
    linear = nn.Linear(8, 12).double()
    layer = LoRALinear.from_linear(linear, rank=4, alpha=8.0)
    x = torch.randn(5, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), linear(x), rtol=0, atol=1e-12)  # B = 0
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"bias", "lora_A", "lora_B"}
    with torch.no_grad():
        layer.lora_B.normal_()
    dense = nn.Linear(8, 12).double()
    with torch.no_grad():
        dense.weight.copy_(layer.dense_weight())
        dense.bias.copy_(layer.bias)
    torch.testing.assert_close(layer(x), dense(x), rtol=0, atol=1e-12)


def test_relora_reset_merges_reinitialises_and_resets_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 8)).double()
    layers = apply_lora(model, rank=3, targets=["0", "2"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for i in range(3):
        model(torch.randn(6, 8, dtype=torch.float64)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    x = torch.randn(4, 8, dtype=torch.float64)
    out = model(x).detach()
    bias_state = opt.state[model[0].bias]["exp_avg"].clone()
    old_A = model[0].lora_A.detach().clone()
    ReLoRAController(layers, TorchBackend(opt), seed=0).reset(iteration=1)
    torch.testing.assert_close(model(x).detach(), out, rtol=0, atol=1e-12)
    for layer in layers.values():
        assert torch.count_nonzero(layer.lora_B) == 0
        for p in (layer.lora_A, layer.lora_B):
            assert torch.count_nonzero(opt.state[p]["exp_avg"]) == 0
            assert torch.count_nonzero(opt.state[p]["exp_avg_sq"]) == 0
    assert not torch.equal(model[0].lora_A, old_A)
    assert torch.equal(opt.state[model[0].bias]["exp_avg"], bias_state)


def test_relora_merge_into_a_bf16_weight_rounds_once():
    """model.frozen_dtype bfloat16: W is stored in bf16, A and B train in float32; the reset's
    merge W + scale·B A runs in float32 and is rounded once, where it is written into W."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 16))
    layers = apply_lora(model, rank=4, targets=["0", "2"], alpha=8.0, frozen_dtype=torch.bfloat16)
    for layer in layers.values():
        assert layer.weight.dtype == torch.bfloat16 and not layer.weight.requires_grad
        assert layer.lora_A.dtype == layer.lora_B.dtype == layer.bias.dtype == torch.float32
        with torch.no_grad():
            layer.lora_B.normal_()  # a merge as large as W itself: each rounding shows
    exact = [layer.weight.double() + layer.scaling * (layer.lora_B.double() @ layer.lora_A.double())
             for layer in layers.values()]
    ReLoRAController(layers, TorchBackend(), seed=0).reset(iteration=1)
    for layer, want in zip(layers.values(), exact):
        assert_rounded_once(layer.weight, want)
        assert torch.count_nonzero(layer.lora_B) == 0 and layer.lora_A.dtype == torch.float32

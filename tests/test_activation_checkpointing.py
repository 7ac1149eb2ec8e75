"""model.gradient_checkpointing: the same gradients with it on and off, for every method (its own
autograd functions and GaLore's gradient probe included), in float64 on the tiny model."""

import pytest
import torch

from sst_dist.config import load_recipe
from sst_dist.registry import METHODS
from sst_dist.engines.torch import TorchBackend
from sst_dist.methods import ProbePass, build_method
from sst_dist.models import build_model, enable_activation_checkpointing

VOCAB, SEQ = 97, 16


def gradients(method: str, checkpointing: bool, *overrides: str):
    """One step's gradients (two micro-batches) and, for GaLore, the projectors its step-0 refresh
    took from a probe pass, with activation checkpointing on or off."""
    recipe = load_recipe(f"recipes/tiny-{method}.yaml", [f"model.seq_len={SEQ}", *overrides])
    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=VOCAB, seq_len=SEQ).double()
    if checkpointing:
        enable_activation_checkpointing(model)
    meth = build_method(recipe, model)
    meth.attach(TorchBackend(None), recipe)
    model.train()
    batches = torch.randint(0, VOCAB, (2, 2, SEQ + 1), generator=torch.Generator().manual_seed(1))

    def loss_of(block):
        logits = model(input_ids=block[:, :-1]).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), block[:, 1:].reshape(-1))

    def probe_pass(probe):
        for block in batches:
            probe.backward(loss_of(block))

    meth.before_step(0, ProbePass(len(batches), probe_pass))
    for i, block in enumerate(batches):
        meth.before_micro_batch(last=i == len(batches) - 1)
        loss_of(block).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    projectors = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".proj")}
    return grads, projectors


CASES = [(m, ()) for m in METHODS] + [("sst", (f"sst.path={path}",)) for path in ("materialized", "factored", "functional")]


@pytest.mark.parametrize("method,overrides", CASES, ids=[f"{m}{'-' + o[0].split('=')[1] if o else ''}"
                                                         for m, o in CASES])
def test_checkpointing_gives_the_same_gradients(method, overrides):
    plain, plain_proj = gradients(method, False, *overrides)
    ckpt, ckpt_proj = gradients(method, True, *overrides)
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    # the method's own parameters do get a gradient, and it is not zero
    lowrank = [n for n in plain if any(k in n for k in ("spectral", "lora", ".B"))]
    assert (method == "full") or lowrank, sorted(plain)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-10, atol=1e-12, msg=name)
    # (LoRA's A has none while B is zero, at the start)
    assert method == "full" or any(plain[name].abs().max() > 0 for name in lowrank)
    assert plain_proj.keys() == ckpt_proj.keys()
    for name in plain_proj:  # GaLore's probe saw the same G under recomputation
        assert plain_proj[name].abs().max() > 0
        torch.testing.assert_close(ckpt_proj[name], plain_proj[name], rtol=1e-10, atol=1e-12, msg=name)


def test_checkpointing_really_recomputes():
    """The switch is live: with it, each decoder block's forward runs again in the backward."""
    calls = []
    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=VOCAB, seq_len=SEQ).double()
    enable_activation_checkpointing(model)
    model.train()
    model.model.decoder.layers[0].fc1.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.randint(0, VOCAB, (1, SEQ))
    model(input_ids=ids).logits.sum().backward()
    assert len(calls) == 2

"""model.build meta: the model built on the meta device and materialised module by module, SST
layers directly as their factors, LoRA layers as the dense build makes them, under the torch engine
and FSDP2."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import losses, pretrain, read_metrics
from sst_dist.build import Materializer, build_on_meta, is_meta
from sst_dist.config import load_recipe
from sst_dist.methods import build_method
from sst_dist.models import build_model
from sst_dist.sst import SSTLinear

VOCAB, SEQ = 97, 32


def meta_model(method, *overrides, materialize=True):
    recipe = load_recipe(f"recipes/tiny-{method}.yaml", [f"model.seq_len={SEQ}", *overrides])
    model = build_on_meta("tiny", vocab_size=VOCAB, seq_len=SEQ)
    meth = build_method(recipe, model)
    assert all(p.is_meta for p in model.parameters())  # shapes only so far
    if materialize:
        Materializer(model, seed=recipe.seed, device="cpu", **meth.materializer_kwargs())(model)
    return model, meth, recipe


def dense_model(method, *overrides):
    recipe = load_recipe(f"recipes/tiny-{method}.yaml", [f"model.seq_len={SEQ}", *overrides])
    torch.manual_seed(recipe.seed)
    model = build_model("tiny", vocab_size=VOCAB, seq_len=SEQ)
    return model, build_method(recipe, model), recipe


def layout(model):
    return {n: (tuple(p.shape), p.dtype, p.device.type, p.requires_grad) for n, p in model.named_parameters()} | \
        {n: (tuple(b.shape), b.dtype, b.device.type) for n, b in model.named_buffers()}


@pytest.mark.parametrize("method", ["full", "lora", "relora", "galore", "sst", "sst+galore"])
@pytest.mark.parametrize("frozen", ["float32", "bfloat16"])
def test_meta_build_has_the_normal_builds_tensors(method, frozen):
    overrides = ("sst.init=haar", f"model.frozen_dtype={frozen}")
    meta, meta_method, _ = meta_model(method, *overrides)
    dense, _, _ = dense_model(method, *overrides)
    assert not is_meta(meta)
    assert layout(meta) == layout(dense)
    # model.frozen_dtype reaches every frozen tensor of every method, and nothing that trains
    for name, param in meta.named_parameters():
        want = getattr(torch, frozen) if not param.requires_grad else torch.float32
        assert param.dtype == want, name
    # tied modules still share one tensor (OPT's LM head and token embedding)
    head, embedding = meta.get_output_embeddings(), meta.get_input_embeddings()
    assert head.weight is embedding.weight
    # the method's parameter list holds the materialised tensors, not the meta placeholders
    assert all(not p.is_meta for g in meta_method.param_groups(meta) for p in g["params"])


@pytest.mark.parametrize("method", ["sst", "sst+galore"])
def test_meta_built_sst_layers_are_factors_only(method):
    model, meth, recipe = meta_model(method, "sst.init=haar", "model.frozen_dtype=bfloat16")
    targets = set(recipe.targets)
    found = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets]
    assert found and all(isinstance(m, SSTLinear) for m in found)
    assert not any(isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets for n, m in model.named_modules())
    assert not any(n.endswith(("q_proj.weight", "fc1.weight", "fc2.weight")) for n, _ in model.named_parameters())
    for layer in (m for m in meth.layers.values() if isinstance(m, SSTLinear)):
        U, Vh = layer.U.float(), layer.Vh.float()
        assert layer.U.dtype == layer.Vh.dtype == torch.bfloat16 and layer.spectral.dtype == torch.float32
        eye = torch.eye(layer.k)
        torch.testing.assert_close(U.T @ U, eye, rtol=0, atol=2e-2)  # bf16 storage: ~2^-8 per entry
        torch.testing.assert_close(Vh @ Vh.T, eye, rtol=0, atol=2e-2)
        idx = layer.active_indices
        assert idx.unique().numel() == layer.rank
        # the trained copies are the frozen vectors at the active indices, in float32
        torch.testing.assert_close(layer.u_active, U[:, idx], rtol=0, atol=0)
        torch.testing.assert_close(layer.vh_active, Vh[idx], rtol=0, atol=0)


def test_meta_build_draws_the_factors_a_dense_haar_build_draws():
    """Both builds seed a layer's factors by (seed, layer): the same SST layers, whichever build."""
    meta, meta_method, _ = meta_model("sst", "sst.init=haar")
    dense, dense_method, _ = dense_model("sst", "sst.init=haar")
    for (name, a), b in zip(meta_method.layers.items(), dense_method.layers.values()):
        for x, y in ((a.U, b.U), (a.Vh, b.Vh), (a.spectral, b.spectral), (a.active_indices, b.active_indices)):
            assert torch.equal(x, y), name


@pytest.mark.parametrize("method", ["lora", "relora"])
@pytest.mark.parametrize("frozen", ["float32", "bfloat16"])
def test_meta_built_lora_layers_are_the_dense_builds(method, frozen):
    """A by (seed, layer) as apply_lora draws it, B zero, W an nn.Linear's N(0, init_std²), bias
    zero: the same layers as the dense build, but W, which each build draws from its own stream."""
    meta, meta_method, recipe = meta_model(method, f"model.frozen_dtype={frozen}", "seed=3")
    dense, dense_method, _ = dense_model(method, f"model.frozen_dtype={frozen}", "seed=3")
    assert len(meta_method.layers) == len(dense_method.layers) == 2 * len(recipe.targets)
    for (name, a), (dense_name, b) in zip(meta_method.layers.items(), dense_method.layers.items()):
        assert name == dense_name
        assert torch.equal(a.lora_A, b.lora_A), name
        assert a.lora_A.dtype == torch.float32 and a.lora_A.std() > 0
        assert torch.count_nonzero(a.lora_B) == 0 and torch.count_nonzero(a.bias) == 0
        assert a.weight.dtype == getattr(torch, frozen) and not a.weight.requires_grad
        std = a.weight.float().std().item()
        assert abs(std - meta.config.init_std) < 0.1 * meta.config.init_std, name
    other, _, _ = meta_model(method, f"model.frozen_dtype={frozen}", "seed=4")
    first = next(iter(meta_method.layers))
    assert not torch.equal(other.get_submodule(first).lora_A, meta.get_submodule(first).lora_A)


class Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shapes = [tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else [out])
                  if isinstance(t, torch.Tensor)]
        self.ops.append((str(func.overloadpacket), shapes))
        return out


def test_materialising_never_forms_a_dense_weight_of_a_targeted_layer():
    """With sst.init haar, no SVD runs and no product forms an (out x in) weight: the layers come
    straight from their factors. (svd draws one W0 per layer for its SVD, which the check sees.)"""
    def recorded(init):
        model, meth, recipe = meta_model("sst", f"sst.init={init}", materialize=False)
        shapes = {(m.out_features, m.in_features) for m in meth.layers.values()}
        with Recorder() as rec:
            Materializer(model, seed=0, device="cpu", init=init)(model)
        svd = [op for op, _ in rec.ops if "svd" in op]
        products = [op for op, out in rec.ops if op in ("aten.mm", "aten.addmm", "aten.matmul", "aten.bmm")
                    and any(s in shapes for s in out)]
        return svd, products, rec.ops

    svd, products, ops = recorded("haar")
    assert not svd and not products
    assert any("geqrf" in op or "linalg_qr" in op for op, _ in ops)  # the Haar draw did run
    svd, _, _ = recorded("svd")
    assert svd  # the check sees the SVD route


@pytest.mark.parametrize("method", ["sst", "full", "relora"])
def test_meta_build_trains_under_the_torch_engine(tmp_path, method):
    pretrain(tmp_path, f"recipes/tiny-{method}.yaml", "--max-steps", "6", "--set", "model.build=meta",
             "--set", "sst.init=haar", "--set", "sst.steps_per_iteration=2")
    curve = losses(tmp_path)
    assert len(curve) == 6 and all(map(lambda v: v == v, curve.values()))
    assert curve[6] < curve[1]
    assert "init_s" in read_metrics(tmp_path)[0]
    event = {"sst": "resample", "relora": "reset"}.get(method)
    if event:
        assert any(m.get("event") == event for m in read_metrics(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("method, init", [("sst", "haar"), ("sst", "svd"), ("relora", "auto")])
def test_meta_build_under_fsdp_matches_the_torch_engine(tmp_path, method, init):
    """FSDP2 on 2 gloo ranks materialises block by block, the factors of each SST layer on its
    owner rank and broadcast, a LoRA layer's A on every rank from its coordinates: the same model
    as the single-process meta build, so in float64 the same curve through a resample (a reset)."""
    args = ("--max-steps", "4", "--set", "model.build=meta", "--set", f"sst.init={init}",
            "--set", "sst.steps_per_iteration=2", "--set", "relora.reset_every=2",
            "--set", "train.dtype=float64")
    pretrain(tmp_path / "torch", f"recipes/tiny-{method}.yaml", *args)
    pretrain(tmp_path / "fsdp", f"recipes/tiny-{method}.yaml", *args, "--engine", "fsdp",
             launcher="torchrun", nproc=2)
    single, sharded = losses(tmp_path / "torch"), losses(tmp_path / "fsdp")
    assert sorted(single) == sorted(sharded) == [1, 2, 3, 4]
    for step in single:
        assert abs(single[step] - sharded[step]) <= 1e-9 * abs(single[step]), step
    assert single[4] < single[1]

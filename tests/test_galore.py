"""GaLore: the optimizer against galore-torch 1.0, and the layer form against the optimizer.

All in float64. galore-torch casts every non-float32 gradient to float32 for the SVD and casts
the projector back, so its float64 runs carry float32-accurate projectors; ours does the same,
which is why the two agree to rounding rather than to float32 accuracy.

Heavy imports (transformers, galore-torch) stay inside the tests that need them, so the two-rank
test's spawned workers start quickly.
"""

import copy
import os
import weakref
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from conftest import assert_rounded_once
from sst_dist.engines.torch import TorchBackend
from galore_reference import GaLoreAdamW
from sst_dist.galore import (GaLoreLinear, GradientProbe, apply_galore, apply_weight_decay,
                             orthogonal_projector, projection_side, projector_generator,
                             randomized_projector, refresh_from_probe, refresh_galore_layers,
                             refresh_projector, uses_randomized)

PROJ_TYPES = ("std", "reverse_std", "left", "right")
OPT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # these tensors are tiny: a second intra-op thread only adds spin overhead, badly so on a
    # loaded 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def galore_torch():
    return pytest.importorskip("galore_torch")


def tiny_opt(**overrides):
    from transformers import OPTForCausalLM

    from sst_dist.models import opt_config
    config = opt_config("tiny", vocab_size=256, seq_len=32, attn_implementation="eager")
    for key, value in overrides.items():
        setattr(config, key, value)
    return OPTForCausalLM(config).double()


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# ----------------------------------------------------------------------------- projector math

@pytest.mark.parametrize("proj_type,tall,wide", [
    ("std", "right", "left"), ("reverse_std", "left", "right"),
    ("left", "left", "left"), ("right", "right", "right")])
def test_projection_side(proj_type, tall, wide):
    assert projection_side((20, 10), proj_type) == tall
    assert projection_side((10, 20), proj_type) == wide
    assert projection_side((10, 10), proj_type) == tall  # square counts as out >= in
    with pytest.raises(ValueError, match="proj_type"):
        projection_side((10, 10), "full")


@pytest.mark.parametrize("side", ["left", "right"])
def test_projector_is_galore_torchs(side, galore_torch):
    G = torch.randn(20, 12, dtype=torch.float64)
    ref = galore_torch.adamw.GaLoreProjector(5).get_orthogonal_matrix(G, 5, side)
    ours = orthogonal_projector(G, 5, side)
    assert ours.dtype == ref.dtype == torch.float64
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("shape", [(20, 12), (12, 20), (16, 16)])
@pytest.mark.parametrize("side", ["left", "right"])
def test_projector_owns_its_memory(shape, side):
    """A projector that is a slice of the SVD's factor keeps the whole factor alive: all layers'
    at a refresh add up to gigabytes. It must be a contiguous tensor of its own size."""
    P = orthogonal_projector(torch.randn(shape), 4, side)
    assert P.is_contiguous()
    assert P.untyped_storage().nbytes() == P.numel() * P.element_size()


# ----------------------------------------------------------------------------- vs galore-torch

def opt_groups(model, rank, gap, scale, proj_type, wd):
    galore = [p for n, p in model.named_parameters()
              if p.ndim == 2 and n.rsplit(".", 2)[-2] in OPT_TARGETS]
    ids = {id(p) for p in galore}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": rest, "weight_decay": wd},
            {"params": galore, "rank": rank, "update_proj_gap": gap, "scale": scale,
             "proj_type": proj_type, "weight_decay": wd}]


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_optimizer_matches_galore_torch(proj_type, galore_torch):
    torch.manual_seed(0)
    ours, ref = tiny_opt(), tiny_opt()
    ref.load_state_dict(ours.state_dict())
    kw = dict(lr=3e-3, betas=(0.9, 0.999), eps=1e-6)
    opt = GaLoreAdamW(opt_groups(ours, 8, 2, 0.25, proj_type, 0.1), **kw)
    ref_opt = galore_torch.GaLoreAdamW(opt_groups(ref, 8, 2, 0.25, proj_type, 0.1),
                                       no_deprecation_warning=True, **kw)
    g = torch.Generator().manual_seed(1)
    first = None
    for step in range(5):  # projectors taken at steps 0, 2, 4
        ids = torch.randint(3, 256, (2, 32), generator=g)
        for model, optimizer in ((ours, opt), (ref, ref_opt)):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
            assert rel_err(p.detach(), q.detach()) < 1e-5, (step, name)
        fc1 = ours.model.decoder.layers[0].fc1.weight
        if step == 0:
            first = opt.state[fc1]["projector"].clone()
    assert opt.state[fc1]["step"] == 5
    assert not torch.allclose(opt.state[fc1]["projector"], first)  # the projector did refresh
    tall_side = {"std": "right", "reverse_std": "left", "left": "left", "right": "right"}[proj_type]
    # fc1 is tall (256, 64): a right projector keeps G Qᵀ (256, r), a left one Pᵀ G (r, 64)
    assert opt.state[fc1]["exp_avg"].shape == ((256, 8) if tall_side == "right" else (8, 64))


# ----------------------------------------------------------------------------- the layer form

def mlp(seed=0):
    torch.manual_seed(seed)  # a tall, a square and a wide weight
    # dtype given, not taken from the default (another test module may change it, and spawned
    # workers would not see that change): the same seed must give the same weights everywhere
    f64 = dict(dtype=torch.float64)
    return nn.Sequential(nn.Linear(12, 20, **f64), nn.Tanh(), nn.Linear(20, 20, **f64), nn.Tanh(),
                         nn.Linear(20, 6, **f64))


def batches(n, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 12, generator=g, dtype=torch.float64),
             torch.randn(16, 6, generator=g, dtype=torch.float64)) for _ in range(n)]


def mse(model, batch):
    x, y = batch
    return (model(x) - y).pow(2).mean()


def dense_gradients(model, data):
    """G of each of mlp()'s three weights, summed over `data`'s batches, by plain autograd: the
    all-at-once reference for the probe."""
    weights = [model[i].weight for i in (0, 2, 4)]
    per_batch = [torch.autograd.grad(mse(model, batch), weights) for batch in data]
    return [sum(grads) for grads in zip(*per_batch)]


def lr_at(step):
    return 0.02 * (1 + step % 4) / 4  # changes every step, so W's decay must use the step's lr


def galore_layers(model, proj_type, rank=4, scale=0.5, gap=10):
    layers = {}
    for index in (0, 2, 4):
        layers[index] = GaLoreLinear.from_linear(model[index], rank, scale, proj_type, gap)
        model[index] = layers[index]
    return list(layers.values())


def train_layer_form(model, layers, optimizer, data, wd, backend):
    """The trainer's loop: at a refresh step a probe pass, the refresh, then the ordinary step."""
    group = optimizer.param_groups[0]
    for step, batch in enumerate(data):
        if any(layer.refresh_due(step) for layer in layers):
            with GradientProbe(layers, step) as probe:
                probe.backward(mse(model, batch))
            refresh_galore_layers(layers, backend, probe.gradients)
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step)
        mse(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
        apply_weight_decay(layers, group["lr"], wd)
        yield step


def train_plain(model, optimizer, data):
    for step, batch in enumerate(data):
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step)
        mse(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
        yield step


def plain_groups(model, rank, scale, proj_type, gap, wd):
    weights = [model[i].weight for i in (0, 2, 4)]
    biases = [model[i].bias for i in (0, 2, 4)]
    return [{"params": weights, "rank": rank, "update_proj_gap": gap, "scale": scale,
             "proj_type": proj_type, "weight_decay": wd},
            {"params": biases, "weight_decay": wd}]


def layer_groups(layers, wd):
    return [{"params": [layer.B for layer in layers], "weight_decay": wd},
            {"params": [layer.bias for layer in layers], "weight_decay": wd}]


def assert_same_trajectory(plain, layered, layers, plain_run, layer_run, tol):
    for step, _ in zip(plain_run, layer_run):
        for index, layer in zip((0, 2, 4), layers):
            assert rel_err(layer.dense_weight(), plain[index].weight.detach()) < tol, (step, index)
            assert rel_err(layer.bias.detach(), plain[index].bias.detach()) < tol, (step, index)
    return step


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_layer_form_with_torch_adamw_follows_galore(proj_type):
    """GaLoreLinear + torch.optim.AdamW == GaLoreAdamW in torch's AdamW arithmetic, wd on."""
    wd, rank, scale, gap = 0.1, 4, 0.5, 10
    plain, layered = mlp(), mlp()
    layers = galore_layers(layered, proj_type, rank, scale, gap)
    # eps near sqrt(v) makes Adam visibly scale-dependent, so a `scale` put into B's gradient
    # instead of the forward would show (at eps=1e-8 it moves W_eff by only ~1e-7)
    eps = 1e-4
    ref = GaLoreAdamW(plain_groups(plain, rank, scale, proj_type, gap, wd), eps=eps,
                      convention="torch")
    opt = torch.optim.AdamW(layer_groups(layers, wd), eps=eps)
    backend = TorchBackend(opt)
    steps = assert_same_trajectory(plain, layered, layers, train_plain(plain, ref, batches(32)),
                                   train_layer_form(layered, layers, opt, batches(32), wd, backend),
                                   tol=1e-6)
    assert steps == 31 and [layer.refreshes for layer in layers] == [4, 4, 4]  # 0, 10, 20, 30
    for layer, weight in zip(layers, (plain[0].weight, plain[2].weight, plain[4].weight)):
        # the optimizer states are the same tensors: GaLore's projected moments live in B's state
        assert rel_err(opt.state[layer.B]["exp_avg"], ref.state[weight]["exp_avg"]) < 1e-6


@pytest.mark.parametrize("proj_type", ["left", "right"])
def test_layer_form_with_hf_adamw_follows_galore_torch(proj_type, galore_torch):
    """Trained by galore-torch's own AdamW arithmetic (no rank groups), the layer form follows
    galore-torch's GaLoreAdamW itself: the decay ordering folds through c as well."""
    wd, rank, scale, gap = 0.1, 4, 0.5, 10
    plain, layered = mlp(), mlp()
    layers = galore_layers(layered, proj_type, rank, scale, gap)
    ref = galore_torch.GaLoreAdamW(plain_groups(plain, rank, scale, proj_type, gap, wd),
                                   no_deprecation_warning=True)
    opt = GaLoreAdamW(layer_groups(layers, wd))  # no `rank` key: plain AdamW, hf arithmetic
    assert_same_trajectory(plain, layered, layers, train_plain(plain, ref, batches(32)),
                           train_layer_form(layered, layers, opt, batches(32), wd,
                                            TorchBackend(opt)), tol=1e-6)


def test_hf_and_torch_conventions_differ():
    """The honest gap: torch.optim.AdamW is not galore-torch's arithmetic (eps, decay order)."""
    a, b = mlp(), mlp()
    opts = [GaLoreAdamW(plain_groups(m, 4, 0.5, "std", 10, 0.1), eps=1e-6, convention=c)
            for m, c in ((a, "hf"), (b, "torch"))]
    for _ in zip(train_plain(a, opts[0], batches(5)), train_plain(b, opts[1], batches(5))):
        pass
    err = rel_err(a[0].weight.detach(), b[0].weight.detach())
    assert 1e-9 < err < 1e-2


@pytest.mark.parametrize("proj_type", ["left", "right"])
def test_refresh_leaves_the_function_unchanged(proj_type):
    model = mlp()
    layers = galore_layers(model, proj_type)
    opt = torch.optim.AdamW(layer_groups(layers, 0.1))
    backend = TorchBackend(opt)
    for _ in train_layer_form(model, layers, opt, batches(7), 0.1, backend):
        pass
    assert all(layer.decay < 1.0 for layer in layers)  # some decay still unfolded
    assert all(layer.B.abs().max() > 0 for layer in layers)
    x = torch.randn(9, 12, dtype=torch.float64)
    before = model(x).detach()
    moments = [opt.state[layer.B]["exp_avg"].clone() for layer in layers]
    refresh_galore_layers(layers, backend, [torch.randn(l.out_features, l.in_features,
                                                        dtype=torch.float64) for l in layers])
    assert rel_err(model(x).detach(), before) < 1e-10
    for layer, m in zip(layers, moments):
        assert layer.decay == 1.0 and torch.count_nonzero(layer.B) == 0
        assert torch.equal(opt.state[layer.B]["exp_avg"], m)  # GaLore keeps its moments
    state = model.state_dict()
    assert state["0._extra_state"] == {"decay": 1.0, "refreshes": 2}


def test_layer_gradients():
    """B sees Pᵀ G / G Qᵀ with no `scale`; the probe sees G; nothing else gets a gradient."""
    torch.manual_seed(3)
    for proj_type in ("left", "right"):
        linear = nn.Linear(8, 12).double()
        layer = GaLoreLinear.from_linear(linear, 3, scale=0.25, proj_type=proj_type)
        tall = layer.proj.shape if proj_type == "left" else layer.proj.T.shape
        Q = torch.linalg.qr(torch.randn(tall, dtype=torch.float64))[0]  # orthonormal columns
        with torch.no_grad():
            layer.proj.copy_(Q if proj_type == "left" else Q.T)
            layer.B.normal_()
            layer.decay = 0.9
        W = layer.dense_weight().requires_grad_()
        x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
        gy = torch.randn(2, 5, 12, dtype=torch.float64)
        with GradientProbe([layer]) as probe:
            out = layer(x)
            probe.backward((out * gy).sum())
        torch.testing.assert_close(out, x @ W.T + layer.bias, rtol=0, atol=1e-12)
        assert layer.B.grad is None and layer.bias.grad is None  # the probe touches no .grad
        layer(x).backward(gy)
        ref = nn.functional.linear(x, W, layer.bias)
        gx, gW = torch.autograd.grad(ref, (x, W), gy)
        G = probe.gradients[0]
        torch.testing.assert_close(G, gW, rtol=0, atol=1e-12)
        P = layer.proj.detach()
        expected = P.T @ G if proj_type == "left" else G @ P.T
        torch.testing.assert_close(layer.B.grad, expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(x.grad, gx, rtol=0, atol=1e-12)
        assert layer.weight.grad is None and layer.proj.grad is None


def test_probe_under_checkpointing_and_its_guard():
    from torch.utils.checkpoint import checkpoint
    model = mlp()
    x, y = batches(1)[0]
    dense = [model[i].weight for i in (0, 2, 4)]
    expected = torch.autograd.grad(mse(model, (x, y)), dense)
    layers = galore_layers(model, "left")
    with GradientProbe(layers) as probe:
        out = checkpoint(model, x, use_reentrant=False)  # recomputes the forward in backward
        probe.backward((out - y).pow(2).mean())
    for G, ref in zip(probe.gradients, expected):
        torch.testing.assert_close(G, ref, rtol=0, atol=1e-12)
    with pytest.raises(RuntimeError, match="no gradient reached"):
        with GradientProbe(layers):
            mse(model, (x, y))  # forgot probe.backward


class MasterBackend(TorchBackend):
    """Holds the authoritative values apart from the parameters, as an engine's fp32 masters do:
    a refresh that read or wrote param.data instead of the verbs would be caught."""

    def __init__(self, params):
        super().__init__(None)
        self.masters = {p: p.detach().clone() for p in params}

    def read(self, param):
        return self.masters[param].clone()

    def write(self, param, value):
        self.masters[param] = value.detach().clone()


def test_refresh_goes_through_the_backend():
    model = mlp()
    layers = galore_layers(model, "left")
    with torch.no_grad():
        for layer in layers:
            layer.B.normal_()
            layer.proj.normal_()
    expected = [layer.dense_weight() for layer in layers]
    backend = MasterBackend([p for layer in layers for p in (layer.weight, layer.proj, layer.B)])
    with torch.no_grad():
        for layer in layers:
            for p in (layer.weight, layer.proj, layer.B):
                p.fill_(float("nan"))  # stale local copies
    grads = [torch.randn(l.out_features, l.in_features, dtype=torch.float64) for l in layers]
    refresh_galore_layers(layers, backend, grads)
    for layer, W, G in zip(layers, expected, grads):
        torch.testing.assert_close(backend.masters[layer.weight], W, rtol=0, atol=1e-12)
        torch.testing.assert_close(backend.masters[layer.proj], orthogonal_projector(G, 4, "left"))
        assert torch.count_nonzero(backend.masters[layer.B]) == 0


@pytest.mark.parametrize("proj_type", ["left", "right"])
def test_refresh_merges_into_a_bf16_weight_rounding_once(proj_type):
    """model.frozen_dtype bfloat16: W and P stored in bf16, B trains in float32. The refresh
    merges decay·W + scale·P B in float32 and rounds once, where it writes W; the tied head and
    the untied layers alike (GaLoreEmbedding is a GaLoreLinear)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 6))
    layers = list(apply_galore(model, 4, ["0", "2"], scale=0.5, proj_type=proj_type,
                               frozen_dtype=torch.bfloat16).values())
    for layer in layers:
        assert layer.weight.dtype == layer.proj.dtype == torch.bfloat16
        assert layer.B.dtype == layer.bias.dtype == torch.float32 and layer.B.requires_grad
        with torch.no_grad():
            layer.B.normal_()  # a merge as large as W itself: each rounding shows
            layer.proj.normal_()
        layer.decay = 0.99
    exact = [layer.weight.double() * layer.decay + layer.scale * (
        layer.proj.double() @ layer.B.double() if layer.side == "left" else layer.B.double() @ layer.proj.double())
        for layer in layers]
    grads = [torch.randn(l.out_features, l.in_features) for l in layers]
    refresh_galore_layers(layers, TorchBackend(), grads)
    for layer, want, G in zip(layers, exact, grads):
        assert_rounded_once(layer.weight, want)
        assert torch.equal(layer.proj, orthogonal_projector(G, 4, layer.side).to(torch.bfloat16))
        assert layer.B.dtype == torch.float32 and torch.count_nonzero(layer.B) == 0


def decaying_matrix(rows: int, cols: int, decay: float, seed: int = 0) -> torch.Tensor:
    """U diag(i^-decay) Vᵀ with Haar U, V: a gradient-like spectrum, float64."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(rows, min(rows, cols), generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(cols, min(rows, cols), generator=g, dtype=torch.float64)).Q
    s = torch.arange(1, min(rows, cols) + 1, dtype=torch.float64) ** -decay
    return (U * s) @ V.T


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("shape", [(384, 160), (160, 384)])
def test_randomized_projector_finds_the_top_subspace(side, shape):
    G = decaying_matrix(*shape, decay=1.0)
    P = randomized_projector(G.float(), 12, side, torch.Generator().manual_seed(3)).double()
    exact = orthogonal_projector(G, 12, side).double()
    assert P.shape == exact.shape
    columns = (lambda M: M) if side == "left" else (lambda M: M.T)  # the vectors as columns
    A = G if side == "left" else G.T
    P, exact = columns(P), columns(exact)
    assert (P.T @ P - torch.eye(12, dtype=torch.float64)).abs().max() < 1e-5  # orthonormal
    # the same subspace: every principal angle's cosine near 1 (the 12th vector mixes a little
    # with the 13th, 8 % apart in i^-1), and the same captured energy
    assert torch.linalg.svdvals(P.T @ exact).min() > 0.99
    assert (P.T @ A).norm() ** 2 / (exact.T @ A).norm() ** 2 > 0.9999
    # a pure function of its generator's seed
    again = randomized_projector(G.float(), 12, side, torch.Generator().manual_seed(3))
    assert torch.equal(columns(again).double(), P)


def test_projector_auto_is_randomized_from_opt_6_7b_on():
    assert not uses_randomized("auto", (2048, 8192)) and uses_randomized("auto", (16384, 4096))
    assert uses_randomized("randomized", (8, 8)) and not uses_randomized("svd", (20480, 5120))


@pytest.mark.parametrize("side", ["left", "right"])
def test_randomized_refresh_leaves_the_function_unchanged(side):
    model = mlp()
    layers = galore_layers(model, side)
    with torch.no_grad():
        for layer in layers:
            layer.B.normal_()
            layer.proj.normal_()
    x = torch.randn(9, 12, dtype=torch.float64)
    before = model(x).detach()
    grads = [torch.randn(l.out_features, l.in_features, dtype=torch.float64) for l in layers]
    refresh_galore_layers(layers, TorchBackend(None), grads, "randomized")
    assert rel_err(model(x).detach(), before) < 1e-10
    for index, (layer, G) in enumerate(zip(layers, grads)):
        # the sketch's seed is (layer, refresh): a resumed run draws the same projector
        expected = randomized_projector(G, layer.rank, layer.side, projector_generator(index, 0, "cpu"))
        assert torch.equal(layer.proj.detach(), expected)
        assert layer.refreshes == 1 and torch.count_nonzero(layer.B) == 0


# ----------------------------------------------------------------------------- model level

def test_apply_galore_on_opt():
    model = tiny_opt()
    ids = torch.randint(3, 256, (2, 16))
    before = model(input_ids=ids).logits
    layers = apply_galore(model, 8, OPT_TARGETS, scale=0.25, proj_type="std", update_proj_gap=5)
    assert len(layers) == 12 and all(isinstance(l, GaLoreLinear) for l in layers.values())
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=1e-12)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and ".B" in n}
    assert len(trainable) == 12
    fc1 = layers["model.decoder.layers.0.fc1"]
    assert fc1.side == "right" and fc1.B.shape == (256, 8) and fc1.proj.shape == (8, 64)
    with pytest.raises(ValueError, match="tied"):
        apply_galore(model, 8, ("lm_head",))
    with pytest.raises(NotImplementedError, match="nn.Embedding"):
        apply_galore(model, 8, ("embed_tokens",))
    with pytest.raises(ValueError, match="no module named"):
        apply_galore(model, 8, ("q_prj",))


def test_apply_galore_untied_lm_head():
    model = tiny_opt(tie_word_embeddings=False)
    assert model.lm_head.weight is not model.model.decoder.embed_tokens.weight
    layers = apply_galore(model, 8, ("lm_head",))
    assert list(layers) == ["lm_head"] and layers["lm_head"].B.shape == (256, 8)


# ----------------------------------------------------------------------------- two ranks

def _two_rank_worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = mlp()
        layers = galore_layers(model, "right")
        backend = TorchBackend(None)
        backend.rank, backend.world_size = rank, 2
        x, y = batches(2)[rank]  # each rank its own data: G must be summed before the SVD
        # the trainer's streamed refresh: each layer's reduce issued from inside the backward
        refresh_from_probe(layers, backend, lambda probe: probe.backward(mse(model, (x, y))), 1)
        torch.save([layer.proj.detach() for layer in layers], os.path.join(out_dir, f"{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_split_svd_and_agree(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_rank_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    G = dense_gradients(mlp(), batches(2))
    layers = galore_layers(mlp(), "right")
    for index, layer in enumerate(layers):
        expected = orthogonal_projector(G[index], layer.rank, layer.side)
        assert torch.equal(results[0][index], results[1][index])
        torch.testing.assert_close(results[0][index], expected, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- tied embedding

@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_tied_embedding_layer_form_follows_galore_on_the_tied_weight(proj_type):
    """GaLoreEmbedding + its tied head under torch's AdamW == GaLoreAdamW on OPT's tied
    embedding / LM head weight, whose gradient is the sum of the lookup's and the head's. The
    inputs include the padding id, whose row gets no lookup gradient, as in nn.Embedding."""
    from sst_dist.galore import GaLoreEmbedding, GaLoreTiedHead, apply_galore_embedding

    wd, rank, scale, gap, eps = 0.1, 8, 0.5, 3, 1e-4
    plain, layered = tiny_opt(), tiny_opt()
    layered.load_state_dict(plain.state_dict())
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    before = layered(input_ids=ids).logits.detach()
    layers = list(apply_galore_embedding(layered, rank, scale=scale, proj_type=proj_type,
                                         update_proj_gap=gap).values())
    (emb,) = layers
    assert isinstance(emb, GaLoreEmbedding) and isinstance(layered.lm_head, GaLoreTiedHead)
    assert layered.lm_head.B is emb.B and layered.model.decoder.embed_tokens is emb
    torch.testing.assert_close(layered(input_ids=ids).logits, before, rtol=0, atol=1e-12)

    tied = plain.model.decoder.embed_tokens.weight
    assert plain.lm_head.weight is tied
    rest = [p for p in plain.parameters() if p is not tied]
    ref = GaLoreAdamW([{"params": rest, "weight_decay": wd},
                       {"params": [tied], "rank": rank, "update_proj_gap": gap, "scale": scale,
                        "proj_type": proj_type, "weight_decay": wd}], eps=eps, convention="torch")
    trainable = [p for p in layered.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, eps=eps, weight_decay=wd)
    backend = TorchBackend(opt)
    g = torch.Generator().manual_seed(5)
    for step in range(8):  # refreshes at 0, 3, 6
        batch = torch.randint(0, 256, (2, 17), generator=g)
        batch[0, :4] = 1  # OPT's padding id
        x, y = batch[:, :-1], batch[:, 1:]

        def loss(model):
            logits = model(input_ids=x).logits
            return nn.functional.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))

        for group in ref.param_groups + opt.param_groups:
            group["lr"] = lr_at(step)
        loss(plain).backward()
        ref.step()
        ref.zero_grad()
        if emb.refresh_due(step):
            with GradientProbe(layers, step) as probe:
                probe.backward(loss(layered))
            refresh_galore_layers(layers, backend, probe.gradients)
        loss(layered).backward()
        opt.step()
        opt.zero_grad()
        apply_weight_decay(layers, lr_at(step), wd)
        assert rel_err(emb.dense_weight(), tied.detach()) < 1e-6, step
        reference = dict(plain.named_parameters())
        for name, p in layered.named_parameters():
            if "decoder.layers" in name:
                assert rel_err(p.detach(), reference[name].detach()) < 1e-6, (step, name)
    assert emb.refreshes == 3
    assert rel_err(opt.state[emb.B]["exp_avg"], ref.state[tied]["exp_avg"]) < 1e-6


# ----------------------------------------------------------------------------- the streamed refresh

class LiveGradients:
    """The most dense probe gradients G alive at once: each time a layer's backward makes one,
    the earlier ones still alive are counted (weakrefs), the running sums a refresh keeps among
    them (a sum is the first micro-batch's G, added into)."""

    def __init__(self, monkeypatch):
        from sst_dist import galore
        self.alive, self.most, self.made = [], 0, 0
        for function in (galore._GaLoreMatmul, galore._GaLoreLookup):
            monkeypatch.setattr(function, "backward", staticmethod(self._counted(function.backward)))

    def _counted(self, backward):
        def counted(ctx, *grads):
            out = backward(ctx, *grads)
            if out[4] is not None:
                self.alive = [ref for ref in self.alive if ref() is not None] + [weakref.ref(out[4])]
                self.most = max(self.most, len(self.alive))
                self.made += 1
            return out
        return counted


def opt_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def perturbed(layers, seed=6):
    """A projector, B and unfolded decay in every layer, for the refresh to merge."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            layer.proj.copy_(torch.randn(layer.proj.shape, generator=g, dtype=torch.float64))
            layer.B.copy_(torch.randn(layer.B.shape, generator=g, dtype=torch.float64) * 0.01)
            layer.decay = 0.9


def streamed_against_all_at_once(monkeypatch, make, micro_batches, refresh_layers, projector):
    """`make()` -> (galore model, its layers, the dense twin, the twin's weights for each layer).
    The streamed refresh (refresh_from_probe) of one copy against refresh_galore_layers of
    another, given G by plain autograd on the dense twin summed over the micro-batches."""
    ids = torch.randint(3, 256, (micro_batches, 2, 16), generator=torch.Generator().manual_seed(7))
    reference, ref_layers, dense, weights = make()
    per_batch = [torch.autograd.grad(opt_loss(dense, block), weights) for block in ids]
    refresh_galore_layers(ref_layers, TorchBackend(None), [sum(g) for g in zip(*per_batch)], projector)

    model, layers, _, _ = make()
    live = LiveGradients(monkeypatch)
    runs = []

    def probe_pass(probe):
        runs.append(1)
        for block in ids:
            probe.backward(opt_loss(model, block))

    passes = refresh_from_probe(layers, TorchBackend(None), probe_pass, micro_batches, projector=projector,
                                refresh_layers=refresh_layers)
    assert passes == len(runs)
    for index, (layer, ref) in enumerate(zip(layers, ref_layers)):
        torch.testing.assert_close(layer.proj, ref.proj, rtol=0, atol=1e-5, msg=f"layer {index}")
        torch.testing.assert_close(layer.weight, ref.weight, rtol=0, atol=1e-12, msg=f"layer {index}")
        assert torch.count_nonzero(layer.B) == 0 and layer.decay == 1.0 and layer.refreshes == 1
        assert layer.proj.abs().max() > 0
    return passes, live


@pytest.mark.parametrize("projector", ["svd", "randomized"])
@pytest.mark.parametrize("micro_batches, refresh_layers, passes, most", [
    (1, None, 1, 1), (1, 5, 1, 1),  # one micro-batch: one pass, one layer's G at a time
    (3, None, 1, 13), (3, 5, 3, 6)])  # several: a pass holds its layers' sums and the G arriving
def test_streamed_refresh_is_the_all_at_once_refresh(monkeypatch, projector, micro_batches, refresh_layers,
                                                     passes, most):
    def make():
        torch.manual_seed(0)
        model = tiny_opt()
        dense = copy.deepcopy(model)
        layers = list(apply_galore(model, 8, OPT_TARGETS, scale=0.5, update_proj_gap=5).values())
        perturbed(layers)
        names = [n for n, m in dense.named_modules() if n.rsplit(".", 1)[-1] in OPT_TARGETS]
        weights = [dense.get_submodule(n).weight for n in names]
        with torch.no_grad():
            for layer, weight in zip(layers, weights):
                weight.copy_(layer.dense_weight())
        return model, layers, dense, weights

    ran, live = streamed_against_all_at_once(monkeypatch, make, micro_batches, refresh_layers, projector)
    assert ran == passes and live.most == most
    assert live.made == 12 * micro_batches  # each layer's G made once per micro-batch, in one pass


@pytest.mark.parametrize("micro_batches, most", [(1, 2), (3, 3)])
def test_streamed_refresh_of_a_tied_embedding(monkeypatch, micro_batches, most):
    """GaLore on the tied embedding (sst+galore's): the head's G arrives first and waits for the
    lookup's, the last of the backward; their sum is the tied weight's G."""
    from sst_dist.galore import apply_galore_embedding

    def make():
        torch.manual_seed(0)
        model = tiny_opt()
        dense = copy.deepcopy(model)
        layers = list(apply_galore_embedding(model, 8, scale=0.5, update_proj_gap=5).values())
        perturbed(layers)
        tied = dense.model.decoder.embed_tokens.weight
        with torch.no_grad():
            tied.copy_(layers[0].dense_weight())
        return model, layers, dense, [tied]

    ran, live = streamed_against_all_at_once(monkeypatch, make, micro_batches, None, "svd")
    # one pass: the held head G and the lookup's (and with several micro-batches the sum beside)
    assert ran == 1 and live.most == most and live.made == 2 * micro_batches


def test_the_projector_is_float32_inside_an_autocast_backward():
    """The streamed refresh takes projectors inside the probe's backward, which the trainer runs
    in its autocast region: the randomized projector's GEMMs must not run in bf16 there."""
    layer = GaLoreLinear(48, 64, 8, proj_type="left")
    G = decaying_matrix(64, 48, decay=1.0).float()
    outside = refresh_projector(layer, 0, G, TorchBackend(None), "randomized")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = refresh_projector(layer, 0, G, TorchBackend(None), "randomized")
    assert torch.equal(inside, outside)


def test_the_probe_counts_its_micro_batches():
    model = mlp()
    layers = galore_layers(model, "left")
    data = batches(2)
    with pytest.raises(RuntimeError, match=r"1 of 2 micro-batches"):
        with GradientProbe(layers, micro_batches=2) as probe:
            probe.backward(mse(model, data[0]))
    with pytest.raises(RuntimeError, match="more often than the 1 micro-batches"):
        with GradientProbe(layers) as probe:
            for batch in data:
                probe.backward(mse(model, batch))

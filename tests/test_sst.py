"""The SST layer's math in float64 against the formulas of docs/design.md §1."""

import pytest
import torch
from torch import nn

from sst_dist.engines.base import Shard
from sst_dist.engines.torch import TorchBackend
from sst_dist.engines.views import row_pieces
from sst_dist.optim import RESET_KEYS, AdamW
from sst_dist.sst import SSTLinear, assign_slots, layer_generator, sample_active, sampling_probabilities
from sst_dist.sst_controller import SSTController

from sst_dist.config import SST_PATHS as PATHS


@pytest.fixture(autouse=True)
def float64_default():
    """This file's tensors are float64; the default goes back for the files that run after it."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def make_layer(out_f=12, in_f=8, rank=3, path="dense", seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_f, out_f).double()
    return linear, SSTLinear.from_linear(linear, rank, torch.Generator().manual_seed(seed), path=path)


def train_a_little(layer, steps=3, lr=0.05, seed=1):
    """Moves the active vectors and s away from their SVD values, like training does."""
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(5, layer.in_features, generator=g)
        layer(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("shape", [(12, 8), (8, 12), (10, 10)])
@pytest.mark.parametrize("path", PATHS)
def test_zero_distortion(shape, path):
    linear, layer = make_layer(*shape, path=path)
    x = torch.randn(4, 7, shape[1])
    torch.testing.assert_close(layer(x), linear(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.dense_weight(), linear.weight.detach(), rtol=0, atol=1e-12)


def test_parameters_are_the_spectral_factors():
    _, layer = make_layer(12, 8, rank=3)
    trainable = {n: tuple(p.shape) for n, p in layer.named_parameters() if p.requires_grad}
    frozen = {n: tuple(p.shape) for n, p in layer.named_parameters() if not p.requires_grad}
    # s (8,), u_active (12, 3) and vh_active (3, 8) packed in one tensor, as views of it; U (12, 8)
    # and Vh (8, 8) in another
    assert trainable == {"spectral": (8 + 12 * 3 + 3 * 8,), "bias": (12,)}
    assert frozen == {"factors": (12 * 8 + 8 * 8,)}
    assert layer.active_indices.dtype == torch.long and layer.active_indices.shape == (3,)
    assert [tuple(t.shape) for t in (layer.s, layer.u_active, layer.vh_active)] == [(8,), (12, 3), (3, 8)]
    numbered = torch.arange(layer.spectral.numel(), dtype=torch.float64)
    s, u, vh = layer.split(numbered)
    assert torch.equal(layer.pack(s, u, vh), numbered)
    assert torch.equal(torch.cat([s, u.flatten(), vh.flatten()]), numbered)  # row-major, in order
    slots = torch.tensor([2, 0])
    assert sorted(numbered[layer.slot_elements(slots)].tolist()) == sorted(
        u[:, slots].flatten().tolist() + vh[slots].flatten().tolist())
    with torch.no_grad():
        layer.u_active[:, 1] = 7.0  # the views write the parameter
    assert (layer.spectral[8 + 1:8 + 36:3] == 7.0).all()


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])
def test_u_and_vh_are_views_of_the_one_frozen_parameter(shape):
    """U and Vh live in `factors` (U, then Vh, row-major): views of its storage, so an in-place
    write to either, and a re-SVD written through the engine's seam, lands in the parameter."""
    out_f, in_f = shape
    k = min(shape)
    _, layer = make_layer(out_f, in_f, rank=3)
    U, Vh = layer.U, layer.Vh
    assert U.shape == (out_f, k) and Vh.shape == (k, in_f)
    for view, offset in ((U, 0), (Vh, out_f * k)):
        assert view.untyped_storage().data_ptr() == layer.factors.untyped_storage().data_ptr()
        assert view.storage_offset() == offset and view.is_contiguous()
    torch.testing.assert_close(torch.cat([U.flatten(), Vh.flatten()]), layer.factors.detach(), rtol=0, atol=0)
    with torch.no_grad():
        layer.Vh[1, 2] = 5.0
    assert layer.factors[out_f * k + in_f + 2] == 5.0
    # a re-SVD through the controller: the parameter is written in place, and holds the new U, Vh
    _, layer = make_layer(out_f, in_f, rank=3)
    opt = AdamW([{"params": [layer.spectral], "resettable": True}, {"params": [layer.bias]}], lr=0.05)
    train_a_little(layer)
    storage, before = layer.factors.data_ptr(), layer.factors.detach().clone()
    SSTController({"0": layer}, TorchBackend(opt), seed=0).resvd(iteration=1)
    assert layer.factors.data_ptr() == storage and not torch.equal(layer.factors, before)
    U, Vh = layer.U, layer.Vh
    torch.testing.assert_close(U.T @ U, torch.eye(k), rtol=0, atol=1e-10)  # a fresh SVD's factors
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(k), rtol=0, atol=1e-10)
    torch.testing.assert_close(layer.u_active, U[:, layer.active_indices], rtol=0, atol=0)


def test_an_old_layout_state_dict_loads_to_identical_weights():
    """A checkpoint written when U and Vh were two parameters (torch engine's state.pt, ZeRO-1's
    module states): load_state_dict packs them into `factors`, strict, with the same values."""
    trained = _model()
    for i in (0, 2):
        train_a_little(trained[i])
    new = {key: value.clone() for key, value in trained.state_dict().items()}
    old = {}
    for key, value in new.items():
        if key.endswith(".factors"):
            U, Vh = trained.get_submodule(key.rsplit(".", 1)[0]).split_factors(value)
            old[key.replace(".factors", ".U")], old[key.replace(".factors", ".Vh")] = U.clone(), Vh.clone()
        else:
            old[key] = value.clone()
    assert not any(key.endswith(".factors") for key in old)
    # the names the engines convert their checkpoints' entries by, from the layers' older_layout
    from sst_dist.layouts import older_names
    assert older_names(trained) == {key: [key.replace(".factors", ".U"), key.replace(".factors", ".Vh")]
                                    for key in new if key.endswith(".factors")}
    fresh = _model(seed=1)
    assert not torch.equal(fresh[0].factors, trained[0].factors)
    fresh.load_state_dict(old)  # strict: no key missing, none unexpected
    for key, value in new.items():
        assert torch.equal(fresh.state_dict()[key], value), key
    x = torch.randn(4, 8)
    torch.testing.assert_close(fresh(x), trained(x), rtol=0, atol=0)
    # the layer as the root module (keys with no prefix)
    alone = _model(seed=1)[2]
    alone.load_state_dict({key[2:]: value for key, value in old.items() if key.startswith("2.")})
    assert torch.equal(alone.factors, new["2.factors"])


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])  # both sides of the dense path's k-deep product
@pytest.mark.parametrize("path", PATHS)
def test_enhanced_gradient_matches_formulas(path, shape):
    out_f, in_f = shape
    _, layer = make_layer(out_f, in_f, rank=3, path=path)
    train_a_little(layer)  # active vectors no longer equal the frozen columns
    idx = layer.active_indices
    U = layer.U.detach().index_copy(1, idx, layer.u_active.detach())
    V = layer.Vh.detach().index_copy(0, idx, layer.vh_active.detach()).T
    W = U @ torch.diag(layer.s.detach()) @ V.T
    torch.testing.assert_close(layer.dense_weight(), W, rtol=0, atol=1e-12)
    x = torch.randn(2, 3, in_f, requires_grad=True)  # (batch, seq, in), as in a model
    gy = torch.randn(2, 3, out_f)
    layer(x).backward(gy)

    dense = nn.Linear(in_f, out_f).double()
    with torch.no_grad():
        dense.weight.copy_(W)
        dense.bias.copy_(layer.bias)
    x_ref = x.detach().clone().requires_grad_()
    dense(x_ref).backward(gy)
    G = dense.weight.grad  # dL/dW of an ordinary dense layer on the same input

    grad_s, grad_u, grad_vh = layer.split(layer.spectral.grad)
    torch.testing.assert_close(grad_s, torch.diagonal(U.T @ G @ V), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_u, G @ V[:, idx], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_vh, U[:, idx].T @ G, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, dense.bias.grad, rtol=1e-10, atol=1e-12)
    # the exact gradient would carry sigma_i; SST's must not
    sigma = layer.s.detach()[idx]
    assert not torch.allclose(grad_u, G @ V[:, idx] * sigma)
    assert layer.U.grad is None and layer.Vh.grad is None


@pytest.mark.parametrize("input_grad", [True, False])  # the dense path forms W again only for x's gradient
@pytest.mark.parametrize("path", ["dense", "materialized", "factored"])
def test_the_backward_uses_the_trained_vectors_of_factors_gathered_anew(path, input_grad):
    """An engine may hand the backward factors gathered anew from their stored partitions (ZeRO-3),
    whose active columns / rows hold stale frozen copies: the factor gradients must still be
    those of the trained vectors, whether or not the input needs a gradient."""
    _, layer = make_layer(12, 8, rank=3, path=path)
    train_a_little(layer)
    idx = layer.active_indices
    U = layer.U.detach().index_copy(1, idx, layer.u_active.detach())
    V = layer.Vh.detach().index_copy(0, idx, layer.vh_active.detach()).T
    x = torch.randn(2, 3, 8, requires_grad=input_grad)
    gy = torch.randn(2, 3, 12)
    y = layer(x)
    with torch.no_grad():  # what a re-gather brings back: other values where the trained vectors go
        layer.U[:, idx] = torch.randn(12, 3)
        layer.Vh[idx] = torch.randn(3, 8)
    y.backward(gy)
    G = gy.reshape(-1, 12).T @ x.detach().reshape(-1, 8)
    grad_s, grad_u, grad_vh = layer.split(layer.spectral.grad)
    torch.testing.assert_close(grad_s, torch.diagonal(U.T @ G @ V), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_u, G @ V[:, idx], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_vh, U[:, idx].T @ G, rtol=1e-10, atol=1e-12)
    if input_grad:
        W = U @ torch.diag(layer.s.detach()) @ V.T
        torch.testing.assert_close(x.grad, gy @ W, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", PATHS)
def test_a_layer_used_twice_before_one_backward_sums_both_gradients(path):
    """Forming W writes the trained vectors into U and Vh in place; a second forward through the
    layer before the first one's backward must neither fail autograd's saved-tensor check nor
    change the first one's gradient."""
    _, layer = make_layer(5, 6, rank=2, path=path)
    train_a_little(layer)
    x1, x2 = torch.randn(3, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    grads = []
    for xs in ((x1,), (x2,)):
        layer.zero_grad()
        layer(xs[0]).pow(2).sum().backward()
        grads.append(layer.spectral.grad.clone())
    layer.zero_grad()
    (layer(x1).pow(2).sum() + layer(x2).pow(2).sum()).backward()
    torch.testing.assert_close(layer.spectral.grad, grads[0] + grads[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", PATHS)
def test_resample_and_resvd_preserve_the_function(path):
    """Through SSTController, the code that runs: a resample and a re-SVD change nothing the
    layer computes, a resample resets exactly the slots whose index changed, a re-SVD leaves
    orthonormal factors."""
    _, layer = make_layer(12, 8, rank=3, path=path)
    opt = AdamW([{"params": [layer.spectral], "resettable": True}, {"params": [layer.bias]}], lr=0.05)
    controller = SSTController({"0": layer}, TorchBackend(opt), seed=0)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):  # the active vectors move away from their frozen copies
        layer(torch.randn(5, 8, generator=g)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    x = torch.randn(5, 8)
    before = layer(x).detach()
    old = layer.active_indices.clone()
    for iteration in range(1, 50):  # a draw that changes some slots and keeps others
        drawn = sample_active(layer.s.detach(), 3, layer_generator(0, 0, iteration))
        if 0 < int(torch.isin(drawn, old).sum()) < 3:
            break
    controller.resample(iteration)
    torch.testing.assert_close(layer(x).detach(), before, rtol=0, atol=1e-10)
    changed = layer.active_indices != old
    assert changed.any() and (~changed).any()
    _, u_state, vh_state = layer.split(opt.state[layer.spectral]["exp_avg"])
    assert torch.count_nonzero(u_state[:, changed]) == 0 and torch.count_nonzero(vh_state[changed]) == 0
    assert torch.count_nonzero(u_state[:, ~changed]) > 0
    layer(x).pow(2).sum().backward()
    opt.step()
    before = layer(x).detach()
    controller.resvd(iteration + 1)
    torch.testing.assert_close(layer(x).detach(), before, rtol=0, atol=1e-10)
    U, Vh = layer.U.detach(), layer.Vh.detach()
    torch.testing.assert_close(U.T @ U, torch.eye(8), rtol=0, atol=1e-10)
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(8), rtol=0, atol=1e-10)


def test_assign_slots_keeps_redrawn_indices_in_place():
    old = torch.tensor([4, 7, 1])
    new_idx, slots = assign_slots(old, torch.tensor([9, 1, 4]))
    assert new_idx.tolist() == [4, 9, 1]
    assert slots.tolist() == [1]
    new_idx, slots = assign_slots(None, torch.tensor([2, 0]))
    assert new_idx.tolist() == [2, 0] and slots.tolist() == [0, 1]


def test_sampling_follows_sigma_weighted_law():
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.0, 3.0])
    p = sampling_probabilities(s)
    torch.testing.assert_close(p, s / s.sum(), rtol=0, atol=1e-12)
    mixed = sampling_probabilities(s, uniform_mix=True)
    torch.testing.assert_close(mixed, 0.5 * (1 / 8 + s / s.sum()), rtol=0, atol=1e-12)

    g = torch.Generator().manual_seed(1234)
    n = 40000
    draws = torch.stack([sample_active(s, 1, g) for _ in range(n)]).flatten()
    counts = torch.bincount(draws, minlength=8).double()

    def chi2(expected_p):
        expected = expected_p * n
        mask = expected > 0
        return float((((counts - expected) ** 2)[mask] / expected[mask]).sum())

    # df = 6 (7 cells with mass); the 0.1% critical value is 22.46
    assert chi2(s / s.sum()) < 22.46
    assert chi2(torch.full((8,), 1 / 8)) > 1000  # clearly not uniform
    assert counts[6] == 0  # sigma = 0 is never drawn while others remain


def test_sampling_without_replacement_and_reproducible():
    s = torch.rand(32) + 0.1
    a = sample_active(s, 16, layer_generator(0, 3, 7))
    b = sample_active(s, 16, layer_generator(0, 3, 7))
    assert torch.equal(a, b) and a.unique().numel() == 16
    assert not torch.equal(a, sample_active(s, 16, layer_generator(0, 3, 8)))


def _model(rank=3, path="dense", seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 8)).double()
    for i in (0, 2):
        model[i] = SSTLinear.from_linear(model[i], rank, torch.Generator().manual_seed(i), path=path)
    return model


def _step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 8, generator=g)
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def test_a_resample_under_bf16_storage_keeps_the_kept_slots_trained_vectors_exactly():
    """model.frozen_dtype bfloat16: U and Vh are stored in bf16 and the active vectors train in
    float32. A resample leaves a kept slot's trained vectors as they were, bit for bit (the sync
    into a bf16 copy of the factors used to round them at every resample); a new slot takes the
    stored, rounded vector."""
    _, layer = make_layer(12, 8, rank=3, path="functional")  # the path that forms W in one dtype
    layer.float()
    layer.factors.data = layer.factors.data.to(torch.bfloat16)
    opt = AdamW([{"params": [layer.spectral], "resettable": True}, {"params": [layer.bias]}], lr=0.05)
    controller = SSTController({"0": layer}, TorchBackend(opt), seed=0)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):  # the active vectors move off the bf16 grid
        layer(torch.randn(5, 8, generator=g, dtype=torch.float32)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    old = layer.active_indices.clone()
    before_u, before_vh = layer.u_active.detach().clone(), layer.vh_active.detach().clone()
    assert not torch.equal(before_u, before_u.bfloat16().float())
    for iteration in range(1, 50):  # a draw that changes some slots and keeps others
        drawn = sample_active(layer.s.detach(), 3, layer_generator(0, 0, iteration))
        if 0 < int(torch.isin(drawn, old).sum()) < 3:
            break
    stored_U, stored_Vh = layer.U.detach().float().clone(), layer.Vh.detach().float().clone()
    controller.resample(iteration)
    assert layer.factors.dtype == torch.bfloat16 and layer.spectral.dtype == torch.float32
    for slot, index in enumerate(layer.active_indices.tolist()):
        if index in old.tolist():
            where = old.tolist().index(index)
            assert slot == where  # a kept index stays in its slot
            assert torch.equal(layer.u_active[:, slot], before_u[:, where])
            assert torch.equal(layer.vh_active[slot], before_vh[where])
        else:
            assert torch.equal(layer.u_active[:, slot], stored_U[:, index])
            assert torch.equal(layer.vh_active[slot], stored_Vh[index])
    assert (layer.active_indices != old).any() and (layer.active_indices == old).any()


def test_resample_prunes_exactly_the_resampled_slots():
    model = _model()
    layers = {"0": model[0], "2": model[2]}
    spectral = [layer.spectral for layer in layers.values()]
    rest = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in spectral)]
    opt = AdamW([{"params": spectral, "resettable": True}, {"params": rest}], lr=1e-2)
    controller = SSTController(layers, TorchBackend(opt), seed=0)
    for i in range(3):
        _step(model, opt, i)
        controller.post_step()
    before = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters() if p in opt.state}
    old = [layer.active_indices.clone() for layer in layers.values()]
    x = torch.randn(4, 8)
    out = model(x).detach()
    # find an iteration whose draw both keeps and replaces slots, so both halves are tested
    for iteration in range(1, 50):
        layer_generator(0, 0, iteration)
        drawn = sample_active(model[0].s.detach(), 3, layer_generator(0, 0, iteration))
        if 0 < int(torch.isin(drawn, old[0]).sum()) < 3:
            break
    controller.resample(iteration)
    torch.testing.assert_close(model(x).detach(), out, rtol=0, atol=1e-12)
    pruned_any = kept_any = False
    for layer, old_idx in zip(layers.values(), old):
        changed = layer.active_indices != old_idx
        state, prior = opt.state[layer.spectral], before[layer.spectral]
        for part, dim in ((1, 1), (2, 0)):  # u_active's columns, vh_active's rows
            for key in RESET_KEYS:  # moments and per-element ages: a fresh Adam for new slots
                new, prev = layer.split(state[key])[part], layer.split(prior[key])[part]
                sl = (slice(None), changed) if dim == 1 else (changed, slice(None))
                kept = (slice(None), ~changed) if dim == 1 else (~changed, slice(None))
                assert torch.count_nonzero(new[sl]) == 0
                assert torch.equal(new[kept], prev[kept])
                pruned_any |= bool(changed.any())
                kept_any |= bool((~changed).any() and prev[kept].abs().sum() > 0)
        assert torch.equal(state["step"], prior["step"])
        for key in RESET_KEYS:  # s keeps its state by default
            assert torch.equal(layer.split(state[key])[0], layer.split(prior[key])[0])
    assert pruned_any and kept_any
    for p in (model[0].bias, model[2].bias):
        for key, value in before[p].items():
            assert torch.equal(opt.state[p][key], value)


def test_post_step_clamps_s_and_renormalises_without_changing_w():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.5)  # large steps push some sigma below 0
    controller = SSTController({"0": model[0], "2": model[2]}, TorchBackend(opt), seed=0)
    negative_seen = False
    for i in range(5):
        _step(model, opt, i)
        negative_seen |= bool((model[0].s < 0).any() or (model[2].s < 0).any())
        weights = [m.dense_weight().clone() for m in (model[0], model[2])]
        factors = [[t.detach().clone() for t in (m.s, m.u_active, m.vh_active)] for m in (model[0], model[2])]
        controller.post_step()
        for m, w, (s, u, vh) in zip((model[0], model[2]), weights, factors):
            # the formula: unit-length active vectors, their norms folded into s_i, then s >= 0
            u_norm, v_norm = u.norm(dim=0), vh.norm(dim=1)
            s[m.active_indices] *= u_norm * v_norm
            torch.testing.assert_close(m.s, s.clamp_min(0), rtol=1e-14, atol=0)
            torch.testing.assert_close(m.u_active, u / u_norm, rtol=1e-14, atol=0)
            torch.testing.assert_close(m.vh_active, vh / v_norm[:, None], rtol=1e-14, atol=0)
            assert (m.s >= 0).all()
            torch.testing.assert_close(m.u_active.norm(dim=0), torch.ones(3), rtol=0, atol=1e-12)
            torch.testing.assert_close(m.vh_active.norm(dim=1), torch.ones(3), rtol=0, atol=1e-12)
            w_clamped = (m.U.index_copy(1, m.active_indices, m.u_active) * m.s) @ m.Vh.index_copy(
                0, m.active_indices, m.vh_active)
            torch.testing.assert_close(m.dense_weight(), w_clamped)
            # renormalisation alone is function-preserving: only the clamp may change W
            if not negative_seen:
                torch.testing.assert_close(m.dense_weight(), w, rtol=0, atol=1e-12)
    assert negative_seen, "lr too small to exercise the clamp"


@pytest.mark.parametrize("width", [1, 3, 4])
def test_row_pieces_are_views_at_their_coordinates(width):
    rows = 5
    full = torch.arange(rows * width, dtype=torch.float64)
    grid = full.view(rows, width)
    for start in range(full.numel()):
        for end in range(start, full.numel() + 1):
            pieces = list(row_pieces([Shard(full[start:end], start)], width))
            assert sum(view.numel() for view, _, _ in pieces) == end - start
            for view, row, col in pieces:
                assert torch.equal(view, grid[row:row + view.shape[0], col:col + view.shape[1]])
                assert view.data_ptr() == grid[row, col].data_ptr()  # a view, not a copy


class ShardedBackend(TorchBackend):
    """Owned pieces cut mid-row, as ZeRO partitions are, plus a mirror copy of every parameter
    (the low-precision weights an engine keeps beside its masters)."""

    def __init__(self, optimizer, cuts=(0.3, 0.55)):
        super().__init__(optimizer)
        self.cuts, self.mirrors = cuts, {}

    def shards(self, param):
        flat = param.data.view(-1)
        bounds = [0, *sorted({int(c * flat.numel()) for c in self.cuts}), flat.numel()]
        owned = [Shard(flat[a:b], a) for a, b in zip(bounds, bounds[1:]) if b > a]
        mirror = self.mirrors.setdefault(param, param.detach().clone())
        return owned, [Shard(mirror.view(-1), 0)]


def test_post_step_on_shards_cut_mid_row_equals_the_whole_tensor():
    whole, sharded = _model(), _model()
    opts = [torch.optim.AdamW(m.parameters(), lr=0.5) for m in (whole, sharded)]
    backend = ShardedBackend(opts[1])
    controllers = [SSTController({"0": m[0], "2": m[2]}, b, seed=0)
                   for m, b in ((whole, TorchBackend(opts[0])), (sharded, backend))]
    for i in range(4):
        for model, opt, controller in zip((whole, sharded), opts, controllers):
            _step(model, opt, i)
            for p in model.parameters():
                backend.mirrors.pop(p, None)  # the engine refreshes its copy from the master
            controller.post_step()
        for p, q in zip(whole.parameters(), sharded.parameters()):
            torch.testing.assert_close(q, p, rtol=0, atol=1e-12)
            if q in backend.mirrors:
                torch.testing.assert_close(backend.mirrors[q], p.detach(), rtol=0, atol=1e-12)


def test_post_step_coalesces_layers_laid_out_in_one_flat_buffer():
    """Engines keep parameters in one flat buffer (ZeRO's partitions and bf16 weights): the plan
    then treats each layer position of every block as one strided view, and must scale exactly
    the elements that per-layer views would."""
    def blocks():
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)]).double()
        for i in range(4):
            model[i] = SSTLinear.from_linear(model[i], 3, torch.Generator().manual_seed(i))
        return model

    apart, flat, controllers = _apart_and_flat(blocks)
    assert flat[2].spectral.data_ptr() == flat[0].spectral.data_ptr() + 2 * flat[0].spectral.numel() * 8
    views = _divided(controllers[1])
    assert [tuple(v.shape) for v in views] == [(4, 8, 3), (4, 3, 8)]  # u of all layers, vh of all
    assert all(whole is None for *_, whole, _ in controllers[1]._plan.div_groups)  # in place
    # separate storages (FSDP2's shards): a view per layer, and still one division per shape, in a
    # scratch tensor that the views are copied into and back from
    assert len(_divided(controllers[0])) == 8
    groups = controllers[0]._plan.div_groups
    assert len(groups) == 2 and all(whole is not None and len(stack) == 4 for stack, *_, whole, _ in groups)


def test_post_step_scales_each_layer_once_in_the_flat_buffer_of_two_opt_blocks():
    """q, k, v, out, fc1, fc2 twice in one buffer: u of fc2 (block 0), q (block 1) and fc2 (block 1)
    lie at one stride, and so do u of q, k, v, out of block 1. q of block 1 belongs to one run only;
    scaled by both, a ZeRO run's model copy of it differed from its master every step."""
    def blocks():
        torch.manual_seed(0)
        shapes = [(8, 8)] * 4 + [(8, 32), (32, 8)]  # (in, out) of q, k, v, out, fc1, fc2
        model = nn.Sequential(*[nn.Linear(i, o) for _ in range(2) for i, o in shapes]).double()
        for i in range(len(model)):
            model[i] = SSTLinear.from_linear(model[i], 3, torch.Generator().manual_seed(i))
        return model

    _, _, controllers = _apart_and_flat(blocks)
    views = _divided(controllers[1])
    assert sum(v.shape[0] for v in views) == 2 * 12  # u and vh of each layer, once
    assert max(v.shape[0] for v in views) > 1  # and still coalesced


def _divided(controller):
    """The views post_step's plan divides by the norms, in its order."""
    return [view for stack, *_ in controller._plan.div_groups for view in stack]


def _apart_and_flat(blocks, steps=4):
    """Two copies of blocks(): one as built, one with every spectral in one flat buffer; trains
    both with post_step and checks they stay equal. Returns (apart, flat, controllers)."""
    apart, flat = blocks(), blocks()
    buffer = torch.cat([layer.spectral.data for layer in flat])
    offset = 0
    for layer in flat:
        n = layer.spectral.numel()
        layer.spectral.data = buffer[offset:offset + n]
        offset += n
    opts = [torch.optim.AdamW(m.parameters(), lr=0.5) for m in (apart, flat)]
    controllers = [SSTController({str(i): m[i] for i in range(len(m))}, TorchBackend(o), seed=0)
                   for m, o in zip((apart, flat), opts)]
    for i in range(steps):
        for model, opt, controller in zip((apart, flat), opts, controllers):
            _step(model, opt, i)
            controller.post_step()
        for p, q in zip(apart.parameters(), flat.parameters()):
            torch.testing.assert_close(q, p, rtol=0, atol=1e-12)
    return apart, flat, controllers


def test_post_step_follows_a_parameter_whose_storage_changed():
    """post_step keeps its views between steps; when an engine gives a parameter new storage (a
    checkpoint load, a re-flattening), it must work on the new tensor, not the stale one."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.5)
    controller = SSTController({"0": model[0], "2": model[2]}, TorchBackend(opt), seed=0)
    _step(model, opt, 0)
    controller.post_step()
    layer = model[0]
    old = layer.spectral.data
    new = old.clone()
    layer.split(new)[1].mul_(3.0)  # new storage, active u columns of norm 3
    layer.spectral.data = new
    s_before = layer.s.detach().clone()
    controller.post_step()
    torch.testing.assert_close(layer.u_active.norm(dim=0), torch.ones(3), rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.split(old)[1].norm(dim=0), torch.ones(3), rtol=0, atol=1e-12)  # left alone
    idx = layer.active_indices
    torch.testing.assert_close(layer.s[idx], s_before[idx] * 3.0, rtol=1e-12, atol=0)


def test_controller_resvd_preserves_the_function_and_resets_all_slots():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    controller = SSTController({"0": model[0], "2": model[2]}, TorchBackend(opt), seed=0)
    for i in range(3):
        _step(model, opt, i)
    x = torch.randn(4, 8)
    out = model(x).detach()
    controller.resvd(iteration=4)
    torch.testing.assert_close(model(x).detach(), out, rtol=0, atol=1e-10)
    for layer in (model[0], model[2]):
        assert torch.all(layer.s[:-1] >= layer.s[1:])  # a fresh SVD: sorted spectrum
        _, u_state, vh_state = layer.split(opt.state[layer.spectral]["exp_avg"])
        assert torch.count_nonzero(u_state) == 0 and torch.count_nonzero(vh_state) == 0


def test_the_materialized_path_forms_w_once_per_step_and_sums_g_over_micro_batches(monkeypatch):
    """The materialized path forms W once per optimizer step (not per micro-batch, not again in
    the backward) and returns the factor gradients once, at the step's last micro-batch, from G
    summed over all of them: the same gradients as the dense path, across optimizer steps that
    write through `.data` as engines do (no version bump), a resample and a re-SVD."""
    import sst_dist.sst as sst

    formed = []
    real = sst.spectral_weight
    monkeypatch.setattr(sst, "spectral_weight", lambda *a: formed.append(1) or real(*a))
    models = [_model(path=path) for path in ("dense", "materialized")]
    controllers = [SSTController({"0": m[0], "2": m[2]}, TorchBackend(), seed=0) for m in models]
    g = torch.Generator().manual_seed(7)
    for step in range(6):
        if step == 2:
            for c in controllers:
                c.resample(1)
        if step == 4:
            for c in controllers:
                c.resvd(2)
        micro_batches = [torch.randn(5, 8, generator=g) for _ in range(3)]
        counts, outs = [], []
        for model in models:
            formed.clear()
            outs.append([])
            for i, x in enumerate(micro_batches):  # gradient accumulation
                for layer in (model[0], model[2]):  # the hook the trainer calls through the method
                    layer.before_micro_batch(last=i == len(micro_batches) - 1)
                out = model(x)
                out.pow(2).mean().backward()
                outs[-1].append(out.detach())
                if i < len(micro_batches) - 1 and model is models[1]:  # held: zero so far
                    assert not model[0].spectral.grad.any() and not model[2].spectral.grad.any()
            counts.append(len(formed))
        # dense: in each forward and in the second layer's backward (the first needs no input
        # gradient) | materialized: once per layer per step
        assert counts == [3 * 3, 2], counts
        for plain, kept in zip(*outs):
            torch.testing.assert_close(kept, plain, rtol=0, atol=1e-12)
        for p, q in zip(models[0].parameters(), models[1].parameters()):
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12)
        assert models[1][0].gradient_sum is None  # released with the last micro-batch
        assert models[1][0]._kept is None and models[1][2]._kept is None  # so is W, before the step
        for model, controller in zip(models, controllers):
            for p in model.parameters():
                if p.grad is not None:  # an engine's step: its updated copy lands through .data
                    p.data.add_(p.grad, alpha=-0.2)
                    p.grad = None
            controller.post_step()

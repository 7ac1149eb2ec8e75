"""Sparse Spectral Training (Zhao et al., ICML 2025): every formula of the method, nothing else.

A targeted linear layer keeps its weight as a full SVD, W = U diag(s) Vh with k = min(out, in).
All k singular values train; r active singular vectors (columns U[:, S], rows Vh[S, :]) train as
the fixed-shape parameters `u_active` (out x r) and `vh_active` (r x in); U and Vh are frozen, one
non-trainable parameter. See docs/design.md §1.

Plain tensor functions, the autograd function and the layer; no distributed code. The periodic
work that applies these formulas to every layer through an engine (resample, re-SVD, the per-step
clamp and renormalisation) is sst_dist.sst_controller.
"""

from __future__ import annotations

import functools
import math
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sst_dist.config import SST_PATHS as PATHS
from sst_dist.layouts import pack, pack_older, qualified, upgrade_on_load
from sst_dist.precision import autocast_backward, autocast_forward
from sst_dist.spectral_init import init_factors, init_generator
from sst_dist.surgery import swap_modules, target_linears


# ----------------------------------------------------------------------------- tensor math

def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64 (tests), else float32: SVD and sampling never run in bf16."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def merged_factors(U, Vh, u_active, vh_active, idx):
    """Copies of U (out, k), Vh (k, in) with the active columns / rows (idx: r) replaced by the
    trained ones: what sync_active does in place, for callers that must not write the originals."""
    U, Vh = U.clone(), Vh.clone()
    sync_active(U, Vh, u_active, vh_active, idx)
    return U, Vh


def dense_from_factors(U, s, Vh):
    """W = U diag(s) Vh: (out, k), (k,), (k, in) -> (out, in); s scales the smaller factor."""
    if U.shape[0] <= Vh.shape[1]:
        return (U * s) @ Vh
    return U @ (s[:, None] * Vh)


def sync_active(U, Vh, u_active, vh_active, idx):
    """Writes the trained active vectors over their frozen copies, in place: U[:, idx] = u_active,
    Vh[idx] = vh_active. Those copies are stale and read nowhere else (a resample or re-SVD merges
    the trained vectors in anyway), so afterwards U and Vh are the layer's effective factors."""
    idx = idx.to(U.device)
    U.index_copy_(1, idx, u_active.to(U.dtype))
    Vh.index_copy_(0, idx, vh_active.to(Vh.dtype))


def spectral_weight(U, Vh, s, u_active, vh_active, idx):
    """The layer's W = U_eff diag(s) Vh_eff, as one k-deep GEMM on U and Vh synced in place
    (sync_active): no copy of U or Vh, no separate product for the active part."""
    sync_active(U, Vh, u_active, vh_active, idx)
    return dense_from_factors(U, s, Vh)


def sampling_probabilities(s: torch.Tensor, uniform_mix: bool = False) -> torch.Tensor:
    """p_i ~ sigma_i (docs/design.md §1), optionally mixed half-and-half with uniform. s: (k,) -> (k,)."""
    weights = s.detach().double().clamp_min(0)
    k = weights.numel()
    total = weights.sum()
    p = weights / total if total > 0 else torch.full_like(weights, 1.0 / k)
    if uniform_mix:
        p = 0.5 * (p + 1.0 / k)
    # multinomial without replacement needs r positive entries; a floor far below any real sigma
    # keeps zeroed singular values drawable last rather than failing the draw
    return (p + 1e-30).clamp_min(1e-30)


def sample_active(s: torch.Tensor, rank: int, generator: torch.Generator | None = None,
                  uniform_mix: bool = False) -> torch.Tensor:
    """Draws r distinct indices from p_i ~ sigma_i, without replacement. Returns LongTensor (r,)."""
    p = sampling_probabilities(s, uniform_mix)
    return torch.multinomial(p, rank, replacement=False, generator=generator)


def assign_slots(old_idx: torch.Tensor | None, drawn: torch.Tensor):
    """Places a new draw into the r slots of u_active / vh_active.

    An index drawn again keeps its slot (its vectors and optimizer moments carry on); new indices
    fill the freed slots in draw order. Returns (new_idx (r,), reset_slots (n,)): the slots whose
    vectors changed, whose optimizer state must be reset.
    """
    if old_idx is None:
        return drawn.clone(), torch.arange(drawn.numel())
    old_idx = old_idx.to(drawn.device)
    keep = torch.isin(old_idx, drawn)
    fresh = drawn[~torch.isin(drawn, old_idx)]
    new_idx = old_idx.clone()
    new_idx[~keep] = fresh
    return new_idx, (~keep).nonzero().flatten()


def layer_generator(seed: int, layer_index: int, iteration: int) -> torch.Generator:
    """The sampling RNG of one layer at one iteration: a pure function of its coordinates, so any
    rank can draw it, the draw does not depend on the world size, and a resumed run needs no
    saved RNG state."""
    state = np.random.SeedSequence([seed, layer_index, iteration]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


# ----------------------------------------------------------------------------- autograd

def _sum_product(total, a, b):
    """total + a @ b in float32 at least (bf16 inputs: one GEMM with a float32 result on CUDA).
    total None: a @ b alone."""
    b = b.to(a.dtype)  # under autocast the saved input and the incoming gradient may differ
    dtype = torch.promote_types(a.dtype, torch.float32)
    if a.dtype == dtype:
        return a @ b if total is None else total.addmm_(a, b)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=dtype) if total is None else \
            torch.addmm(total, a, b, out_dtype=dtype, out=total)
    return (a @ b).to(dtype) if total is None else total.add_(a @ b)


class _SSTMatmul(torch.autograd.Function):
    """y = x Wᵀ + bias with W = U_eff diag(s) Vh_eff, and SST's enhanced gradient.

    ∂L/∂s_i = u_iᵀ G v_i as usual, but the active vectors get G v_i and Gᵀ u_i (no σ_i factor),
    computed here rather than by dividing the exact gradient by σ_i, which can be 0. G = gyᵀ x.
    The frozen factors (U, Vh) get no gradient.

    `layer` (materialized path): its W, formed once per step, and its sum of G over the step's
    micro-batches: while it holds its gradient, G is added to the sum and the factor gradients
    are zero; the step's last micro-batch returns them from the whole sum (they are linear in G).
    """

    @staticmethod
    @autocast_forward
    def forward(ctx, x, factors, spectral, idx, bias, path, layer):
        # the bias goes into the last GEMM's epilogue (F.linear), as nn.Linear's does
        U, Vh = layer.split_factors(factors)
        if path == "factored":
            s, u_active, vh_active = layer.split(spectral)
            sync_active(U, Vh, u_active, vh_active, idx)
            h = x @ Vh.T  # (..., k)
            y = F.linear(h * s, U, bias)
            ctx.save_for_backward(x, spectral, idx, h)
        else:
            kept = layer.kept_weight() if path == "materialized" else None
            weight = kept if kept is not None else spectral_weight(U, Vh, *layer.split(spectral), idx)
            y = F.linear(x, weight, bias)
            # the dense path forms W again in the backward rather than holding it
            ctx.save_for_backward(x, spectral, idx, kept)
        # the factors by reference, not saved: sync_active writes their active columns / rows in
        # place, which would fail the saved-tensor version check of an earlier forward through
        # this layer whose backward has not run yet (a layer used twice before one backward). The
        # parameter itself, split again in the backward: an engine may have gathered it anew
        ctx.frozen, ctx.path, ctx.layer = factors, path, layer
        return y

    @staticmethod
    @autocast_backward
    def backward(ctx, gy):
        x, spectral, idx, extra = ctx.saved_tensors
        layer = ctx.layer
        U, Vh = layer.split_factors(ctx.frozen)
        s, u_active, vh_active = layer.split(spectral)
        x2 = x.reshape(-1, x.shape[-1])
        g2 = gy.reshape(-1, gy.shape[-1])
        grad_x = grad_s = grad_u = grad_vh = grad_bias = None
        if ctx.needs_input_grad[4]:
            grad_bias = g2.sum(0)
        if ctx.path == "factored":
            sync_active(U, Vh, u_active, vh_active, idx)
            h2 = extra.reshape(-1, extra.shape[-1])
            gh = g2 @ U  # (T, k): column i is gy · u_i
            if ctx.needs_input_grad[0]:
                grad_x = (gh * s).reshape(*gy.shape[:-1], -1) @ Vh
            grad_s = (gh * h2).sum(0)
            grad_u = g2.T @ h2[:, idx]
            grad_vh = gh[:, idx].T @ x2
            return grad_x, None, layer.pack(grad_s, grad_u, grad_vh), None, grad_bias, None, None
        synced = False  # whether U, Vh hold the trained active vectors (spectral_weight writes them in)
        if ctx.needs_input_grad[0]:
            synced = extra is None
            weight = extra if extra is not None else spectral_weight(U, Vh, s, u_active, vh_active, idx)
            grad_x = gy @ weight
        if ctx.path == "materialized" and not layer.holds_gradient:
            layer._kept = None  # the step's last use of W: the optimizer step runs without it
        if ctx.path == "materialized" and (layer.holds_gradient or layer.gradient_sum is not None):
            layer.gradient_sum = _sum_product(layer.gradient_sum, g2.T, x2)
            if layer.holds_gradient:  # zeros, not None: engines' gradient hooks expect a tensor
                return grad_x, None, torch.zeros_like(spectral), None, grad_bias, None, None
            G = layer.gradient_sum.to(x2.dtype)
            layer.gradient_sum = None
        else:
            G = g2.T @ x2  # (out, in): the dense weight gradient
        if not synced:  # an engine may have gathered U and Vh anew since the forward
            sync_active(U, Vh, u_active, vh_active, idx)
        grads = factor_gradients(G, U, Vh, u_active, vh_active, idx.to(G.device))
        return grad_x, None, layer.pack(*grads), None, grad_bias, None, None


def factor_gradients(G, U, Vh, u_active, vh_active, idx):
    """SST's gradients from the dense weight gradient G (out, in), given the effective factors
    (U, Vh with the trained active vectors in): every σ_i's u_iᵀ G v_i and, at the active indices,
    G v_i and Gᵀ u_i. One k-deep product on the smaller side gives σ's gradient and one of the two
    vector gradients. Returns (grad_s (k,), grad_u (out, r), grad_vh (r, in))."""
    if U.shape[0] >= Vh.shape[1]:
        P = U.T @ G  # (k, in): row i is Gᵀ u_i
        return (P * Vh).sum(1), G @ vh_active.T, P[idx]  # G @ vh_activeᵀ: column i is G v_i
    Q = G @ Vh.T  # (out, k): column i is G v_i
    return (U * Q).sum(0), Q[:, idx], u_active.T @ G  # u_activeᵀ G: row i is Gᵀ u_i


class _SpectralWeight(torch.autograd.Function):
    """The "functional" path's W = U_eff diag(s) Vh_eff, with SST's enhanced gradient
    (factor_gradients of the dense gradient autograd brings back to W).

    A pure function of its tensors: no layer state, and U, Vh (of `factors`) are copied with the
    active vectors in rather than synced in place, so torch.compile traces it, and the F.linear after it, into
    the graph of the block it sits in (model.compile), where the other paths stay eager. `dtype`:
    what W is formed in (the autocast dtype, or the trainables' own); `shape`: (out, rank, in).
    """

    @staticmethod
    def forward(ctx, factors, spectral, idx, dtype, shape):
        ctx.save_for_backward(factors, spectral, idx)
        ctx.shape = shape
        U, Vh, s, _, _ = _effective_factors(factors, spectral, idx, shape, dtype)
        return dense_from_factors(U, s, Vh)

    @staticmethod
    def backward(ctx, G):
        factors, spectral, idx = ctx.saved_tensors
        U, Vh, _, u_active, vh_active = _effective_factors(factors, spectral, idx, ctx.shape, G.dtype)
        grad_s, grad_u, grad_vh = factor_gradients(G, U, Vh, u_active, vh_active, idx)
        return None, pack_spectral(grad_s.to(spectral.dtype), grad_u, grad_vh), None, None, None


def spectral_linear(x, factors, spectral, idx, bias, dtype, shape):
    """The functional path's layer: F.linear with W formed by _SpectralWeight. A pure function of its
    tensors, which torch.compile traces alone where a whole block cannot be compiled (under ZeRO-3,
    whose per-module hooks a block's graph would hold: SSTLinear.compile_alone)."""
    return F.linear(x, _SpectralWeight.apply(factors, spectral, idx, dtype, shape), bias)


@functools.cache
def compiled_spectral_linear():
    """One compiled function for every layer, so its graphs (one per weight shape and grad mode) are shared."""
    return torch.compile(spectral_linear, dynamic=False)


def split_spectral(packed: torch.Tensor, out: int, rank: int, inp: int):
    """Views (s (k,), u_active (out, r), vh_active (r, in)) of a flat tensor in SSTLinear.spectral's
    layout: s, then u_active and vh_active row-major."""
    k, u = min(out, inp), out * rank
    return packed[:k], packed[k:k + u].view(out, rank), packed[k + u:k + u + rank * inp].view(rank, inp)


def pack_spectral(s, u_active, vh_active) -> torch.Tensor:
    """The inverse of split_spectral: one flat tensor in s's dtype."""
    return torch.cat([s.reshape(-1), u_active.reshape(-1).to(s.dtype), vh_active.reshape(-1).to(s.dtype)])


def split_factors(packed: torch.Tensor, out: int, inp: int):
    """Views (U (out, k), Vh (k, in)) of a flat tensor in SSTLinear.factors' layout: U, then Vh,
    row-major; k = min(out, in)."""
    k = min(out, inp)
    return packed[:out * k].view(out, k), packed[out * k:out * k + k * inp].view(k, inp)


def pack_factors(U, Vh) -> torch.Tensor:
    """The inverse of split_factors: one flat tensor in U's dtype (the layout older U and Vh are
    packed into on load)."""
    return pack((U, Vh))


def _effective_factors(factors, spectral, idx, shape, dtype):
    """(U_eff, Vh_eff, s, u_active, vh_active) in `dtype`, out of place: copies of U and Vh (of the
    packed `factors`) with the active vectors of the packed `spectral` at `idx`. shape: (out, rank, in)."""
    U, Vh = split_factors(factors, shape[0], shape[2])
    s, u_active, vh_active = split_spectral(spectral.to(dtype), *shape)
    U = U.to(dtype).index_copy(1, idx, u_active)
    Vh = Vh.to(dtype).index_copy(0, idx, vh_active)
    return U, Vh, s, u_active, vh_active


# ----------------------------------------------------------------------------- the layer

def kept_count(fraction: float, k: int) -> int:
    """Singular values kept of k at fraction F: ceil(F·k), at least 1 (F·k rounded to 6 decimals
    first, so that 0.1 · 30 keeps 3, not 4)."""
    return max(1, math.ceil(round(fraction * k, 6)))


class SSTLinear(nn.Module):
    """A linear layer trained in its spectral form. Parameters:

    factors (out·k + k·in,): frozen (requires_grad=False) so an engine shards it like any weight.
    It packs U (out, k) and Vh (k, in), which are views of it (the properties U and Vh, of
    whatever tensor the parameter is at the time: FSDP2's unsharded one, ZeRO-3's gathered one).
    Their columns / rows at the active indices are overwritten with the trained vectors whenever
    the layer computes (sync_active), so they never go stale where read.
    spectral (k + out·r + r·in,), bias (out,): trainable. `spectral` packs s (k,), u_active
    (out, r) and vh_active (r, in), which are views of it.
    Packed, the layer holds three parameters where it would hold six: an engine's per-tensor work
    (FSDP2's copy-in and cast at each unshard, ZeRO-3's fetch and release per module, gradient
    hooks, overflow checks, norms) costs time per tensor whatever its size.
    A state dict of the older layout (prefix.U, prefix.Vh) loads: they are packed on load, as
    `older_layout` declares (sst_dist.layouts, which the engines' checkpoint loads use too).
    Buffer active_indices (r,): which singular indices the active slots hold.

    How it computes (`path`, docs/design.md §4): "dense" forms W in each forward and again in the
    backward, holding nothing extra; "materialized" forms W once per optimizer step and keeps it
    (one W per layer), and sums G over the step's micro-batches (one float32 G per layer while
    `holds_gradient`), so the factor gradients are taken once per step; "factored" never forms W;
    "functional" forms W in each forward with a pure function (no state, no in-place sync), which
    autograd keeps for the backward as it keeps nn.Linear's weight (+1 W per layer until then), so
    that torch.compile traces the layer with its block (model.compile).
    """

    older_layout = {"factors": ("U", "Vh")}  # sst_dist.layouts: factors = U ‖ Vh, row-major
    compute = staticmethod(spectral_linear)  # the functional path's; compile_alone compiles it

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *,
                 path: str = "dense", device=None, dtype=None):
        super().__init__()
        k = min(in_features, out_features)
        if not 0 < rank <= k:
            raise ValueError(f"rank must be in 1..{k} for a {out_features}x{in_features} layer, got {rank}")
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        factory = dict(device=device, dtype=dtype)
        self.in_features, self.out_features, self.rank, self.path = in_features, out_features, rank, path
        self.k = k
        self._sizes = (k, out_features * rank, rank * in_features)  # of s, u_active, vh_active
        self._kept: tuple | None = None  # materialized: (what W was formed from, W)
        self.holds_gradient = False  # materialized: a micro-batch before the step's last
        self.gradient_sum: torch.Tensor | None = None  # materialized: G summed over micro-batches
        self.factors_numel = out_features * k + k * in_features  # of U ‖ Vh
        self.factors = nn.Parameter(torch.empty(self.factors_numel, **factory), requires_grad=False)
        self.spectral = nn.Parameter(torch.empty(k + out_features * rank + rank * in_features, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        self.register_buffer("active_indices", torch.arange(rank, device=device))
        self.register_load_state_dict_pre_hook(upgrade_on_load)

    @staticmethod
    def owns_state(prefix: str, state: dict) -> bool:
        """Whether `prefix` in a checkpoint's state dict is an SSTLinear (export)."""
        return f"{prefix}.spectral" in state

    @staticmethod
    def dense_from_state(prefix: str, state: dict, recipe, keep_singular: float | None = None):
        """Export: the layer's entries popped from `state` (either layout, older_layout), merged
        into U diag(s) Vh (float64), its ceil(F·k) largest singular values kept at keep_singular F;
        (weight, (k, kept, (out, in)))."""
        from sst_dist.models import target_shapes

        pack_older(state, qualified(SSTLinear.older_layout, prefix))
        idx = state.pop(f"{prefix}.active_indices").long()
        # the flat factors keep no shape: the layer's is its model's (a target's (out, in))
        out, inp = target_shapes(recipe.model.size)[prefix.rsplit(".", 1)[-1]]
        k = min(out, inp)
        U, Vh = split_factors(state.pop(f"{prefix}.{FROZEN}").double(), out, inp)
        s, u_active, vh_active = split_spectral(state.pop(f"{prefix}.spectral").double(), out, idx.numel(), inp)
        U, Vh = merged_factors(U, Vh, u_active, vh_active, idx)
        n = k if keep_singular is None else kept_count(keep_singular, k)
        if n < k:
            keep = torch.topk(s.abs(), n).indices.sort().values
            U, s, Vh = U[:, keep], s[keep], Vh[keep]
        return dense_from_factors(U, s, Vh), (k, n, (out, inp))

    def meta_draw(self, m) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """model.build meta (build.Materializer `m`): U, s, Vh drawn on the device, in their
        storage dtypes; on the layer's owner rank only."""
        # float32 at least for the QR / SVD, whatever the storage
        work = torch.float64 if m.dtype == torch.float64 else torch.float32
        U, s, Vh = init_factors(self.out_features, self.in_features, m.std,
                                init_generator(m.seed, m.index(self), m.device), m.init, device=m.device, dtype=work)
        return U.to(m.frozen_dtype), s.to(m.dtype), Vh.to(m.frozen_dtype)

    def meta_init(self, m, name: str, drawn) -> None:
        """model.build meta: the factors `drawn` (meta_draw's, None where another rank drew them)
        shared over the ranks, the active slots sampled as apply_sst samples them."""
        if drawn is None:
            shapes = [(self.out_features, self.k), (self.k,), (self.k, self.in_features)]
            dtypes = [m.frozen_dtype, m.dtype, m.frozen_dtype]
            drawn = [torch.empty(shape, device=m.device, dtype=dt) for shape, dt in zip(shapes, dtypes)]
        U, s, Vh = m.share(self, drawn)
        idx = sample_active(s.cpu(), self.rank, layer_generator(m.seed, m.index(self), 0), m.uniform_mix)
        spectral = self.pack(s.to(m.dtype), U[:, idx.to(U.device)].to(m.dtype), Vh[idx.to(Vh.device)].to(m.dtype))
        m.swap_in(self.factors, pack_factors(U, Vh))
        m.swap_in(self.spectral, spectral)
        self.active_indices = idx.to(m.device)
        m.fill(self, "bias", 0.0)

    def regions(self) -> tuple[tuple[int, int], ...]:
        """(offset, numel) of s, u_active and vh_active in `spectral`."""
        k, u, v = self._sizes
        return (0, k), (k, u), (k + u, v)

    def split(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views (s, u_active, vh_active) of a tensor laid out as `spectral` (its value, a read of
        it, its gradient or optimizer state)."""
        return split_spectral(packed, self.out_features, self.rank, self.in_features)

    def pack(self, s, u_active, vh_active) -> torch.Tensor:
        """The inverse of split: one flat tensor in s's dtype."""
        return pack_spectral(s, u_active, vh_active)

    def split_factors(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (U, Vh) of a tensor laid out as `factors` (its value, or a read of it)."""
        return split_factors(packed, self.out_features, self.in_features)

    def pack_factors(self, U, Vh) -> torch.Tensor:
        """The inverse of split_factors: one flat tensor in U's dtype."""
        return pack_factors(U, Vh)

    def slot_elements(self, slots: torch.Tensor) -> torch.Tensor:
        """Where the active slots `slots` live in `spectral`: u_active's columns and vh_active's
        rows, as flat indices (what an optimizer-state reset of those slots zeroes)."""
        (_, _), (a, _), (b, _) = self.regions()
        slots = slots.to(torch.long)  # made where the slots are: no copy for a reset on the device
        columns = a + torch.arange(self.out_features, device=slots.device)[:, None] * self.rank + slots[None, :]
        rows = b + slots[:, None] * self.in_features + torch.arange(self.in_features, device=slots.device)[None, :]
        return torch.cat([columns.reshape(-1), rows.reshape(-1)])

    @property
    def U(self) -> torch.Tensor:
        """(out, k), a view of `factors`: writes land in it."""
        return self.split_factors(self.factors)[0]

    @property
    def Vh(self) -> torch.Tensor:
        """(k, in), a view of `factors`: writes land in it."""
        return self.split_factors(self.factors)[1]

    @property
    def s(self) -> torch.Tensor:
        return self.split(self.spectral)[0]

    @property
    def u_active(self) -> torch.Tensor:
        return self.split(self.spectral)[1]

    @property
    def vh_active(self) -> torch.Tensor:
        return self.split(self.spectral)[2]

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, rank: int, generator: torch.Generator | None = None,
                    path: str = "dense", uniform_mix: bool = False, factors=None) -> "SSTLinear":
        """The same function as `linear`, as a full SVD with r active vectors drawn from p ~ σ.
        `factors` (U, s, Vh): a fresh layer's own (sst_dist.spectral_init), in place of the SVD of
        `linear`'s weight, which they then replace. A linear on the meta device gives a layer on
        the meta device, to be materialised as its factors (sst_dist.build)."""
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, rank, linear.bias is not None,
                    path=path, device=weight.device, dtype=weight.dtype)
        if weight.is_meta:
            return layer
        if factors is None:
            factors = torch.linalg.svd(weight.to(compute_dtype(weight)), full_matrices=False)
        U, s, Vh = factors
        layer.load_factors(U, s, Vh, sample_active(s.cpu(), rank, generator, uniform_mix))
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
        return layer

    @torch.no_grad()
    def load_factors(self, U, s, Vh, idx):
        """Sets the whole spectral state from a factorisation and an active set (plain tensors)."""
        idx = idx.to(self.active_indices.device)
        self.U.copy_(U)  # views of `factors`
        self.Vh.copy_(Vh)
        self.s.copy_(s)
        self.active_indices.copy_(idx)
        self.u_active.copy_(U[:, idx.to(U.device)])
        self.vh_active.copy_(Vh[idx.to(Vh.device)])

    @property
    def traceable(self) -> bool:
        """Whether torch.compile can trace this layer into its block's graph (sst_dist.models.compile_blocks)."""
        return self.path == "functional"

    def compile_alone(self) -> bool:
        """torch.compile of this layer's computation alone, not its module call, so the engine's
        per-module hooks stay outside the graph (sst_dist.models.compile_layers). Only the
        functional path is a pure function; returns whether the layer was compiled."""
        if not self.traceable:
            return False
        self.compute = compiled_spectral_linear()
        return True

    def forward(self, x):
        if self.path == "functional":
            device = x.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.spectral.dtype
            return self.compute(x, self.factors, self.spectral, self.active_indices, self.bias, dtype,
                                (self.out_features, self.rank, self.in_features))
        return _SSTMatmul.apply(x, self.factors, self.spectral, self.active_indices, self.bias, self.path, self)

    def _factors(self) -> tuple:
        return *self.split_factors(self.factors), *self.split(self.spectral), self.active_indices

    @torch.no_grad()
    def kept_weight(self) -> torch.Tensor:
        # storage and version of every factor: an in-place update or a new tensor forms W again.
        # Engines that write through `.data` bump no version; SSTController drops W after them.
        if self._kept is None or self._kept[0] != self._weight_key():
            self._kept = None  # the old W goes before the new one is formed
            weight = spectral_weight(*self._factors())
            self._kept = (self._weight_key(), weight)  # after the sync's own writes to U and Vh
        return self._kept[1]

    def _weight_key(self) -> tuple:
        return tuple((t.data_ptr(), t._version) for t in (self.factors, self.spectral, self.active_indices))

    def drop_kept_weight(self) -> None:
        """At a step boundary (the factors are about to change or just did)."""
        self._kept = None
        self.gradient_sum = None

    def before_micro_batch(self, last: bool) -> None:
        """Told before each micro-batch whether it is the step's last. The materialized path sums
        G over the step's micro-batches and takes the factor gradients at the last one, so all
        earlier ones hold their gradient; the other paths need nothing."""
        if self.path == "materialized":
            self.holds_gradient = not last

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        return spectral_weight(*self._factors())

    def footprint(self) -> dict:
        """What sst_dist.memory counts beyond the parameters: x·Vhᵀ kept for the backward (factored);
        W kept through the step (materialized) or by autograd to the backward (functional); one W
        formed while it computes (dense, functional); `spectral`, which its own function reads as
        stored (autocast keeps no bf16 copy of it)."""
        dense = self.out_features * self.in_features
        return {"saved_width": self.k if self.path == "factored" else 0,
                "kept_weight": dense if self.path in ("materialized", "functional") else 0,
                "formed_weight": dense if self.path in ("dense", "functional") else 0,
                "uncast": self.spectral.numel()}

    def sst_parameters(self) -> list[nn.Parameter]:
        """The parameters trained at the low-rank learning rate (bias is full-rank)."""
        return [self.spectral]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, "
                f"rank={self.rank}, path={self.path}")


FROZEN = "factors"  # SSTLinear's frozen parameter, U ‖ Vh flattened


def resvd_factors(U, Vh, s, u_active, vh_active, idx):
    """A fresh SVD of the layer's current W, in float32 (float64 if the inputs are)."""
    dtype = compute_dtype(U, s, u_active)
    W = spectral_weight(U.to(dtype), Vh.to(dtype), s.to(dtype), u_active.to(dtype), vh_active.to(dtype), idx)
    return torch.linalg.svd(W, full_matrices=False)


# ----------------------------------------------------------------------------- model level

def apply_sst(model: nn.Module, rank: int, targets: Iterable[str], *, seed: int = 0,
              path: str = "dense", uniform_mix: bool = False, init: str = "svd",
              init_std: float = 0.02, frozen_dtype: torch.dtype | None = None) -> dict[str, SSTLinear]:
    """Replaces every nn.Linear whose attribute name is in `targets` by an SSTLinear.

    init (sst.init): svd, the SVD of each linear's weight; haar / auto, fresh factors of an
    N(0, init_std²) W0 drawn directly where sst_dist.spectral_init says so (the weight is dropped).
    frozen_dtype: the storage of U and Vh, `factors` (model.frozen_dtype). A model on the meta
    device gets layers on the meta device (sst_dist.build materialises them).
    Returns the new layers by qualified name, in model order (their index is their owner key).
    """
    from sst_dist.spectral_init import init_generator, uses_haar, haar_factors

    def make(index: int, linear: nn.Linear) -> SSTLinear:
        weight, factors = linear.weight, None
        if not weight.is_meta and uses_haar(init, min(weight.shape)):
            factors = haar_factors(*weight.shape, init_std, init_generator(seed, index, weight.device),
                                   device=weight.device, dtype=compute_dtype(weight))
        return SSTLinear.from_linear(linear, rank, layer_generator(seed, index, 0), path, uniform_mix, factors)

    return swap_modules(model, target_linears(model, targets), make, frozen_dtype)


__all__ = ["SSTLinear", "apply_sst", "sample_active", "assign_slots", "layer_generator",
           "resvd_factors", "merged_factors", "dense_from_factors", "spectral_weight", "sync_active",
           "sampling_probabilities", "compute_dtype", "split_factors", "pack_factors",
           "FROZEN"]

"""Sparse Spectral Training (Zhao et al., ICML 2025): every formula of the method, nothing else.

A targeted linear layer keeps its weight as a full SVD, W = U diag(s) Vh with k = min(out, in).
All k singular values train; r active singular vectors (columns U[:, S], rows Vh[S, :]) train as
the fixed-shape parameters `u_active` (out x r) and `vh_active` (r x in); the rest of U and Vh are
frozen, non-trainable parameters. See docs/design.md §1.

Engine-facing work (resample, re-SVD, the per-step clamp and renormalisation) goes through the
seam in `sst_dist.engines.base.Backend`, so the same code is right under ZeRO and FSDP.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sst_dist.config import SST_PATHS as PATHS
from sst_dist.engines.base import Shard
from sst_dist.precision import autocast_backward, autocast_forward


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


def renormalized(s, u_active, vh_active, idx):
    """Active u_i, v_i scaled back to unit length, their norms folded into s_i so W is unchanged.

    s (k,), u_active (out, r), vh_active (r, in). Returns the three new tensors.
    """
    u_norm = u_active.norm(dim=0).clamp_min(torch.finfo(u_active.dtype).tiny)
    v_norm = vh_active.norm(dim=1).clamp_min(torch.finfo(vh_active.dtype).tiny)
    s = s.clone()
    s[idx] = s[idx] * (u_norm * v_norm).to(s.dtype)
    return s, u_active / u_norm, vh_active / v_norm[:, None]


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
    The frozen U, Vh get no gradient.

    `layer` (materialized path): its W, formed once per step, and its sum of G over the step's
    micro-batches: while it holds its gradient, G is added to the sum and the factor gradients
    are zero; the step's last micro-batch returns them from the whole sum (they are linear in G).
    """

    @staticmethod
    @autocast_forward
    def forward(ctx, x, U, Vh, spectral, idx, bias, path, layer):
        # the bias goes into the last GEMM's epilogue (F.linear), as nn.Linear's does
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
        # U and Vh by reference, not saved: sync_active writes their active columns / rows in
        # place, which would fail the saved-tensor version check of an earlier forward through
        # this layer whose backward has not run yet (a layer used twice before one backward)
        ctx.frozen, ctx.path, ctx.layer = (U, Vh), path, layer
        return y

    @staticmethod
    @autocast_backward
    def backward(ctx, gy):
        x, spectral, idx, extra = ctx.saved_tensors
        U, Vh = ctx.frozen
        layer = ctx.layer
        s, u_active, vh_active = layer.split(spectral)
        x2 = x.reshape(-1, x.shape[-1])
        g2 = gy.reshape(-1, gy.shape[-1])
        grad_x = grad_s = grad_u = grad_vh = grad_bias = None
        if ctx.needs_input_grad[5]:
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
            return grad_x, None, None, layer.pack(grad_s, grad_u, grad_vh), None, grad_bias, None, None
        if ctx.needs_input_grad[0]:
            weight = extra if extra is not None else spectral_weight(U, Vh, s, u_active, vh_active, idx)
            grad_x = gy @ weight
        if ctx.path == "materialized" and not layer.holds_gradient:
            layer._kept = None  # the step's last use of W: the optimizer step runs without it
        if ctx.path == "materialized" and (layer.holds_gradient or layer.gradient_sum is not None):
            layer.gradient_sum = _sum_product(layer.gradient_sum, g2.T, x2)
            if layer.holds_gradient:  # zeros, not None: engines' gradient hooks expect a tensor
                return grad_x, None, None, torch.zeros_like(spectral), None, grad_bias, None, None
            G = layer.gradient_sum.to(x2.dtype)
            layer.gradient_sum = None
        else:
            G = g2.T @ x2  # (out, in): the dense weight gradient
        # U and Vh hold the trained active vectors (an engine may have gathered them anew since
        # the forward), so one k-deep product on the smaller side gives every σ_i's gradient
        # u_iᵀ G v_i and, at the active indices, one of the two vector gradients
        sync_active(U, Vh, u_active, vh_active, idx)
        idx = idx.to(G.device)
        if U.shape[0] >= Vh.shape[1]:
            P = U.T @ G  # (k, in): row i is Gᵀ u_i
            grad_s = (P * Vh).sum(1)
            grad_vh = P[idx]
            grad_u = G @ vh_active.T  # (out, r): column i is G v_i
        else:
            Q = G @ Vh.T  # (out, k): column i is G v_i
            grad_s = (U * Q).sum(0)
            grad_u = Q[:, idx]
            grad_vh = u_active.T @ G  # (r, in): row i is Gᵀ u_i
        return grad_x, None, None, layer.pack(grad_s, grad_u, grad_vh), None, grad_bias, None, None


# ----------------------------------------------------------------------------- the layer

class SSTLinear(nn.Module):
    """A linear layer trained in its spectral form. Parameters:

    U (out, k), Vh (k, in): frozen (requires_grad=False) so an engine shards them like any weight;
    their columns / rows at the active indices are overwritten with the trained vectors whenever
    the layer computes (sync_active), so they never go stale where read.
    spectral (k + out·r + r·in,), bias (out,): trainable. `spectral` packs s (k,), u_active
    (out, r) and vh_active (r, in), which are views of it: one tensor where there would be three,
    because an engine's per-tensor work (gradient hooks, overflow checks, norms) costs time per
    tensor whatever its size; packed, the layer has nn.Linear's two.
    Buffer active_indices (r,): which singular indices the active slots hold.

    How it computes (`path`, docs/design.md §4): "dense" forms W in each forward and again in the
    backward, holding nothing extra; "materialized" forms W once per optimizer step and keeps it
    (one W per layer), and sums G over the step's micro-batches (one float32 G per layer while
    `holds_gradient`), so the factor gradients are taken once per step; "factored" never forms W.
    """

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
        self.U = nn.Parameter(torch.empty(out_features, k, **factory), requires_grad=False)
        self.Vh = nn.Parameter(torch.empty(k, in_features, **factory), requires_grad=False)
        self.spectral = nn.Parameter(torch.empty(k + out_features * rank + rank * in_features, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        self.register_buffer("active_indices", torch.arange(rank, device=device))

    def regions(self) -> tuple[tuple[int, int], ...]:
        """(offset, numel) of s, u_active and vh_active in `spectral`."""
        k, u, v = self._sizes
        return (0, k), (k, u), (k + u, v)

    def split(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views (s, u_active, vh_active) of a tensor laid out as `spectral` (its value, a read of
        it, its gradient or optimizer state)."""
        k, u, v = self._sizes
        return packed[:k], packed[k:k + u].view(self.out_features, self.rank), \
            packed[k + u:k + u + v].view(self.rank, self.in_features)

    def pack(self, s, u_active, vh_active) -> torch.Tensor:
        """The inverse of split: one flat tensor in s's dtype."""
        return torch.cat([s.reshape(-1), u_active.reshape(-1).to(s.dtype), vh_active.reshape(-1).to(s.dtype)])

    def slot_elements(self, slots: torch.Tensor) -> torch.Tensor:
        """Where the active slots `slots` live in `spectral`: u_active's columns and vh_active's
        rows, as flat indices (what an optimizer-state reset of those slots zeroes)."""
        (_, _), (a, _), (b, _) = self.regions()
        slots = slots.to(torch.long).cpu()
        columns = a + torch.arange(self.out_features)[:, None] * self.rank + slots[None, :]
        rows = b + slots[:, None] * self.in_features + torch.arange(self.in_features)[None, :]
        return torch.cat([columns.reshape(-1), rows.reshape(-1)])

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
        self.U.copy_(U)
        self.Vh.copy_(Vh)
        self.s.copy_(s)
        self.active_indices.copy_(idx)
        self.u_active.copy_(U[:, idx.to(U.device)])
        self.vh_active.copy_(Vh[idx.to(Vh.device)])

    def forward(self, x):
        return _SSTMatmul.apply(x, self.U, self.Vh, self.spectral, self.active_indices, self.bias,
                                self.path, self)

    def _factors(self) -> tuple:
        return self.U, self.Vh, *self.split(self.spectral), self.active_indices

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
        return tuple((t.data_ptr(), t._version) for t in (self.U, self.Vh, self.spectral, self.active_indices))

    def drop_kept_weight(self) -> None:
        """At a step boundary (the factors are about to change or just did)."""
        self._kept = None
        self.gradient_sum = None

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        return spectral_weight(*self._factors())

    def sst_parameters(self) -> list[nn.Parameter]:
        """The parameters trained at the low-rank learning rate (bias is full-rank)."""
        return [self.spectral]

    # The three methods below act on this layer's own tensors, for single-process use. Training
    # under an engine goes through SSTController, which does the same through the seam.
    @torch.no_grad()
    def resample(self, generator: torch.Generator | None = None, uniform_mix: bool = False):
        """Writes the active vectors back and draws a new active set; W is unchanged.
        Returns the slots whose vectors changed (their optimizer state needs a reset)."""
        U, Vh, new_idx, slots = resampled(self.U, self.Vh, self.s, self.u_active, self.vh_active,
                                          self.active_indices, generator, uniform_mix)
        self.U.copy_(U)
        self.Vh.copy_(Vh)
        self.active_indices.copy_(new_idx)
        self.u_active.copy_(U[:, new_idx])
        self.vh_active.copy_(Vh[new_idx])
        return slots

    @torch.no_grad()
    def resvd(self, generator: torch.Generator | None = None, uniform_mix: bool = False):
        """Re-orthogonalises by a fresh SVD of U diag(s) Vh and draws a new active set."""
        U, s, Vh = resvd_factors(self.U, self.Vh, self.s, self.u_active, self.vh_active, self.active_indices)
        self.load_factors(U, s, Vh, sample_active(s.cpu(), self.rank, generator, uniform_mix))

    @torch.no_grad()
    def post_step(self, renormalize: bool = True):
        s = self.s.clamp_min(0)
        if renormalize:
            s, u, vh = renormalized(s, self.u_active, self.vh_active, self.active_indices)
            self.u_active.copy_(u)
            self.vh_active.copy_(vh)
        self.s.copy_(s)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, "
                f"rank={self.rank}, path={self.path}")


def resampled(U, Vh, s, u_active, vh_active, idx, generator=None, uniform_mix=False):
    """Writes u_active / vh_active back into U / Vh and draws the next active set.

    Returns (U, Vh, new_idx, reset_slots); the new active vectors are U[:, new_idx], Vh[new_idx].
    """
    U, Vh = merged_factors(U, Vh, u_active, vh_active, idx)
    drawn = sample_active(s.cpu(), idx.numel(), generator, uniform_mix)
    new_idx, slots = assign_slots(idx.cpu(), drawn)
    return U, Vh, new_idx.to(idx.device), slots


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
    frozen_dtype: the storage of U and Vh (sst.frozen_dtype). A model on the meta device gets
    layers on the meta device (sst_dist.build materialises them).
    Returns the new layers by qualified name, in model order (their index is their owner key).
    """
    from sst_dist.spectral_init import init_generator, uses_haar, haar_factors

    targets = set(targets)
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    layers = {}
    for index, (name, linear) in enumerate(found):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        factors = None
        weight = linear.weight
        if not weight.is_meta and uses_haar(init, min(weight.shape)):
            factors = haar_factors(*weight.shape, init_std, init_generator(seed, index, weight.device),
                                   device=weight.device, dtype=compute_dtype(weight))
        layer = SSTLinear.from_linear(linear, rank, layer_generator(seed, index, 0), path, uniform_mix,
                                      factors)
        if frozen_dtype is not None and not weight.is_meta:
            for frozen in (layer.U, layer.Vh):
                frozen.data = frozen.data.to(frozen_dtype)
        setattr(parent, attr, layer)
        layers[name] = layer
    return layers


def row_pieces(shards, width: int):
    """Each flat shard of a row-major (rows, width) tensor as at most three 2-D views: the rest of
    its first row, its whole rows, the start of its last row. Yields (view, row, column) of each
    view's first element. Views, not copies: writing into them writes the shard."""
    for shard in shards:
        values, n = shard.values, shard.values.numel()
        row, col = divmod(shard.start, width)
        if not col and n % width == 0:  # whole rows only: one view (the common, unsharded case)
            if n:
                yield values.view(n // width, width), row, 0
            continue
        offset = 0
        if col and n:
            head = min(n, width - col)
            yield values[:head].view(1, head), row, col
            offset, row = head, row + 1
        whole = (n - offset) // width
        if whole:
            yield values[offset:offset + whole * width].view(whole, width), row, 0
            offset, row = offset + whole * width, row + whole
        if offset < n:
            yield values[offset:].view(1, n - offset), row, 0


def _signature(shards) -> tuple:
    """What a plan of views depends on: every shard's storage, dtype, size and offset.
    `shards`: backend.shards(p) of each parameter."""
    return tuple((shard.values.data_ptr(), shard.values.dtype, shard.values.numel(), shard.start)
                 for owned_mirrors in shards for group in owned_mirrors for shard in group)


def region(shards, offset: int, numel: int) -> tuple[list[Shard], list[Shard]]:
    """backend.shards(p) cut to the elements [offset, offset + numel) of p, counted from offset:
    the shards of one tensor packed into p (SSTLinear.spectral's s, u_active, vh_active)."""
    def cut(group):
        pieces = []
        for shard in group:
            a = max(offset, shard.start)
            b = min(offset + numel, shard.start + shard.values.numel())
            if a < b:
                pieces.append(Shard(shard.values[a - shard.start:b - shard.start], a - offset))
        return pieces

    owned, mirrors = shards
    return cut(owned), cut(mirrors)


def _extent(view: torch.Tensor) -> int:
    """How many storage elements a view spans, from its first element to its last."""
    return 1 + sum((n - 1) * s for n, s in zip(view.shape, view.stride()))


def strided_runs(pieces):
    """Coalesces views that lie at one stride apart in one storage into one batched view per run.

    pieces: (view, tag, group): equally shaped views of one group (anything hashable) whose tags
    (e.g. layer indices) advance by one step while their storage offsets advance by one stride
    form a run. Yields (batched (n, *shape), first tag, tag step, n, group). Where an engine keeps
    its parameters in one flat buffer, the same layer of every block is one run (tags 6 apart in
    an OPT block of q, k, v, out, fc1, fc2): one kernel where there would be one per layer.
    Views in storages of their own stay runs of one.
    """
    groups: dict[tuple, dict] = {}
    for view, tag, group in pieces:
        key = (view.untyped_storage().data_ptr(), view.dtype, tuple(view.shape), view.stride(), group)
        by_tag = groups.setdefault(key, {})
        if tag in by_tag:  # two pieces of one tag (a layer cut by several shards): no run
            yield view.unsqueeze(0), tag, 1, 1, group
        else:
            by_tag[tag] = view
    for (*_, group), by_tag in groups.items():
        left = sorted(by_tag)
        while left:
            # the longest progression from the first tag left, over every step to another tag
            first, best, step = left[0], [left[0]], 1
            start = by_tag[first].storage_offset()
            for other in left[1:]:
                tag_step, offset_step = other - first, by_tag[other].storage_offset() - start
                if offset_step < _extent(by_tag[first]):  # would overlap (or run backwards)
                    continue
                run = [first]
                while run[-1] + tag_step in by_tag and \
                        by_tag[run[-1] + tag_step].storage_offset() == start + len(run) * offset_step:
                    run.append(run[-1] + tag_step)
                if len(run) > len(best):
                    best, step = run, tag_step
            view = by_tag[first]
            if len(best) == 1:
                yield view.unsqueeze(0), first, 1, 1, group
            else:
                stride = by_tag[best[1]].storage_offset() - start
                whole = view.as_strided((len(best), *view.shape), (stride, *view.stride()), start)
                yield whole, first, step, len(best), group
            for tag in best:  # gone from by_tag too, or a later run's progression could pass over it
                del by_tag[tag]
            left = [tag for tag in left if tag in by_tag]


class _RenormPlan:
    """SSTController.post_step's views and buffers, for one layout of shards.

    Building it walks every shard of s, u_active and vh_active once. The u / vh pieces are
    coalesced into strided runs across layers where the engine's flat buffers allow (see
    strided_runs), so a step costs a few stacked norms, one index_add, one all-reduce and a few
    list ops (torch._foreach_*) per dtype, whatever the number of layers.
    """

    MAX_STACK = 1 << 24  # elements per stacked norm: bounds the float64 copy it makes

    def __init__(self, layers, spectral_shards, device):
        self.signature = _signature(spectral_shards)
        self.device = device
        # per layer: (s, u_active, vh_active) shards, each (owned, mirrors)
        shards = [[region(raw, offset, numel) for offset, numel in layer.regions()]
                  for layer, raw in zip(layers, spectral_shards)]
        n, rank = len(layers), max(layer.rank for layer in layers)
        self.rank = rank
        self.sums = torch.zeros(n * 2 * rank, dtype=torch.float64, device=device)
        self.s_scale = torch.ones(n, max(layer.k for layer in layers), dtype=torch.float64, device=device)
        # per dtype of the tensors written: s copies and their scale spans; u / vh views and
        # their divisors (views of a per-dtype copy of the norms, refreshed each step)
        self.s_lists: dict[torch.dtype, tuple[list, list]] = {}
        self.div_lists: dict[torch.dtype, tuple[list, list]] = {}
        self.scale_cast: dict[torch.dtype, torch.Tensor] = {}
        self.norms_cast: dict[torch.dtype, torch.Tensor] = {}
        pieces, owned_pieces = [], []  # (view, layer index, (kind, first slot, slot count))
        for i, (layer, (s_shards, u_shards, vh_shards)) in enumerate(zip(layers, shards)):
            for shard in s_shards[0] + s_shards[1]:
                values = shard.values
                if values.dtype not in self.scale_cast:  # the same tensor where the dtype matches
                    self.scale_cast[values.dtype] = self.s_scale.to(values.dtype)
                span = self.scale_cast[values.dtype][i, shard.start:shard.start + values.numel()]
                self.s_lists.setdefault(values.dtype, ([], []))[0].append(values)
                self.s_lists[values.dtype][1].append(span)
            for kind, (owned, mirrors), width in ((0, u_shards, layer.rank), (1, vh_shards, layer.in_features)):
                for group, is_owned in ((owned, True), (mirrors, False)):
                    for view, row, col in row_pieces(group, width):
                        # u_active (out, r): a slot per column; vh_active (r, in): a slot per row
                        first, count = (col, view.shape[1]) if kind == 0 else (row, view.shape[0])
                        if view.dtype not in self.norms_cast:
                            self.norms_cast[view.dtype] = torch.empty(n, 2, rank, dtype=view.dtype, device=device)
                        pieces.append((view, i, (kind, first, count)))
                        if is_owned:
                            owned_pieces.append((view, i, (kind, first, count)))
        for views, i, step, m, (kind, first, count) in strided_runs(pieces):
            norms = self.norms_cast[views.dtype][i:i + step * (m - 1) + 1:step, kind, first:first + count]
            lists = self.div_lists.setdefault(views.dtype, ([], []))
            lists[0].append(views)
            lists[1].append(norms[:, None, :] if kind == 0 else norms[:, :, None])
        # owned runs of one shape are concatenated for one norm kernel; the slots follow that order
        by_shape: dict[tuple, list] = {}
        for views, i, step, m, (kind, first, count) in strided_runs(owned_pieces):
            by_shape.setdefault((kind, tuple(views.shape[1:]), views.dtype), []).append((views, i, step, first, count))
        self.norm_groups, slots = [], []
        for (kind, shape, _), runs in by_shape.items():
            per_stack = max(1, self.MAX_STACK // max(1, shape[0] * shape[1]))
            stack, members = [], 0
            for views, i, step, first, count in runs:
                a = 0
                while a < views.shape[0]:
                    b = min(views.shape[0], a + per_stack - members)
                    stack.append(views[a:b])
                    slots += [(i + j * step, kind, first, count) for j in range(a, b)]
                    members, a = members + b - a, b
                    if members == per_stack:
                        self.norm_groups.append((kind, stack))
                        stack, members = [], 0
            if stack:
                self.norm_groups.append((kind, stack))
        flat = [(i * 2 + kind) * rank + first + j for i, kind, first, count in slots for j in range(count)]
        self.slot_index = torch.tensor(flat, dtype=torch.long, device=device)

    def matches(self, shards) -> bool:
        return _signature(shards) == self.signature

    def run(self, layers, backend, renormalize: bool):
        if not renormalize:
            for values, _ in self.s_lists.values():
                torch._foreach_clamp_min_(values, 0.0)
            return
        n, rank = len(layers), self.rank
        sums = self.sums.zero_()
        if self.norm_groups:
            # float64 partial sums: how the elements are split over shards and ranks then changes
            # nothing at float32 precision, so the run does not depend on the world size
            partials = [torch.linalg.vector_norm(stack[0] if len(stack) == 1 else torch.cat(stack),
                                                 dim=kind + 1, dtype=torch.float64).flatten()
                        for kind, stack in self.norm_groups]
            sums.index_add_(0, self.slot_index, torch.cat(partials).square_())
        norms = backend.all_reduce_sum(sums).view(n, 2, rank).sqrt_()
        norms.clamp_(min=torch.finfo(torch.float32).tiny)
        active = torch.stack([layer.active_indices.to(self.device) for layer in layers])
        self.s_scale.fill_(1.0).scatter_(1, active, norms[:, 0] * norms[:, 1])
        for dtype, (values, spans) in self.s_lists.items():
            if self.scale_cast[dtype] is not self.s_scale:
                self.scale_cast[dtype].copy_(self.s_scale)
            torch._foreach_mul_(values, spans)
            torch._foreach_clamp_min_(values, 0.0)
        for dtype, (views, divisors) in self.div_lists.items():
            self.norms_cast[dtype].copy_(norms)
            torch._foreach_div_(views, divisors)


class SSTController:
    """Runs the method's periodic work on all SST layers through an engine's seam.

    Sampling is a pure function of (seed, layer, iteration), so every rank draws the same set with
    no communication. The one costly step, the SVD of a layer, runs on the layer's owner rank and
    its result is broadcast.
    """

    def __init__(self, layers: dict[str, SSTLinear], backend, *, seed: int = 0,
                 renormalize: bool = True, uniform_mix: bool = False, reset_s_state: bool = False):
        self.layers = list(layers.values())
        self.backend = backend
        self.seed, self.renormalize = seed, renormalize
        self.uniform_mix, self.reset_s_state = uniform_mix, reset_s_state
        self._plan: _RenormPlan | None = None

    @torch.no_grad()
    def post_step(self):
        """s >= 0 and (option) unit-length active vectors, their norms folded into s.

        Runs every step, so it works on each rank's own shards: partial sums of squares per
        active vector, one all-reduce for all layers, then the same local scaling on the fp32
        master and on the model's low-precision copy. No gather, and no per-element index.
        All layers at once, from a plan of views built when the shard layout changes (see
        _RenormPlan): a loop of small ops per layer leaves the GPU waiting on Python.
        """
        shards = [self.backend.shards(layer.spectral) for layer in self.layers]
        plan = self._plan
        if plan is None or not plan.matches(shards):
            plan = self._plan = _RenormPlan(self.layers, shards, self.backend.compute_device)
        plan.run(self.layers, self.backend, self.renormalize)
        for layer in self.layers:  # the step and the scaling wrote through the engine
            layer.drop_kept_weight()

    @torch.no_grad()
    def resample(self, iteration: int):
        """Start of an iteration: write back, draw, load, reset the moments of changed slots."""
        read = self.backend.read
        for index, layer in enumerate(self.layers):
            s, u_active, vh_active = layer.split(read(layer.spectral))
            U, Vh, new_idx, slots = resampled(
                read(layer.U), read(layer.Vh), s, u_active, vh_active, layer.active_indices,
                layer_generator(self.seed, index, iteration), self.uniform_mix)
            self._load(layer, U, Vh, s, new_idx, slots)

    @torch.no_grad()
    def resvd(self, iteration: int):
        """Start of a round: a fresh SVD per layer on its owner rank, then a full redraw."""
        backend = self.backend
        results = {}
        for index, layer in enumerate(self.layers):
            tensors = [backend.read(layer.U), backend.read(layer.Vh), *layer.split(backend.read(layer.spectral))]
            if backend.owner(index) == backend.rank:
                dev = backend.compute_device
                results[index] = resvd_factors(*[t.to(dev) for t in tensors], layer.active_indices.to(dev))
        for index, layer in enumerate(self.layers):
            dtype = compute_dtype(layer.spectral)
            shapes = [(layer.out_features, layer.k), (layer.k,), (layer.k, layer.in_features)]
            U, s, Vh = results.get(index) or [
                torch.empty(shape, dtype=dtype, device=backend.compute_device) for shape in shapes]
            for t in (U, s, Vh):
                backend.broadcast(t, backend.owner(index))
            drawn = sample_active(s.cpu(), layer.rank, layer_generator(self.seed, index, iteration),
                                  self.uniform_mix)
            new_idx, slots = assign_slots(None, drawn)
            self._load(layer, U, Vh, s, new_idx, slots)

    def _load(self, layer: SSTLinear, U, Vh, s, new_idx, slots):
        backend = self.backend
        new_idx = new_idx.to(U.device)
        layer.drop_kept_weight()
        backend.write(layer.U, U)
        backend.write(layer.Vh, Vh)
        layer.active_indices.copy_(new_idx.to(layer.active_indices.device))
        backend.write(layer.spectral, layer.pack(s.to(U.device), U[:, new_idx], Vh[new_idx]))
        reset = [layer.slot_elements(slots)] if slots.numel() else []
        if self.reset_s_state:
            reset.append(torch.arange(layer.k))
        if reset:
            backend.reset_state(layer.spectral, torch.cat(reset))

    def state_dict(self) -> dict:
        return {"active_indices": [layer.active_indices.tolist() for layer in self.layers]}

    def load_state_dict(self, state: dict) -> None:
        for layer, idx in zip(self.layers, state["active_indices"]):
            layer.active_indices.copy_(torch.tensor(idx, dtype=torch.long))


__all__ = ["SSTLinear", "apply_sst", "SSTController", "sample_active", "assign_slots",
           "layer_generator", "resampled", "resvd_factors", "renormalized", "merged_factors",
           "dense_from_factors", "spectral_weight", "sync_active", "sampling_probabilities", "region",
           "strided_runs"]

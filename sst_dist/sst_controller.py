"""SST's periodic work under an engine: the per-step clamp and renormalisation, the resample at the
start of an iteration and the re-SVD at the start of a round (docs/design.md §1, §3).

The formulas are sst_dist.sst's; this module applies them to every SST layer through the engine's
seam (sst_dist.engines.base.Backend), so the same code is right single-process, under ZeRO and
under FSDP. The per-step work runs on each rank's own shards, batched over all layers.
"""

from __future__ import annotations

import math

import torch

from sst_dist.engines.views import region, row_pieces, signature, strided_runs
from sst_dist.sst import (SSTLinear, assign_slots, compute_dtype, layer_generator, resvd_factors,
                          sample_active, sync_active)


class _RenormPlan:
    """SSTController.post_step's views and buffers, for one layout of shards.

    Building it walks every shard of s, u_active and vh_active once. The u / vh pieces are
    coalesced into strided runs across layers where the engine's flat buffers allow (see
    strided_runs), so a step costs a few stacked norms, one index_add, one all-reduce and a few
    list ops (torch._foreach_*) per dtype, whatever the number of layers.
    """

    MAX_STACK = 1 << 24  # elements per stacked norm: bounds the float64 copy it makes

    def __init__(self, layers, spectral_shards, device):
        self.signature = signature(spectral_shards)
        self.device = device
        # per layer: (s, u_active, vh_active) shards, each (owned, mirrors)
        shards = [[region(raw, offset, numel) for offset, numel in layer.regions()]
                  for layer, raw in zip(layers, spectral_shards)]
        n, rank = len(layers), max(layer.rank for layer in layers)
        self.rank = rank
        self.sums = torch.zeros(n * 2 * rank, dtype=torch.float64, device=device)
        self.s_scale = torch.ones(n, max(layer.k for layer in layers), dtype=torch.float64, device=device)
        # per dtype of the tensors written: s copies and their scale spans
        self.s_lists: dict[torch.dtype, tuple[list, list]] = {}
        self.scale_cast: dict[torch.dtype, torch.Tensor] = {}
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
                        pieces.append((view, i, (kind, first, count)))
                        if is_owned:
                            owned_pieces.append((view, i, (kind, first, count)))
        # owned runs of one shape are concatenated for one norm kernel; the slots follow that order
        self.norm_groups, slots = [], []
        for (kind, _, _), stacks in _stacks(owned_pieces, self.MAX_STACK).items():
            for stack, rows in stacks:
                self.norm_groups.append((kind, stack))
                slots += rows
        self.slot_index = _slot_index(slots, rank, device)
        # every run (mirrors too) of one shape divided by its norms in one kernel: a list division
        # whose divisors broadcast takes torch's per-tensor fallback, a kernel and a launch per
        # view (two per layer under FSDP2, which holds each layer apart). So the runs of a stack are
        # copied into one scratch tensor, divided there and copied back (a list copy of equal
        # shapes, one kernel); a stack of one run is divided in place.
        stacks = [(kind, (sum(view.shape[0] for view in stack), *shape), dtype, stack, rows)
                  for (kind, shape, dtype), of_shape in _stacks(pieces, self.MAX_STACK).items()
                  for stack, rows in of_shape]
        scratch_numel: dict[torch.dtype, int] = {}  # one scratch per dtype, shared: the stacks run one by one
        for _, whole_shape, dtype, stack, _ in stacks:
            if len(stack) > 1:
                scratch_numel[dtype] = max(scratch_numel.get(dtype, 0), math.prod(whole_shape))
        scratch = {dtype: torch.empty(numel, dtype=dtype, device=device) for dtype, numel in scratch_numel.items()}
        self.div_groups = []  # (runs, divisor index, divisor shape, scratch view or None, its pieces)
        for kind, whole_shape, dtype, stack, rows in stacks:
            count = rows[0][3]
            divisor_shape = (whole_shape[0], 1, count) if kind == 0 else (whole_shape[0], count, 1)
            whole = pieces_of_whole = None
            if len(stack) > 1:
                whole = scratch[dtype][:math.prod(whole_shape)].view(whole_shape)
                pieces_of_whole = list(whole.split([view.shape[0] for view in stack]))
            self.div_groups.append((stack, _slot_index(rows, rank, device), divisor_shape, whole, pieces_of_whole))
        self._active_key: list | None = None  # (buffer, its version) per layer, of _active_stack

    def matches(self, shards) -> bool:
        return signature(shards) == self.signature

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
        self.s_scale.fill_(1.0).scatter_(1, self._active(layers), norms[:, 0] * norms[:, 1])
        for dtype, (values, spans) in self.s_lists.items():
            if self.scale_cast[dtype] is not self.s_scale:
                self.scale_cast[dtype].copy_(self.s_scale)
            torch._foreach_mul_(values, spans)
            torch._foreach_clamp_min_(values, 0.0)
        flat = norms.view(-1)
        for stack, index, divisor_shape, whole, pieces in self.div_groups:
            # the norms rounded to the views' dtype, then the division in that dtype
            divisor = flat.index_select(0, index).to(stack[0].dtype).view(divisor_shape)
            if whole is None:
                stack[0].div_(divisor)
                continue
            torch.cat(stack, out=whole)
            whole.div_(divisor)
            torch._foreach_copy_(stack, pieces)

    def _active(self, layers) -> torch.Tensor:
        """Every layer's active indices stacked (n, r), stacked again only when one changed (a
        resample, a re-SVD, a load: each bumps the buffer's version or replaces it)."""
        known = self._active_key
        if known is None or any(index is not t or version != t._version
                                for (t, version), index in zip(known, (layer.active_indices for layer in layers))):
            self._active_stack = torch.stack([layer.active_indices.to(self.device) for layer in layers])
            self._active_key = [(layer.active_indices, layer.active_indices._version) for layer in layers]
        return self._active_stack


def _slot_index(rows, rank: int, device) -> torch.Tensor:
    """The positions in the (n, 2, rank) norms of `rows`' slots, one per slot, in order; rows:
    (layer index, kind, first slot, slot count), as _stacks gives them."""
    return torch.tensor([(i * 2 + kind) * rank + first + j for i, kind, first, count in rows for j in range(count)],
                        dtype=torch.long, device=device)


def _stacks(pieces, limit: int) -> dict[tuple, list]:
    """strided_runs of `pieces`, by (kind, row shape, dtype), cut into stacks of at most `limit`
    elements: {(kind, shape, dtype): [(views, rows)]}, rows: (layer index, kind, first slot,
    slot count) per row of the stack's views, in order."""
    by_shape: dict[tuple, list] = {}
    for views, i, step, m, (kind, first, count) in strided_runs(pieces):
        by_shape.setdefault((kind, tuple(views.shape[1:]), views.dtype), []).append((views, i, step, first, count))
    out: dict[tuple, list] = {}
    for key, runs in by_shape.items():
        shape = key[1]
        per_stack = max(1, limit // max(1, shape[0] * shape[1]))
        stacks, stack, rows = out.setdefault(key, []), [], []
        for views, i, step, first, count in runs:
            a = 0
            while a < views.shape[0]:
                b = min(views.shape[0], a + per_stack - len(rows))
                stack.append(views[a:b])
                rows += [(i + j * step, key[0], first, count) for j in range(a, b)]
                a = b
                if len(rows) == per_stack:
                    stacks.append((stack, rows))
                    stack, rows = [], []
        if stack:
            stacks.append((stack, rows))
    return out


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
        backend = self.backend
        trainables = backend.read_many([layer.spectral for layer in self.layers])
        parts = [layer.split(packed) for layer, packed in zip(self.layers, trainables)]
        draws = self._draw([s for s, _, _ in parts], iteration, redraw_all=False)
        for layer, (s, u_active, vh_active), (new_idx, slots) in zip(self.layers, parts, draws):
            # a copy of its own, in the trainables' dtype: under bf16 storage (model.frozen_dtype)
            # a bf16 copy would round the kept slots' trained vectors, synced in below, at every
            # resample; only the newly drawn slots come from the stored (rounded) factors
            factors = backend.read(layer.factors).to(compute_dtype(layer.spectral))
            # the trained vectors back in, through views of the copy
            sync_active(*layer.split_factors(factors), u_active, vh_active, layer.active_indices)
            self._load(layer, factors, s, new_idx, slots)

    @torch.no_grad()
    def resvd(self, iteration: int):
        """Start of a round: a fresh SVD per layer on its owner rank, then a full redraw."""
        backend = self.backend
        dev = backend.compute_device
        results = {}
        trainables = backend.read_many([layer.spectral for layer in self.layers])
        for index, (layer, packed) in enumerate(zip(self.layers, trainables)):
            tensors = [*layer.split_factors(backend.read(layer.factors)), *layer.split(packed)]
            if backend.owner(index) == backend.rank:
                results[index] = resvd_factors(*[t.to(dev) for t in tensors], layer.active_indices.to(dev))
        # σ of every layer first, for the draws; then each layer's factors, loaded as they arrive
        sigmas = [backend.broadcast(results[index][1] if index in results else
                                    torch.empty(layer.k, dtype=compute_dtype(layer.spectral), device=dev),
                                    backend.owner(index))
                  for index, layer in enumerate(self.layers)]
        draws = self._draw(sigmas, iteration, redraw_all=True)
        for index, (layer, s, (new_idx, slots)) in enumerate(zip(self.layers, sigmas, draws)):
            if index in results:
                U, _, Vh = results.pop(index)
                packed = layer.pack_factors(U, Vh)
            else:  # a receive buffer
                packed = torch.empty(layer.factors_numel, dtype=compute_dtype(layer.spectral), device=dev)
            # U and Vh in one broadcast, in the layout of the one frozen parameter they go to
            self._load(layer, backend.broadcast(packed, backend.owner(index)), s, new_idx, slots)

    def _draw(self, singular_values, iteration: int, redraw_all: bool):
        """Each layer's next active set and the slots whose vectors change, as (new_idx, slots) on
        the compute device. The draws run on the host from one copy of every layer's σ and active
        set, and their results go back in one copy: a copy per layer would wait for the device
        each time, and a resample would cost a round trip per layer."""
        layers = self.layers
        sigma = torch.cat([s.reshape(-1) for s in singular_values]).cpu().split([layer.k for layer in layers])
        old = [None] * len(layers) if redraw_all else \
            torch.cat([layer.active_indices for layer in layers]).cpu().split([layer.rank for layer in layers])
        chosen = []
        for index, layer in enumerate(layers):
            drawn = sample_active(sigma[index], layer.rank, layer_generator(self.seed, index, iteration),
                                  self.uniform_mix)
            chosen.extend(assign_slots(old[index], drawn))
        pieces = torch.cat(chosen).to(self.backend.compute_device).split([t.numel() for t in chosen])
        return list(zip(pieces[0::2], pieces[1::2]))

    def _load(self, layer: SSTLinear, factors, s, new_idx, slots):
        """`factors`: the layer's new U ‖ Vh, whole, in the parameter's layout (written as it is)."""
        backend = self.backend
        U, Vh = layer.split_factors(factors)
        new_idx = new_idx.to(U.device)
        layer.drop_kept_weight()
        backend.write(layer.factors, factors)
        layer.active_indices.copy_(new_idx)
        backend.write(layer.spectral, layer.pack(s.to(U.device), U[:, new_idx], Vh[new_idx]))
        reset = [layer.slot_elements(slots)] if slots.numel() else []
        if self.reset_s_state:
            reset.append(torch.arange(layer.k, device=slots.device))
        if reset:
            backend.reset_state(layer.spectral, torch.cat(reset))

"""Generic views of an engine's shards (`Shard`, base.py): cut to a region, to 2-D row pieces, and
coalesced across parameters that lie at one stride in one flat buffer. Used by the per-step work
that runs on each rank's own shards with no gather (sst_dist.sst_controller)."""

from __future__ import annotations

import torch

from sst_dist.engines.base import Shard


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


def signature(shards) -> tuple:
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


def extent(view: torch.Tensor) -> int:
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
                if offset_step < extent(by_tag[first]):  # would overlap (or run backwards)
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

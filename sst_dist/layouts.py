"""Older parameter layouts, declared as data and converted on load: no method named here.

A layer class that once held some tensors as separate parameters and now packs them into one
declares `older_layout = {new: (old, ...)}`: parameter `new` is the row-major flattening of the
older parameters, concatenated in that order. The engines convert their checkpoints' entries with
the names `older_names` finds, and a layer's load hook or an export packs a plain state dict with
`pack_older`; neither knows which layer or which names.
"""

from __future__ import annotations

import torch
from torch import nn


def qualified(layout: dict, prefix: str) -> dict[str, list[str]]:
    """One module's `older_layout` under its qualified name `prefix` ('' for the root):
    {new full name: [old full names]}."""
    dot = f"{prefix}." if prefix else ""
    return {dot + new: [dot + old for old in olds] for new, olds in layout.items()}


def older_names(model: nn.Module) -> dict[str, list[str]]:
    """{new full name: [old full names]} of every module of `model` that declares `older_layout`."""
    names = {}
    for prefix, module in model.named_modules():
        names.update(qualified(getattr(module, "older_layout", {}), prefix))
    return names


def pack(tensors) -> torch.Tensor:
    """The older tensors flattened and concatenated, in the first one's dtype: the new parameter."""
    tensors = list(tensors)
    return torch.cat([t.reshape(-1).to(tensors[0].dtype) for t in tensors])


def pack_older(state: dict, names: dict[str, list[str]]) -> bool:
    """A state dict of an older layout, in place: each new name whose old entries are all there
    (and which is not there itself) gets them packed, and they are removed. True if it changed
    anything."""
    changed = False
    for new, olds in names.items():
        if new in state or not all(old in state for old in olds):
            continue
        state[new] = pack(state.pop(old) for old in olds)
        changed = True
    return changed


def upgrade_on_load(module: nn.Module, state: dict, prefix: str, *_) -> None:
    """A load_state_dict pre-hook for a layer that declares `older_layout`: its entries of an older
    layout are packed before the load (`prefix` ends in a dot, or is empty)."""
    pack_older(state, qualified(module.older_layout, prefix[:-1]))

"""Model surgery: how every method puts its layers into a model (peft's replace-by-name)."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn


def target_linears(model: nn.Module, targets: Iterable[str]) -> list[tuple[str, nn.Linear]]:
    """Every nn.Linear whose attribute name is in `targets`, by qualified name, in model order."""
    targets = set(targets)
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets]


def store_frozen(module: nn.Module, dtype: torch.dtype | None) -> None:
    """Every frozen floating parameter under `module` stored in `dtype` (model.frozen_dtype), in
    place: the Parameter objects stay, so tied modules keep sharing them. None leaves them as they
    are; on the meta device only their dtype changes (sst_dist.build materialises them in it)."""
    if dtype is None:
        return
    for param in module.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def swap_modules(model: nn.Module, found: list[tuple[str, nn.Module]],
                 make: Callable[[int, nn.Module], nn.Module],
                 frozen_dtype: torch.dtype | None = None) -> dict[str, nn.Module]:
    """Replaces each (name, module) of `found` by make(index, module), index its position in
    `found` (a layer's owner key and RNG coordinate), its frozen tensors in `frozen_dtype`
    (store_frozen: one layer at a time, so only one layer's are ever held in the wider dtype).
    Returns the new modules by name, in order."""
    layers = {}
    for index, (name, module) in enumerate(found):
        parent_name, _, attr = name.rpartition(".")
        layer = make(index, module)
        store_frozen(layer, frozen_dtype)
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer)
        layers[name] = layer
    return layers

"""Model surgery: how every method puts its layers into a model (peft's replace-by-name)."""

from __future__ import annotations

from typing import Callable, Iterable

from torch import nn


def target_linears(model: nn.Module, targets: Iterable[str]) -> list[tuple[str, nn.Linear]]:
    """Every nn.Linear whose attribute name is in `targets`, by qualified name, in model order."""
    targets = set(targets)
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets]


def swap_modules(model: nn.Module, found: list[tuple[str, nn.Module]],
                 make: Callable[[int, nn.Module], nn.Module]) -> dict[str, nn.Module]:
    """Replaces each (name, module) of `found` by make(index, module), index its position in
    `found` (a layer's owner key and RNG coordinate). Returns the new modules by name, in order."""
    layers = {}
    for index, (name, module) in enumerate(found):
        parent_name, _, attr = name.rpartition(".")
        layer = make(index, module)
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer)
        layers[name] = layer
    return layers

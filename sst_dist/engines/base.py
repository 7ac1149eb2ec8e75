"""The one seam between the method and the engine that owns masters and optimizer states.

A method (SST resample / re-SVD, ReLoRA* merge, GaLore refresh) never touches `param.data` or an
optimizer's state dict directly: under ZeRO or FSDP those are shards, flat buffers or low-precision
copies, and edits to them are silently overwritten by the next step (DESIGN §3). It goes through
these verbs instead. Every verb is collective: all ranks call it, in the same order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Backend(ABC):
    rank: int = 0
    world_size: int = 1

    @abstractmethod
    def read(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The full, authoritative value of `param` (its fp32 master if it has one), on every rank."""

    @abstractmethod
    def write(self, param: torch.nn.Parameter, value: torch.Tensor) -> None:
        """Sets `param` (and its fp32 master, if any) to the full tensor `value`, given on every rank."""

    @abstractmethod
    def reset_state(self, param: torch.nn.Parameter, index: torch.Tensor | None = None,
                    dim: int = 0) -> None:
        """Zeroes the optimizer moments of `param`: all of it, or the slices `index` along `dim`."""

    @abstractmethod
    def optimizer_state(self, param: torch.nn.Parameter, key: str) -> torch.Tensor | None:
        """The full optimizer state `key` ('exp_avg', 'exp_avg_sq') of `param`, read through the
        engine; None before the first step."""

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """`tensor` as rank `src` holds it, on every rank (in place where possible)."""
        if self.world_size > 1:
            torch.distributed.broadcast(tensor, src)
        return tensor

    def owner(self, layer_index: int) -> int:
        """The rank that computes a layer's SVD / resample; results are broadcast from it."""
        return layer_index % self.world_size

    @property
    def compute_device(self) -> torch.device:
        return torch.device("cpu")


def zero_moments(state: dict, index: torch.Tensor | None, dim: int,
                 keys=("exp_avg", "exp_avg_sq")) -> None:
    """Zeroes Adam moments in a plain state dict, whole or along `dim` at `index`."""
    for key in keys:
        tensor = state.get(key)
        if tensor is None:
            continue
        if index is None:
            tensor.zero_()
        else:
            tensor.index_fill_(dim, index.to(tensor.device), 0)

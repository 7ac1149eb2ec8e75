"""The two seams of an engine, the one that owns masters and optimizer states.

`Backend`, between the method and the engine: a method (SST resample / re-SVD, ReLoRA* merge,
GaLore refresh) never touches `param.data` or an optimizer's state dict directly: under ZeRO or
FSDP those are shards, flat buffers or low-precision copies, and edits to them are silently
overwritten by the next step (docs/design.md §3). It goes through these verbs instead. Every verb
is collective: all ranks call it, in the same order.

`Engine`, between the trainer (sst_dist.train) and the engine: forward, backward and step, the
learning rates, checkpoints.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

from sst_dist.optim import RESET_KEYS, set_learning_rates


@dataclass
class Shard:
    """A writable flat view of part of a parameter, and where it starts in the flattened whole."""

    values: torch.Tensor
    start: int


class Backend(ABC):
    rank: int = 0
    world_size: int = 1

    @abstractmethod
    def read(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The full, authoritative value of `param` (its fp32 master if it has one), on every rank,
        as a tensor of its own: the caller may write it."""

    def read_many(self, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
        """read() of each parameter, in order; an engine may gather them in fewer collectives."""
        return [self.read(param) for param in params]

    @abstractmethod
    def write(self, param: torch.nn.Parameter, value: torch.Tensor) -> None:
        """Sets `param` (and its fp32 master, if any) to the full tensor `value`, given on every rank."""

    @abstractmethod
    def reset_state(self, param: torch.nn.Parameter, index: torch.Tensor | None = None,
                    dim: int = 0) -> None:
        """Resets the optimizer state of `param` to a fresh start: all of it, or the slices `index`
        along `dim`. Zeroes the moments, and the per-element ages of a resettable group, so the
        reset elements' bias correction starts again too (sst_dist.optim)."""

    @abstractmethod
    def optimizer_state(self, param: torch.nn.Parameter, key: str) -> torch.Tensor | None:
        """The full optimizer state `key` ('exp_avg', 'exp_avg_sq') of `param`, read through the
        engine; None before the first step."""

    @abstractmethod
    def shards(self, param: torch.nn.Parameter) -> tuple[list[Shard], list[Shard]]:
        """(owned, mirrors) for elementwise updates done locally, with no gather.

        `owned`: this rank's pieces of the authoritative value (the fp32 master); over all ranks they
        cover each element exactly once, so partial sums over them can be all-reduced. `mirrors`:
        other local copies (the low-precision model weights) that must receive the same change.
        """

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def reduce_sum_to(self, tensor: torch.Tensor, dst: int, *, in_place: bool = False) -> torch.Tensor:
        """The sum of `tensor` over ranks, on rank `dst` (other ranks get a partial sum). The
        caller's tensor is left as it was, unless `in_place`: then the sum is made in it, with no
        copy (for a caller that gives the tensor up)."""
        if self.world_size > 1:
            tensor = tensor if in_place else tensor.clone()
            torch.distributed.reduce(tensor, dst)
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """`tensor` as rank `src` holds it, on every rank (in place where possible)."""
        if self.world_size > 1:
            # gloo sends the storage as laid out: a transposed view (torch.linalg.svd's U and Vh
            # are column-major) arrives scrambled on the other ranks. A receive buffer is already
            # contiguous, so this copies only on the sender, whose own tensor is right as it is.
            tensor = tensor.contiguous()
            torch.distributed.broadcast(tensor, src)
        return tensor

    def owner(self, layer_index: int) -> int:
        """The rank that computes a layer's SVD / resample; results are broadcast from it."""
        return layer_index % self.world_size

    @property
    def compute_device(self) -> torch.device:
        return torch.device("cpu")


def zero_moments(state: dict, index: torch.Tensor | None, dim: int) -> None:
    """Zeroes Adam moments (and per-element ages, sst_dist.optim) in a plain state dict, whole or
    along `dim` at `index`."""
    for key in RESET_KEYS:
        tensor = state.get(key)
        if tensor is None:
            continue
        if index is None:
            tensor.zero_()
        else:
            tensor.index_fill_(dim, index.to(tensor.device), 0)


class Engine(ABC):
    """What the trainer drives, the same for every engine: `model` (as the engine wraps it) runs
    each forward inside `forward_context()`, then `backward(loss)` per micro-batch and `step()`
    once per iteration; `backend` is the method's seam into the same masters and states."""

    name: str  # the --engine value
    model: torch.nn.Module
    backend: Backend
    optimizer: torch.optim.Optimizer
    rank: int = 0
    world_size: int = 1

    @contextlib.contextmanager
    def probing(self):
        """The model a GaLore probe pass runs through: the model itself, unless the engine's
        wrapper must be bypassed (DeepSpeedEngine.probing)."""
        yield self.model

    def forward_context(self):
        """The context every forward runs in: none, unless the engine autocasts (TorchEngine);
        ZeRO's bf16 and FSDP2's MixedPrecisionPolicy cast by themselves."""
        return contextlib.nullcontext()

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """The backward of one micro-batch's loss, scaled for gradient accumulation."""

    @abstractmethod
    def step(self) -> torch.Tensor | None:
        """One optimizer step; returns the gradient norm (before clipping) for the divergence guard."""

    def set_learning_rates(self, lrs: dict[str, float]) -> None:
        """Each parameter group's lr, by group name."""
        set_learning_rates(self.optimizer, lrs)

    @abstractmethod
    def save(self, path: Path) -> None:
        """Writes the model's and optimizer's state into the folder `path` (every rank calls it)."""

    @abstractmethod
    def load(self, path: Path) -> None:
        """Reads back what save() wrote into `path`."""

    @property
    def compiles_blocks(self) -> bool:
        """Whether model.compile compiles whole decoder blocks (sst_dist.models.compile_blocks); where
        not, only the methods' layers that compile alone are (compile_layers)."""
        return True

    @property
    def zero_stage(self) -> int | None:
        """The ZeRO stage a checkpoint records; None where the engine has none (DeepSpeed's only)."""
        return None

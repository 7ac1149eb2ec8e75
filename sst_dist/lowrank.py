"""The low-rank baselines in SST's harness: LoRA and ReLoRA* (docs/design.md §2)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.nn import functional as F

from sst_dist.sst import layer_generator
from sst_dist.surgery import swap_modules, target_linears


class LoRALinear(nn.Module):
    """W x + b + scale · B A x with W frozen; A (r, in) Gaussian, B (out, r) zero, scale = alpha / r.

    `weight` stays a (frozen) parameter so an engine shards it like any weight.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 alpha: float | None = None, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.scaling = (alpha if alpha is not None else rank) / rank
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **factory))

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float | None = None,
                    generator: torch.Generator | None = None) -> "LoRALinear":
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, rank, linear.bias is not None,
                    alpha, device=w.device, dtype=w.dtype)
        if w.is_meta:  # shapes only: sst_dist.build draws A when it materialises the layer
            return layer
        layer.weight.copy_(w)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
        layer.lora_A.copy_(initial_A(rank, linear.in_features, generator, w.dtype))
        return layer

    @staticmethod
    def owns_state(prefix: str, state: dict) -> bool:
        """Whether `prefix` in a checkpoint's state dict is a LoRALinear (export)."""
        return f"{prefix}.lora_A" in state

    @staticmethod
    def dense_from_state(prefix: str, state: dict, recipe, keep_singular: float | None = None):
        """Export: the layer's entries popped from `state`, merged into W + scale·B·A (float64); (weight, None)."""
        A, B = state.pop(f"{prefix}.lora_A").double(), state.pop(f"{prefix}.lora_B").double()
        weight = state.pop(f"{prefix}.weight").double()
        scaling = LoRALinear(A.shape[1], B.shape[0], A.shape[0], alpha=recipe.lora.alpha, device="meta").scaling
        return merged(weight, A, B, scaling), None

    def meta_init(self, m, name: str, drawn=None) -> None:
        """model.build meta (build.Materializer `m`): W and bias as an nn.Linear's; A Gaussian
        and B zero, as from_linear, A seeded by the layer's index as apply_lora seeds it."""
        m.dense(self, name)
        m.fill(self, "lora_B", 0.0)
        if self.lora_A.is_meta:
            A = initial_A(self.rank, self.in_features, layer_generator(m.seed, m.index(self), 0), m.dtype)
            m.swap_in(self.lora_A, A.to(m.device))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        return self.weight + self.delta_weight()

    def footprint(self) -> dict:
        """What sst_dist.memory counts beyond the parameters: x·Aᵀ, kept for the backward."""
        return {"saved_width": self.rank}

    def lowrank_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A, self.lora_B]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def initial_A(rank: int, in_features: int, generator: torch.Generator | None, dtype) -> torch.Tensor:
    """Gaussian A with std 1/r (peft's "gaussian" init), drawn on the CPU for reproducibility."""
    return (torch.randn(rank, in_features, generator=generator, dtype=torch.float64) / rank).to(dtype)


def merged(weight, lora_A, lora_B, scaling):
    """ReLoRA*'s merge: the dense weight that carries the factors' contribution, in float32 at
    least: a bf16 W (model.frozen_dtype) is rounded once, where it is written back."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    return weight.to(dtype) + scaling * (lora_B.to(dtype) @ lora_A.to(dtype))


def apply_lora(model: nn.Module, rank: int, targets: Iterable[str], *, alpha: float | None = None,
               seed: int = 0, frozen_dtype: torch.dtype | None = None) -> dict[str, LoRALinear]:
    """Replaces every nn.Linear whose attribute name is in `targets` by a LoRALinear, its frozen W
    in `frozen_dtype` (model.frozen_dtype; None: the linear's own). Layer i's A is drawn from
    layer_generator(seed, i, 0), whichever device or build (sst_dist.build draws the same)."""
    return swap_modules(model, target_linears(model, targets), lambda index, linear: LoRALinear.from_linear(
        linear, rank, alpha, layer_generator(seed, index, 0)), frozen_dtype)


class ReLoRAController:
    """ReLoRA*: every T3 steps merge B A into W, re-draw A, zero B, reset both factors' moments
    (the lr re-warm is the schedule's). All through the engine seam; the new A is a pure function
    of (seed, layer, iteration), so every rank draws the same without communicating."""

    def __init__(self, layers: dict[str, LoRALinear], backend, *, seed: int = 0):
        self.layers = list(layers.values())
        self.backend = backend
        self.seed = seed

    @torch.no_grad()
    def reset(self, iteration: int):
        read, write = self.backend.read, self.backend.write
        for index, layer in enumerate(self.layers):
            weight = merged(read(layer.weight), read(layer.lora_A), read(layer.lora_B), layer.scaling)
            write(layer.weight, weight)
            A = initial_A(layer.rank, layer.in_features, layer_generator(self.seed, index, iteration),
                          torch.float64 if weight.dtype == torch.float64 else torch.float32)
            write(layer.lora_A, A)
            write(layer.lora_B, torch.zeros(layer.out_features, layer.rank, dtype=A.dtype))
            self.backend.reset_state(layer.lora_A)
            self.backend.reset_state(layer.lora_B)

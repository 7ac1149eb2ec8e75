"""The optimizer form of GaLore, kept as the reference the layer form (sst_dist.galore) is tested
against: a drop-in for galore_torch.GaLoreAdamW (same parameter-group keys `rank`,
`update_proj_gap`, `scale`, `proj_type`), itself tested against galore-torch 1.0."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.optim import Optimizer

from sst_dist.galore import (DEFAULT_PROJ_TYPE, DEFAULT_SCALE, DEFAULT_UPDATE_PROJ_GAP, orthogonal_projector,
                             project, project_back, projection_side)

CONVENTIONS = ("hf", "torch")


def adam_direction(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int, lr: float,
                   betas: tuple[float, float], eps: float, correct_bias: bool,
                   convention: str) -> tuple[torch.Tensor, float]:
    """Adam's normalised update m / denom and its step size; the update is -step_size · m / denom.

    The two conventions differ only in where eps enters once the bias is corrected:
      hf    (transformers' old AdamW, hence galore-torch): m / (sqrt(v) + eps) · lr·sqrt(bc2)/bc1
      torch (torch.optim.AdamW, DeepSpeed Adam):         m / (sqrt(v)/sqrt(bc2) + eps) · lr/bc1
    """
    beta1, beta2 = betas
    if not correct_bias:
        return exp_avg / (exp_avg_sq.sqrt() + eps), lr
    bc1, bc2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
    if convention == "hf":
        return exp_avg / exp_avg_sq.sqrt().add_(eps), lr * math.sqrt(bc2) / bc1
    return exp_avg / (exp_avg_sq.sqrt() / math.sqrt(bc2)).add_(eps), lr / bc1


class GaLoreAdamW(Optimizer):
    """AdamW with GaLore projection for every 2-D parameter in a group that has a `rank` key.

    Group keys (as galore-torch): rank, update_proj_gap (200), scale (1.0), proj_type ('std').
    Parameters of other shapes in a `rank` group, and all parameters of other groups, get plain
    AdamW (galore-torch would fail on a 1-D parameter there).

    convention: 'hf' (default) reproduces galore-torch: eps added to sqrt(v) before the bias
    correction, decoupled weight decay applied after the update, W <- W - lr·wd·W. 'torch' is
    torch.optim.AdamW's (and DeepSpeed's Adam's) arithmetic: eps added after the bias correction,
    decay first, W <- (1 - lr·wd)·W. The two differ by O(eps) in the denominator and O(lr·wd) in
    the update; 'torch' is what `GaLoreLinear` under an engine's AdamW computes.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True,
                 convention: str = "hf"):
        if lr < 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if eps < 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        correct_bias=correct_bias, convention=convention)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if "rank" in group:
                projection_side((1, 1), group.get("proj_type", DEFAULT_PROJ_TYPE))  # validates
                if group["rank"] < 1 or group.get("update_proj_gap", DEFAULT_UPDATE_PROJ_GAP) < 1:
                    raise ValueError(f"rank and update_proj_gap must be >= 1, got {group['rank']}, "
                                     f"{group.get('update_proj_gap')}")

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, decay = group["lr"], group["lr"] * group["weight_decay"]
            convention = group["convention"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("GaLoreAdamW does not support sparse gradients")
                state = self.state[p]
                taken = state.get("step", 0)  # steps taken before this one
                grad = p.grad
                galore = "rank" in group and p.ndim == 2
                if galore:
                    side = projection_side(p.shape, group.get("proj_type", DEFAULT_PROJ_TYPE))
                    gap = group.get("update_proj_gap", DEFAULT_UPDATE_PROJ_GAP)
                    if "projector" not in state or taken % gap == 0:
                        state["projector"] = orthogonal_projector(grad, group["rank"], side)
                    grad = project(grad, state["projector"], side)
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                beta1, beta2 = group["betas"]
                state["step"] = taken + 1
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                direction, step_size = adam_direction(
                    exp_avg, exp_avg_sq, state["step"], lr, group["betas"], group["eps"],
                    group["correct_bias"], convention)
                if galore:
                    direction = project_back(direction, state["projector"], side,
                                             group.get("scale", DEFAULT_SCALE))
                if convention == "torch" and decay:
                    p.mul_(1.0 - decay)
                p.add_(direction, alpha=-step_size)
                if convention == "hf" and decay:
                    p.add_(p, alpha=-decay)
        return loss

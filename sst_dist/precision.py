"""Mixed precision for the project's autograd functions, on whatever device they run.

torch.amp.custom_fwd / custom_bwd take one device type when the function is defined, so a
function decorated for CUDA runs its backward outside a CPU autocast (and then meets bf16
gradients with fp32 weights). These record the autocast state of the device the inputs are on,
and run the backward under the same state, as nn.Linear's autograd does.
"""

from __future__ import annotations

import contextlib
import functools

import torch


def autocast_forward(forward):
    @functools.wraps(forward)
    def wrapper(ctx, *args):
        device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        ctx.autocast_state = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return forward(ctx, *args)

    return wrapper


def autocast_backward(backward):
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        device, enabled, dtype = ctx.autocast_state
        with torch.autocast(device, enabled=enabled, dtype=dtype):
            return backward(ctx, *grads)

    return wrapper


def full_precision(tensor: torch.Tensor):
    """A context in which matmuls on `tensor`'s device run in the inputs' own dtype (autocast off):
    for products that must stay float32 inside an autocast region, such as a gradient probe."""
    return torch.autocast(tensor.device.type, enabled=False) if torch.is_autocast_enabled(
        tensor.device.type) else contextlib.nullcontext()

"""The seam for a plain single-process torch optimizer: parameters and states are ordinary tensors."""

from __future__ import annotations

import torch

from sst_dist.engines.base import Backend, Engine, Shard, zero_moments
from sst_dist.optim import build_optimizer


class TorchBackend(Backend):
    def __init__(self, optimizer: torch.optim.Optimizer | None = None, device=None):
        self.optimizer = optimizer
        self._device = torch.device(device or "cpu")

    def read(self, param):
        return param.detach().clone()

    @torch.no_grad()
    def write(self, param, value):
        param.copy_(value.to(device=param.device, dtype=param.dtype))

    def reset_state(self, param, index=None, dim=0):
        if self.optimizer is not None:
            zero_moments(self.optimizer.state.get(param, {}), index, dim)

    def shards(self, param):
        return [Shard(param.data.view(-1), 0)], []

    def optimizer_state(self, param, key):
        if self.optimizer is None:
            return None
        tensor = self.optimizer.state.get(param, {}).get(key)
        return None if tensor is None else tensor.detach().clone()

    @property
    def compute_device(self):
        return self._device


class TorchEngine(Engine):
    """A single-process trainer engine: AdamW over the given groups, grad accumulation, clipping."""

    name = "torch"

    def __init__(self, model, param_groups: list[dict], recipe, device: torch.device, accumulation: int,
                 dtype: torch.dtype = torch.float32):
        self.model = model
        # fp32 weights and states; bf16 only inside autocast, on a GPU and on a CPU alike
        self.autocast_dtype = dtype if dtype == torch.bfloat16 else None
        self.device = device
        self.accumulation = accumulation
        self.optimizer = build_optimizer(param_groups, recipe, device)
        self.grad_clip = recipe.optim.grad_clip
        self.backend = TorchBackend(self.optimizer, device)

    def forward_context(self):
        if self.autocast_dtype is None:
            return super().forward_context()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def backward(self, loss):
        (loss / self.accumulation).backward()

    def step(self):
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def save(self, path):
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()},
                   path / "state.pt")

    def load(self, path):
        state = torch.load(path / "state.pt", map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

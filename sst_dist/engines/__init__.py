"""Engines: who owns the fp32 masters and optimizer states. The method reaches them only through
`Backend` (base.py); the trainer drives them through the small Engine surface used in train.py:
`model`, `probing()`, `backend`, `backward(loss)`, `step()`, `set_learning_rates({...})`, `save(dir)`,
`load(dir)`.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

# aliased: importing the submodule engines/torch.py rebinds this package's global name `torch`
import torch as _torch
import torch.distributed as dist

from sst_dist.config import ConfigError

ENGINES = ("torch", "deepspeed", "fsdp")


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 and dist.is_initialized()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def _reduce(self, value: float, op) -> float:
        if not self.active:
            return float(value)
        device = _torch.device("cuda", _torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = _torch.tensor(float(value), dtype=_torch.float64, device=device)
        dist.all_reduce(t, op=op)
        return float(t)

    def mean(self, value) -> float:
        return self._reduce(float(value), dist.ReduceOp.SUM) / self.world_size

    def any(self, flag: bool) -> bool:
        return self._reduce(1.0 if flag else 0.0, dist.ReduceOp.MAX) > 0

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank: a decision taken once, so that no rank is left waiting for
        one that stopped on it."""
        if not self.active:
            return obj
        device = _torch.device("cuda", _torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=device)
        return box[0]


def _single_process_env() -> None:
    """Lets `python launch/pretrain.py --ds-config ...` run as a world of one, with no launcher."""
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def distributed_context(engine: str) -> DistributedContext:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if engine == "torch":
        if world > 1:
            raise ConfigError(f"{world} processes were launched but no engine was chosen; pass "
                              "--ds-config ds_configs/zero2.json (deepspeed) or --engine fsdp (torchrun)")
        return DistributedContext()
    _single_process_env()
    backend = "nccl" if _torch.cuda.is_available() else "gloo"
    if engine == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    elif not dist.is_initialized():
        # NCCL otherwise guesses each rank's GPU from its global rank (a hang on uneven nodes)
        local = _torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if backend == "nccl" else None
        dist.init_process_group(backend, device_id=local)
    return DistributedContext(dist.get_rank(), dist.get_world_size(),
                              int(os.environ.get("LOCAL_RANK", "0")))


def build_engine(name: str, model, param_groups, recipe, *, device, dtype, micro_batch, accumulation,
                 ds_config=None, ctx=None):
    if name == "torch":
        from sst_dist.engines.torch import TorchEngine

        model.to(dtype=_torch.float64 if dtype == _torch.float64 else _torch.float32)
        return TorchEngine(model, param_groups, recipe, device, accumulation, dtype)
    if name == "deepspeed":
        from sst_dist.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(model, param_groups, recipe, device=device, dtype=dtype,
                               micro_batch=micro_batch, accumulation=accumulation,
                               ds_config=ds_config, ctx=ctx)
    if name == "fsdp":
        from sst_dist.engines.fsdp import FSDPEngine

        return FSDPEngine(model, param_groups, recipe, device=device, dtype=dtype,
                          accumulation=accumulation, ctx=ctx)
    raise ConfigError(f"--engine: {name!r} is not one of {', '.join(ENGINES)}")

"""Engines: who owns the fp32 masters and optimizer states. The method reaches them only through
`Backend` (base.py); the trainer drives them through `Engine` (base.py): `model`, `backend`,
`probing()`, `forward_context()`, `backward(loss)`, `step()`, `set_learning_rates({...})`,
`save(dir)`, `load(dir)`, `zero_stage`.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
from dataclasses import dataclass

# aliased: importing the submodule engines/torch.py rebinds this package's global name `torch`
import torch as _torch
import torch.distributed as dist

from sst_dist.engines.base import Engine
from sst_dist.errors import ConfigError

ENGINES = ("torch", "deepspeed", "fsdp")


# Rank 0 prepares the data while the others wait: hours for a hub corpus, so that one wait has
# its own CPU group with this timeout instead of train.collective_timeout_s.
PATIENT_TIMEOUT = datetime.timedelta(days=1)


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    patient_group: object = None  # gloo, PATIENT_TIMEOUT; for barrier(patient=True)
    # gloo, for the host's own numbers (a stop flag, a peak): a reduction on the GPU would make
    # the host wait for every kernel queued before it, so the host could not run ahead
    host_group: object = None

    @property
    def active(self) -> bool:
        return self.world_size > 1 and dist.is_initialized()

    def barrier(self, patient: bool = False) -> None:
        if self.active:
            dist.barrier(group=self.patient_group if patient else None)

    def _reduce(self, value: float, op) -> float:
        if not self.active:
            return float(value)
        t = _torch.tensor(float(value), dtype=_torch.float64)
        dist.all_reduce(t, op=op, group=self.host_group)
        return float(t)

    def maximum(self, value) -> float:
        return self._reduce(float(value), dist.ReduceOp.MAX)

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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for a launcher's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_env() -> None:
    """Lets `python launch/pretrain.py --ds-config ...` run as a world of one, with no launcher."""
    if "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def distributed_context(engine: str, timeout_s: float | None = None) -> DistributedContext:
    """Joins the launcher's process group; `timeout_s` (train.collective_timeout_s) bounds every
    collective, so a stalled or dead rank ends the job instead of hanging it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if engine == "torch":
        if world > 1:
            raise ConfigError(f"{world} processes were launched but no engine was chosen; pass "
                              "--ds-config ds_configs/zero2.json (deepspeed) or --engine fsdp (torchrun)")
        return DistributedContext()
    _single_process_env()
    backend = "nccl" if _torch.cuda.is_available() else "gloo"
    timeout = {}
    if timeout_s is not None:
        timeout = {"timeout": datetime.timedelta(seconds=timeout_s)}
        # groups made later by dist.new_group without a timeout (ZeRO's data-parallel group) take
        # these c10d defaults (30 min gloo, 10 min NCCL), not the world group's timeout
        c10d = dist.distributed_c10d
        c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout["timeout"]
    if engine == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, **timeout)
    elif not dist.is_initialized():
        # NCCL otherwise guesses each rank's GPU from its global rank (a hang on uneven nodes)
        local = _torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if backend == "nccl" else None
        dist.init_process_group(backend, device_id=local, **timeout)
    patient = host = None
    if dist.get_world_size() > 1:
        patient = dist.new_group(backend="gloo", timeout=PATIENT_TIMEOUT)
        if dist.get_backend() != "gloo":  # else the world group is on the host already
            host = dist.new_group(backend="gloo", **timeout)
    return DistributedContext(dist.get_rank(), dist.get_world_size(),
                              int(os.environ.get("LOCAL_RANK", "0")), patient, host)


def leave_distributed() -> None:
    """Tears the process groups down after a finished run. Left to the interpreter's exit, gloo's
    worker threads can abort a rank whose run succeeded ("terminate called without an active
    exception", exit -6). Not after a failed collective: cli.run_cli skips the teardown there."""
    if dist.is_initialized():
        dist.destroy_process_group()


# What gloo and the c10d store say when a peer does not answer in time, or went away
_TIMED_OUT = re.compile(r"timed out|timeout", re.IGNORECASE)
_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def collective_failure(err: BaseException, timeout_s: float) -> str | None:
    """One line for a collective that failed because another rank stalled or died, else None
    (any other error keeps its traceback). NCCL's watchdog ends the process itself, with a log
    line naming the rank and the collective."""
    if not (isinstance(err, RuntimeError) and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    text = str(err).strip()
    first = re.sub(r"^\[[^\]]*\.(cc|cpp):\d+\]\s*", "", text.splitlines()[0] if text else "")[:160]
    if _TIMED_OUT.search(text):
        what = f"no answer from another rank within train.collective_timeout_s = {timeout_s:g} s"
    elif isinstance(err, dist.DistError) or any(s in text for s in _LOST):
        what = "lost contact with another rank"
    else:
        return None
    return (f"rank {dist.get_rank()} of {dist.get_world_size()}: {what} ({first}); another rank stalled"
            " or died: see that rank's output")


def check_precision(engine: str, recipe) -> None:
    """Refuses, before anything starts, a precision an engine cannot give on this machine: bf16
    under DeepSpeed needs a GPU (the torch and fsdp engines autocast on a CPU too)."""
    on_cpu = recipe.train.device == "cpu" or not _torch.cuda.is_available()
    if engine == "deepspeed" and recipe.train.dtype == "bfloat16" and on_cpu:
        raise ConfigError("train.dtype: bfloat16 under DeepSpeed needs a GPU (its CPU ranks run "
                          "float32); use --set train.dtype=float32, or the torch or fsdp engine")


def cast_masters(model, dtype) -> None:
    """Every floating parameter and buffer to `dtype` (the fp32 or fp64 master), in place, but
    frozen parameters kept in bfloat16 on purpose (model.frozen_dtype) stay so: model.to(dtype)
    would make an fp32 copy of the largest tensors a low-rank method holds."""
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is None or not param.is_floating_point() or param.dtype == dtype:
                continue
            if not param.requires_grad and param.dtype == _torch.bfloat16:
                continue
            param.data = param.data.to(dtype)
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != dtype:
                module._buffers[name] = buffer.to(dtype)


def build_engine(name: str, model, param_groups, recipe, *, device, dtype, micro_batch, accumulation,
                 ds_config=None, ctx=None, materialize=None) -> Engine:
    """`materialize` (sst_dist.build.Materializer): a model still on the meta device, which the
    fsdp engine materialises block by block as it shards it."""
    if materialize is not None and name != "fsdp":
        raise ConfigError(f"--engine {name}: materialise the model before building the engine")
    if name == "torch":
        from sst_dist.engines.torch import TorchEngine

        cast_masters(model, _torch.float64 if dtype == _torch.float64 else _torch.float32)
        return TorchEngine(model, param_groups, recipe, device, accumulation, dtype)
    if name == "deepspeed":
        from sst_dist.engines.deepspeed import DeepSpeedEngine


        return DeepSpeedEngine(model, param_groups, recipe, device=device, dtype=dtype,
                               micro_batch=micro_batch, accumulation=accumulation,
                               ds_config=ds_config, ctx=ctx)
    if name == "fsdp":
        from sst_dist.engines.fsdp import FSDPEngine

        return FSDPEngine(model, param_groups, recipe, device=device, dtype=dtype,
                          accumulation=accumulation, ctx=ctx, materialize=materialize)
    raise ConfigError(f"--engine: {name!r} is not one of {', '.join(ENGINES)}")

"""Where a process runs: its device, compute dtype, CPU threads, batch split and stop signals."""

from __future__ import annotations

import os
import signal

import torch

from sst_dist.config import Recipe
from sst_dist.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def resolve_device(recipe: Recipe, local_rank: int) -> torch.device:
    want = recipe.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but no GPU is visible; use cpu or auto")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def resolve_dtype(recipe: Recipe, device: torch.device) -> torch.dtype:
    if recipe.train.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[recipe.train.dtype]


def batch_geometry(recipe: Recipe, world_size: int) -> tuple[int, int]:
    """(micro-batch per rank, gradient accumulation steps) from the recipe's global batch."""
    global_batch = recipe.train.global_batch
    if global_batch % world_size:
        raise ConfigError(f"train.global_batch: {global_batch} is not divisible by {world_size} ranks")
    per_rank = global_batch // world_size
    micro = recipe.train.micro_batch or per_rank
    if per_rank % micro:
        raise ConfigError(f"train.micro_batch: {micro} does not divide the {per_rank} sequences per rank "
                          f"(global_batch {global_batch} / {world_size} ranks)")
    return micro, per_rank // micro


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch onto `device` without waiting for the work queued there: from page-locked memory a
    copy to the GPU is queued like a kernel, where from ordinary memory the driver may first wait
    for the stream."""
    if device.type != "cuda":
        return batch.to(device)
    return batch.pin_memory().to(device, non_blocking=True)


class StopFlag:
    """SIGTERM / SIGINT ask for a checkpoint and a clean exit at the end of the current step."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.raised = True


def set_threads() -> None:
    """On CPU, the cores shared out over the local ranks, so two gloo ranks do not fight over two
    cores; an OMP_NUM_THREADS in the environment wins (torch applied it at import): a CPU run's
    sums, hence its last bits, depend on the thread count, and the tests pin it on every side."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if local_world > 1 and not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))

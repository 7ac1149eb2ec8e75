"""Where a process runs: its device, compute dtype, CPU threads, batch split, stop signals and the
launcher it watches."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

import torch

from sst_dist.config import Recipe
from sst_dist.errors import ConfigError
from sst_dist.rundir import process_running, process_start

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
    """SIGTERM, SIGINT and SIGHUP (a closed terminal, a dropped ssh) ask for a checkpoint and a clean
    exit at the end of the current step. A SIGHUP ignored at start (nohup) stays ignored."""

    def __init__(self):
        self.raised = False
        self.ttys = [fd for fd in (1, 2) if os.isatty(fd)]
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            if sig != signal.SIGHUP or signal.getsignal(sig) != signal.SIG_IGN:
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.raised = True
        if signum == signal.SIGHUP:
            # a hung-up terminal fails every write with EIO (it is no longer a tty), and the progress
            # bar's next write would end the run before its checkpoint: the output goes nowhere instead
            for fd in self.ttys:
                if not os.isatty(fd):
                    devnull = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(devnull, fd)
                    os.close(devnull)


# Set by launch/deepspeed_run.py for the ranks it starts: "host:pid" of the wrapper, which is not
# their parent (deepspeed's launcher is), so its death would otherwise go unnoticed.
SUPERVISOR_ENV = "SST_DIST_SUPERVISOR"


def watch_launcher(interval_s: float = 1.0) -> threading.Thread | None:
    """A rank started by a launcher (torchrun, deepspeed, launch/deepspeed_run.py) sends itself
    SIGTERM when the launcher dies, so the stop path checkpoints and exits rather than training on
    with no one to stop it (each rank runs in a session of its own, out of a terminal's reach).

    Watched: the parent, for a rank started by a launcher (LOCAL_RANK set; not a plain `python`, whose
    parent is a shell that a `nohup ... &` outlives), and the wrapper named in SST_DIST_SUPERVISOR on
    this host. A parent's death shows as a new parent pid (the process is re-parented), which no pid
    reuse can fake; PR_SET_PDEATHSIG would fire on the exit of the parent's thread that forked."""
    watched = []
    if "LOCAL_RANK" in os.environ:
        parent = os.getppid()
        watched.append((f"the launcher (pid {parent})", lambda: os.getppid() == parent))
    host, _, pid = os.environ.get(SUPERVISOR_ENV, "").rpartition(":")
    if pid.isdigit() and host == socket.gethostname():
        started = process_start(int(pid))
        watched.append((f"launch/deepspeed_run.py (pid {pid})", lambda: process_running(int(pid), started)))
    if not watched:
        return None

    def watch():
        while True:
            for name, alive in watched:
                if not alive():
                    try:  # the launcher may have held the other end of the output
                        print(f"warning: rank {os.environ.get('RANK', '0')}: {name} is gone; checkpointing "
                              "and stopping", file=sys.stderr, flush=True)
                    except OSError:
                        pass
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
            time.sleep(interval_s)

    thread = threading.Thread(target=watch, name="watch-launcher", daemon=True)
    thread.start()
    return thread


def set_threads() -> None:
    """On CPU, the cores shared out over the local ranks, so two gloo ranks do not fight over two
    cores; an OMP_NUM_THREADS in the environment wins (torch applied it at import): a CPU run's
    sums, hence its last bits, depend on the thread count, and the tests pin it on every side."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if local_world > 1 and not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))

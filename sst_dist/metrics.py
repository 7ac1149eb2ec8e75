"""What a run reports: each step's loss and gradient norm read off the device (StepReadout), the
seconds of each phase of an event step (PhaseClock), and metrics.jsonl, wandb and the progress bar
(MetricsLogger)."""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from sst_dist import rundir
from sst_dist.config import Recipe
from sst_dist.errors import RunError


class StepReadout:
    """A step's loss (the mean over ranks) and gradient norm, on their way to the host.

    Reading a number off the GPU waits for every kernel queued before the read. The trainer reads
    a step's numbers after it has queued the next step, so the GPU does not idle while the host
    logs and starts a step; this copy, queued right behind the step with an event after it, lets
    that read wait for this step alone."""

    def __init__(self, result, ctx):  # result: train_step's StepResult
        loss, norm = result.loss, result.grad_norm
        self.has_norm, self.world_size = norm is not None, ctx.world_size
        if not isinstance(norm, torch.Tensor):  # a float, or None: filled in on the device, no copy
            norm = torch.full((), math.nan if norm is None else float(norm), device=loss.device)
        values = torch.stack([loss.double(), norm.detach().to(loss.device, torch.float64)])
        if ctx.active:  # summed: the loss's mean over ranks; the global norm is the same on every rank
            dist.all_reduce(values)
        self.ready = None
        if values.is_cuda:
            self.host = torch.empty(2, dtype=torch.float64, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.host = values

    def wait(self) -> None:
        """Until the step has ended (at once on a CPU)."""
        if self.ready is not None:
            self.ready.synchronize()

    def read(self) -> tuple[float, float | None]:
        """(loss, gradient norm or None), waiting for the step if it is still running."""
        self.wait()
        loss, norm = (self.host / self.world_size).tolist()
        if not self.has_norm:
            return loss, None
        # a negative norm is DeepSpeed's mark for a non-finite one (bf16 without its overflow check)
        return loss, math.nan if norm < 0 else norm


class PhaseClock:
    """The seconds of each phase of a step (train_step's `mark`), for the steps with periodic work:
    the metrics' `event_phases_s` say where a resample's or refresh's extra time goes. On a GPU
    from CUDA events recorded at each phase's end, read only on an event step, so ordinary steps
    wait on nothing; on a CPU from the host clock. A phase run several times (one forward per
    micro-batch) is summed."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        self.marks = [("start", self._now())]

    def __call__(self, phase: str) -> None:
        self.marks.append((phase, self._now()))

    def seconds(self) -> dict[str, float]:
        if self.cuda:
            self.marks[-1][1].synchronize()
        phases: dict[str, float] = {}
        for (_, begin), (phase, end) in zip(self.marks, self.marks[1:]):
            elapsed = begin.elapsed_time(end) / 1e3 if self.cuda else end - begin
            phases[phase] = phases.get(phase, 0.0) + elapsed
        return {phase: round(value, 4) for phase, value in phases.items()}


class MetricsLogger:
    """metrics.jsonl (appended, one object per step), wandb and the progress bar, on rank 0 only.
    wandb and the bar see every train.log_every-th step, evaluations and the last step.

    A row that cannot be written (a full disk) does not stop the run here: `failure` says why, and
    the trainer checkpoints and stops at the end of the next step."""

    def __init__(self, out: Path, recipe: Recipe, enabled: bool, resume_step: int):
        self.enabled = enabled
        self.wandb = None
        self.file = None
        self.path = out / "metrics.jsonl"
        self.failure: str | None = None  # why a row could not be written
        self.every, self.last = recipe.train.log_every, recipe.train.max_steps
        if not enabled:
            return
        # rows past the checkpoint (a kill after it, or a fallback to an older one) are trained again
        for name in ("metrics.jsonl", "eval.jsonl"):
            with _no_traceback(out / name):
                dropped = rundir.cut_log(out / name, resume_step)
            if dropped:
                print(f"{name}: dropped {dropped} rows past step {resume_step}, which is trained again",
                      flush=True)
        with _no_traceback(self.path):
            self.file = open(self.path, "a")
        with _no_traceback(out / "recipe.json"):
            (out / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=1))
        if recipe.wandb.mode != "disabled":
            import wandb

            # a resumed run continues the same wandb run: wandb picks the id once, we keep it
            id_file = out / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.exists() else None
            self.wandb = wandb.init(project=recipe.wandb.project, name=recipe.wandb.name, id=run_id,
                                    resume="allow", mode=recipe.wandb.mode, dir=str(out),
                                    config=recipe.to_dict())
            with _no_traceback(id_file):
                id_file.write_text(self.wandb.id)
        self.bar = tqdm(total=self.last, initial=resume_step, desc=recipe.method, unit="step", dynamic_ncols=True)

    def due(self, record: dict) -> bool:
        step = record["step"]
        return step % self.every == 0 or step == self.last or "eval_loss" in record

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        if self.file is not None:
            try:
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()
            except OSError as err:  # a torn last line is dropped by the resumed run's cut_log
                self.failure = (f"cannot append step {record['step']} to {self.path}: "
                                f"{rundir.write_failure(err, self.path)}")
                self._close_file()
        if not self.due(record):
            return
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "event"}, step=record["step"])
        self.bar.update(record["step"] - self.bar.n)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}")

    def _close_file(self) -> None:
        file, self.file = self.file, None
        try:
            file.close()
        except OSError:  # the write buffer still full: its flush fails again
            pass

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            if self.file is not None:
                self._close_file()
            if self.wandb is not None:
                self.wandb.finish()


@contextlib.contextmanager
def _no_traceback(path: Path):
    """An OSError writing a log file before the first step, as one line naming it."""
    try:
        yield
    except OSError as err:
        raise RunError(f"cannot write {path}: {rundir.write_failure(err, path)}") from None

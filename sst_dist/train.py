"""The training loop: build -> (resume) -> step -> log -> checkpoint. One file, top to bottom."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from sst_dist import checkpoint, rundir
from sst_dist.config import Recipe
from sst_dist.data import evaluate, lm_loss, open_data, prepare
from sst_dist.engines import build_engine, distributed_context, leave_distributed
from sst_dist.errors import ConfigError, RunError
from sst_dist.build import Materializer, build_on_meta
from sst_dist.methods import Method, ProbePass, build_method, frozen_dtype
from sst_dist.models import (OPT_VOCAB, build_model, check_attn_implementation, compile_blocks,
                             enable_activation_checkpointing)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class Run:
    recipe: Recipe
    output_dir: Path
    engine: str = "torch"  # torch | deepspeed | fsdp
    ds_config: str | None = None
    eval_only: bool = False  # evaluate the latest checkpoint on the held-out split, then stop


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


def build_run(recipe: Recipe, engine_name: str, ctx, *, device, dtype, vocab_size: int, micro_batch: int,
              accumulation: int, ds_config: str | None = None, init_device=None) -> tuple[Method, object]:
    """The model, the method applied to it and the engine that wraps it: (method, engine).
    `init_device`: where a dense build initialises the weights (the benchmarks build large models
    on the GPU); None, the CPU, so a run's initial weights do not depend on the machine.
    model.build meta: the model is built on the meta device and materialised on `device` (SST
    layers directly as their factors), by the fsdp engine block by block as it shards."""
    torch.manual_seed(recipe.seed)
    model_kwargs = dict(vocab_size=vocab_size, seq_len=recipe.model.seq_len,
                        attn_implementation=recipe.model.attn_implementation)
    master = torch.float64 if dtype == torch.float64 else torch.float32
    meta = recipe.model.build == "meta"
    if meta:
        model = build_on_meta(recipe.model.size, **model_kwargs)
    else:
        with init_device if init_device is not None else contextlib.nullcontext():
            model = build_model(recipe.model.size, **model_kwargs, init_from=recipe.model.init_from)
    if recipe.model.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if not meta:
        model.to(device=device, dtype=master)
    method = build_method(recipe, model)  # on the meta device too: the method's layers take shapes
    materialize = None
    if meta:
        sharded = engine_name == "fsdp"
        materialize = Materializer(model, seed=recipe.seed, device=device, dtype=master, init=recipe.sst.init,
                                   frozen_dtype=frozen_dtype(recipe), uniform_mix=recipe.sst.uniform_mix,
                                   rank=ctx.rank if sharded else 0, world_size=ctx.world_size if sharded else 1)
        if not sharded:
            materialize(model)
            materialize = None
    engine = build_engine(engine_name, model, method.param_groups(model), recipe, device=device, dtype=dtype,
                          micro_batch=micro_batch, accumulation=accumulation, ds_config=ds_config, ctx=ctx,
                          materialize=materialize)
    method.attach(engine.backend, recipe)
    if recipe.model.compile:  # last: the blocks as the engine wraps them, hooks included
        compile_blocks(engine.model, method.layers.values())
    return method, engine


@dataclass
class StepResult:
    event: str | None  # the periodic work run before the step ('+'-joined names), if any
    lrs: dict[str, float]  # the step's learning rate of each group
    loss: torch.Tensor  # this rank's mean loss over the step's micro-batches (float64)
    grad_norm: object  # the engine's global gradient norm, or None


def train_step(engine, method: Method, step: int, chunks, mark: Callable[[str], None] | None = None) -> StepResult:
    """One optimizer step on this rank's micro-batches `chunks`: the method's periodic work, a
    forward and backward per micro-batch, the engine's step and the method's per-step work. The
    benchmarks call it too; `mark(phase)` is called as each phase ends (before_step, probe,
    forward, backward, step, after_step)."""
    mark = mark or (lambda phase: None)
    engine.model.train()

    def probe_pass(probe):
        mark("before_step")  # what ran before the probe (an SST resample) counts there
        with engine.probing() as model:
            for chunk in chunks:
                with engine.forward_context():
                    probe.backward(lm_loss(model, chunk))
        mark("probe")

    event = method.before_step(step, ProbePass(len(chunks), probe_pass))
    lrs = method.learning_rates(step)
    engine.set_learning_rates(lrs)
    mark("before_step")
    loss_sum = torch.zeros((), device=chunks[0].device, dtype=torch.float64)
    for i, chunk in enumerate(chunks):
        method.before_micro_batch(last=i == len(chunks) - 1)
        with engine.forward_context():
            loss = lm_loss(engine.model, chunk)
        mark("forward")
        engine.backward(loss)
        loss_sum += loss.detach().double()
        del loss
        mark("backward")
    grad_norm = engine.step()
    mark("step")
    method.after_step(lrs)
    mark("after_step")
    return StepResult(event, lrs, loss_sum / len(chunks), grad_norm)


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch onto `device` without waiting for the work queued there: from page-locked memory a
    copy to the GPU is queued like a kernel, where from ordinary memory the driver may first wait
    for the stream."""
    if device.type != "cuda":
        return batch.to(device)
    return batch.pin_memory().to(device, non_blocking=True)


class StepReadout:
    """A step's loss (the mean over ranks) and gradient norm, on their way to the host.

    Reading a number off the GPU waits for every kernel queued before the read. The trainer reads
    a step's numbers after it has queued the next step, so the GPU does not idle while the host
    logs and starts a step; this copy, queued right behind the step with an event after it, lets
    that read wait for this step alone."""

    def __init__(self, result: StepResult, ctx):
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


class StopFlag:
    """SIGTERM / SIGINT ask for a checkpoint and a clean exit at the end of the current step."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.raised = True


def main(run: Run) -> dict:
    lock = rundir.RunLock(run.output_dir)  # taken by rank 0 only, in _main
    try:
        result = _main(run, lock)
    finally:
        lock.release()
    leave_distributed()
    return result


def _main(run: Run, lock: rundir.RunLock) -> dict:
    recipe = run.recipe
    ctx = distributed_context(run.engine, recipe.train.collective_timeout_s)
    device = resolve_device(recipe, ctx.local_rank)
    dtype = resolve_dtype(recipe, device)
    check_attn_implementation(recipe.model.attn_implementation, device)
    if recipe.model.frozen_dtype == "bfloat16" and dtype != torch.bfloat16:
        raise ConfigError(f"model.frozen_dtype: bfloat16 needs bfloat16 compute, but train.dtype is "
                          f"{recipe.train.dtype} ({str(dtype).removeprefix('torch.')} here); "
                          "set train.dtype=bfloat16 or model.frozen_dtype=float32")
    micro, accumulation = batch_geometry(recipe, ctx.world_size)
    is_main = ctx.rank == 0
    out = run.output_dir
    # rank 0 checks the folder, takes the lock and picks the checkpoints; its answer, or its one-line
    # error, reaches every rank before any of them waits for another
    claim = ctx.broadcast_object(claim_output_dir(out, lock) if is_main else None)
    if "error" in claim:
        raise RunError(claim["error"])

    # data: one rank tokenizes, the others wait and read the same shards
    if is_main:
        prepare(recipe.data, progress=True)
    ctx.barrier(patient=True)
    data = open_data(recipe.data, seq_len=recipe.model.seq_len, global_batch=recipe.train.global_batch,
                     seed=recipe.seed, rank=ctx.rank, world_size=ctx.world_size)

    built = time.perf_counter()
    vocab = data.vocab_size if recipe.model.size == "tiny" else max(OPT_VOCAB, data.vocab_size)
    method, engine = build_run(recipe, run.engine, ctx, device=device, dtype=dtype, vocab_size=vocab,
                               micro_batch=micro, accumulation=accumulation, ds_config=run.ds_config)
    init_s = ctx.maximum(time.perf_counter() - built)  # the model built and, under an engine, placed

    state = {"step": 0, "tokens": 0, "elapsed_s": 0.0}
    settings = checkpoint.run_settings(recipe.to_dict(), engine=run.engine, world_size=ctx.world_size,
                                       zero_stage=getattr(engine, "zero_stage", None), vocab_size=vocab)
    resume_from, saved, changed = load_newest(engine, claim["checkpoints"], settings, ctx, out)
    if saved is not None:
        if not run.eval_only and saved["step"] >= recipe.train.max_steps:  # of the checkpoint that loads
            if is_main:
                print(f"nothing to do: {resume_from} is at step {saved['step']} and train.max_steps is "
                      f"{recipe.train.max_steps}; raise --max-steps to train further", flush=True)
            return {"step": saved["step"], "output_dir": str(out)}
        state = {key: saved[key] for key in state}
        data.load_state_dict(saved["data"])
        if "torch_rng" in saved:
            torch.set_rng_state(torch.tensor(saved["torch_rng"], dtype=torch.uint8))
        if is_main:
            print(f"resuming from {resume_from} at step {state['step']}", flush=True)
            if changed:
                print(f"resuming with changed settings: {', '.join(changed)}", flush=True)

    if run.eval_only:
        return evaluate_checkpoint(engine, data, recipe, device, out, resume_from, state["step"], ctx)

    logger = MetricsLogger(out, recipe, is_main, resume_step=state["step"])
    stop = StopFlag()
    tokens_per_step = recipe.train.global_batch * recipe.model.seq_len
    max_steps = recipe.train.max_steps
    bar = tqdm(total=max_steps, initial=state["step"], disable=not is_main, desc=recipe.method,
               unit="step", dynamic_ncols=True)
    last_saved = state["step"]
    last_good = resume_from  # the newest checkpoint, named if the run diverges
    step = state["step"]
    clock = PhaseClock(device)

    def finish(record: dict, readout: StepReadout, eval_due: bool) -> None:
        """A step's numbers read, logged and checked; every rank reads the same all-reduced loss
        and global norm, so all stop at the same step."""
        loss_value, grad_norm = readout.read()
        record["loss"] = loss_value
        finite = math.isfinite(loss_value) and (grad_norm is None or math.isfinite(grad_norm))
        if finite and eval_due:
            with engine.forward_context():  # the training precision (bf16 frozen factors need it)
                record.update(run_eval(engine.model, data, recipe, device))
        logger.log(record)
        if logger.due(record):
            bar.update(record["step"] - bar.n)
            bar.set_postfix(loss=f"{loss_value:.4f}")
        if not finite:  # raised before any save: a checkpoint of this state would replace good ones
            bar.close()
            logger.close()
            raise RunError(f"training diverged at step {record['step']} (loss {loss_value}, gradient norm "
                           f"{grad_norm}); nothing saved. Last good checkpoint: {last_good or 'none'}; "
                           f"re-run with a lower lr (--set optim.lr=...) to resume from it")

    # A step's loss and norm are read one step late (StepReadout): the step after it is queued
    # first. A step is read at once where something depends on it being finite: a save, an
    # evaluation, the end, and the periodic work before the next step (a resample of a diverged
    # model would fail inside, with no word of the divergence); and a step with periodic work, so
    # its time in the log includes its own end.
    pending = None  # (record, readout) of the step not read yet
    try:
        while step < max_steps:
            t0 = time.perf_counter()
            clock.start()
            result = train_step(engine, method, step, to_device(data.next_batch(), device).split(micro), clock)
            readout = StepReadout(result, ctx)
            if pending is not None:
                previous, pending = pending, None
                finish(*previous, eval_due=False)
            step += 1
            stopping = ctx.any(stop.raised)
            every = recipe.checkpoint.every_steps
            save_due = recipe.checkpoint.save and (stopping or step == max_steps or (every and step % every == 0))
            eval_due = bool(recipe.eval.every_steps) and (step % recipe.eval.every_steps == 0 or step == max_steps)
            read_now = (save_due or eval_due or stopping or step == max_steps or bool(result.event)
                        or method.work_due(step))
            if read_now:
                readout.wait()  # this step's time includes its own end
            elapsed = time.perf_counter() - t0
            state["tokens"] += tokens_per_step
            state["elapsed_s"] += elapsed
            lrs = result.lrs
            record = {"step": step, "loss": None, "lr": lrs["full"], "lowrank_lr": lrs["lowrank"],
                      **({"galore_lr": lrs["galore"]} if "galore" in lrs else {}),
                      "tokens": state["tokens"], "elapsed_s": round(state["elapsed_s"], 4),
                      "tokens_per_s": round(tokens_per_step / elapsed, 1)}
            if result.event:
                record["event"] = result.event
                record["event_phases_s"] = clock.seconds()
            if init_s is not None:  # this process's first step: how long the build took
                record["init_s"], init_s = round(init_s, 2), None
            if device.type == "cuda":  # the largest over the ranks
                record["peak_mem_gib"] = round(ctx.maximum(torch.cuda.max_memory_allocated(device)) / 2**30, 3)
            if not read_now:
                pending = (record, readout)
                continue
            finish(record, readout, eval_due)
            if save_due:
                last_good = save(engine, data, state, step, out, recipe, ctx, settings, resume_from)
                last_saved = step
            if stopping:
                if is_main:
                    saved = "checkpoint saved, re-run to resume" if recipe.checkpoint.save else "checkpoint.save is off"
                    print(f"stopped by signal at step {step}; {saved}", flush=True)
                break
    except Exception:
        if pending is not None:  # the last step that ended is logged, though the one after it failed
            with contextlib.suppress(Exception):
                finish(*pending, eval_due=False)
        raise
    bar.close()
    if last_saved != step and recipe.checkpoint.save:
        save(engine, data, state, step, out, recipe, ctx, settings, resume_from)
    logger.close()
    ctx.barrier()
    return {"step": step, "output_dir": str(out)}


def run_eval(model, data, recipe: Recipe, device) -> dict:
    model.eval()
    batch = max(1, recipe.train.micro_batch or recipe.train.global_batch)
    loss = evaluate(model, data.eval_batches(recipe.eval.tokens, batch), device=device)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


def evaluate_checkpoint(engine, data, recipe: Recipe, device, out: Path, checkpoint_dir, step: int,
                        ctx) -> dict:
    """The periodic evaluation, run once on a loaded checkpoint; appended to eval.jsonl."""
    if checkpoint_dir is None:
        raise ConfigError(f"--eval-only: no checkpoint under {checkpoint.checkpoint_root(out)}; "
                          "train first, or pass the --output-dir of a run")
    with engine.forward_context():
        result = {"step": step, "checkpoint": checkpoint_dir.name, **run_eval(engine.model, data, recipe, device)}
    if ctx.rank == 0:
        with open(out / "eval.jsonl", "a") as f:
            f.write(json.dumps(result) + "\n")
        print(json.dumps(result), flush=True)
    ctx.barrier()
    return result


def claim_output_dir(out: Path, lock: rundir.RunLock) -> dict:
    """Rank 0: the output folder checked and locked, and the checkpoints to try, newest first; or
    the one-line reason not to start ({"error": ...})."""
    try:
        rundir.prepare(out)
        took_over = lock.acquire()
        checkpoints, warning = checkpoint.resolve(out)
    except RunError as err:
        return {"error": str(err)}
    for line in (took_over, warning):
        if line:
            print(line, file=sys.stderr, flush=True)
    return {"checkpoints": [str(p) for p in checkpoints]}


def load_newest(engine, checkpoints, settings: dict, ctx, out: Path) -> tuple[Path | None, dict | None, list]:
    """The newest of `checkpoints` whose engine state loads: (its folder, its trainer state, the
    settings that changed since it), or (None, None, []) to start fresh. Each is checked against
    this run's settings before loading, and one the engine cannot read gives way to the next older
    one; if none loads, the run stops with one line."""
    failures = []
    for path in map(Path, checkpoints):
        saved = checkpoint.read_trainer_state(path)
        changed = checkpoint.check_resume(path, saved, settings)
        failure = load_engine_state(engine, path, ctx)
        if failure is None:
            return path, saved, changed
        failures.append(f"{path.name}: {failure}")
        if ctx.rank == 0:
            print(f"warning: cannot load {path} ({failure}); trying the next older checkpoint",
                  file=sys.stderr, flush=True)
    if failures:
        raise RunError(f"no checkpoint in {checkpoint.checkpoint_root(out)} could be loaded "
                       f"({'; '.join(failures)}); to start fresh, move or delete that folder")
    return None, None, []


def load_engine_state(engine, path: Path, ctx) -> str | None:
    """Loads a checkpoint's engine state; None, or why it failed on any rank (all ranks agree)."""
    try:
        engine.load(path)
        failure = None
    except Exception as err:  # a damaged file surfaces as anything from EOFError to RuntimeError
        lines = str(err).strip().splitlines()
        failure = f"{type(err).__name__}: {lines[0][:200] if lines else ''}"
    if ctx.any(failure is not None):
        return failure or "failed on another rank"
    return None


def save(engine, data, state, step, out, recipe, ctx, settings, resumed_from) -> Path:
    """A checkpoint of `step` (collective); returns its folder."""
    path = checkpoint.partial_dir(out, step) if ctx.rank == 0 else checkpoint.checkpoint_root(out) / (
        checkpoint.step_name(step) + ".partial")
    ctx.barrier()
    engine.save(path)
    ctx.barrier()
    if ctx.rank == 0:
        trainer_state = {**state, "step": step, "data": data.state_dict(),
                         "torch_rng": torch.get_rng_state().tolist(), "method": recipe.method,
                         "settings": settings}
        checkpoint.commit(out, step, trainer_state, recipe.checkpoint.keep, resumed_from)
    ctx.barrier()
    return checkpoint.checkpoint_root(out) / checkpoint.step_name(step)


class MetricsLogger:
    """metrics.jsonl (appended, one object per step) and wandb, on rank 0 only. wandb, like the
    progress bar, sees every train.log_every-th step, evaluations and the last step."""

    def __init__(self, out: Path, recipe: Recipe, enabled: bool, resume_step: int):
        self.enabled = enabled
        self.wandb = None
        self.every, self.last = recipe.train.log_every, recipe.train.max_steps
        if not enabled:
            return
        # rows past the checkpoint (a kill after it, or a fallback to an older one) are trained again
        for name in ("metrics.jsonl", "eval.jsonl"):
            dropped = rundir.cut_log(out / name, resume_step)
            if dropped:
                print(f"{name}: dropped {dropped} rows past step {resume_step}, which is trained again",
                      flush=True)
        self.file = open(out / "metrics.jsonl", "a")
        (out / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=1))
        if recipe.wandb.mode != "disabled":
            import wandb

            # a resumed run continues the same wandb run: wandb picks the id once, we keep it
            id_file = out / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.exists() else None
            self.wandb = wandb.init(project=recipe.wandb.project, name=recipe.wandb.name, id=run_id,
                                    resume="allow", mode=recipe.wandb.mode, dir=str(out),
                                    config=recipe.to_dict())
            id_file.write_text(self.wandb.id)

    def due(self, record: dict) -> bool:
        step = record["step"]
        return step % self.every == 0 or step == self.last or "eval_loss" in record

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None and self.due(record):
            self.wandb.log({k: v for k, v in record.items() if k != "event"}, step=record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.wandb is not None:
                self.wandb.finish()


def set_threads() -> None:
    """On CPU, the cores shared out over the local ranks, so two gloo ranks do not fight over two
    cores; an OMP_NUM_THREADS in the environment wins (torch applied it at import): a CPU run's
    sums, hence its last bits, depend on the thread count, and the tests pin it on every side."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if local_world > 1 and not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))

"""The training loop: setup -> resume -> step -> log -> checkpoint, top to bottom. What it calls
lives beside it: metrics.py (what a step reports), evaluate.py (the loss, the evaluation) and
checkpoint.py (claiming the folder, loading, saving)."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from sst_dist import checkpoint, rundir
from sst_dist.config import Recipe
from sst_dist.data import TrainData, open_data, prepare
from sst_dist.engines import DistributedContext, build_engine, distributed_context, leave_distributed
from sst_dist.engines.base import Engine
from sst_dist.errors import ConfigError, RunError
from sst_dist.build import Materializer, build_on_meta
from sst_dist.evaluate import check_held_out, evaluate_checkpoint, lm_loss, run_eval
from sst_dist.methods import Method, ProbePass, build_method
from sst_dist.metrics import MetricsLogger, PhaseClock, StepReadout
from sst_dist.models import (build_model, check_attn_implementation, compile_blocks, compile_layers,
                             enable_activation_checkpointing, model_vocab)
from sst_dist.registry import spec
from sst_dist.runtime import StopFlag, batch_geometry, resolve_device, resolve_dtype, to_device



@dataclass
class Run:
    recipe: Recipe
    output_dir: Path
    engine: str = "torch"  # torch | deepspeed | fsdp
    ds_config: str | None = None
    eval_only: bool = False  # evaluate the latest checkpoint on the held-out split, then stop


def build_run(recipe: Recipe, engine_name: str, ctx, *, device, dtype, vocab_size: int, micro_batch: int,
              accumulation: int, ds_config: str | None = None, init_device=None) -> tuple[Method, object]:
    """The model, the method applied to it and the engine that wraps it: (method, engine).
    `init_device`: where a dense build initialises the weights (the benchmarks build large models
    on the GPU); None, the CPU, so a run's initial weights do not depend on the machine.
    model.build meta: the model is built on the meta device and materialised on `device` (SST
    layers directly as their factors), by the fsdp engine block by block as it shards."""
    spec(recipe.method).check_engine(engine_name)
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
        materialize = Materializer(model, seed=recipe.seed, device=device, dtype=master,
                                   rank=ctx.rank if sharded else 0, world_size=ctx.world_size if sharded else 1,
                                   **method.materializer_kwargs())
        if not sharded:
            materialize(model)
            materialize = None
    engine = build_engine(engine_name, model, method.param_groups(model), recipe, device=device, dtype=dtype,
                          micro_batch=micro_batch, accumulation=accumulation, ds_config=ds_config, ctx=ctx,
                          materialize=materialize)
    method.attach(engine.backend, recipe)
    if recipe.model.compile:  # last: the blocks as the engine wraps them, hooks included
        if engine.compiles_blocks:
            compile_blocks(engine.model, method.layers.values())
        else:
            compiled = compile_layers(method.layers.values())
            if ctx.rank == 0:
                print(f"model.compile: {compiled} SST layers compiled alone; the engine's per-module hooks and"
                      " the rest of each block run eagerly", flush=True)
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


def main(run: Run) -> dict:
    """Setup, resume, then the loop (or, with eval_only, one evaluation of the checkpoint)."""
    lock = rundir.RunLock(run.output_dir)  # taken by rank 0 only, in setup
    try:
        s = setup(run, lock)
        start = resume(s)
        if run.eval_only:
            result = evaluate_checkpoint(s.engine, s.data, run.recipe, s.device, run.output_dir,
                                         start.checkpoint, start.state["step"], s.ctx)
        else:
            step = start.state["step"] if start.done else loop(s, start)
            result = {"step": step, "output_dir": str(run.output_dir)}
    finally:
        lock.release()
    leave_distributed()
    return result


@dataclass
class Setup:
    """What a run builds before its first step."""
    run: Run
    ctx: DistributedContext
    device: torch.device
    micro: int  # sequences per forward on this rank
    data: TrainData  # this rank's batches and the held-out blocks
    method: Method
    engine: Engine
    settings: dict  # what a checkpoint records of this run (checkpoint.run_settings)
    checkpoints: list[str]  # those to resume from, newest first (rank 0's pick)
    init_s: float  # the model built and, under an engine, placed (the slowest rank)

    @property
    def recipe(self) -> Recipe:
        return self.run.recipe

    @property
    def is_main(self) -> bool:
        return self.ctx.rank == 0


def setup(run: Run, lock: rundir.RunLock) -> Setup:
    """The recipe checked against this machine, the output folder claimed, the data prepared and
    opened, and the model, method and engine built."""
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
    # rank 0 checks the folder, takes the lock and picks the checkpoints; its answer, or its one-line
    # error, reaches every rank before any of them waits for another
    claim = ctx.broadcast_object(checkpoint.claim_output_dir(run.output_dir, lock) if is_main else None)
    if "error" in claim:
        raise RunError(claim["error"])

    # data: one rank tokenizes, the others wait and read the same shards
    if is_main:
        prepare(recipe.data, progress=True)
    ctx.barrier(patient=True)
    data = open_data(recipe.data, seq_len=recipe.model.seq_len, global_batch=recipe.train.global_batch,
                     seed=recipe.seed, rank=ctx.rank, world_size=ctx.world_size)
    check_held_out(data, recipe, run.eval_only)

    built = time.perf_counter()
    vocab = model_vocab(recipe.model.size, data.vocab_size)
    method, engine = build_run(recipe, run.engine, ctx, device=device, dtype=dtype, vocab_size=vocab,
                               micro_batch=micro, accumulation=accumulation, ds_config=run.ds_config)
    init_s = ctx.maximum(time.perf_counter() - built)
    if is_main and recipe.checkpoint.save and not run.eval_only:
        checkpoint.check_free_space(run.output_dir, engine.model)
    settings = checkpoint.run_settings(recipe.to_dict(), engine=run.engine, world_size=ctx.world_size,
                                       zero_stage=getattr(engine, "zero_stage", None), vocab_size=vocab)
    return Setup(run, ctx, device, micro, data, method, engine, settings, claim["checkpoints"], init_s)


@dataclass
class Start:
    """Where the loop starts: the trainer's counters and the checkpoint they come from."""
    state: dict  # step, tokens, elapsed_s
    checkpoint: Path | None  # None: a fresh start
    done: bool = False  # the checkpoint is at train.max_steps already: nothing to train


def resume(s: Setup) -> Start:
    """The newest checkpoint that loads, put back (engine, data position, RNG); a fresh start
    without one."""
    recipe = s.recipe
    path, saved, changed = checkpoint.load_newest(s.engine, s.checkpoints, s.settings, s.ctx, s.run.output_dir)
    if saved is None:
        return Start({"step": 0, "tokens": 0, "elapsed_s": 0.0}, None)
    if not s.run.eval_only and saved["step"] >= recipe.train.max_steps:  # of the checkpoint that loads
        if s.is_main:
            print(f"nothing to do: {path} is at step {saved['step']} and train.max_steps is "
                  f"{recipe.train.max_steps}; raise --max-steps to train further", flush=True)
        return Start({"step": saved["step"]}, path, done=True)
    state = checkpoint.restore(saved, s.data)
    if s.is_main:
        print(f"resuming from {path} at step {state['step']}", flush=True)
        if changed:
            print(f"resuming with changed settings: {', '.join(changed)}", flush=True)
        if recipe.optim.schedule == "cosine" and any(c.startswith("train.max_steps ") for c in changed):
            # the decay ends at train.max_steps: a new end re-stretches it, and the lr steps there
            print(f"warning: optim.schedule=cosine decays to train.max_steps, now {recipe.train.max_steps}: "
                  f"the lr at step {state['step']} is re-read on the new cosine, not the old one's", flush=True)
    return Start(state, path)


def loop(s: Setup, start: Start) -> int:
    """Steps from the start to train.max_steps, or to a stop signal; each step logged, the model
    evaluated and saved when due. Returns the last step.

    A step's loss and norm are read one step late (StepReadout): the step after it is queued
    first. A step is read at once where something depends on it being finite: a save, an
    evaluation, the end, and the periodic work before the next step (a resample of a diverged
    model would fail inside, with no word of the divergence); and a step with periodic work, so
    its time in the log includes its own end."""
    recipe, ctx, engine, out = s.recipe, s.ctx, s.engine, s.run.output_dir
    state, max_steps, every = start.state, recipe.train.max_steps, recipe.checkpoint.every_steps
    logger = MetricsLogger(out, recipe, s.is_main, resume_step=state["step"])
    stop, clock = StopFlag(), PhaseClock(s.device)
    step = last_saved = state["step"]
    last_good = start.checkpoint  # the newest checkpoint, named if the run diverges
    init_s = s.init_s  # logged with this process's first step

    def finish(record: dict, readout: StepReadout, eval_due: bool) -> None:
        diverged = log_step(s, logger, record, readout, eval_due)
        if diverged:  # raised before any save: a checkpoint of this state would replace good ones
            logger.close()
            raise RunError(f"{diverged}; nothing saved. Last good checkpoint: {last_good or 'none'}; "
                           f"re-run with a lower lr (--set optim.lr=...) to resume from it")

    pending = None  # (record, readout) of the step not read yet
    try:
        while step < max_steps:
            t0 = time.perf_counter()
            clock.start()
            result = train_step(engine, s.method, step, to_device(s.data.next_batch(), s.device).split(s.micro),
                                clock)
            readout = StepReadout(result, ctx)
            if pending is not None:
                previous, pending = pending, None
                finish(*previous, eval_due=False)
            step += 1
            # one host all-reduce: 1 a stop signal; 2 rank 0's metrics.jsonl cannot be written, so
            # the steps since the last checkpoint are saved while that may still be possible
            halt = ctx.maximum(2 if logger.failure else 1 if stop.raised else 0)
            stopping = halt > 0
            save_due = recipe.checkpoint.save and (stopping or step == max_steps or (every and step % every == 0))
            eval_due = bool(recipe.eval.every_steps) and (step % recipe.eval.every_steps == 0 or step == max_steps)
            read_now = (save_due or eval_due or stopping or step == max_steps or bool(result.event)
                        or s.method.work_due(step))
            if read_now:
                readout.wait()  # this step's time includes its own end
            record = step_record(s, step, result, state, time.perf_counter() - t0, clock, init_s)
            init_s = None
            if not read_now:
                pending = (record, readout)
                continue
            finish(record, readout, eval_due)
            unlogged = (logger.failure or "rank 0 cannot write metrics.jsonl") if halt == 2 else None
            if save_due:
                try:
                    last_good = checkpoint.save(engine, s.data, state, step, out, recipe, ctx, s.settings,
                                                start.checkpoint)
                except RunError as err:
                    raise RunError(f"{unlogged}; {err}") if unlogged else err
                last_saved = step
            if unlogged:
                saved = f"checkpoint saved at step {step}" if save_due else "checkpoint.save is off"
                raise RunError(f"{unlogged}; {saved}: free space, then re-run to resume")
            if stopping:
                if s.is_main:
                    saved = "checkpoint saved, re-run to resume" if recipe.checkpoint.save else "checkpoint.save is off"
                    print(f"stopped by signal at step {step}; {saved}", flush=True)
                break
    except Exception:
        if pending is not None:  # the last step that ended is logged, though the one after it failed
            with contextlib.suppress(Exception):
                finish(*pending, eval_due=False)
        logger.close()
        raise
    if last_saved != step and recipe.checkpoint.save:
        checkpoint.save(engine, s.data, state, step, out, recipe, ctx, s.settings, start.checkpoint)
    logger.close()
    ctx.barrier()
    if logger.failure:  # the last step's row, after its checkpoint
        raise RunError(f"{logger.failure}; " + (f"checkpoint saved at step {step}" if recipe.checkpoint.save
                                                 else "checkpoint.save is off"))
    return step


def step_record(s: Setup, step: int, result: StepResult, state: dict, elapsed: float, clock: PhaseClock,
                init_s: float | None) -> dict:
    """A step's row of metrics.jsonl, its loss still to be read; the step's tokens and time are
    added to `state`."""
    tokens_per_step = s.recipe.train.global_batch * s.recipe.model.seq_len
    state["tokens"] += tokens_per_step
    state["elapsed_s"] += elapsed
    lrs = result.lrs
    record = {"step": step, "loss": None, **Method.lr_fields(lrs),
              "tokens": state["tokens"], "elapsed_s": round(state["elapsed_s"], 4),
              "tokens_per_s": round(tokens_per_step / elapsed, 1)}
    if result.event:
        record["event"] = result.event
        record["event_phases_s"] = clock.seconds()
    if init_s is not None:  # this process's first step: how long the build took
        record["init_s"] = round(init_s, 2)
    if s.device.type == "cuda":  # the largest over the ranks
        record["peak_mem_gib"] = round(s.ctx.maximum(torch.cuda.max_memory_allocated(s.device)) / 2**30, 3)
    return record


def log_step(s: Setup, logger: MetricsLogger, record: dict, readout: StepReadout, eval_due: bool) -> str | None:
    """A step's numbers read into its row, the model evaluated if due, the row logged; why the run
    diverged, or None. Every rank reads the same all-reduced loss and global norm, so all stop at
    the same step."""
    loss_value, grad_norm = readout.read()
    record["loss"] = loss_value
    finite = math.isfinite(loss_value) and (grad_norm is None or math.isfinite(grad_norm))
    if finite and eval_due:
        with s.engine.forward_context():  # the training precision (bf16 frozen factors need it)
            record.update(run_eval(s.engine.model, s.data, s.recipe, s.device))
    logger.log(record)
    if finite:
        return None
    return f"training diverged at step {record['step']} (loss {loss_value}, gradient norm {grad_norm})"

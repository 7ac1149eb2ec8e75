"""Checkpoint folders that a kill can never corrupt, and which one a run resumes from.

A checkpoint is written into `step_NNNNNNN.partial/`, sealed with `trainer.json` (the trainer's
state, the settings the run was started with, and every file's size), renamed to `step_NNNNNNN/`
and only then named in `latest` (itself replaced atomically). A killed save leaves a `.partial`
folder that is ignored and removed by the next save; the previous good checkpoint is untouched.

Resuming never goes backwards silently: `latest` if it is complete, else the newest complete
checkpoint with a warning naming what was skipped; never a fresh start while a `step_N` folder
exists. Pruning keeps the newest by step number, the checkpoint just written and the one resumed from.

The trainer calls the functions at the end: claim_output_dir, load_newest (with restore) and save.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import torch

from sst_dist import rundir
from sst_dist.config import flatten, upgrade_saved
from sst_dist.errors import RunError
from sst_dist.rundir import write_atomic

LATEST = "latest"
TRAINER_STATE = "trainer.json"
_STEP = re.compile(r"step_(\d+)")

# Recipe keys that shape the model's parameters or the meaning of the saved state: a checkpoint
# resumes only with the values it was written with. Every other key (lr, max_steps, eval,
# checkpointing, logging, ...) may change on a re-run, and the new value is used.
STATE_KEYS = ("method", "rank", "targets", "model.size", "model.seq_len", "sst.path", "galore.rank",
              "galore.proj_type")
# Engines whose checkpoints load only on the world size that wrote them: ZeRO stores one optimizer
# partition per rank. FSDP2's DCP folders reshard, and the single-process engine has one world size.
SAME_WORLD_SIZE = ("deepspeed",)


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def step_of(path: Path) -> int | None:
    match = _STEP.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def step_folders(output_dir: str | Path) -> list[Path]:
    """Every `step_N` folder, complete or not (never a `.partial` one), in step order (numeric: names
    sort wrongly past step 9,999,999)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if step_of(p) is not None and p.is_dir()), key=step_of)


def read_trainer_state(path: Path) -> dict:
    return json.loads((path / TRAINER_STATE).read_text())


def problem(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint (a short phrase), or None when it is one."""
    if not path.is_dir():
        return "missing"
    try:
        state = read_trainer_state(path)
    except FileNotFoundError:
        return f"no {TRAINER_STATE}"
    except (OSError, ValueError):
        return f"{TRAINER_STATE} unreadable"
    if not isinstance(state, dict) or state.get("step") != step_of(path):
        return f"{TRAINER_STATE} is not for this step"
    for name, size in state.get("files", {}).items():  # checkpoints from before the manifest have none
        file = path / name
        if not file.is_file():
            return f"{name} missing"
        if file.stat().st_size != size:
            return f"{name} truncated ({file.stat().st_size} of {size} bytes)"
    return None


def resolve(output_dir: str | Path) -> tuple[list[Path], str | None]:
    """The checkpoints to resume from, in the order to try them, and a warning line when the first
    is not simply `latest`. The first is `latest` if complete, else the newest complete checkpoint;
    the older complete ones follow, for when the engine cannot load one. Raises RunError if `step_N`
    folders (or `latest`) exist but none is complete: a fresh start would silently discard them."""
    root = checkpoint_root(output_dir)
    folders = step_folders(output_dir)
    problems = {p: problem(p) for p in folders}
    complete = [p for p in reversed(folders) if problems[p] is None]  # newest first
    marker = root / LATEST
    named = None
    notes = []
    if marker.exists():
        try:
            named = marker.read_text().strip()
        except OSError:
            pass
        if not named:
            notes.append("latest is empty" if named == "" else "latest is unreadable")
        elif root / named in complete:
            chosen = root / named
            newer = [p.name for p in complete if step_of(p) > step_of(chosen)]
            warning = None
            if newer:  # a save killed between its rename and `latest`, or `latest` edited by hand
                warning = (f"warning: {root}: latest names {named}; resuming from it, not from the newer "
                           f"{', '.join(newer)}")
            return [chosen, *(p for p in complete if step_of(p) < step_of(chosen))], warning
        else:
            notes.append(f"latest names {named} ({problem(root / named) or 'not a checkpoint'})")
    elif complete:
        notes.append("latest is missing")
    newest = step_of(complete[0]) if complete else -1
    notes += [f"{p.name} is incomplete ({why})" for p, why in problems.items()
              if why and step_of(p) > newest and p.name != named]
    if not complete:
        if notes:
            raise RunError(f"{root}: no complete checkpoint to resume from: {'; '.join(notes)}. "
                           f"To start fresh, move or delete {root}")
        return [], None
    return complete, f"warning: {root}: {'; '.join(notes)}; resuming from {complete[0].name}"


def partial_dir(output_dir: str | Path, step: int) -> Path:
    path = checkpoint_root(output_dir) / (step_name(step) + ".partial")
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def commit(output_dir: str | Path, step: int, trainer_state: dict, keep: int,
           resumed_from: Path | None = None) -> Path:
    """Seals a fully written partial folder: trainer state and file sizes, rename, `latest`, pruning."""
    root = checkpoint_root(output_dir)
    partial = root / (step_name(step) + ".partial")
    files = {p.relative_to(partial).as_posix(): p.stat().st_size
             for p in sorted(partial.rglob("*")) if p.is_file()}
    write_atomic(partial / TRAINER_STATE, json.dumps({**trainer_state, "files": files}, indent=1))
    final = root / step_name(step)
    if final.exists():
        shutil.rmtree(final)
    partial.replace(final)
    write_atomic(root / LATEST, final.name)
    prune(output_dir, keep, final, resumed_from)
    return final


def prune(output_dir: str | Path, keep: int, written: Path, resumed_from: Path | None = None) -> None:
    """Deletes complete checkpoints but the `keep` newest by step, the one just `written` and the one
    the run `resumed_from`; incomplete `step_N` folders older than `written` (resuming never picks
    them); and the `.partial` folders of killed saves."""
    folders = step_folders(output_dir)
    complete = [p for p in folders if problem(p) is None]
    spare = {p.name for p in complete[-keep:]} | {written.name}
    if resumed_from is not None:
        spare.add(resumed_from.name)
    for old in folders:
        if old.name not in spare and (old in complete or step_of(old) < step_of(written)):
            shutil.rmtree(old, ignore_errors=True)
    for partial in checkpoint_root(output_dir).glob("step_*.partial"):
        shutil.rmtree(partial, ignore_errors=True)


def estimated_size(model) -> int:
    """A checkpoint's bytes, about: every parameter and buffer in its own dtype, and for each trainable
    element the optimizer's two fp32 moments, an fp32 age (sst_dist.optim; only resettable groups keep
    one) and an fp32 master where the parameter is narrower. An overestimate where a group keeps no
    age, or GaLore's projected moments."""
    total = sum(b.numel() * b.element_size() for b in model.buffers())
    for param in model.parameters():
        numel = getattr(param, "ds_numel", param.numel())  # ZeRO-3 leaves an empty tensor in place
        total += numel * param.element_size()
        if param.requires_grad:
            total += numel * (12 + (4 if param.element_size() < 4 else 0))
    return total


def check_free_space(out: Path, model) -> None:
    """Before the first step: one warning line when the output folder's disk cannot hold another
    checkpoint (a save writes the new one before it prunes an old one)."""
    need, free = estimated_size(model), shutil.disk_usage(out).free
    if free < need:
        print(f"warning: --output-dir {out}: {free / 2**30:.2f} GiB free, a checkpoint takes about "
              f"{need / 2**30:.2f} GiB; free space, or the first save will fail and stop the run",
              file=sys.stderr, flush=True)


def run_settings(recipe: dict, *, engine: str, zero_stage: int | None, world_size: int,
                 vocab_size: int) -> dict:
    """What a checkpoint records about the run that wrote it, for `check_resume`."""
    return {"recipe": recipe, "engine": engine, "zero_stage": zero_stage, "world_size": world_size,
            "vocab_size": vocab_size}


def check_resume(path: Path, saved: dict, current: dict) -> list[str]:
    """Raises RunError naming every setting the checkpoint at `path` cannot be resumed with; returns
    the changed settings it can, as 'key old -> new'. `saved` is its trainer state, `current` this
    run's `run_settings`."""
    old = saved.get("settings")
    if old is None:  # written before checkpoints recorded their settings
        return []
    before, after = flatten(upgrade_saved(old["recipe"])), flatten(current["recipe"])
    blocking, kept = [], []
    for key in sorted(before.keys() | after.keys()):
        if before.get(key) != after.get(key):
            (blocking if key in STATE_KEYS else kept).append(f"{key} {_show(before.get(key))} -> "
                                                             f"{_show(after.get(key))}")
    facts = [("engine", "engine"), ("vocab_size", "vocabulary size")]
    if old["engine"] == current["engine"]:
        facts.append(("zero_stage", "ZeRO stage"))
        if current["engine"] in SAME_WORLD_SIZE:
            facts.append(("world_size", "world size"))
    for key, label in facts:
        if old.get(key) != current.get(key):
            blocking.append(f"{label} {_show(old.get(key))} -> {_show(current.get(key))}")
    if blocking:
        raise RunError(f"cannot resume {path}, it was written with other settings: {', '.join(blocking)}. "
                       f"Re-run with its settings, or use another --output-dir to start fresh")
    return kept


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


# The trainer's side, collective where it takes `ctx`: the folder claimed, the newest loadable
# checkpoint loaded, and a checkpoint written.


def claim_output_dir(out: Path, lock: rundir.RunLock) -> dict:
    """Rank 0: the output folder checked and locked, and the checkpoints to try, newest first; or
    the one-line reason not to start ({"error": ...})."""
    try:
        rundir.prepare(out)
        took_over = lock.acquire()
        checkpoints, warning = resolve(out)
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
        saved = read_trainer_state(path)
        changed = check_resume(path, saved, settings)
        failure = load_engine_state(engine, path, ctx)
        if failure is None:
            return path, saved, changed
        failures.append(f"{path.name}: {failure}")
        if ctx.rank == 0:
            print(f"warning: cannot load {path} ({failure}); trying the next older checkpoint",
                  file=sys.stderr, flush=True)
    if failures:
        raise RunError(f"no checkpoint in {checkpoint_root(out)} could be loaded "
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
    """A checkpoint of `step` (collective); returns its folder. A write that fails on any rank (a
    full disk) removes the partial folder and stops every rank with one line naming it and why;
    the checkpoints written before are untouched."""
    partial = checkpoint_root(out) / (step_name(step) + ".partial")

    def attempt(work) -> bool:  # True if `work` failed on any rank; each rank keeps its own reason
        nonlocal failure
        try:
            work()
        except Exception as err:  # torch.save's disk-full error is a RuntimeError with no errno
            failure = rundir.write_failure(err, partial)
        return ctx.any(failure is not None)  # also the barrier between the three parts

    def seal():
        trainer_state = {**state, "step": step, "data": data.state_dict(),
                         "torch_rng": torch.get_rng_state().tolist(), "method": recipe.method,
                         "settings": settings}
        commit(out, step, trainer_state, recipe.checkpoint.keep, resumed_from)

    failure = None
    if (attempt(lambda: partial_dir(out, step) if ctx.rank == 0 else None)
            or attempt(lambda: engine.save(partial))
            or attempt(seal if ctx.rank == 0 else lambda: None)):
        if ctx.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise RunError(f"cannot write checkpoint {partial}: {failure or 'failed on another rank'}; it is "
                       "removed, the checkpoints before it are untouched: free space, then re-run to resume")
    return checkpoint_root(out) / step_name(step)


def restore(saved: dict, data) -> dict:
    """Puts back what `save` wrote beside the engine's state (the data position, the torch RNG) and
    returns the trainer's counters: step, tokens, elapsed_s."""
    data.load_state_dict(saved["data"])
    if "torch_rng" in saved:
        torch.set_rng_state(torch.tensor(saved["torch_rng"], dtype=torch.uint8))
    return {key: saved[key] for key in ("step", "tokens", "elapsed_s")}

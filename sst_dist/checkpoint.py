"""Checkpoint folders that a kill can never corrupt.

A checkpoint is written into `step_NNNNNNN.partial/`, renamed to `step_NNNNNNN/` when complete,
and only then named in `latest` (itself replaced atomically). A killed save leaves a `.partial`
folder that is ignored and removed next time; the previous good checkpoint is untouched.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

LATEST = "latest"
TRAINER_STATE = "trainer.json"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    root = checkpoint_root(output_dir)
    marker = root / LATEST
    if not marker.is_file():
        return None
    path = root / marker.read_text().strip()
    return path if (path / TRAINER_STATE).is_file() else None


def partial_dir(output_dir: str | Path, step: int) -> Path:
    path = checkpoint_root(output_dir) / (step_name(step) + ".partial")
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def commit(output_dir: str | Path, step: int, trainer_state: dict, keep: int) -> Path:
    """Seals a fully written partial folder: trainer state, rename, `latest`, pruning."""
    root = checkpoint_root(output_dir)
    partial = root / (step_name(step) + ".partial")
    _write_atomic(partial / TRAINER_STATE, json.dumps(trainer_state, indent=1))
    final = root / step_name(step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    _write_atomic(root / LATEST, final.name)
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".partial"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_trainer_state(path: Path) -> dict:
    return json.loads((path / TRAINER_STATE).read_text())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

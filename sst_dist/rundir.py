"""The output folder: checked before anything is written, held by one run at a time, its logs cut
back to the step a run resumes from."""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import socket
import time
from pathlib import Path

from sst_dist.errors import RunError

LOCK = "run.lock"


def write_atomic(path: Path, text: str) -> None:
    """Replaces `path` by `text` at once: a kill leaves the old file or the new one, never a mix; a
    failed write (a full disk) leaves the old one and no temporary file. The temporary file is named
    by process, so ranks racing to write the same file do no harm."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# Below this much free space, a write error that gives no reason (torch.save's "file write failed")
# is taken for a full disk: one that failed for want of space leaves next to nothing free
NEARLY_FULL = 64 * 2**20


def write_failure(err: BaseException, path: Path) -> str:
    """Why a write under `path` failed, in a few words: the errno's text ("No space left on
    device", "File too large" past `ulimit -f`), else the error's first line."""
    seen = err
    while seen is not None:  # the OSError may be the cause of a library's own error
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    # safetensors wraps the OS error in its own: "I/O error: No space left on device (os error 28)"
    wrapped = re.search(r'I/O error: ([^(\n]+?) \(os error|message: "([^"]+)"', str(err))
    if wrapped:
        return wrapped.group(1) or wrapped.group(2)
    try:
        free = shutil.disk_usage(nearest_existing(path)).free
    except OSError:
        free = None
    if free is not None and free < NEARLY_FULL:
        return f"No space left on device ({free // 2**20} MiB free)"
    lines = str(err).strip().splitlines()
    first = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", lines[0] if lines else type(err).__name__)[:200]
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:  # past it a write fails, and torch.save does not say why
        first += f"; a file size limit is set (ulimit -f {limit // 1024})"
    return first


def nearest_existing(path: Path) -> Path:
    """`path` or its nearest existing parent (the working folder for a relative path none of whose
    parents exist)."""
    return next((p for p in (path, *path.parents) if p.exists()), Path("."))


def nearest_existing_folder(path: Path, flag: str) -> Path:
    """`path` or its nearest existing parent, which must be a folder: else RunError naming `flag`
    (a file where the folder, or one of its parents, would go)."""
    existing = nearest_existing(path)
    if not existing.is_dir():
        where = "is a file, not a folder" if existing == path else f"is inside {existing}, which is a file"
        raise RunError(f"{flag} {path} {where}")
    return existing


def prepare(out: Path) -> None:
    """Creates the output folder, or says in one line why it cannot hold a run."""
    nearest_existing_folder(out, "--output-dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunError(f"--output-dir {out}: cannot create it ({err.strerror})") from None
    if (out / "checkpoints").exists() and not (out / "checkpoints").is_dir():
        raise RunError(f"--output-dir {out}: {out / 'checkpoints'} is a file, not a folder")
    for path in (out, out / "checkpoints", out / "metrics.jsonl", out / "recipe.json"):
        if path.exists() and not os.access(path, os.W_OK | (os.X_OK if path.is_dir() else 0)):
            raise RunError(f"--output-dir {out}: {path} is read-only")
    # a read-only mount, a full disk or a quota passes the permission check (and root passes it always)
    for folder in (out, out / "checkpoints"):
        probe = folder / f".write-probe.{os.getpid()}"
        try:
            if folder.is_dir():
                probe.write_bytes(bytes(4096))
                probe.unlink()
        except OSError as err:
            with contextlib.suppress(OSError):
                probe.unlink()
            raise RunError(f"--output-dir {out}: cannot write in {folder} ({write_failure(err, folder)})") from None


def process_start(pid: int) -> str | None:
    """When the kernel started `pid` (Linux): tells the lock's holder from a process that got its pid later."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_running(pid, start: str | None) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return True  # not a pid this code wrote: assume the holder may still be there
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    now = process_start(pid)
    return start is None or now is None or now == start


class RunLock:
    """`run.lock` in the output folder, naming the run that writes there (host, pid, start).

    Taken by rank 0 before anything is written. A lock whose process is gone (a kill -9, a crashed
    node's run re-started on the same host) is taken over with a warning; a live one, or one from
    another host (whose processes cannot be checked from here), stops the new run.
    """

    def __init__(self, out: Path):
        self.path = out / LOCK
        self.held = False
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "start": process_start(os.getpid())}

    def acquire(self) -> str | None:
        """Takes the lock; returns a warning line if it took over a stale one. Raises RunError if held."""
        text = json.dumps({**self.me, "since": time.strftime("%Y-%m-%d %H:%M:%S")})
        warning = None
        try:
            if not self._create(text):
                holder = self._holder()
                if holder is None or holder.get("host") != self.me["host"] or process_running(
                        holder.get("pid"), holder.get("start")):
                    raise RunError(self._in_use(holder))
                warning = (f"warning: {self.path}: took over the lock of pid {holder['pid']} "
                           f"(started {holder.get('since', '?')}), which is no longer running")
                self.path.unlink(missing_ok=True)
                if not self._create(text):  # another run took it over first
                    raise RunError(self._in_use(self._holder()))
        except OSError as err:
            raise RunError(f"--output-dir {self.path.parent}: cannot write {self.path.name} "
                           f"({err.strerror})") from None
        self.held = True
        return warning

    def release(self) -> None:
        if self.held and (self._holder() or {}).get("pid") == self.me["pid"]:
            self.path.unlink(missing_ok=True)
        self.held = False

    def _create(self, text: str) -> bool:
        """Creates the lock file whole (a hard link of a finished temporary file), or not at all if
        it exists: a reader never sees it half written."""
        tmp = self.path.with_name(f"{self.path.name}.{self.me['pid']}.tmp")
        tmp.write_text(text)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _in_use(self, holder: dict | None) -> str:
        if holder is None:
            return (f"--output-dir {self.path.parent} is in use ({self.path} is unreadable); "
                    f"delete it if no run writes there")
        return (f"--output-dir {self.path.parent} is in use by pid {holder.get('pid')} on "
                f"{holder.get('host')} (since {holder.get('since', '?')}); stop that run, or delete "
                f"{self.path} if it is gone")


def cut_log(path: Path, last_step: int) -> int:
    """Drops the rows of a .jsonl log past `last_step`, and a line torn by a kill, so that a resumed
    run appends every step once. Rewrites the file atomically; returns how many rows were dropped."""
    if not path.is_file():
        return 0
    text = path.read_text()
    lines = text.splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= last_step:
            kept.append(line)
    if len(kept) != len(lines) or not text.endswith("\n") and text:
        write_atomic(path, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)

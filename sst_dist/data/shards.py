"""Tokenize a source once into token shards (nanoGPT's habit), resumably, with many processes.

Layout of a prepared folder `<cache_dir>/<source>-<tokenizer>[-n<max_docs>][-val<f>]/`:

    manifest.json          settings, tokenizer fingerprint, one entry per finished part
    tokenizer.json         the tokenizer that made the shards (decode, evaluate elsewhere)
    train_00000.bin ...    token ids (uint16 when the vocabulary fits, else uint32), documents
    val_00000.bin ...      joined as  doc0 EOS doc1 EOS ...

The source is cut into *parts* of DOCS_PER_PART consecutive documents. A part's two files are
written under a `.partial` name, renamed when complete, and only then added to the manifest
(itself replaced atomically). A killed run loses at most the part in progress; the next run
skips the documents of the finished parts and carries on. `complete: true` marks the end.

Held-out split: document i goes to validation iff floor((i+1)f) > floor(if) for f =
val_fraction: exactly that fraction, spread evenly through the corpus, the same whatever the
number of processes. C4, which has a validation split of its own, fills those slots with its
validation documents in order, the others with its training documents (c4_documents).
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import itertools
import json
import math
import os
import re
import sys
import zlib
from collections import deque
from pathlib import Path
from typing import Iterator

import numpy as np

from sst_dist.data.tokenizer import SAMPLE_DIR, Tok, load_tokenizer
from sst_dist.errors import DataError
from sst_dist.hub import hub_reachable
from sst_dist.rundir import write_atomic

FORMAT = 1
MANIFEST = "manifest.json"
SOURCES = ("sample", "local", "openwebtext", "c4")  # data.source
DOCS_PER_PART = 65536  # about 70M OpenWebText tokens: 140 MB uint16 per train shard
# data.source c4: the dataset and variant on the hub (GaLore's, APOLLO's and Fira's pretraining data),
# and the file names of its splits in a downloaded copy (data.path)
C4_DATASET, C4_VARIANT = "allenai/c4", "en"
C4_FILES = {"train": "c4-train.*.json.gz", "validation": "c4-validation.*.json.gz"}
CHUNK_CHARS = 1 << 18  # characters per task: ~0.1 s of work, enough to hide the IPC, small enough to balance


# ---------------------------------------------------------------- sources


# A local file is read as UTF-8, strictly: errors="replace" had made a binary file, or a Latin-1
# one, silently into training tokens. What does not read is a DataError naming the file (and the
# byte), which data.on_bad_file turns into a stop or a skipped file (iter_documents).

def _open(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


@contextlib.contextmanager
def _reading(path: Path):
    """Turns a file that does not read (not gzip, cut short, unreadable) into a one-line DataError."""
    try:
        yield
    except gzip.BadGzipFile:
        raise DataError(f"{path}: not a gzip file, though named .gz") from None
    except EOFError:
        raise DataError(f"{path}: truncated (the gzip stream ends early)") from None
    except zlib.error as err:
        raise DataError(f"{path}: corrupt gzip data ({err})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read it ({err.strerror or err})") from None


def _decode(path: Path, data: bytes, offset: int = 0) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        where = "of its uncompressed text " if path.name.endswith(".gz") else ""
        raise DataError(f"{path}: byte {offset + err.start:,} {where}(0x{data[err.start]:02x}) is not UTF-8;"
                        " a binary file, or text in another encoding (convert it: iconv -t utf-8)") from None


def _texts_jsonl(path: Path, field: str = "text") -> Iterator[str]:
    with _reading(path), _open(path) as f:
        offset = 0
        for n, raw in enumerate(f, 1):
            line = _decode(path, raw, offset)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                text = json.loads(line)[field]
            except (json.JSONDecodeError, KeyError, TypeError):
                text = None
            if not isinstance(text, str):
                raise DataError(f"{path}:{n}: not a JSON object with a '{field}' string")
            yield text


def _texts_parquet(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            raise DataError(f"{path}: no 'text' column (columns: {', '.join(pf.schema_arrow.names)})")
        for batch in pf.iter_batches(columns=["text"], batch_size=4096):
            yield from (t for t in batch.column(0).to_pylist() if t is not None)
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{path}: cannot read as parquet ({type(err).__name__})") from None


def _texts_txt(path: Path) -> Iterator[str]:
    with _reading(path), _open(path) as f:
        data = f.read()
    yield _decode(path, data)


_READERS = {
    ".jsonl": _texts_jsonl, ".jsonl.gz": _texts_jsonl, ".json.gz": _texts_jsonl,
    ".parquet": _texts_parquet, ".txt": _texts_txt, ".txt.gz": _texts_txt,
}


def _reader(path: Path):
    for ext, fn in _READERS.items():
        if path.name.endswith(ext):
            return fn
    return None


def _local_texts(path: Path, on_bad_file: str) -> Iterator[str]:
    """A local file's documents, all or none: the whole file is read once before its first
    document is used, so a bad file is left out whole (skip) or stops before any of it is
    tokenized (stop), and the documents' numbering (split, resume) is the same either way."""
    read = _reader(path)
    try:
        for _ in read(path):
            pass
    except DataError as err:
        if on_bad_file == "skip":
            print(f"warning: {err}; left out (data.on_bad_file=skip)", file=sys.stderr, flush=True)
            return
        raise DataError(f"{err}; fix or remove the file, or set data.on_bad_file=skip to leave it out") from None
    yield from read(path)


def local_files(folder: str | Path) -> list[Path]:
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"data.path: {root} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and _reader(p) is not None)
    if not files:
        raise DataError(f"data.path: {root} holds no .txt, .jsonl or .parquet files (.gz allowed)")
    return files


def sample_files() -> list[Path]:
    files = sorted(SAMPLE_DIR.glob("*.jsonl.gz"))
    if not files:
        raise DataError(f"{SAMPLE_DIR}: the bundled sample is missing (no *.jsonl.gz)")
    return files


def _hf_texts(name: str, variant: str | None = None, split: str = "train", what: str | None = None,
              copy: str = "data.source=local and data.path") -> Iterator[str]:
    """The hub dataset, streamed; with HF_HUB_OFFLINE=1, a copy in the local HF cache. `what`
    names it in an error, `copy` says how to point at a downloaded copy instead."""
    what = what or f"data.hf_dataset={name}"
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if not offline and not hub_reachable():
        raise DataError(
            f"{what}: the Hugging Face hub is not reachable from this machine; set {copy} to a "
            "downloaded copy (or HF_HUB_OFFLINE=1 for one in the HF cache), or use data.source=sample")
    try:
        import datasets

        datasets.logging.set_verbosity_error()
        ds = datasets.load_dataset(name, variant, split=split, streaming=not offline)
    except Exception as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise DataError(f"{what}: cannot load it ({reason}); set {copy} to a downloaded copy, "
                        "or use data.source=sample") from None
    for row in ds:
        yield row["text"]


def c4_split_files(folder: str | Path, split: str) -> list[Path]:
    """A downloaded C4's files of `split`, in order: <folder>/[en/]c4-<split>.NNNNN-of-NNNNN.json.gz."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"data.path: {root} is not a folder")
    files = sorted(root.glob(C4_FILES[split])) or sorted(root.glob(f"{C4_VARIANT}/{C4_FILES[split]}"))
    if not files:
        raise DataError(f"data.path: {root} holds no C4 {split} files ({C4_FILES[split]}, or under "
                        f"{C4_VARIANT}/); point it at a copy of {C4_DATASET}'s {C4_VARIANT} folder")
    return files


def _c4_texts(cfg, split: str) -> Iterator[str]:
    if cfg.path:
        for path in c4_split_files(cfg.path, split):
            yield from _texts_jsonl(path)
    else:
        yield from _hf_texts(C4_DATASET, C4_VARIANT, split, what=f"data.source=c4 ({C4_DATASET} {C4_VARIANT})",
                             copy=f"data.path (C4's {C4_VARIANT} folder of json.gz files)")


def c4_documents(cfg) -> Iterator[str]:
    """C4's documents as one stream whose held-out slots (is_val) hold its validation split, in
    order, and every other slot its training split, so the held-out set is C4's own. Past the end
    of the validation split (36M documents at val_fraction 0.01), the held-out slots take training
    documents, which are then never trained on."""
    train, val = _c4_texts(cfg, "train"), None
    index = 0
    while True:
        if is_val(index, cfg.val_fraction):
            if val is None:  # opened at the first held-out slot: a short run reads it only then
                val = _c4_texts(cfg, "validation")
            text = next(val, None)
            if text is None:
                text = next(train, None)
        else:
            text = next(train, None)
        if text is None:
            return
        yield text
        index += 1


def iter_documents(cfg) -> Iterator[str]:
    """The documents of cfg.source in a fixed order (the order fixes the split and resume)."""
    if cfg.source == "sample":
        for path in sample_files():
            yield from _texts_jsonl(path)
    elif cfg.source == "local":
        if not cfg.path:
            raise DataError("data.path: required when data.source is 'local'")
        for path in local_files(cfg.path):
            yield from _local_texts(path, cfg.on_bad_file)
    elif cfg.source == "openwebtext":
        yield from _hf_texts(cfg.hf_dataset)
    elif cfg.source == "c4":
        yield from c4_documents(cfg)
    else:
        raise DataError(f"data.source: {cfg.source!r} is not one of {', '.join(SOURCES)}")


# ---------------------------------------------------------------- naming


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")


def _path_slug(path: str) -> str:
    path = Path(path).expanduser().resolve()
    return f"{_slug(path.name)}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def source_slug(cfg) -> str:
    if cfg.source == "sample":
        return "sample"
    if cfg.source == "local":
        return f"local-{_path_slug(cfg.path)}"
    if cfg.source == "c4":  # the hub's, or a downloaded copy's
        return f"c4-{C4_VARIANT}" + (f"-{_path_slug(cfg.path)}" if cfg.path else "")
    return _slug(cfg.hf_dataset.split("/")[-1])


def folder_name(cfg, tok_name: str) -> str:
    name = f"{source_slug(cfg)}-{tok_name}"
    if cfg.max_docs is not None:
        name += f"-n{cfg.max_docs}"
    if cfg.val_fraction != 0.01:
        name += f"-val{cfg.val_fraction:g}"
    return name


def is_val(index: int, fraction: float) -> bool:
    return math.floor((index + 1) * fraction) > math.floor(index * fraction)


# ---------------------------------------------------------------- manifest


def read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError
    except (ValueError, OSError, AttributeError):
        raise DataError(f"{path}: corrupt or of another format; delete {folder} and prepare again") from None
    wrong = _manifest_problem(manifest)
    if wrong:
        raise DataError(f"{path}: {wrong}; delete {folder} and prepare again")
    return manifest


def _manifest_problem(manifest: dict) -> str | None:
    """The first field the readers need that is missing or of the wrong type (an edited or
    damaged manifest), as a short phrase; None when all are there."""
    def wrong(where, value, kind):
        return f"{where} is missing" if value is None else f"{where} is {json.dumps(value)[:40]}, not {kind}"

    settings, parts = manifest.get("settings"), manifest.get("parts")
    if not isinstance(settings, dict):
        return wrong("settings", settings, "an object")
    if not isinstance(manifest.get("complete"), bool):
        return wrong("complete", manifest.get("complete"), "true or false")
    for key in ("vocab_size", "eos_id"):
        if not isinstance(settings.get(key), int) or isinstance(settings.get(key), bool):
            return wrong(f"settings.{key}", settings.get(key), "a whole number")
    if settings.get("dtype") not in ("uint16", "uint32"):
        return wrong("settings.dtype", settings.get("dtype"), "uint16 or uint32")
    if not isinstance(settings.get("tokenizer"), str):
        return wrong("settings.tokenizer", settings.get("tokenizer"), "a name")
    if not isinstance(parts, list):
        return wrong("parts", parts, "a list")
    for i, part in enumerate(parts):
        if not isinstance(part, dict) or not isinstance(part.get("docs"), int):
            return wrong(f"parts[{i}].docs", part.get("docs") if isinstance(part, dict) else part, "a count")
        for split in ("train", "val"):
            shard = part.get(split)
            for key, kind in (("file", str), ("tokens", int), ("crc32", int)):
                value = shard.get(key) if isinstance(shard, dict) else None
                if not isinstance(value, kind):
                    return wrong(f"parts[{i}].{split}.{key}", value, "a name" if kind is str else "a number")
    return None


def source_files(cfg) -> dict | None:
    """What a local source held: its files' count, bytes and a digest of (path, size, mtime), so a
    prepared folder is not reused after the files changed. None for the other sources, which
    cannot change under the same name unnoticed (the sample ships with the code) or cannot be
    listed cheaply (the hub)."""
    if cfg.source != "local":
        return None
    root = Path(cfg.path).expanduser().resolve()
    files = local_files(root)
    digest = hashlib.sha256()
    total = 0
    for path in files:
        stat = path.stat()
        total += stat.st_size
        digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return {"files": len(files), "bytes": total, "sha256": digest.hexdigest()}


def check_source_unchanged(cfg, folder: Path, manifest: dict) -> None:
    """DataError if a local source's files differ from those the complete `folder` was prepared
    from. A source folder deleted after preparing is fine: the shards are all training reads."""
    then = manifest["settings"].get("source_files")
    if then is None or cfg.source != "local" or not Path(cfg.path).expanduser().is_dir():
        return
    now = source_files(cfg)
    if now == then:
        return
    sizes = f"{then['files']} files, {then['bytes']:,} bytes then; {now['files']}, {now['bytes']:,} now"
    if (then["files"], then["bytes"]) == (now["files"], now["bytes"]):
        sizes = f"{now['files']} files, {now['bytes']:,} bytes, but other names or times"
    raise DataError(f"data.path {cfg.path}: its files changed since {folder} was prepared ({sizes});"
                    f" delete {folder} to prepare it again from them")


def _settings(cfg, tok: Tok) -> dict:
    return {
        "source": cfg.source,
        "path": str(Path(cfg.path).expanduser().resolve()) if cfg.source in ("local", "c4") and cfg.path else None,
        "hf_dataset": {"openwebtext": cfg.hf_dataset, "c4": f"{C4_DATASET}/{C4_VARIANT}"}.get(cfg.source),
        "tokenizer": tok.name,
        "tokenizer_sha": tok.fingerprint,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "dtype": "uint16" if tok.vocab_size <= 1 << 16 else "uint32",
        "val_fraction": cfg.val_fraction,
        "max_docs": cfg.max_docs,
        "docs_per_part": DOCS_PER_PART,
        "source_files": source_files(cfg),
    }


# ---------------------------------------------------------------- workers

_WORKER_TOK = None
_WORKER_ARGS: tuple = ()


def _init_worker(tok_json: str, eos_id: int, dtype: str, val_fraction: float) -> None:
    global _WORKER_TOK, _WORKER_ARGS
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process: num_proc is the knob
    from tokenizers import Tokenizer

    _WORKER_TOK = Tokenizer.from_str(tok_json)
    _WORKER_ARGS = (eos_id, np.dtype(dtype), val_fraction)


def _tokenize_chunk(task: tuple[int, list[str]]) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Documents [first, first+len) -> (train tokens, val tokens, documents, characters)."""
    first, texts = task
    eos_id, dtype, fraction = _WORKER_ARGS
    encodings = _WORKER_TOK.encode_batch_fast(texts, add_special_tokens=False)
    train: list[np.ndarray] = []
    val: list[np.ndarray] = []
    eos = np.array([eos_id], dtype=dtype)
    for i, enc in enumerate(encodings):
        out = val if is_val(first + i, fraction) else train
        out.append(np.asarray(enc.ids, dtype=dtype))
        out.append(eos)
    empty = np.empty(0, dtype=dtype)
    return (np.concatenate(train) if train else empty, np.concatenate(val) if val else empty,
            len(texts), sum(map(len, texts)))


def _ordered_map(pool, fn, tasks, window: int):
    """pool.imap with at most `window` tasks in flight: imap would read a streamed source to
    the end into memory before the first result comes back."""
    pending: deque = deque()
    for task in tasks:
        pending.append(pool.apply_async(fn, (task,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


# ---------------------------------------------------------------- prepare


def cannot_write(path: Path, err: OSError) -> DataError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        hint = "free some space, or set data.cache_dir to another disk"
    else:
        hint = f"check that this process may write there and that nothing else removes files in {path.parent}"
    return DataError(f"{path}: cannot write ({err.strerror or err}); {hint}, and prepare again (it resumes)")


@contextlib.contextmanager
def _preparing_alone(folder: Path):
    """One process at a time prepares a folder: two benches started together on one cache would
    otherwise write the same part's .partial files, and each clear the other's away. The second
    waits, then finds the folder complete (or resumes it, if the first failed)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    lock = folder / ".prepare.lock"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "a")
    except OSError as err:
        raise cannot_write(lock, err) from None
    with handle:  # closing it releases the lock, also when the process dies
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting: another process is preparing {folder}", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


class _ShardWriter:
    def __init__(self, path: Path):
        self.path = path
        self.partial = path.with_name(path.name + ".partial")
        try:
            self.file = open(self.partial, "wb")
        except OSError as err:
            raise cannot_write(self.partial, err) from None
        self.tokens = 0
        self.crc = 0

    def write(self, arr: np.ndarray) -> None:
        buf = arr.tobytes()
        try:
            self.file.write(buf)
        except OSError as err:
            raise cannot_write(self.partial, err) from None
        self.crc = zlib.crc32(buf, self.crc)
        self.tokens += arr.size

    def abort(self) -> None:
        try:
            self.file.close()  # flushes: on a full disk, fails again
        except OSError:
            pass
        self.partial.unlink(missing_ok=True)

    def close(self) -> dict:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.partial, self.path)
        except OSError as err:
            raise cannot_write(self.partial, err) from None
        return {"file": self.path.name, "tokens": self.tokens, "crc32": self.crc}


def _write_manifest(folder: Path, manifest: dict) -> None:
    try:
        write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1))
    except OSError as err:
        raise cannot_write(folder / MANIFEST, err) from None


def _chunks(docs: Iterator[str], first: int, stop: int):
    """Groups documents [first, stop) into tasks of about CHUNK_CHARS characters."""
    batch: list[str] = []
    start = index = first
    chars = 0
    while index < stop:  # test before next(): a document read past `stop` would be lost
        text = next(docs, None)
        if text is None:
            break
        batch.append(text)
        chars += len(text)
        index += 1
        if chars >= CHUNK_CHARS:
            yield start, batch
            batch, start, chars = [], index, 0
    if batch:
        yield start, batch


def candidate_folders(cfg) -> list[Path]:
    """Where cfg's prepared folder may be, found without the hub: `auto` for a hub or local
    source means OPT's tokenizer if it loaded when the folder was made, else the bundled one."""
    from sst_dist.data.tokenizer import load_bundled, load_local

    if cfg.tokenizer == "bundled" or (cfg.tokenizer == "auto" and cfg.source == "sample"):
        names = [load_bundled().name]
    elif cfg.tokenizer == "opt":
        names = ["opt"]
    elif cfg.tokenizer == "auto":
        names = ["opt", load_bundled().name]
    else:
        names = [load_local(cfg.tokenizer).name]
    cache = Path(cfg.cache_dir).expanduser()
    return [cache / folder_name(cfg, name) for name in names]


def prepare(cfg, progress: bool = True) -> Path:
    """Tokenizes cfg's source into shards unless a complete manifest is there; returns the folder."""
    for folder in candidate_folders(cfg):  # done before: no source, no hub needed
        manifest = read_manifest(folder)
        if manifest is not None and manifest["complete"]:
            check_source_unchanged(cfg, folder, manifest)
            return folder
    docs = iter_documents(cfg)
    first = next(docs, None)  # a missing folder or an unreachable hub fails here, before any write
    if first is None:
        raise DataError(f"data.source={cfg.source}: no documents to prepare")
    docs = itertools.chain([first], docs)
    tok = load_tokenizer(cfg.tokenizer, cfg.source)
    folder = Path(cfg.cache_dir).expanduser() / folder_name(cfg, tok.name)
    with _preparing_alone(folder):
        return _prepare_folder(cfg, folder, tok, docs, progress)


def _prepare_folder(cfg, folder: Path, tok: Tok, docs: Iterator[str], progress: bool) -> Path:
    settings = _settings(cfg, tok)
    manifest = read_manifest(folder)
    if manifest is not None:
        changed = [k for k, v in settings.items() if k != "source_files" and manifest["settings"].get(k) != v]
        if changed:
            raise DataError(f"{folder / MANIFEST}: made with other {', '.join(changed)}; "
                            f"delete {folder} or choose another data.cache_dir")
        if manifest["complete"]:
            return folder
        # resuming after a failure, typically a fixed source file: the files read from now on
        manifest["settings"]["source_files"] = settings["source_files"]
    else:
        manifest = {"format": FORMAT, "settings": settings, "parts": [], "complete": False}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tokenizer.json").write_text(tok.json)
        for stale in folder.glob("*.partial"):
            stale.unlink()
    except OSError as err:
        raise cannot_write(Path(err.filename) if err.filename else folder / "tokenizer.json", err) from None

    num_proc = cfg.num_proc or os.cpu_count() or 1
    done = sum(part["docs"] for part in manifest["parts"])
    limit = cfg.max_docs if cfg.max_docs is not None else sys.maxsize
    for _ in range(done):  # resume: the finished parts' documents, read but not tokenized
        if next(docs, None) is None:
            break

    bar = None
    if progress:
        from tqdm import tqdm

        total = None if cfg.max_docs is None else cfg.max_docs
        bar = tqdm(total=total, initial=done, unit="doc", desc=f"prepare {folder.name}",
                   dynamic_ncols=True, mininterval=1.0)
    init = (tok.json, tok.eos_id, settings["dtype"], cfg.val_fraction)
    pool = None
    if num_proc > 1:
        import multiprocessing as mp

        # fork, not spawn: spawn re-imports the caller's main script in every worker, which
        # loops forever on a script without an `if __name__ == "__main__"` guard. The workers
        # only run the Rust tokenizer (built afresh from JSON, one thread) and numpy copies, so
        # the parent's threads (torch, a datasets stream) are never touched in them.
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ctx.Pool(num_proc, initializer=_init_worker, initargs=init)
        run = lambda tasks: _ordered_map(pool, _tokenize_chunk, tasks, window=2 * num_proc)  # noqa: E731
    else:
        _init_worker(*init)
        run = lambda tasks: map(_tokenize_chunk, tasks)  # noqa: E731
    writers: list[_ShardWriter] = []  # the part in progress: its .partial files go if it fails
    try:
        while done < limit:
            stop = min(limit, done + DOCS_PER_PART)
            index = len(manifest["parts"])
            train = _ShardWriter(folder / f"train_{index:05d}.bin")
            writers = [train]
            val = _ShardWriter(folder / f"val_{index:05d}.bin")
            writers = [train, val]
            count = 0
            for tr, va, ndocs, _chars in run(_chunks(docs, done, stop)):
                train.write(tr)
                val.write(va)
                count += ndocs
                if bar is not None:
                    bar.update(ndocs)
            if count == 0:
                train.abort()
                val.abort()
                break
            manifest["parts"].append({"docs": count, "train": train.close(), "val": val.close()})
            writers = []
            done += count
            _write_manifest(folder, manifest)
            if done < stop:  # the source ran out inside this part
                break
    except BaseException:
        for writer in writers:  # a full disk is not left fuller by a part that cannot finish
            writer.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()
    if not manifest["parts"]:
        raise DataError(f"data.source={cfg.source}: no documents to prepare")
    manifest["complete"] = True
    manifest["docs"] = done
    for split in ("train", "val"):
        manifest[f"{split}_tokens"] = sum(part[split]["tokens"] for part in manifest["parts"])
    _write_manifest(folder, manifest)
    return folder

"""Training reads fixed-length blocks from the memory-mapped shards; evaluation reads held-out ones.

Blocks. A shard of n tokens holds floor((n - 1) / L) blocks of L + 1 tokens: block j is
tokens[jL : jL + L + 1]. Consecutive blocks share one token (the last label of block j is the
first input of block j + 1), so every token but a shard's first is a label exactly once. A block
never crosses a shard's end; the at most L tokens after a shard's last block are left out.
Documents inside a block are separated by EOS (shards.py), as in nanoGPT and GPT-2.

Sampling. Blocks are numbered 0..N-1 over all train shards. Epoch e visits them in the order
perm_e = argsort(hash(seed, e, i)): a keyed 64-bit hash (splitmix64), so the order depends on
the seed and epoch only, not on numpy's random streams, the world size or anything else. Step t
of an epoch takes the global batch perm_e[tB : (t+1)B]; rank r reads its rows
[r B/W, (r+1) B/W). An epoch ends when fewer than B blocks are left (those are skipped); the next
epoch is a fresh permutation. The position (epoch, blocks consumed) is the whole state: a
resumed run continues exactly, whatever its world size, even with another global batch.
"""

from __future__ import annotations

import json
import math
import sys
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from sst_dist.data.shards import MANIFEST, read_manifest
from sst_dist.errors import DataError
from sst_dist.rundir import write_atomic

_VERIFIED = ".verified.json"
_U64 = np.uint64


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # Wrapping uint64 arithmetic is what the hash wants; numpy arrays wrap silently.
    x = x + _U64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def epoch_order(num_blocks: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of block ids for one epoch: a pure function of (num_blocks, seed, epoch)."""
    key = _splitmix64(np.array([(seed & (2**64 - 1)) ^ (epoch * 0xD1B54A32D192ED03 % 2**64)], dtype=_U64))
    keys = _splitmix64(np.arange(num_blocks, dtype=_U64) ^ key[0])
    order = np.argsort(keys, kind="stable")
    return order.astype(np.uint32) if num_blocks < 2**32 else order


def _crc32_file(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


class Shards:
    """The memory-mapped shards of one split, cut into blocks of L + 1 tokens."""

    def __init__(self, folder: Path, entries: list[dict], dtype: np.dtype, seq_len: int):
        self.seq_len = seq_len
        self.files: list[Path] = []
        self.maps: list[np.ndarray] = []
        counts = []
        for entry in entries:
            if entry["tokens"] <= seq_len:  # no whole block (empty val shards, tiny parts)
                continue
            path = folder / entry["file"]
            self.files.append(path)
            # One memmap per shard for the whole run: pages are shared by the OS cache and the
            # kernel reads only the blocks touched.
            self.maps.append(np.memmap(path, dtype=dtype, mode="r", shape=(entry["tokens"],)))
            counts.append((entry["tokens"] - 1) // seq_len)
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.num_blocks = int(self.starts[-1])

    def gather(self, block_ids: np.ndarray, vocab_size: int) -> torch.Tensor:
        L = self.seq_len
        shard_of = np.searchsorted(self.starts, block_ids, side="right") - 1
        offsets = (block_ids - self.starts[shard_of]) * L
        out = np.empty((len(block_ids), L + 1), dtype=np.int64)
        for row, (s, off) in enumerate(zip(shard_of.tolist(), offsets.tolist())):
            out[row] = self.maps[s][off:off + L + 1]
        if out.size and int(out.max()) >= vocab_size:  # bit rot reads as impossible ids
            bad = self.files[int(shard_of[int(np.argmax(out.max(axis=1)))])]
            raise DataError(f"{bad}: token id >= vocab size {vocab_size}; the shard is corrupt, prepare again")
        return torch.from_numpy(out)


def _check_files(folder: Path, entries: list[dict], itemsize: int) -> None:
    """Existence and size of every shard always; a CRC32 of every byte once per file version
    (size, mtime), remembered in .verified.json so that later runs start at once."""
    stamp_path = folder / _VERIFIED
    try:
        stamps = json.loads(stamp_path.read_text()) if stamp_path.is_file() else {}
    except (ValueError, OSError):
        stamps = {}
    changed = False
    for entry in entries:
        path = folder / entry["file"]
        if not path.is_file():
            raise DataError(f"{path}: shard missing; prepare the data again (python -m sst_dist.data prepare)")
        st = path.stat()
        if st.st_size != entry["tokens"] * itemsize:
            raise DataError(f"{path}: {st.st_size} bytes, expected {entry['tokens'] * itemsize}; "
                            "the shard is truncated or corrupt, prepare again")
        stamp = [st.st_size, st.st_mtime_ns]
        if stamps.get(entry["file"]) == stamp:
            continue
        if _crc32_file(path) != entry["crc32"]:
            raise DataError(f"{path}: checksum mismatch; the shard is corrupt, prepare again")
        stamps[entry["file"]] = stamp
        changed = True
    if changed:
        try:  # ranks race here harmlessly: each writes a complete file and renames it
            write_atomic(stamp_path, json.dumps(stamps))
        except OSError:
            pass  # a read-only cache still trains; it just verifies again next time


class TrainData:
    """This rank's view of the prepared data: its part of each global batch, and the held-out set."""

    def __init__(self, folder: str | Path, *, seq_len: int, global_batch: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        folder = Path(folder)
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} / world size {world_size}: need 0 <= rank < world size")
        if global_batch <= 0 or global_batch % world_size:
            raise DataError(f"train.global_batch: {global_batch} is not divisible by the world size {world_size}")
        if seq_len <= 0:
            raise DataError(f"model.seq_len: {seq_len} must be > 0")
        manifest = read_manifest(folder)
        if manifest is None or not manifest.get("complete"):
            what = "not prepared" if manifest is None else "only partly prepared"
            raise DataError(f"{folder / MANIFEST}: {what}; run `python -m sst_dist.data prepare` first")
        settings = manifest["settings"]
        self.folder = folder
        self.vocab_size: int = settings["vocab_size"]
        self.eos_id: int = settings["eos_id"]
        self.tokenizer_path = folder / "tokenizer.json"
        dtype = np.dtype(settings["dtype"])
        parts = manifest["parts"]
        _check_files(folder, [p[s] for p in parts for s in ("train", "val")], dtype.itemsize)
        self.train = Shards(folder, [p["train"] for p in parts], dtype, seq_len)
        self.val = Shards(folder, [p["val"] for p in parts], dtype, seq_len)
        if self.train.num_blocks < global_batch:
            raise DataError(f"{folder}: {self.train.num_blocks} training blocks of {seq_len + 1} tokens, "
                            f"fewer than train.global_batch={global_batch}; use more data or smaller batches")
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.rank, self.world_size = rank, world_size
        self.local_batch = global_batch // world_size
        self.seed = seed
        self.epoch = 0
        self.cursor = 0  # blocks of this epoch's order already consumed (by all ranks together)
        self.step = 0
        self._order: np.ndarray | None = None
        self._order_epoch = -1
        self._warned_short = False
        self.last_block_ids = np.empty(0, dtype=np.int64)

    @property
    def num_blocks(self) -> int:
        return self.train.num_blocks

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            self._order = epoch_order(self.num_blocks, self.seed, self.epoch)
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> torch.Tensor:
        """(global_batch // world_size, seq_len + 1) int64: this rank's rows of the step's batch."""
        if self.cursor + self.global_batch > self.num_blocks:
            self.epoch, self.cursor = self.epoch + 1, 0
        lo = self.cursor + self.rank * self.local_batch
        ids = self._epoch_order()[lo:lo + self.local_batch].astype(np.int64)
        self.last_block_ids = ids  # for tests and debugging: which blocks this rank just read
        self.cursor += self.global_batch
        self.step += 1
        return self.train.gather(ids, self.vocab_size)

    def state_dict(self) -> dict:
        return {"format": 1, "seed": self.seed, "epoch": self.epoch, "cursor": self.cursor,
                "step": self.step, "num_blocks": self.num_blocks, "seq_len": self.seq_len,
                "data": self.folder.name}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_blocks") != self.num_blocks or state.get("seq_len") != self.seq_len:
            raise DataError(
                f"resume: the checkpoint's data position is for {state.get('num_blocks')} blocks of "
                f"seq_len {state.get('seq_len')} from {state.get('data')}, this run has "
                f"{self.num_blocks} of seq_len {self.seq_len} from {self.folder.name}")
        # The saved seed wins: the position means something only in its own order.
        self.seed = int(state["seed"])
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.step = int(state.get("step", 0))
        self._order_epoch = -1

    def eval_batches(self, tokens: int, batch_size: int) -> Iterator[torch.Tensor]:
        """The first ceil(tokens / seq_len) held-out blocks, in order, in batches of <= batch_size."""
        if self.val.num_blocks == 0:
            raise DataError(f"{self.folder}: no held-out block of {self.seq_len + 1} tokens; "
                            "raise data.val_fraction or lower model.seq_len")
        want = math.ceil(tokens / self.seq_len)
        have = min(want, self.val.num_blocks)
        if have < want and not self._warned_short:
            print(f"warning: eval wants {want} held-out blocks, {self.folder.name} has {have}; "
                  "evaluating on those", file=sys.stderr)
            self._warned_short = True
        for lo in range(0, have, batch_size):
            ids = np.arange(lo, min(lo + batch_size, have), dtype=np.int64)
            yield self.val.gather(ids, self.vocab_size)


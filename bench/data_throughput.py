"""The data pipeline's throughput on this machine: tokenizing (prepare) and reading blocks.

    python -m bench.data_throughput [--synthetic-mtok 256] [--local DIR] [--out DIR]

Rows:
  tokenize   `prepare` on the shipped sample with 1 and with all cores (bundled BPE), end to end:
             source reading, worker processes, shard writing, manifest; with --local DIR, also
             on that folder.
  read       `TrainData.next_batch` on one core (torch and BLAS limited to one thread), for
             several block lengths and batch sizes; on the prepared sample, and on a synthetic
             folder of --synthetic-mtok million tokens (larger than the sample, still in the OS
             page cache just after writing: the rate of the reading code, not of a cold disk).
Prints a table and writes data_throughput.csv under --out. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from sst_dist.config import DataConfig
from sst_dist.data import TrainData, prepare
from sst_dist.data.shards import FORMAT, MANIFEST

ROOT = Path(__file__).resolve().parents[1]


def _cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def bench_prepare(cache: Path, num_proc: int, local: str | None = None) -> dict:
    cfg = DataConfig(source="local" if local else "sample", path=local, tokenizer="bundled",
                     cache_dir=str(cache / f"p{num_proc}{'l' if local else ''}"), num_proc=num_proc)
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    folder = prepare(cfg, progress=False)
    seconds = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0  # this process and its (joined) tokenizer workers
    manifest = json.loads((folder / MANIFEST).read_text())
    tokens = manifest["train_tokens"] + manifest["val_tokens"]
    from sst_dist.data.shards import iter_documents

    chars = sum(len(t.encode()) for t in iter_documents(cfg))
    label = "local " + Path(local).name if local else "sample"
    return {"what": "tokenize", "setting": f"{label}, {num_proc} proc", "tokens": tokens,
            "seconds": seconds, "tokens_per_s": tokens / seconds,
            "note": f"{chars / seconds / 1e6:.1f} MB text/s, {tokens / cpu:,.0f} tokens per CPU-s, "
                    f"{manifest['docs']} docs", "folder": folder}


def synthetic_folder(root: Path, mtok: int) -> Path:
    """A prepared folder of random uint16 ids in 4 shards, written as prepare would."""
    folder = root / "synthetic"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    per = mtok * 1_000_000 // 4
    parts = []
    for k in range(4):
        arr = rng.integers(0, 8192, size=per, dtype=np.uint16)
        arr.tofile(folder / f"train_{k:05d}.bin")
        val = arr[:4096].copy()
        val.tofile(folder / f"val_{k:05d}.bin")
        parts.append({"docs": 1, "train": {"file": f"train_{k:05d}.bin", "tokens": per, "crc32": zlib.crc32(arr)},
                      "val": {"file": f"val_{k:05d}.bin", "tokens": 4096, "crc32": zlib.crc32(val)}})
    settings = {"source": "synthetic", "tokenizer": "none", "vocab_size": 8192, "eos_id": 2, "dtype": "uint16"}
    (folder / MANIFEST).write_text(json.dumps({"format": FORMAT, "settings": settings, "parts": parts,
                                              "complete": True}))
    return folder


def bench_read(folder: Path, label: str, seq_len: int, batch: int, seconds: float = 1.5) -> dict:
    data = TrainData(folder, seq_len=seq_len, global_batch=batch, seed=0)
    data.next_batch()  # the epoch's order is built once per epoch: not part of the steady rate
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            data.next_batch()
        n += 20
    dt = time.perf_counter() - t0
    tokens = n * batch * seq_len  # labels per batch: what the model trains on
    return {"what": "read", "setting": f"{label}, L={seq_len}, batch={batch}", "tokens": tokens,
            "seconds": dt, "tokens_per_s": tokens / dt, "note": f"{n / dt:,.0f} batches/s"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic-mtok", type=int, default=256, help="million tokens (default 256 = 512 MB)")
    parser.add_argument("--local", help="also time `prepare` of this folder (e.g. a corpus built "
                        "by `python -m sst_dist.data corpus`) on all cores")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sst-data-bench-") as tmp:
        tmp = Path(tmp)
        cores = os.cpu_count() or 1
        for num_proc in sorted({1, cores}):
            rows.append(bench_prepare(tmp, num_proc))
        if args.local:
            rows.append(bench_prepare(tmp, cores, args.local))
        sample = rows[0]["folder"]
        for r in rows:
            r.pop("folder", None)
        synth = synthetic_folder(tmp, args.synthetic_mtok)
        for seq_len, batch in ((128, 8), (1024, 8), (1024, 32), (2048, 16)):
            rows.append(bench_read(sample, "sample", seq_len, batch))
        for seq_len, batch in ((128, 8), (1024, 8), (1024, 32), (2048, 16)):
            rows.append(bench_read(synth, f"synthetic {args.synthetic_mtok}M", seq_len, batch))
        shutil.rmtree(synth)

    load = os.getloadavg()[0]
    print(f"\ndata pipeline throughput: {os.cpu_count()} cores, load average {load:.1f} at the end; "
          "reads on 1 core (target >= 5M tokens/s)\n")
    cols = [("what", 8, "<"), ("setting", 34, "<"), ("tokens/s", 12, ">"), ("tokens", 13, ">"),
            ("s", 5, ">"), ("note", 0, "<")]
    print("| " + " | ".join(f"{name:{align}{width}}" for name, width, align in cols) + " |")
    print("|" + "|".join(("-" * (width + 1) + ":" if align == ">" else "-" * (width + 2)) if width else "---"
                         for name, width, align in cols) + "|")
    for r in rows:
        cells = [r["what"], r["setting"], f"{r['tokens_per_s']:,.0f}", f"{r['tokens']:,}",
                 f"{r['seconds']:.2f}", r["note"]]
        print("| " + " | ".join(f"{c:{align}{width}}" for c, (_, width, align) in zip(cells, cols)) + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "data_throughput.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["what", "setting", "tokens_per_s", "tokens", "seconds", "note"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwrote {out / 'data_throughput.csv'}")


if __name__ == "__main__":
    main()

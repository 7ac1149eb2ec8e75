"""The largest OPT each method trains on one or two GPUs: real steps through launch/pretrain.py.

    python -m bench.scale --method sst --size 30b --gpus 1 --out runs/scale
    python -m bench.scale --method sst --size 66b --gpus 2 --out runs/scale      # FSDP2 via torchrun
    python -m bench.scale --search --method full --gpus 1 --sizes 1.3b,2.7b,6.7b,13b --out runs/scale
    python -m bench.scale --method sst --size tiny --device cpu --out /tmp/scale  # the CPU check

A run trains the recipe recipes/opt-SIZE-METHOD.yaml (recipes/tiny-METHOD.yaml for tiny) for
--steps steps at micro-batch --micro-batch x --seq per GPU (the global batch is one micro-batch
per GPU), with SST resampling every --t3 steps, so the steps cross a resample; the torch engine
on one GPU, FSDP2 under torchrun on more. It reports the build time (init_s: model built,
factors drawn, engine ready), steady tokens/s (the median step without a periodic event, after
the first --warmup steps), the largest peak memory over the GPUs and the first and last losses,
beside `python -m sst_dist.memory`'s estimate for the same run.

--search runs the sizes in order, each in its own process, and stops at the first that does not
fit (out of memory); the last that ran is the largest size this method trains on these GPUs.
It prints a table and writes scale.csv and scale.md under --out; every run's own folder
(metrics.jsonl, stdout/stderr) stays there too.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if not __package__:  # run as a file: its sibling modules import only as the package
    print("error: run it from the repository root as a module: python -m bench.scale ...", file=sys.stderr)
    sys.exit(2)

from bench.size_recipe import size_recipe  # noqa: E402
from sst_dist.config import load_recipe  # noqa: E402
from sst_dist.registry import METHODS  # noqa: E402
from sst_dist.errors import ConfigError  # noqa: E402

COLUMNS = ("method", "size", "gpus", "engine", "status", "steps", "init_s", "wall_s", "tokens_per_s",
           "peak_gib", "est_gib", "est_err_pct", "loss_first", "loss_last", "events", "note")
OOM_MARKS = ("OutOfMemoryError", "CUDA out of memory", "out of memory")


def overrides(args, gpus: int) -> list[str]:
    sets = [f"train.max_steps={args.steps}", f"train.micro_batch={args.micro_batch}",
            f"train.global_batch={args.micro_batch * gpus}", f"model.seq_len={args.seq}",
            f"sst.steps_per_iteration={args.t3}", "wandb.mode=disabled", "eval.every_steps=0",
            "checkpoint.save=false", f"train.device={args.device}"]
    if args.data_path:
        sets += ["data.source=local", f"data.path={args.data_path}"]
    else:
        sets.append("data.source=sample")  # shipped with the package: no download, no datasets
    return sets + list(args.set)


def command(args, recipe: Path, out: Path, gpus: int) -> list[str]:
    launch = ["launch/pretrain.py", "--recipe", str(recipe), "--output-dir", str(out)]
    for item in overrides(args, gpus):
        launch += ["--set", item]
    if gpus == 1:
        return [sys.executable, *launch]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
            *launch, "--engine", "fsdp"]


def estimate_gib(args, recipe, gpus: int) -> float | None:
    from sst_dist.memory import GIB, estimate_engine

    try:
        est = estimate_engine(recipe.model.size, recipe.method, recipe.rank, "torch" if gpus == 1 else "fsdp",
                              gpus, recipe.train.micro_batch, recipe.model.seq_len,
                              frozen_dtype=recipe.model.frozen_dtype, checkpointing=recipe.model.gradient_checkpointing,
                              sst_path=recipe.sst.path, galore_rank=recipe.galore.rank)
    except ConfigError:
        return None
    return est["total"] / GIB


def summarise(metrics: list[dict], warmup: int) -> dict:
    steady = [m["tokens_per_s"] for m in metrics if m["step"] > warmup and "event" not in m]
    losses = [m["loss"] for m in metrics]
    peaks = [m["peak_mem_gib"] for m in metrics if "peak_mem_gib" in m]
    tail = losses[-5:]
    return {
        "steps": len(metrics),
        "init_s": metrics[0].get("init_s") if metrics else None,
        "tokens_per_s": round(statistics.median(steady), 1) if steady else None,
        "peak_gib": max(peaks) if peaks else None,
        "loss_first": round(losses[0], 4) if losses else None,
        "loss_last": round(sum(tail) / len(tail), 4) if tail else None,
        "events": ",".join(f"{m['step']}:{m['event']}" for m in metrics if "event" in m),
    }


def run_one(args, method: str, size: str, gpus: int) -> dict:
    recipe_file = size_recipe(size, method)
    recipe = load_recipe(recipe_file, overrides(args, gpus))
    out = Path(args.out) / f"{method}-{size}-{gpus}gpu"
    if out.exists():  # a fresh run, never a resume of an older one
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    row = {"method": method, "size": size, "gpus": gpus, "engine": "torch" if gpus == 1 else "fsdp",
           "est_gib": None if (e := estimate_gib(args, recipe, gpus)) is None else round(e, 2)}
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               PYTORCH_CUDA_ALLOC_CONF=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"),
               TOKENIZERS_PARALLELISM="false")
    cmd = command(args, recipe_file, out, gpus)
    print(f"[{method} {size} x{gpus}] {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    # the run writes its own stdout.txt / stderr.txt as it goes: a run cut short, or a bench killed
    # from outside, leaves what it printed up to then
    with open(out / "stdout.txt", "w") as stdout_file, open(out / "stderr.txt", "w") as stderr_file:
        try:
            code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=stdout_file, stderr=stderr_file,
                                  timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    stderr = (out / "stderr.txt").read_text(errors="replace")
    metrics_file = out / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    row.update(summarise(metrics, args.warmup))
    if code == 0:
        row["status"] = "ok"
    elif code == "timeout":
        row["status"], row["note"] = "timeout", f"over --timeout {args.timeout} s"
    elif any(mark in stderr for mark in OOM_MARKS):
        row["status"] = "oom"
        row["note"] = next((line.strip()[:160] for line in stderr.splitlines() if "out of memory" in line.lower()), "")
    else:
        row["status"] = "error"
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        row["note"] = lines[-1][:200] if lines else f"exit {code}"
    if row.get("peak_gib") and row.get("est_gib"):
        row["est_err_pct"] = round(100 * (row["est_gib"] - row["peak_gib"]) / row["peak_gib"], 1)
    print(f"[{method} {size} x{gpus}] {row['status']}: " + ", ".join(
        f"{k} {row[k]}" for k in ("init_s", "tokens_per_s", "peak_gib", "est_gib", "loss_first", "loss_last")
        if row.get(k) is not None), flush=True)
    return row


def table(rows: list[dict]) -> str:
    header = [c for c in COLUMNS if c != "note"]
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in header] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write(rows: list[dict], out: Path, args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    new = not (out / "scale.csv").exists()
    with open(out / "scale.csv", "a", newline="") as f:  # appended: several commands, one table
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows({c: r.get(c) for c in COLUMNS} for r in rows)
    with open(out / "scale.md", "a") as f:
        f.write(f"\n`{' '.join(sys.argv)}` (micro-batch {args.micro_batch} x {args.seq}, {args.steps} steps, "
                f"T3 {args.t3})\n\n| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n")
        for r in rows:
            f.write("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in COLUMNS) + " |\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)}")
    p.add_argument("--size", help="tiny, 2.7b, 6.7b, 13b, 30b, 66b (a recipe recipes/opt-SIZE-METHOD.yaml)")
    p.add_argument("--sizes", default="2.7b,6.7b,13b,30b,66b", help="--search: the sizes to try, in order")
    p.add_argument("--search", action="store_true", help="find the largest size that runs")
    p.add_argument("--gpus", type=int, default=1, help="1: torch engine; more: FSDP2 under torchrun")
    p.add_argument("--steps", type=int, default=None, help="default 30 (a run), 12 (--search)")
    p.add_argument("--t3", type=int, default=10, help="sst.steps_per_iteration: steps between resamples")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of tokens/s")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--device", default="auto", help="train.device: auto | cuda | cpu")
    p.add_argument("--data-path", help="a folder of text files (data.source local); default the shipped sample")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any recipe override")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    p.add_argument("--out", required=True, help="scale.csv, scale.md and each run's folder go here")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 12 if args.search else 30
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.method not in METHODS:
            raise ConfigError(f"--method: {args.method!r} is not one of {', '.join(METHODS)}")
        if args.gpus < 1 or args.steps < 1 or args.micro_batch < 1 or args.seq < 1 or args.t3 < 1:
            raise ConfigError("--gpus, --steps, --micro-batch, --seq and --t3 must be >= 1")
        sizes = [s.strip() for s in args.sizes.split(",") if s.strip()] if args.search else [args.size]
        if not sizes or None in sizes:
            raise ConfigError("give --size, or --search with --sizes")
        for size in sizes:
            size_recipe(size, args.method)  # every recipe exists before the first run starts
        rows = []
        for size in sizes:
            row = run_one(args, args.method, size, args.gpus)
            rows.append(row)
            if row["status"] != "ok":
                break
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table(rows))
    if args.search:
        fits = [r["size"] for r in rows if r["status"] == "ok"]
        last = rows[-1]
        stop = "" if last["status"] == "ok" else f"; {last['size']}: {last['status']}"
        print(f"largest {args.method} on {args.gpus} GPU{'s' if args.gpus > 1 else ''}: "
              f"{fits[-1] if fits else 'none'}{stop}")
    write(rows, Path(args.out), args)
    return 0 if rows[-1]["status"] == "ok" or args.search else 1


if __name__ == "__main__":
    sys.exit(main())

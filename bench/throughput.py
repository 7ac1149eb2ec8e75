"""Each method against full-rank under each engine, on 1 and 2 GPUs, side by side in one run:
tokens/s, MFU, peak memory, and the periodic event's seconds and share of wall time.

    python -m bench.throughput --gpus 1,2 --steps 300 --engines zero2,zero3,fsdp
    python -m bench.throughput --size 1.3b --gpus 1,2 --engines zero2,fsdp --set train.micro_batch=8
    python -m bench.throughput --gpus 1 --steps 300 --engines zero2 --repeat 3   # ratios with their spread
    python -m bench.throughput --size tiny --gpus 1 --steps 8 --skip 2 --engines zero2   # CPU: the flow only

Each (engine, method, GPU count) is one real `launch/pretrain.py` run through the launcher a user
would use (deepspeed / torchrun), on the size's recipes (recipes/opt-SIZE-METHOD.yaml; tiny:
recipes/tiny-METHOD.yaml). Prints the table, then each (engine, method) at every GPU count side by
side with the per-GPU efficiency, and writes throughput.csv; each run's folder and log are named
ENGINE-METHOD-NgpuS with no commas or plus signs (sst+galore -> sst-galore). ZeRO-3 runs take
model.compile=false, as it compiles no block there, except SST's with sst.path=functional and
model.compile, whose layers then compile alone (sst_dist.models.compile_layers) while full-rank's
blocks run eagerly like every block under ZeRO-3. Measures; asserts nothing.

--repeat N runs each (engine, GPU count) N times over, the methods interleaved (full, sst, full,
sst, ...), so a drift of the machine (clocks, a neighbour's load) falls on every method alike; the
runs are named ...-rK (K = 1..N). The table gives each cell's median over its runs, and x full
with its spread: the ratio of each repeat to full-rank's run of the same repeat, median and
min-max. throughput.csv keeps one row per run (its `repeat`, its own x full) and then one summary
row per cell (repeat `summary`, `runs` that gave figures, medians, tokens_x_full_min/_max).

Columns:
  tokens/s   median over the steps after --skip that ran no periodic event (the whole job's tokens)
  x full     tokens/s over full-rank's of the same repeat (median over repeats), and its min-max
  MFU        model FLOPs per second per GPU over --peak-tflops: the full-rank model's FLOPs per token,
             6N + 12·L·d·T (N: the dense model's matmul parameters, the tied embedding once, no
             position table; L layers of width d, T = seq_len: PaLM's attention term, Chowdhery et
             al. 2022, App. B), the same for every method, so a method's MFU is its speed, not its work
  event s    per periodic event (SST resample / re-SVD, ReLoRA* reset, GaLore refresh): the event
             step's time minus the median step's, averaged over the events after the first
  1st s      the same for the first event after step 0, which also pays one-time costs; run
             enough steps for 2+ events (steps > 2 x the period) to tell the two apart
  event %    that over the wall time of one period at the run's own period (SST: T3 steps), i.e.
             the share of a long run's wall time the events take
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if not __package__:  # run as a file: its sibling modules import only as the package
    print("error: run it from the repository root as a module: python -m bench.throughput ...", file=sys.stderr)
    sys.exit(2)

from bench.size_recipe import size_recipe  # noqa: E402
from sst_dist.config import load_recipe  # noqa: E402
from sst_dist.errors import ConfigError  # noqa: E402
from sst_dist.engines import free_port  # noqa: E402
from sst_dist.registry import spec  # noqa: E402

# an H200 (SXM) and an H100 SXM: dense BF16 tensor-core peak, 989 TFLOP/s (NVIDIA's data sheets
# give 1,979 with 2:4 sparsity, which no dense training uses)
H200_BF16_TFLOPS = 989.0


def safe_name(text: str) -> str:
    """A file-name part with no commas, plus signs or other characters shells and tools trip on."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def run_name(engine: str, method: str, gpus: int, repeat: int | None = None) -> str:
    """A run's folder and log name; `repeat` (1..N) only when the bench repeats runs."""
    return safe_name(f"{engine}-{method}-{gpus}gpu" + (f"-r{repeat}" if repeat else ""))


def flops_per_token(size: str, seq_len: int) -> float:
    """Training FLOPs per token of the dense model of `size`: 6N + 12·L·d·T (see the module doc)."""
    import torch

    from sst_dist.models import default_vocab, model_class, model_config

    config = model_config(size, default_vocab(size), seq_len)
    with torch.device("meta"):
        model = model_class(size)(config)
    positions = getattr(model.model, "decoder", None)  # OPT's learned positions are a lookup, no FLOPs
    n = sum(p.numel() for p in model.parameters()) - (positions.embed_positions.weight.numel() if positions else 0)
    return 6.0 * n + 12.0 * config.num_hidden_layers * config.hidden_size * seq_len


def write_csv(path: Path, results: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in results for k in r}))
        writer.writeheader()
        writer.writerows(results)


def deepspeed_gpus(gpus: int, env) -> list[str]:
    """The deepspeed launcher's GPU arguments. Given --num_gpus, it ignores CUDA_VISIBLE_DEVICES
    and takes GPUs 0..N-1, so a bench pointed at other GPUs would share GPU 0 with whatever runs
    there; the first `gpus` visible ones are named with --include instead."""
    visible = [d.strip() for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if len(visible) < gpus:
        return ["--num_gpus", str(gpus)]
    return ["--include", "localhost:" + ",".join(visible[:gpus])]


def compiles_layers_alone(recipe: str, extra: list[str]) -> bool:
    """Whether the run (its recipe with the --set overrides) compiles its method's layers alone
    under ZeRO-3."""
    loaded = load_recipe(ROOT / recipe, extra[1::2])
    return loaded.model.compile and spec(loaded.method).compiles_layers_alone(loaded)


def launch(engine: str, gpus: int, recipe: str, out: Path, steps: int, extra: list[str]) -> tuple[float, int]:
    """Runs one job; (wall seconds, exit code)."""
    args = ["launch/pretrain.py", "--recipe", recipe, "--output-dir", str(out), "--max-steps", str(steps),
            "--set", "wandb.mode=disabled", "--set", "eval.every_steps=0", "--set", "checkpoint.save=false",
            *extra]
    if engine.startswith("zero3") and not compiles_layers_alone(recipe, extra):
        args += ["--set", "model.compile=false"]  # refused there, compiling nothing (read_ds_config)
    if engine == "fsdp":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus),
               "--master_port", str(free_port()), *args, "--engine", "fsdp"]
    else:
        cmd = ["deepspeed", *deepspeed_gpus(gpus, os.environ), "--master_port", str(free_port()), *args,
               "--ds-config", f"ds_configs/{engine}.json"]
    log_path = out.parent / f"{out.name}.log"
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        print(f"  {engine} {recipe} x{gpus}: exit {proc.returncode}, see {log_path}", flush=True)
        print("  " + "\n  ".join(log_path.read_text().splitlines()[-15:]), flush=True)
    return time.time() - t0, proc.returncode


def summarize(out: Path, skip: int, gpus: int, peak_tflops: float) -> dict | None:
    """One run's figures from its metrics.jsonl and recipe.json (see the module doc)."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    steady = [r for r in rows[skip:] if "event" not in r]
    if not steady:
        return None
    recipe = json.loads((out / "recipe.json").read_text())
    tokens_per_step = rows[0]["tokens"]
    step_s = statistics.median(tokens_per_step / r["tokens_per_s"] for r in steady)
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in steady)
    flops = flops_per_token(recipe["model"]["size"], recipe["model"]["seq_len"])
    # the events after step 0 (a step-0 event runs before any optimizer state exists, with the
    # first step's compile and allocation; it is not what a long run repeats)
    events = [r for r in rows if "event" in r and r["step"] > 1]
    summary = {
        "steps": len(rows),
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s / gpus * flops / (peak_tflops * 1e12),
        "mean_tokens_per_s_all": tokens_per_step * len(rows) / rows[-1]["elapsed_s"],
        "peak_mem_gib": max(r.get("peak_mem_gib", 0.0) for r in rows),
        "events": ",".join(sorted({r["event"] for r in events})),
        "event_count": len(events),
        "final_loss": rows[-1]["loss"],
    }
    if events:
        # where the last event step's time went, phase by phase (the trainer's event_phases_s)
        if "event_phases_s" in events[-1]:
            summary["event_phases_s"] = json.dumps(events[-1]["event_phases_s"])
        extra = [tokens_per_step / r["tokens_per_s"] - step_s for r in events]
        # the period between events: their spacing, or (one event) its step, since events fall on
        # multiples of the period; a record's step is 1 + the index of the step it ran before
        starts = [r["step"] - 1 for r in events]
        period = statistics.median(b - a for a, b in zip(starts, starts[1:])) if len(starts) > 1 else starts[0]
        # the first event also pays what happens once (a group's first collective, a first
        # allocation); a long run repeats the later ones, so those give the share when there are any
        repeated = extra[1:] or extra
        summary.update(event_s=statistics.mean(repeated), first_event_s=extra[0], event_period=period,
                       event_share=statistics.mean(repeated) / (period * step_s))
    return summary


# the columns that name a cell of the table (a run adds its repeat): never averaged
CELL_KEYS = ("engine", "method", "gpus")


def add_ratios(results: list[dict]) -> None:
    """Each run's tokens/s over full-rank's run of the same (engine, GPU count, repeat):
    `tokens_x_full`, on the runs that both gave figures."""
    full = {(r["engine"], r["gpus"], r.get("repeat")): r.get("tokens_per_s") for r in results
            if r["method"] == "full"}
    for r in results:
        base = full.get((r["engine"], r["gpus"], r.get("repeat")))
        if r.get("tokens_per_s") and base:
            r["tokens_x_full"] = r["tokens_per_s"] / base


def summarize_repeats(results: list[dict]) -> list[dict]:
    """One row per (engine, GPU count, method), in the order of first appearance: the median of each
    numeric figure over the runs that gave figures, a text figure where every run agrees, and the
    x full ratio's median, min and max (add_ratios first). Every cell keeps its worst exit code and,
    where a run failed, the first failed run's name (its log: NAME.log)."""
    cells: dict[tuple, list[dict]] = {}
    for r in results:
        cells.setdefault(tuple(r[k] for k in CELL_KEYS), []).append(r)
    summary = []
    for key, runs in cells.items():
        row = dict(zip(CELL_KEYS, key), repeat="summary", exit=max(r["exit"] for r in runs))
        measured = [r for r in runs if r.get("tokens_per_s")]
        row["runs"] = len(measured)
        failed = [r["run"] for r in runs if r["exit"] or not r.get("tokens_per_s")]
        if failed:
            row["failed_run"] = failed[0]
        # a run's own: its name, repeat and exit code, and the phases of its last event
        names = {k for r in measured for k in r} - set(CELL_KEYS) - {"run", "repeat", "exit", "event_phases_s"}
        for name in sorted(names):
            values = [r[name] for r in measured if name in r]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                row[name] = statistics.median(values)
            elif len(set(values)) == 1 and len(values) == len(measured):
                row[name] = values[0]
        ratios = [r["tokens_x_full"] for r in measured if "tokens_x_full" in r]
        if ratios:
            row.update(tokens_x_full_min=min(ratios), tokens_x_full_max=max(ratios))
        summary.append(row)
    return summary


def side_by_side(results: list[dict]) -> list[dict]:
    """Per (engine, method): tokens/s at each GPU count and the per-GPU efficiency of each count
    over the smallest, tokens/s(n) / (n / n0 · tokens/s(n0)), 1.0 for linear scaling."""
    rows = {}
    for r in results:
        if r.get("tokens_per_s"):
            rows.setdefault((r["engine"], r["method"]), {})[r["gpus"]] = r["tokens_per_s"]
    table = []
    for (engine, method), by_gpus in rows.items():
        base, counts = min(by_gpus), sorted(by_gpus.items())
        table.append({"engine": engine, "method": method, "tokens_per_s": dict(counts),
                      "efficiency": {n: t / (n / base * by_gpus[base]) for n, t in counts if n != base}})
    return table


HEADER = (f"{'engine':7} {'method':11} {'GPUs':>4} {'runs':>4} {'tokens/s':>10} {'x full':>6} {'min-max':>11} "
          f"{'MFU':>6} {'peak GiB':>8} {'x full':>6} {'events':>15} {'1st s':>7} {'event s':>8} {'event %':>7} "
          f"{'loss':>7}")


def format_row(r: dict, full: dict) -> str:
    """A summary row (summarize_repeats) as a table line; `full` is full-rank's in the same cell."""
    tps, mem = r.get("tokens_per_s"), r.get("peak_mem_gib")
    if not tps:  # a cell with no steady step has no figures: say so, not a row of zeros
        return (f"{r['engine']:7} {r['method']:11} {r['gpus']:4d} failed (exit {r.get('exit')}): see "
                f"{r['failed_run']}.log")
    ratio_t = f"{r['tokens_x_full']:.3f}" if "tokens_x_full" in r else "-"
    spread = (f"{r['tokens_x_full_min']:.3f}-{r['tokens_x_full_max']:.3f}"
              if r["runs"] > 1 and "tokens_x_full_min" in r else "-")
    ratio_m = f"{mem / full['peak_mem_gib']:.3f}" if mem and full.get("peak_mem_gib") else "-"
    mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
    event_s = f"{r['event_s']:.2f}" if "event_s" in r else "-"
    first = f"{r['first_event_s']:.2f}" if "first_event_s" in r else "-"
    share = f"{100 * r['event_share']:.2f}%" if "event_share" in r else "-"
    return (f"{r['engine']:7} {r['method']:11} {r['gpus']:4d} {r['runs']:4d} {tps:10.0f} {ratio_t:>6} {spread:>11} "
            f"{mfu:>6} {mem or 0:8.2f} {ratio_m:>6} {r.get('events', '')[:15]:>15} {first:>7} {event_s:>8} "
            f"{share:>7} {r.get('final_loss', 0):7.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", default="2", help="comma list of GPU counts, e.g. 1,2 (side by side)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--size", default="125m", help="recipes/opt-SIZE-METHOD.yaml (tiny: recipes/tiny-METHOD.yaml)")
    parser.add_argument("--methods", default="full,sst",
                        help="comma list; with full among them, each gets its x full ratio")
    parser.add_argument("--engines", default="zero2,zero3", help="comma list of zero1,zero2,zero3,fsdp")
    parser.add_argument("--skip", type=int, default=20, help="warm-up steps left out of the median")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per (engine, GPU count, method), the methods interleaved; the table "
                             "gives medians and x full's min-max")
    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_TFLOPS,
                        help="the GPU's dense bf16 peak, TFLOP/s, for MFU (default: H200, 989)")
    parser.add_argument("--out", default="runs/bench-throughput")
    parser.add_argument("--set", action="append", default=[], help="recipe overrides for every run")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        print(f"error: --repeat {args.repeat}: give 1 or more runs per cell", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = [x for kv in args.set for x in ("--set", kv)]
    gpu_counts = [int(n) for n in args.gpus.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    try:  # every recipe exists before the first run starts
        recipes = {method: str(size_recipe(args.size, method).relative_to(ROOT)) for method in methods}
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = []
    for engine in args.engines.split(","):
        for gpus in gpu_counts:
            # repeats outermost: each method's runs interleave with the others' (see the module doc)
            for repeat in range(1, args.repeat + 1):
                for method in methods:
                    name = run_name(engine, method, gpus, repeat if args.repeat > 1 else None)
                    run_dir = out / name
                    shutil.rmtree(run_dir, ignore_errors=True)
                    wall, code = launch(engine, gpus, recipes[method], run_dir, args.steps, extra)
                    # a run that stopped early keeps its figures (up to where it stopped) and its exit code
                    summary = summarize(run_dir, args.skip, gpus, args.peak_tflops) or {}
                    results.append({"engine": engine, "method": method, "gpus": gpus, "repeat": repeat,
                                    "run": name, "wall_s": round(wall, 1), "exit": code, **summary})
                    print(f"  done {name}: {summary}", flush=True)
                    add_ratios(results)
                    # after each run: a bench cut short keeps its rows
                    write_csv(out / "throughput.csv", results + summarize_repeats(results))
    cells = summarize_repeats(results)
    print(f"\nOPT-{args.size}, {args.steps} steps, median tokens/s after {args.skip} steps (all GPUs), "
          f"median of {args.repeat} run(s) per cell; MFU per GPU at {args.peak_tflops:g} TFLOP/s peak")
    print(HEADER)
    by = {(r["engine"], r["gpus"], r["method"]): r for r in cells}
    for r in cells:
        print(format_row(r, by.get((r["engine"], r["gpus"], "full"), {})))
    scaling = side_by_side(cells)
    if len(gpu_counts) > 1 and scaling:
        counts = sorted(gpu_counts)
        print(f"\nscaling: tokens/s at {', '.join(map(str, counts))} GPUs; per-GPU efficiency over {counts[0]} GPU(s)")
        for row in scaling:
            cells = " ".join(f"{row['tokens_per_s'].get(n, 0):10.0f}" for n in counts)
            eff = " ".join(f"x{n}: {e:.3f}" for n, e in row["efficiency"].items())
            print(f"{row['engine']:7} {row['method']:11} {cells}  {eff}")
    return 0 if all(r["exit"] == 0 and "tokens_per_s" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

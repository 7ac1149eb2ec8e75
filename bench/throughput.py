"""Each method against full-rank under each engine, on 1 and 2 GPUs, side by side in one run:
tokens/s, MFU, peak memory, and the periodic event's seconds and share of wall time.

    python -m bench.throughput --gpus 1,2 --steps 300 --engines zero2,zero3,fsdp
    python -m bench.throughput --size 1.3b --gpus 1,2 --engines zero2,fsdp --set train.micro_batch=8
    python -m bench.throughput --size tiny --gpus 1 --steps 8 --skip 2 --engines zero2   # CPU: the flow only

Each (engine, method, GPU count) is one real `launch/pretrain.py` run through the launcher a user
would use (deepspeed / torchrun), on the size's recipes (recipes/opt-SIZE-METHOD.yaml; tiny:
recipes/tiny-METHOD.yaml). Prints the table, then each (engine, method) at every GPU count side by
side with the per-GPU efficiency, and writes throughput.csv; each run's folder and log are named
ENGINE-METHOD-NgpuS with no commas or plus signs (sst+galore -> sst-galore). ZeRO-3 runs take
model.compile=false (it compiles nothing there). Measures; asserts nothing.

Columns:
  tokens/s   median over the steps after --skip that ran no periodic event (the whole job's tokens)
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
from sst_dist.errors import ConfigError  # noqa: E402
from sst_dist.engines import free_port  # noqa: E402

# an H200 (SXM) and an H100 SXM: dense BF16 tensor-core peak, 989 TFLOP/s (NVIDIA's data sheets
# give 1,979 with 2:4 sparsity, which no dense training uses)
H200_BF16_TFLOPS = 989.0


def safe_name(text: str) -> str:
    """A file-name part with no commas, plus signs or other characters shells and tools trip on."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def run_name(engine: str, method: str, gpus: int) -> str:
    return safe_name(f"{engine}-{method}-{gpus}gpu")


def flops_per_token(size: str, seq_len: int) -> float:
    """Training FLOPs per token of the dense OPT model of `size`: 6N + 12·L·d·T (see the module doc)."""
    import torch
    from transformers import OPTForCausalLM

    from sst_dist.models import OPT_VOCAB, opt_config

    config = opt_config(size, OPT_VOCAB, seq_len)
    with torch.device("meta"):
        model = OPTForCausalLM(config)
    n = sum(p.numel() for p in model.parameters()) - model.model.decoder.embed_positions.weight.numel()
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


def launch(engine: str, gpus: int, recipe: str, out: Path, steps: int, extra: list[str]) -> tuple[float, int]:
    """Runs one job; (wall seconds, exit code)."""
    args = ["launch/pretrain.py", "--recipe", recipe, "--output-dir", str(out), "--max-steps", str(steps),
            "--set", "wandb.mode=disabled", "--set", "eval.every_steps=0", "--set", "checkpoint.save=false",
            *extra]
    if engine.startswith("zero3"):  # ZeRO-3 runs eager: model.compile is refused there (read_ds_config)
        args += ["--set", "model.compile=false"]
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


HEADER = (f"{'engine':7} {'method':11} {'GPUs':>4} {'tokens/s':>10} {'x full':>6} {'MFU':>6} {'peak GiB':>8} "
          f"{'x full':>6} {'events':>15} {'1st s':>7} {'event s':>8} {'event %':>7} {'loss':>7}")


def format_row(r: dict, full: dict) -> str:
    tps, mem = r.get("tokens_per_s"), r.get("peak_mem_gib")
    if not tps:  # a run with no steady step has no figures: say so, not a row of zeros
        return (f"{r['engine']:7} {r['method']:11} {r['gpus']:4d} failed (exit {r.get('exit')}): see "
                f"{run_name(r['engine'], r['method'], r['gpus'])}.log")
    ratio_t = f"{tps / full['tokens_per_s']:.3f}" if tps and full.get("tokens_per_s") else "-"
    ratio_m = f"{mem / full['peak_mem_gib']:.3f}" if mem and full.get("peak_mem_gib") else "-"
    mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
    event_s = f"{r['event_s']:.2f}" if "event_s" in r else "-"
    first = f"{r['first_event_s']:.2f}" if "first_event_s" in r else "-"
    share = f"{100 * r['event_share']:.2f}%" if "event_share" in r else "-"
    return (f"{r['engine']:7} {r['method']:11} {r['gpus']:4d} {tps or 0:10.0f} {ratio_t:>6} {mfu:>6} "
            f"{mem or 0:8.2f} {ratio_m:>6} {r.get('events', '')[:15]:>15} {first:>7} {event_s:>8} {share:>7} "
            f"{r.get('final_loss', 0):7.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", default="2", help="comma list of GPU counts, e.g. 1,2 (side by side)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--size", default="125m", help="recipes/opt-SIZE-METHOD.yaml (tiny: recipes/tiny-METHOD.yaml)")
    parser.add_argument("--methods", default="full,sst", help="comma list; full first gives the x full ratios")
    parser.add_argument("--engines", default="zero2,zero3", help="comma list of zero1,zero2,zero3,fsdp")
    parser.add_argument("--skip", type=int, default=20, help="warm-up steps left out of the median")
    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_TFLOPS,
                        help="the GPU's dense bf16 peak, TFLOP/s, for MFU (default: H200, 989)")
    parser.add_argument("--out", default="runs/bench-throughput")
    parser.add_argument("--set", action="append", default=[], help="recipe overrides for every run")
    args = parser.parse_args(argv)
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
            for method in methods:
                run_dir = out / run_name(engine, method, gpus)
                shutil.rmtree(run_dir, ignore_errors=True)
                wall, code = launch(engine, gpus, recipes[method], run_dir, args.steps, extra)
                # a run that stopped early keeps its figures (up to where it stopped) and its exit code
                summary = summarize(run_dir, args.skip, gpus, args.peak_tflops) or {}
                results.append({"engine": engine, "method": method, "gpus": gpus, "wall_s": round(wall, 1),
                                "exit": code, **summary})
                print(f"  done {engine} {method} x{gpus}: {summary}", flush=True)
                write_csv(out / "throughput.csv", results)  # after each run: a bench cut short keeps its rows
    print(f"\nOPT-{args.size}, {args.steps} steps, median tokens/s after {args.skip} steps (all GPUs); "
          f"MFU per GPU at {args.peak_tflops:g} TFLOP/s peak")
    print(HEADER)
    by = {(r["engine"], r["gpus"], r["method"]): r for r in results}
    for r in results:
        print(format_row(r, by.get((r["engine"], r["gpus"], "full"), {})))
    scaling = side_by_side(results)
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

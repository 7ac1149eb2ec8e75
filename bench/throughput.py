"""SST against full-rank under each engine, side by side in one run: tokens/s and peak memory.

    python bench/throughput.py --gpus 2 --steps 300 --engines zero2,zero3 [--fsdp] [--out DIR]

Each (engine, method) pair is one real `launch/pretrain.py` run through the launcher a user would
use (deepspeed / torchrun), on the same recipes (recipes/opt-125m-{sst,full}.yaml unless --size).
Prints a table with the SST / full ratios and writes throughput.csv. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sst_dist.engines import free_port  # noqa: E402


def launch(engine: str, gpus: int, recipe: str, out: Path, steps: int, extra: list[str]) -> float:
    args = ["launch/pretrain.py", "--recipe", recipe, "--output-dir", str(out), "--max-steps", str(steps),
            "--set", "wandb.mode=disabled", "--set", "eval.every_steps=0", "--set", "checkpoint.every_steps=0",
            *extra]
    if engine == "fsdp":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus),
               "--master_port", str(free_port()), *args, "--engine", "fsdp"]
    else:
        cmd = ["deepspeed", "--num_gpus", str(gpus), "--master_port", str(free_port()), *args,
               "--ds-config", f"ds_configs/{engine}.json"]
    t0 = time.time()
    with open(out.with_suffix(".log"), "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        print(f"  {engine} {recipe}: exit {proc.returncode}, see {out.with_suffix('.log')}", flush=True)
        print("  " + "\n  ".join(out.with_suffix(".log").read_text().splitlines()[-15:]), flush=True)
    return time.time() - t0


def summarize(out: Path, skip: int) -> dict | None:
    path = out / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    steady = [r for r in rows[skip:] if "event" not in r]
    events = [r for r in rows if "event" in r]
    if not steady:
        return None
    tokens_per_step = rows[0]["tokens"]
    return {
        "steps": len(rows),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "mean_tokens_per_s_all": tokens_per_step * len(rows) / rows[-1]["elapsed_s"],
        "peak_mem_gib": max(r.get("peak_mem_gib", 0.0) for r in rows),
        "event_s": sum(tokens_per_step / r["tokens_per_s"] for r in events),
        "events": ",".join(r["event"] for r in events),
        "final_loss": rows[-1]["loss"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--size", default="125m", help="recipes/opt-SIZE-{sst,full}.yaml")
    parser.add_argument("--engines", default="zero2,zero3", help="comma list of zero1,zero2,zero3,fsdp")
    parser.add_argument("--skip", type=int, default=20, help="warm-up steps left out of the median")
    parser.add_argument("--out", default="runs/bench-throughput")
    parser.add_argument("--set", action="append", default=[], help="recipe overrides for every run")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = [x for kv in args.set for x in ("--set", kv)]
    results = []
    for engine in args.engines.split(","):
        for method in ("full", "sst"):
            run_dir = out / f"{engine}-{method}"
            shutil.rmtree(run_dir, ignore_errors=True)
            recipe = f"recipes/opt-{args.size}-{method}.yaml"
            wall = launch(engine, args.gpus, recipe, run_dir, args.steps, extra)
            summary = summarize(run_dir, args.skip) or {}
            results.append({"engine": engine, "method": method, "wall_s": round(wall, 1), **summary})
            print(f"  done {engine} {method}: {summary}", flush=True)
    header = f"{'engine':8} {'method':6} {'tokens/s':>10} {'x full':>7} {'peak GiB/GPU':>13} {'x full':>7} " \
             f"{'events':>16} {'event s':>8} {'loss':>7}"
    print(f"\nOPT-{args.size}, {args.gpus} GPU(s), {args.steps} steps, median tokens/s after {args.skip} steps")
    print(header)
    by = {(r["engine"], r["method"]): r for r in results}
    for r in results:
        full = by.get((r["engine"], "full"), {})
        tps, mem = r.get("tokens_per_s"), r.get("peak_mem_gib")
        ratio_t = f"{tps / full['tokens_per_s']:.3f}" if tps and full.get("tokens_per_s") else "-"
        ratio_m = f"{mem / full['peak_mem_gib']:.3f}" if mem and full.get("peak_mem_gib") else "-"
        print(f"{r['engine']:8} {r['method']:6} {tps or 0:10.0f} {ratio_t:>7} {mem or 0:13.2f} {ratio_m:>7} "
              f"{r.get('events', '')[:16]:>16} {r.get('event_s', 0):8.2f} {r.get('final_loss', 0):7.3f}")
    with open(out / "throughput.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in results for k in r}))
        writer.writeheader()
        writer.writerows(results)


if __name__ == "__main__":
    main()

"""Measured peak memory and tokens/s of each method, next to the estimator's numbers.

    python -m bench.memory                        # GPU: 125m, 350m, 1.3b x all methods, mb 1 and 8
    python -m bench.memory --sizes 125m --methods full,sst --micro-batches 1 --steps 2
    python -m bench.memory --device cpu --sizes tiny --steps 2      # the flow only, on CPU

One engine for all: DeepSpeed (ds_configs/zero2.json unless --ds-config; bf16 with fp32 masters
on a GPU) on one process, set up exactly as the trainer does it (sst_dist.engines.deepspeed, which
fills the config's "auto" fields with load_ds_config); or `--engine fsdp`, FSDP2 on one process
(fp32 weights, gradients and AdamW, bf16 gathers), where `model.frozen_dtype` decides how every
method's frozen tensors are stored (DeepSpeed's bf16 casts the whole module to bf16, whatever it
says), compared with `python -m sst_dist.memory --engine fsdp`. Each (size, method, rank) runs in a fresh
subprocess so peaks never mix; inside it the micro-batches run in increasing order, with the peak
counter reset before each. Batches are random tokens. GaLore is also run at --galore-ranks.

Measured: torch.cuda.max_memory_allocated over warm-up + timed steps and one more step at the
method's first periodic event after step 0 (GaLore refresh, SST resample, ReLoRA* reset: the
refresh is where GaLore peaks, and only then with Adam moments present) (on CPU: the process's
peak RSS, only to prove the flow), the memory still allocated after the last step (weights, masters,
Adam moments: compare with the estimate's "resident"), and tokens/s over the timed steps.
Writes memory.csv, memory.png (if matplotlib is there) and one log per subprocess to --out.
Measures; asserts nothing. On one H200 the 1.3B sweep of full, GaLore (r 64 and 512), SST and
SST + GaLore took 300 s; SST's setup (the SVD of 144 layers) is the slowest part of a run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if not __package__:  # run as a file: its sibling modules import only as the package
    print("error: run it from the repository root as a module: python -m bench.memory ...", file=sys.stderr)
    sys.exit(2)

from sst_dist.registry import METHODS  # noqa: E402

GIB = 2**30


# ----------------------------------------------------------------------------- the worker

def worker(job: dict) -> dict:
    """Builds model + method + DeepSpeed once, then measures each micro-batch. Returns a report."""
    import torch

    from bench.harness import build

    micro_batches = sorted(job["micro_batches"])
    cuda = job["device"] == "cuda"
    report = {"memory_kind": "cuda_max_allocated" if cuda else "cpu_peak_rss", "results": []}
    try:
        run = build(job["size"], job["method"], job["rank"], job["seq"], micro_batches[0], job["device"],
                    job["ds_config"], job["set"])
    except NotImplementedError as err:
        report["skipped"] = f"build_method: {err}"
        return report
    engine, device = run.engine, run.device
    report["device_name"] = torch.cuda.get_device_name(device) if cuda else "cpu"
    report["sst_path"] = run.recipe.sst.path
    # the trainer trains GaLore in its layer form (GaLoreLinear / GaLoreEmbedding) under every engine
    report["galore_form"] = "layer"
    if job["ds_config"]:
        report["zero_stage"] = int(engine.config.get("zero_optimization", {}).get("stage", 0))
        report["bf16"] = bool(engine.config.get("bf16", {}).get("enabled"))
    report["frozen_dtype"] = run.recipe.model.frozen_dtype
    report["checkpointing"] = run.recipe.model.gradient_checkpointing
    report["setup_s"] = run.setup_s

    step = 0
    for mb in micro_batches:
        row = {"micro_batch": mb}
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            timed_tokens, start = 0, None
            for i in range(job["warmup"] + job["steps"]):
                if i == job["warmup"]:
                    run.sync()
                    start = time.perf_counter()
                run.step(step, [run.batch(mb, job["seq"])])
                step += 1
                if start is not None:
                    timed_tokens += mb * job["seq"]
            run.sync()
            elapsed = time.perf_counter() - start if start is not None else 0.0
            row["tokens_per_s"] = round(timed_tokens / elapsed, 1) if elapsed > 0 else None
            event = run.first_event_step()
            if event is not None:  # untimed; its peak counts: a real run does this work every so often
                run.step(event, [run.batch(mb, job["seq"])])
                row["event_step"] = event
            if cuda:
                row["peak_bytes"] = torch.cuda.max_memory_allocated(device)
                row["resident_bytes"] = torch.cuda.memory_allocated(device)
            else:  # ru_maxrss is in KiB on Linux; it only grows, so later rows include earlier ones
                row["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            row["status"] = "ok"
        except torch.OutOfMemoryError as err:
            row["status"] = "oom"
            row["note"] = str(err).splitlines()[0][:200]
            report["results"].append(row)
            for bigger in micro_batches[micro_batches.index(mb) + 1:]:
                report["results"].append({"micro_batch": bigger, "status": "oom",
                                          "note": f"not run: micro-batch {mb} ran out of memory"})
            break
        report["results"].append(row)
    return report


# ----------------------------------------------------------------------------- the sweep

def supported(method: str) -> str | None:
    """None if build_method knows `method`, else why not: asked on a tiny CPU model, so a method the
    code lacks costs no GPU time."""
    import torch

    from sst_dist.config import load_recipe
    from sst_dist.methods import build_method
    from sst_dist.models import build_model

    recipe = load_recipe(None, [f"method={method}", "rank=4", "model.size=tiny", "model.seq_len=16"])
    torch.manual_seed(0)
    try:
        build_method(recipe, build_model("tiny", vocab_size=64, seq_len=16))
    except NotImplementedError as err:
        return str(err)
    return None


def run_job(job: dict, out: Path, timeout: int) -> dict:
    """One (size, method, rank) in a fresh process; its report, or why there is none."""
    name = f"{job['size']}-{job['method'].replace('+', '_')}-r{job['rank']}"
    log_path, report_path = out / f"{name}.log", out / f"{name}.json"
    report_path.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # each worker is its own world of one
    cmd = [sys.executable, "-m", "bench.memory", "--worker", json.dumps(job),
           "--report", str(report_path)]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = f"timeout ({timeout} s)"
    wall = round(time.perf_counter() - t0, 1)
    if report_path.exists():
        report = json.loads(report_path.read_text())
    else:
        tail = log_path.read_text(errors="replace").splitlines()[-12:]
        print(f"  {name}: exit {rc} after {wall} s, see {log_path}\n    " + "\n    ".join(tail), flush=True)
        report = {"error": f"exit {rc}, see {log_path.name}"}
    report["wall_s"] = wall
    return report


def estimates(job: dict, report: dict, mb: int) -> dict:
    """The estimator's numbers for the configuration the worker actually ran."""
    from sst_dist.memory import estimate, estimate_engine

    if not job["ds_config"]:  # FSDP2 on one process
        est = estimate_engine(job["size"], job["method"], job["rank"], "fsdp", 1, mb, job["seq"],
                              frozen_dtype=report.get("frozen_dtype", "float32"),
                              checkpointing=report.get("checkpointing", False),
                              sst_path=report.get("sst_path", "dense"),
                              galore_rank=job["rank"] if METHODS[job["method"]].uses_galore else None)
        states = est["weights"] + est["gradients"] + est["optimizer"]
        return {"est_states_gib": states / GIB, "est_activations_gib": est["activations"] / GIB,
                "est_total_gib": est["total"] / GIB,
                "est_resident_gib": (est["weights"] + est["optimizer"]) / GIB}
    bf16 = report.get("bf16", job["device"] == "cuda")
    est = estimate(job["size"], job["method"], job["rank"], report.get("zero_stage", job["zero"]), 1, mb,
                   job["seq"], precision="bf16" if bf16 else "fp32",
                   galore_rank=job["rank"] if METHODS[job["method"]].uses_galore else None,
                   sst_path=report.get("sst_path", "dense"),
                   galore_form=report.get("galore_form", "optimizer"))
    states = est["weights"] + est["gradients"] + est["masters"] + est["optimizer"]
    return {"est_states_gib": states / GIB, "est_buffers_gib": est["buffers"] / GIB,
            "est_activations_gib": est["activations"] / GIB, "est_total_gib": est["total"] / GIB,
            "est_resident_gib": (est["weights"] - est["kept_weight"] + est["masters"] + est["optimizer"]) / GIB}


def rows_of(job: dict, report: dict) -> list[dict]:
    """One CSV row per micro-batch: measured values, the estimate and their ratio."""
    results = report.get("results") or [
        {"micro_batch": mb, "status": "skipped" if "skipped" in report else "error",
         "note": report.get("skipped") or report.get("error")} for mb in job["micro_batches"]]
    rows = []
    for res in results:
        row = {"size": job["size"], "method": job["method"], "rank": job["rank"], "seq": job["seq"],
               "micro_batch": res["micro_batch"], "status": res["status"], "note": res.get("note", ""),
               "tokens_per_s": res.get("tokens_per_s"), "device": report.get("device_name", job["device"]),
               "memory_kind": report.get("memory_kind", ""), "setup_s": report.get("setup_s"),
               "wall_s": report.get("wall_s")}
        if res.get("peak_bytes") is not None:
            row["peak_gib"] = res["peak_bytes"] / GIB
        if res.get("resident_bytes") is not None:
            row["resident_gib"] = res["resident_bytes"] / GIB
        try:
            row.update(estimates(job, report, res["micro_batch"]))
        except Exception as err:  # a configuration the estimator refuses still keeps its row
            row["note"] = (row["note"] + "; " if row["note"] else "") + f"no estimate: {err}"
        if row.get("peak_gib") and row.get("est_total_gib") and job["device"] == "cuda":
            row["ratio"] = row["peak_gib"] / row["est_total_gib"]
        rows.append(row)
    return rows


def _fmt(value, spec=".2f") -> str:
    return "-" if value is None or value == "" else format(value, spec)


def print_table(rows: list[dict]) -> None:
    header = ("size", "method", "rank", "mb", "est states", "est total", "peak", "peak/est",
              "resident", "est resid", "tokens/s", "status")
    lines = [header]
    for r in rows:
        status = r["status"] + (f" ({r['note']})" if r.get("note") else "")
        lines.append((r["size"], r["method"], str(r["rank"]), str(r["micro_batch"]),
                      _fmt(r.get("est_states_gib")), _fmt(r.get("est_total_gib")), _fmt(r.get("peak_gib")),
                      _fmt(r.get("ratio"), ".3f"), _fmt(r.get("resident_gib")),
                      _fmt(r.get("est_resident_gib")), _fmt(r.get("tokens_per_s"), ".0f"), status))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    for line in lines:
        cells = [v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths))]
        print("  ".join(cells + [line[-1]]))


def plot(rows: list[dict], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG written"
    mbs = sorted({r["micro_batch"] for r in rows})
    width = max(8, 0.6 * len(rows) / len(mbs) + 3)
    fig, axes = plt.subplots(len(mbs), 1, figsize=(width, 4 * len(mbs)), squeeze=False)
    for ax, mb in zip(axes[:, 0], mbs):
        sub = [r for r in rows if r["micro_batch"] == mb]
        labels = [f"{r['size']}\n{r['method']}" + (f"\nr{r['rank']}" if r["method"] == "galore" else "")
                  for r in sub]
        x = range(len(sub))
        ax.bar([i - 0.2 for i in x], [r.get("peak_gib") or 0 for r in sub], 0.4, label="measured peak")
        ax.bar([i + 0.2 for i in x], [r.get("est_total_gib") or 0 for r in sub], 0.4, label="estimate")
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set_ylabel("GiB per GPU")
        ax.set_title(f"micro-batch {mb} x {sub[0]['seq']} tokens")
        ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"wrote {path}"


CSV_FIELDS = ["size", "method", "rank", "micro_batch", "seq", "status", "note", "peak_gib", "est_total_gib",
              "ratio", "est_states_gib", "est_buffers_gib", "est_activations_gib", "resident_gib",
              "est_resident_gib", "tokens_per_s", "memory_kind", "device", "setup_s", "wall_s"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="125m,350m,1.3b")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--galore-ranks", default="512", help="extra ranks for GaLore alone ('' for none)")
    p.add_argument("--micro-batches", default=None, help="default 1,8 (cpu: 1,2)")
    p.add_argument("--seq", type=int, default=None, help="default 2048 (cpu: 128)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per micro-batch")
    p.add_argument("--steps", type=int, default=3, help="timed steps per micro-batch")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--engine", default="deepspeed", choices=("deepspeed", "fsdp"),
                   help="fsdp: FSDP2 on one process, frozen tensors stored as model.frozen_dtype says")
    p.add_argument("--ds-config", help="--engine deepspeed's config (default ds_configs/zero2.json)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override for every run, e.g. sst.path=factored")
    # SST's setup at 1.3B (an SVD per layer) alone took 250 s on a shared H200
    p.add_argument("--timeout", type=int, default=900, help="seconds per subprocess")
    p.add_argument("--out", default="runs/bench-memory")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    return p


def plan(args) -> tuple[list[dict], dict[str, str]]:
    """The jobs of the sweep and, per method, why it is skipped. Raises ConfigError on bad flags."""
    from sst_dist.errors import ConfigError
    from sst_dist.memory import model_name, resolve_model
    from sst_dist.models import min_target_dim
    from sst_dist.registry import TARGETS, family

    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"--methods: {', '.join(unknown) or 'empty'}; choose from {', '.join(METHODS)}")
    sizes = [resolve_model(s) for s in args.sizes.split(",") if s]
    if args.engine == "fsdp" and args.ds_config:
        raise ConfigError(f"--ds-config {args.ds_config}: a DeepSpeed config, which --engine fsdp does not use; "
                          "drop one of the two")
    ds_config = Path(args.ds_config or "ds_configs/zero2.json")
    if not ds_config.is_absolute() and not ds_config.exists():
        ds_config = ROOT / ds_config  # the repository's ds_configs/ from any directory
    if not ds_config.is_file():
        raise ConfigError(f"--ds-config {args.ds_config}: no such file")
    zero = int(json.loads(ds_config.read_text()).get("zero_optimization", {}).get("stage", 0))
    if args.engine == "fsdp":
        ds_config, zero = None, None
    try:
        micro_batches = sorted({int(m) for m in args.micro_batches.split(",") if m})
        galore_ranks = [int(r) for r in args.galore_ranks.split(",") if r]
    except ValueError:
        raise ConfigError("--micro-batches, --galore-ranks: comma lists of integers") from None
    base = {"seq": args.seq, "warmup": args.warmup, "steps": args.steps, "device": args.device,
            "ds_config": str(ds_config.resolve()) if ds_config else None, "zero": zero, "set": args.set,
            "micro_batches": micro_batches}
    skipped = {m: why for m in dict.fromkeys(methods) if (why := supported(m))}
    jobs = []
    for size in sizes:
        limit = min_target_dim(size, TARGETS[family(size)])
        for method in methods:
            for rank in [args.rank] + (galore_ranks if method == "galore" else []):
                job = {**base, "size": size, "method": method, "rank": rank}
                if method in skipped:
                    job["skip"] = skipped[method]
                elif method != "full" and rank > limit:
                    job["skip"] = f"rank {rank} exceeds min(out, in) = {limit} of {model_name(size)}"
                jobs.append(job)
    return jobs, skipped


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    cpu = args.device == "cpu"  # the CPU run only proves the flow: keep it small unless asked
    args.seq = args.seq or (128 if cpu else 2048)
    args.micro_batches = args.micro_batches or ("1,2" if cpu else "1,8")
    if args.worker:
        report = worker(json.loads(args.worker))
        Path(args.report).write_text(json.dumps(report))
        from sst_dist.engines import leave_distributed

        leave_distributed()
        return 0

    from sst_dist.errors import ConfigError

    try:
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ConfigError("--device cuda: no GPU is visible; --device cpu checks the flow only")
        jobs, skipped = plan(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for method, why in skipped.items():
        print(f"note: skipping {method}, which build_method does not support yet: {why}", flush=True)

    rows, t_start = [], time.perf_counter()
    for job in jobs:
        if "skip" in job:
            report = {"skipped": job["skip"]}
        else:
            print(f"running {job['size']} {job['method']} rank {job['rank']} ...", flush=True)
            report = run_job(job, out, args.timeout)
        rows += rows_of(job, report)

    zero = jobs[0]["zero"] if jobs else "?"
    kind = next((r["memory_kind"] for r in rows if r.get("memory_kind")), "")
    engine = "FSDP2" if args.engine == "fsdp" else f"DeepSpeed ZeRO-{zero}"
    print(f"\n{engine}, 1 process, seq {args.seq}, {args.warmup} warm-up + {args.steps} timed "
          f"steps per micro-batch; GiB ({kind}); sweep took {time.perf_counter() - t_start:.0f} s")
    print_table(rows)
    print("est states = weights + grads (with the step's copies) + masters + Adam; est total = the estimated "
          "peak, with activations and ZeRO's reduce bucket (python -m sst_dist.memory); resident = allocated "
          "after the last step (weights + masters + Adam) and its estimate.")
    if args.device == "cpu":
        print("cpu: 'peak' is the process's peak RSS (libraries included), not comparable with the estimate")
    with open(out / "memory.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out / 'memory.csv'}")
    measured = [r for r in rows if r.get("peak_gib")]
    print(plot(measured, out / "memory.png") if measured else "nothing measured: no PNG written")
    return 0


if __name__ == "__main__":
    sys.exit(main())

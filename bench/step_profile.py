"""Where a training step's time and memory go, phase by phase, for each method side by side.

    python -m bench.step_profile --size 1.3b --methods full,sst,galore --micro-batch 8
    python -m bench.step_profile --size 1.3b --methods galore --micro-batch 1 --set galore.update_proj_gap=3
    python -m bench.step_profile --size 125m --methods full,sst --kernels 12     # + top operators per phase
    python -m bench.step_profile --size 1.3b --methods galore --micro-batch 1 --steps 4 \\
        --set galore.update_proj_gap=5 --memory-sites 12      # what is live at a refresh's peak
    python -m bench.step_profile --size 125m --methods full,sst --free 20 --ds-config fsdp  # host-bound?
    python -m bench.step_profile --size 125m --methods full,sst --syncs 5    # what the host waited for
    python -m bench.step_profile --device cpu --size tiny --seq 64                # the flow only

Same set-up as bench/memory.py (bench/harness.py: one process, DeepSpeed with ds_configs/zero2.json
or --ds-config, or FSDP2 with --ds-config fsdp; bf16 with fp32 masters on a GPU, random tokens);
each method runs in a fresh subprocess. The device is synchronised at the end of each phase:
probe (a GaLore refresh's extra forward and backward), before_step (the method's periodic work:
resample, re-SVD, GaLore refresh), forward, backward, step (the optimizer, with ZeRO's gradient
handling), after_step (SST's clamp and renormalisation). Per phase: median milliseconds over the
timed steps where it ran, and the peak memory allocated within it. Measures; asserts nothing.

`--free N` then runs N steps with nothing synchronised between them, as the trainer runs them, and
reports their milliseconds per step and the share of that time the GPU was busy (from a second,
profiled pass): a step whose synchronised phases add up to less than its free-running time, or
whose GPU is busy well under 100 %, is bound by the host, not by the GPU. `--syncs N` then runs N steps under CUDA's sync debug mode
and lists, per step, every operation that made the host wait for the GPU, by the line that called it.
Under ZeRO-3 the table adds its per-module hooks' host time per step (fetch, release) and the
parameters they gathered (sst_dist.engines.deepspeed_internals.parameter_traffic).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if not __package__:  # run as a file: its sibling modules import only as the package
    print("error: run it from the repository root as a module: python -m bench.step_profile ...", file=sys.stderr)
    sys.exit(2)

GIB = 2**30
PHASES = ("probe", "before_step", "forward", "backward", "step", "after_step")


MARKER = "phase-end:"


def ops_by_phase(events, top: int) -> str:
    """The profiled step's operators, per phase: count, self CPU ms and self device ms of the `top`
    operators by self CPU time. A phase whose CPU time far exceeds its device time is bound by
    launches and Python, not by the GPU."""
    import bisect

    ends = sorted((e.time_range.start, e.name[len(MARKER):]) for e in events if e.name.startswith(MARKER))
    starts = [t for t, _ in ends]
    table: dict[str, dict[str, list]] = {}
    for e in events:
        if e.name.startswith(MARKER) or e.device_type.name != "CPU":
            continue
        i = bisect.bisect_left(starts, e.time_range.start)
        if i == len(ends):
            continue
        row = table.setdefault(ends[i][1], {}).setdefault(e.name, [0, 0.0, 0.0])
        row[0] += 1
        row[1] += e.self_cpu_time_total / 1e3
        row[2] += getattr(e, "self_device_time_total", 0.0) / 1e3
    lines = []
    for phase in PHASES:
        ops = table.get(phase)
        if not ops:
            continue
        cpu, dev, calls = (sum(r[i] for r in ops.values()) for i in (1, 2, 0))
        lines.append(f"  {phase}: {calls} ops, self CPU {cpu:.1f} ms, self device {dev:.1f} ms")
        for name, (n, c, d) in sorted(ops.items(), key=lambda kv: -kv[1][1])[:top]:
            lines.append(f"    {name[:56]:56} {n:6d} calls {c:8.2f} ms CPU {d:8.2f} ms device")
    return "\n".join(lines)


def _site(frames) -> str:
    """Where an allocation was made: the innermost frame in this project, with the innermost
    library frame under it when there is one (DeepSpeed, torch.autograd)."""
    ours = next((f for f in frames if "/sst_dist/" in f.get("filename", "")
                 or "/bench/" in f.get("filename", "")), None)
    lib = next((f for f in frames if "/site-packages/" in f.get("filename", "")
                and "/torch/cuda/" not in f.get("filename", "")), None)
    fmt = lambda f: f"{'/'.join(f['filename'].split('/')[-2:])}:{f['line']} {f.get('name', '')}"
    if ours is None:
        return fmt(lib) if lib else "(no Python frame: autograd engine / C++)"
    return fmt(ours) + (f" <- {fmt(lib)}" if lib and frames.index(lib) < frames.index(ours) else "")


def peak_sites(snapshot: dict, baseline: int, top: int) -> str:
    """Replays the recorded allocations of one step and lists, at its peak, what was live that the
    step allocated, grouped by allocation site. `baseline`: bytes allocated when recording began."""
    events = [e for trace in snapshot.get("device_traces", []) for e in trace]
    live, total, peak, peak_at = {}, 0, 0, -1
    for n, e in enumerate(events):
        action, addr, size = e.get("action"), e.get("addr"), e.get("size", 0)
        if action == "alloc":
            live[addr] = size
            total += size
        elif action == "free_completed":  # blocks from before the step count too: their size is given
            total -= live.pop(addr, size)
        if total > peak:
            peak, peak_at = total, n
    live = {}
    for e in events[:peak_at + 1]:
        action, addr = e.get("action"), e.get("addr")
        if action == "alloc":
            live[addr] = e
        elif action == "free_completed":
            live.pop(addr, None)
    sites: dict[str, list] = {}
    for e in live.values():
        row = sites.setdefault(_site(e.get("frames", [])), [0, 0])
        row[0] += 1
        row[1] += e.get("size", 0)
    lines = [f"  allocated before the step {baseline / GIB:.2f} GiB; the step's peak {(baseline + peak) / GIB:.2f} GiB "
             f"(+{peak / GIB:.2f}), made of:"]
    for site, (count, size) in sorted(sites.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"    {size / GIB:7.3f} GiB {count:5d} blocks  {site}")
    return "\n".join(lines)


def worker(job: dict) -> dict:
    import torch

    from bench.harness import build

    run = build(job["size"], job["method"], job["rank"], job["seq"], job["micro_batch"], job["device"],
                job["ds_config"], job["set"], job["accumulation"])
    cuda = run.cuda
    samples: list[dict] = []  # per timed step: phase -> (ms, peak bytes)
    marks: dict = {}

    def mark(phase: str) -> None:
        run.sync()
        if marks.get("profiling"):  # a zero-length marker: events before it belong to `phase`
            with torch.profiler.record_function(MARKER + phase):
                pass
        now = time.perf_counter()
        peak = torch.cuda.max_memory_allocated(run.device) if cuda else 0
        ms, old_peak = marks["current"].get(phase, (0.0, 0))
        marks["current"][phase] = (ms + (now - marks["t"]) * 1e3, max(old_peak, peak))
        marks["t"] = now
        if cuda:
            torch.cuda.reset_peak_memory_stats(run.device)

    kernels = sites = None
    zero3 = getattr(run.engine, "zero_stage", None) == 3
    if zero3:
        from sst_dist.engines.deepspeed_internals import parameter_traffic
    traffic_steps: list[dict] = []  # ZeRO-3: per timed step, its hooks' host work
    for step in range(job["warmup"] + job["steps"]):
        blocks = [run.batch(job["micro_batch"], job["seq"]) for _ in range(job["accumulation"])]
        run.sync()
        marks.update(current={}, t=time.perf_counter())
        if cuda:
            torch.cuda.reset_peak_memory_stats(run.device)
        last = step == job["warmup"] + job["steps"] - 1
        profile = job["kernels"] and last
        if last and job["memory_sites"] and cuda:
            torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
            baseline = torch.cuda.memory_allocated(run.device)
        with parameter_traffic() if zero3 else contextlib.nullcontext({}) as traffic:
            if profile:
                activities = [torch.profiler.ProfilerActivity.CPU] + (
                    [torch.profiler.ProfilerActivity.CUDA] if cuda else [])
                marks["profiling"] = True
                with torch.profiler.profile(activities=activities) as prof:
                    run.step(step, blocks, mark)
                marks["profiling"] = False
                kernels = ops_by_phase(prof.events(), job["kernels"])
            else:
                run.step(step, blocks, mark)
        if last and job["memory_sites"] and cuda:
            sites = peak_sites(torch.cuda.memory._snapshot(), baseline, job["memory_sites"])
            torch.cuda.memory._record_memory_history(enabled=None)
        if step >= job["warmup"]:
            samples.append(marks["current"])
            if zero3 and not profile:  # the profiler's own overhead would land in the hooks' time
                traffic_steps.append(traffic)
    free = free_running(run, job) if job.get("free") and cuda else None
    waits = host_waits(run, job) if job.get("syncs") and cuda else None
    report = {"setup_s": run.setup_s, "tokens": job["micro_batch"] * job["seq"] * job["accumulation"],
              "resident_gib": (torch.cuda.memory_allocated(run.device) if cuda else 0) / GIB,
              "phases": {}}
    for phase in PHASES:
        ran = [s[phase] for s in samples if phase in s]
        if ran:
            report["phases"][phase] = {"ms": statistics.median(ms for ms, _ in ran),
                                       "max_ms": max(ms for ms, _ in ran), "steps": len(ran),
                                       "peak_gib": max(peak for _, peak in ran) / GIB}
    report["step_ms"] = statistics.median(sum(ms for ms, _ in s.values()) for s in samples)
    if traffic_steps:
        report["zero3"] = {key: statistics.median(t[key] for t in traffic_steps) for key in traffic_steps[0]}
    if free:
        report["free"] = free
    if waits:
        report["host_waits"] = waits
    if kernels:
        report["kernels"] = kernels
    if sites:
        report["memory_sites"] = sites
    return report


def busy_seconds(events) -> float:
    """The time covered by at least one GPU kernel or copy: the union of their intervals."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type.name == "CUDA")
    total, end = 0.0, float("-inf")
    for a, b in spans:
        if b > end:
            total += b - max(a, end)
            end = b
    return total / 1e6  # profiler times are in microseconds


def run_free(run, batches) -> None:
    """One step per entry of `batches`, back to back with no phase synchronised, as the trainer
    runs them. Step index 1 throughout: no periodic work falls due."""
    for blocks in batches:
        run.step(1, blocks)


def step_batches(run, job: dict, n: int) -> list:
    """`n` steps' micro-batches, made before any step runs."""
    return [[run.batch(job["micro_batch"], job["seq"]) for _ in range(job["accumulation"])] for _ in range(n)]


def free_running(run, job: dict) -> dict:
    """`job["free"]` steps run free (run_free): their milliseconds per step, then the same again
    under the profiler for the GPU's busy share."""
    import torch

    n = job["free"]
    batches = step_batches(run, job, n)

    def steps() -> float:
        run.sync()
        start = time.perf_counter()
        run_free(run, batches)
        run.sync()
        return time.perf_counter() - start

    wall = steps()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        profiled = steps()
    return {"ms": wall / n * 1e3, "busy": busy_seconds(prof.events()) / profiled, "steps": n}


def host_waits(run, job: dict) -> dict:
    """`job["syncs"]` steps run free (run_free) under CUDA's sync debug mode: every operation that
    made the host wait for the GPU (a read-back, a copy from pageable memory), counted by the line
    of Python that called it."""
    import warnings

    import torch

    n = job["syncs"]
    batches = step_batches(run, job, n)
    run.sync()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run_free(run, batches)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return waits_by_caller(caught, n)


def waits_by_caller(caught, steps: int) -> dict:
    """The sync debug mode's warnings (warnings.WarningMessage) as host waits per step, in all and
    by the line that made them (the last three parts of its path), most frequent first; other
    warnings are left out."""
    sites: dict[str, int] = {}
    for w in caught:
        if "synchroniz" in str(w.message):
            where = f"{'/'.join(Path(w.filename).parts[-3:])}:{w.lineno}"
            sites[where] = sites.get(where, 0) + 1
    return {"per_step": sum(sites.values()) / steps, "steps": steps,
            "sites": sorted(((where, count / steps) for where, count in sites.items()), key=lambda x: -x[1])}


def run_job(job: dict, timeout: int) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # each worker is its own world of one
    cmd = [sys.executable, "-m", "bench.step_profile", "--worker", json.dumps(job)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout ({timeout} s)"}
    for line in proc.stdout.splitlines():
        if line.startswith("REPORT "):
            return json.loads(line[len("REPORT "):])
    tail = (proc.stdout + proc.stderr).splitlines()[-15:]
    return {"error": f"exit {proc.returncode}:\n    " + "\n    ".join(tail)}


def print_tables(labels: list[str], reports: list[dict]) -> None:
    ok = [(label, r) for label, r in zip(labels, reports) if "phases" in r]
    for label, r in zip(labels, reports):
        if "error" in r:
            print(f"{label}: {r['error']}")
    if not ok:
        return
    width = max(12, *(len(label) for label, _ in ok))
    print("\nmilliseconds per phase (median over the timed steps it ran in; peak GiB allocated within it)")
    print(f"{'phase':12} " + " ".join(f"{label:>{width}}" for label, _ in ok))
    for phase in PHASES:
        if not any(phase in r["phases"] for _, r in ok):
            continue
        cells = []
        for _, r in ok:
            p = r["phases"].get(phase)
            cells.append(f"{p['ms']:8.1f} ({p['peak_gib']:5.2f})" if p else "-")
        print(f"{phase:12} " + " ".join(f"{c:>{width}}" for c in cells))
    first = ok[0][1]
    print(f"{'step total':12} " + " ".join(f"{r['step_ms']:8.1f}        ".rjust(width) for _, r in ok))
    print(f"{'tokens/s':12} " + " ".join(f"{r['tokens'] / r['step_ms'] * 1e3:8.0f}        ".rjust(width)
                                       for _, r in ok))
    print(f"{'x ' + ok[0][0]:12} " + " ".join(f"{first['step_ms'] / r['step_ms']:8.3f}        ".rjust(width)
                                            for _, r in ok))
    print(f"{'resident GiB':12} " + " ".join(f"{r['resident_gib']:8.2f}        ".rjust(width) for _, r in ok))
    if all("free" in r for _, r in ok):
        free = [r["free"] for _, r in ok]
        print(f"\nfree-running, {free[0]['steps']} steps with nothing synchronised between phases or steps")
        print(f"{'ms per step':12} " + " ".join(f"{f['ms']:8.1f}        ".rjust(width) for f in free))
        print(f"{'x ' + ok[0][0]:12} " + " ".join(f"{free[0]['ms'] / f['ms']:8.3f}        ".rjust(width) for f in free))
        print(f"{'GPU busy':12} " + " ".join(f"{f['busy']:8.1%}        ".rjust(width) for f in free))
    if all("zero3" in r for _, r in ok):
        hooks = [r["zero3"] for _, r in ok]
        print("\nZeRO-3's per-module hooks, host time per step (median of the timed steps but a profiled one)")
        print(f"{'fetch ms':12} " + " ".join(f"{h['fetch_s'] * 1e3:8.1f}        ".rjust(width) for h in hooks))
        print(f"{'release ms':12} " + " ".join(f"{h['release_s'] * 1e3:8.1f}        ".rjust(width) for h in hooks))
        print(f"{'gathered':12} " + " ".join(f"{h['gathered']:8.0f}        ".rjust(width) for h in hooks))
    for label, r in ok:
        if r.get("host_waits"):
            w = r["host_waits"]
            print(f"\n{label}: {w['per_step']:g} host waits for the GPU per step (over {w['steps']} steps), by caller")
            for where, count in w["sites"]:
                print(f"  {count:6.2f}  {where}")
        if r.get("kernels"):
            print(f"\n{label}: operators of one step by phase, top by self CPU time\n{r['kernels']}")
        if r.get("memory_sites"):
            print(f"\n{label}: the last step's peak memory by allocation site\n{r['memory_sites']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1.3b")
    p.add_argument("--methods", default="full,sst,galore",
                   help="comma list; METHOD@KEY=VALUE;KEY=VALUE adds recipe overrides for that run only")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=None, help="default 8 (cpu: 2)")
    p.add_argument("--seq", type=int, default=None, help="default 2048 (cpu: 64)")
    p.add_argument("--accumulation", type=int, default=1,
                   help="micro-batches per optimizer step (forward and backward rows sum over them)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--kernels", type=int, default=0, help="profile the last step: top N operators per phase")
    p.add_argument("--free", type=int, default=0,
                   help="then N steps with nothing synchronised (GPU): ms per step and the GPU's busy share")
    p.add_argument("--syncs", type=int, default=0,
                   help="then N steps under CUDA's sync debug mode (GPU): what made the host wait, by caller")
    p.add_argument("--memory-sites", type=int, default=0,
                   help="record the last step's allocations (GPU): top N sites live at its peak")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--ds-config", default=str(ROOT / "ds_configs" / "zero2.json"),
                   help="a DeepSpeed config, or fsdp for the FSDP2 engine")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override, every run")
    p.add_argument("--timeout", type=int, default=600, help="seconds per method")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        report = worker(json.loads(args.worker))
        print("REPORT " + json.dumps(report), flush=True)
        from sst_dist.engines import leave_distributed

        leave_distributed()
        return 0

    cpu = args.device == "cpu"
    if not cpu:
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda: no GPU is visible; --device cpu checks the flow only", file=sys.stderr)
            return 2
    base = {"size": args.size, "rank": args.rank, "seq": args.seq or (64 if cpu else 2048),
            "micro_batch": args.micro_batch or (2 if cpu else 8), "accumulation": args.accumulation,
            "warmup": args.warmup,
            "steps": args.steps, "kernels": args.kernels, "free": args.free, "syncs": args.syncs, "memory_sites": args.memory_sites,
            "device": args.device,
            "ds_config": None if args.ds_config == "fsdp" else args.ds_config}
    labels, reports = [], []
    for spec in [m for m in args.methods.split(",") if m]:
        method, _, extra = spec.partition("@")
        job = {**base, "method": method, "set": args.set + [kv for kv in extra.split(";") if kv]}
        print(f"running {spec} ...", flush=True)
        t0 = time.perf_counter()
        reports.append(run_job(job, args.timeout))
        labels.append(spec)
        print(f"  {spec}: {time.perf_counter() - t0:.0f} s (setup {reports[-1].get('setup_s', '-')} s)", flush=True)
    engine = "FSDP2" if args.ds_config == "fsdp" else f"DeepSpeed {Path(args.ds_config).stem}"
    print(f"\nOPT-{args.size}, {engine}, 1 process, micro-batch {base['micro_batch']} x "
          f"seq {base['seq']} x {base['accumulation']} per step, rank {args.rank}, {args.warmup} warm-up + {args.steps} timed steps")
    print_tables(labels, reports)
    return 0 if all("error" not in r for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())

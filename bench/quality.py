"""Every method on the same data, seed and token budget, through the real launcher: one command.

    python -m bench.quality --size 125m --steps 20000 --gpus 6 --device cuda --out runs/quality \\
        [--methods full,lora,relora,sst,galore,sst+galore] [--set KEY=V] [--set METHOD:KEY=V] \\
        [--sweep [METHOD:]KEY=V1,V2,... [--one-at-a-time]] [--seeds 0,1,2] [--eval-every E] [--eval-tokens T]
        [--warmup W]
    python -m bench.quality --plot-only --out runs/quality

Each run is `python launch/pretrain.py` (single process) on recipes/<size>-<method>.yaml
(`--size tiny`: recipes/tiny-<method>.yaml) in its own folder OUT/runs/<name>/ (metrics.jsonl,
checkpoints, run.log, bench.json). With `--device cuda`, up to --gpus runs at once, one GPU each;
on CPU one after another. A finished run is reused, an unfinished one resumed, so re-running the
same command after an interruption only does what is left. With --seeds every method and variant
runs once per seed. Writes OUT/quality.csv, quality.md (the table, the curves across seeds, the
gap measures and the checks, also printed) and eval_loss.png, train_loss.png, ppl_vs_memory.png.
See docs/quality.md.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if not __package__:  # run as a file: its sibling modules import only as the package
    print("error: run it from the repository root as a module: python -m bench.quality ...", file=sys.stderr)
    sys.exit(2)

from bench.size_recipe import size_recipe  # noqa: E402
from sst_dist.config import flatten, load_recipe, upgrade_saved  # noqa: E402
from sst_dist.registry import METHODS  # noqa: E402
from sst_dist.errors import ConfigError  # noqa: E402
from sst_dist.plot import (RESET_EVENTS, across_runs, eval_band_panel, mean_rows, pyplot, read_rows,  # noqa: E402
                           save, train_loss_panel)

# recipe keys that do not change what a run trains: a finished or half-done folder whose recipe
# differs from this invocation's only in these is still the same run
NEUTRAL_KEYS = ("train.max_steps", "train.log_every", "eval.every_steps", "eval.tokens",
                "checkpoint.every_steps", "checkpoint.keep", "wandb", "data.num_proc")
RISE_BEFORE, RISE_AFTER, RISE_WINDOW = 10, 50, 10
CSV_FIELDS = ("method", "variant", "seed", "eval_loss", "eval_ppl", "final_train_loss", "peak_mem_gib",
              "tokens_per_s", "tokens", "steps", "trainable_params", "status", "run_dir",
              # the summary rows (seed "mean") of a (method, variant) run at several seeds
              "n_seeds", "eval_loss_sd", "eval_loss_min", "eval_loss_max")
SUMMARY = "mean"  # the seed column of a summary row


class BenchError(Exception):
    """A mistake on the command line; reported as one line."""


@dataclass
class RunSpec:
    method: str
    variant: str  # the sweep overrides that tell this run from the method's others ("" if none)
    name: str  # folder name under OUT/runs: no commas, no plus signs
    recipe: Path
    overrides: list[str]  # --set items for the launcher, in order (later wins)
    steps: int = 0  # train.max_steps of the resolved recipe
    resolved: dict = field(default_factory=dict)  # the recipe as the trainer will see it
    seed: int = 0  # the resolved recipe's seed

    def folder(self, out: Path) -> Path:
        return out / "runs" / self.name


# ----------------------------------------------------------------------------- planning


def safe_name(text: str) -> str:
    """A file-name-safe form: `sst+galore` -> `sst-galore`, anything but [A-Za-z0-9._=-] -> `_`."""
    return re.sub(r"[^A-Za-z0-9._=-]", "_", text.replace("+", "-"))


def split_method(item: str, flag: str) -> tuple[str | None, str]:
    """`[METHOD:]dotted.key=value` -> (METHOD or None, `dotted.key=value`), checked."""
    if "=" not in item:
        raise BenchError(f"{flag} {item!r}: expected [METHOD:]dotted.key=value")
    key, value = item.split("=", 1)
    method = None
    if ":" in key:
        method, key = key.split(":", 1)
        if method not in METHODS:
            raise BenchError(f"{flag} {item!r}: unknown method {method!r}; use one of {', '.join(METHODS)}")
    key = key.strip()
    if not key or not all(part.strip() for part in key.split(".")):
        raise BenchError(f"{flag} {item!r}: expected [METHOD:]dotted.key=value")
    return method, f"{key}={value}"


def parse_sweep(item: str) -> tuple[str | None, str, list[str]]:
    method, kv = split_method(item, "--sweep")
    key, raw = kv.split("=", 1)
    values = [v.strip() for v in raw.split(",") if v.strip()]
    if not values:
        raise BenchError(f"--sweep {item!r}: no values; expected [METHOD:]KEY=V1,V2,...")
    if len(set(values)) != len(values):
        raise BenchError(f"--sweep {item!r}: a value is listed twice")
    return method, key, values


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise BenchError(f"--methods: unknown method {m!r}; use a comma list of {', '.join(METHODS)}")
    if not methods:
        raise BenchError(f"--methods: empty; use a comma list of {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise BenchError("--methods: a method is listed twice")
    return methods


def parse_seeds(text: str | None) -> list[int] | None:
    """`--seeds 0,1,2` -> [0, 1, 2]; None without the flag (each recipe's own seed)."""
    if text is None:
        return None
    items = [v.strip() for v in text.split(",") if v.strip()]
    if not items or not all(v.isdigit() for v in items):
        raise BenchError(f"--seeds {text!r}: expected a comma list of integers >= 0, e.g. 0,1,2")
    seeds = [int(v) for v in items]
    if len(set(seeds)) != len(seeds):
        raise BenchError(f"--seeds {text!r}: a seed is listed twice")
    return seeds


def common_overrides(args) -> list[str]:
    """What every run shares besides the user's --set: the budget, warm-up, evaluation, checkpoints."""
    steps = args.steps
    warmup = args.warmup if args.warmup is not None else min(2000, steps // 10)
    every = args.eval_every if args.eval_every is not None else max(1, steps // 10)
    sets = [f"train.max_steps={steps}", f"optim.warmup_steps={warmup}", f"eval.every_steps={every}",
            # a checkpoint per evaluation: an interrupted bench loses at most one interval
            f"checkpoint.every_steps={every}", "wandb.mode=disabled", f"train.device={args.device}"]
    if args.eval_tokens is not None:
        sets.append(f"eval.tokens={args.eval_tokens}")
    return sets


def plan(args) -> list[RunSpec]:
    """One RunSpec per (method, sweep variant, seed), every recipe resolved and validated up front."""
    methods = parse_methods(args.methods)
    seeds = parse_seeds(args.seeds)
    shared, per_method = [], {m: [] for m in methods}
    for item in args.set:
        method, kv = split_method(item, "--set")
        if method is None:
            shared.append(kv)
        elif method in per_method:
            per_method[method].append(kv)
        else:
            print(f"note: --set {item} ignored: {method} is not in --methods", flush=True)
    sweeps = [parse_sweep(item) for item in args.sweep]
    if seeds is not None and any(key == "seed" for _, key, _ in sweeps):
        raise BenchError("--sweep seed=...: use --seeds, which names the folders and summarises across seeds")
    for method, key, _ in sweeps:
        if method is not None and method not in methods:
            print(f"note: --sweep {method}:{key} ignored: {method} is not in --methods", flush=True)
    base = common_overrides(args)
    specs, names = [], {}
    for method in methods:
        try:
            recipe = size_recipe(args.size, method)
        except ConfigError as err:
            raise BenchError(f"{err} or drop {method} from --methods") from None
        mine = [(key, values) for m, key, values in sweeps if m in (None, method)]
        if args.one_at_a_time and mine:  # an ablation: each value moves one key from the recipe's
            combos = [((key, v),) for key, values in mine for v in values]
        else:
            combos = itertools.product(*[[(key, v) for v in values] for key, values in mine])
        for combo in combos:
            variant_sets = [f"{key}={value}" for key, value in combo]
            variant = " ".join(variant_sets)
            where = f"{method} {variant}".strip()
            overrides = [*base, *shared, *per_method[method], *variant_sets]
            own_seed = resolve(recipe, overrides, where, method).seed
            for seed in seeds if seeds is not None else [own_seed]:
                # the recipe's own seed keeps the folder of a run without --seeds: adding --seeds to a
                # finished bench reuses its runs and trains only the other seeds
                suffix = [] if seed == own_seed else [f"seed={seed}"]
                name = safe_name(method) + "".join(f"__{safe_name(s)}" for s in variant_sets + suffix)
                if name in names:
                    raise BenchError(f"--sweep: runs {names[name]!r} and {where!r} would share the folder "
                                     f"runs/{name}; use distinguishable values")
                names[name] = where
                run_sets = overrides + [f"seed={seed}"] if seeds is not None else overrides
                resolved = resolve(recipe, run_sets, where, method)
                specs.append(RunSpec(method, variant, name, recipe, run_sets, resolved.train.max_steps,
                                     resolved.to_dict(), resolved.seed))
    return specs


def resolve(recipe: Path, overrides: list[str], where: str, method: str):
    """The recipe as the trainer will see it; a BenchError (one line) if it is not valid."""
    try:
        resolved = load_recipe(recipe, overrides)
    except ConfigError as err:
        raise BenchError(f"{where} ({recipe.relative_to(ROOT)}): {err}") from None
    if resolved.method != method:
        raise BenchError(f"{recipe.relative_to(ROOT)}: method is {resolved.method!r}, "
                         f"expected {method!r} (do not --set method)")
    return resolved


# ----------------------------------------------------------------------------- reading runs


def best_of_each(specs: list[RunSpec], out: Path, steps: int) -> list[RunSpec]:
    """Each method's variant with the lowest final eval loss (its mean over the seeds), every seed
    of it continued to `steps` in its own folder.

    The lr schedule is warm-up then constant (no decay), and data and resets are functions of the
    step, so a run continued from step S to N is the run N steps long would have been: a sweep at
    S steps followed by its winners at N costs one sweep, not a second one."""
    losses: dict[tuple[str, str], list[float]] = {}
    for spec in specs:
        loss = summarize(read_meta(spec.folder(out)) or {"method": spec.method, "steps": spec.steps},
                         spec.folder(out), out).get("eval_loss")
        if loss is not None and math.isfinite(loss):
            losses.setdefault((spec.method, spec.variant), []).append(loss)
    best: dict[str, tuple[float, str]] = {}
    for (method, variant), values in losses.items():
        mean = statistics.fmean(values)
        if method not in best or mean < best[method][0]:
            best[method] = (mean, variant)
    winners = []
    for method in (m for m in METHODS if m in best):
        for spec in (s for s in specs if (s.method, s.variant) == (method, best[method][1])):
            overrides = [o for o in spec.overrides if not o.startswith("train.max_steps=")] + [f"train.max_steps={steps}"]
            resolved = load_recipe(spec.recipe, overrides)
            winners.append(RunSpec(spec.method, spec.variant, spec.name, spec.recipe, overrides, steps,
                                   resolved.to_dict(), spec.seed))
    return winners


def last_row(folder: Path) -> dict | None:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 8192))
        lines = f.read().decode(errors="replace").splitlines()
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def recipe_mismatch(spec: RunSpec, folder: Path) -> str | None:
    """The keys that would make a resumed or reused folder another run than this invocation asks for."""
    path = folder / "recipe.json"
    if not path.is_file():
        return None
    try:
        had = flatten(upgrade_saved(json.loads(path.read_text())))
    except ValueError:
        return None
    want = flatten(spec.resolved)
    # a key newer than the folder's recipe ran at its default (a new key keeps the old behaviour)
    had = {**{k: v for k, v in flatten(load_recipe(None).to_dict()).items() if k not in had}, **had}
    neutral = lambda k: any(k == n or k.startswith(n + ".") for n in NEUTRAL_KEYS)  # noqa: E731
    diff = [f"{k}: {had.get(k)!r} -> {want.get(k)!r}" for k in sorted(set(had) | set(want))
            if not neutral(k) and had.get(k) != want.get(k)]
    return "; ".join(diff) or None


def trainable_params(resolved: dict) -> int | None:
    """Trainable parameters of the run's model and method (the layer form the trainer uses)."""
    try:
        from sst_dist.data import prepared_dir
        from sst_dist.data.shards import read_manifest
        from sst_dist.memory import count_parameters
        from sst_dist.models import model_vocab

        recipe = load_recipe(None, [f"{k}={json.dumps(v)}" for k, v in flatten(resolved).items()])
        manifest = read_manifest(prepared_dir(recipe.data))
        data_vocab = manifest["settings"]["vocab_size"] if manifest else None
        if data_vocab is None and model_vocab(recipe.model.size, 0) == 0:  # it takes the data's vocabulary
            return None
        vocab = model_vocab(recipe.model.size, data_vocab or 0)  # as sst_dist.train
        counts = count_parameters(recipe.model.size, recipe.method, recipe.rank, galore_rank=recipe.galore.rank,
                                  sst_path=recipe.sst.path, galore_form="layer", targets=tuple(recipe.targets),
                                  seq=recipe.model.seq_len, vocab_size=vocab)
        return counts.trainable
    except Exception:  # a count is a nicety: never let it cost a finished run's row
        return None


def summarize(meta: dict, folder: Path, out: Path) -> dict:
    """One CSV row from a run folder's bench.json and metrics.jsonl."""
    steps = meta["steps"]
    rows = read_rows(folder, steps)
    # run_dir relative to OUT: results copied to another machine still find their folders
    resolved = meta.get("recipe_resolved") or {}
    row = {"method": meta["method"], "variant": meta.get("variant", ""), "seed": meta_seed(meta),
           "run_dir": folder.relative_to(out).as_posix(), "trainable_params": meta.get("trainable_params"),
           "_folder": folder, "_steps": steps, "_rows": rows,
           "_warmup": resolved.get("optim", {}).get("warmup_steps", 0)}
    done = bool(rows) and rows[-1]["step"] >= steps
    row["status"] = meta.get("status") if meta.get("status") == "failed" else ("ok" if done else "incomplete")
    if not rows:
        return row
    evals = [r for r in rows if "eval_loss" in r]
    if evals:
        row["eval_loss"] = evals[-1]["eval_loss"]
        row["eval_ppl"] = evals[-1]["eval_ppl"]
    tail = rows[-max(1, math.ceil(len(rows) / 10)):]
    row["final_train_loss"] = statistics.fmean(r["loss"] for r in tail)
    mems = [r["peak_mem_gib"] for r in rows if "peak_mem_gib" in r]
    row["peak_mem_gib"] = max(mems) if mems else None
    steady = rows[min(10, len(rows) // 5):]  # the first steps pay for allocation and warm-up
    row["tokens_per_s"] = round(statistics.median(r["tokens_per_s"] for r in steady), 1)
    row["tokens"] = rows[-1]["tokens"]
    row["steps"] = rows[-1]["step"]
    return row


def meta_seed(meta: dict) -> int | None:
    """The run's seed: bench.json's, or its recipe's (folders from before the seed was recorded)."""
    seed = meta.get("seed")
    return seed if seed is not None else (meta.get("recipe_resolved") or {}).get("seed")


def reset_rise(rows: list[dict]) -> tuple[float, int, int] | None:
    """Largest loss rise after a reset: over the RISE_AFTER steps from a reset, the highest
    RISE_WINDOW-step rolling mean minus the mean of the RISE_BEFORE steps before it (nats).
    (rise, step of that reset, resets measured), or None if no reset has the steps around it."""
    loss = {r["step"]: r["loss"] for r in rows}
    best, checked = None, 0
    for r in rows:
        if not any(e in RESET_EVENTS for e in str(r.get("event", "")).split("+")):
            continue
        s = r["step"]  # the first step trained after the reset
        before = [loss.get(t) for t in range(s - RISE_BEFORE, s)]
        after = [loss[t] for t in range(s, s + RISE_AFTER) if t in loss]
        if None in before or len(after) < RISE_WINDOW:
            continue
        pre = statistics.fmean(before)
        peak = max(statistics.fmean(after[i:i + RISE_WINDOW]) for i in range(len(after) - RISE_WINDOW + 1))
        checked += 1
        if best is None or peak - pre > best[0]:
            best = (peak - pre, s)
    return None if best is None else (best[0], best[1], checked)


# ----------------------------------------------------------------------------- reports


def fmt(value, spec: str) -> str:
    if value is None or value == "":
        return ""
    return format(value, spec)


def label(row: dict) -> str:
    return f"{row['method']} {row['variant']}".strip()


def metrics(row: dict) -> list[dict]:
    """The run's metrics.jsonl rows, read once per report."""
    if "_rows" not in row:
        row["_rows"] = read_rows(row["_folder"], row["_steps"])
    return row["_rows"]


def groups(results: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(method, variant) -> its runs (one per seed), in the order of `results`."""
    return by_setting(results, lambda row: row)


def by_setting(items: list, row_of) -> dict[tuple[str, str], list]:
    out: dict[tuple[str, str], list] = {}
    for item in items:
        row = row_of(item)
        out.setdefault((row["method"], row["variant"]), []).append(item)
    return out


def several_seeds(results: list[dict]) -> bool:
    return any(len(runs) > 1 for runs in groups(results).values())


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def seed_summaries(results: list[dict]) -> list[dict]:
    """One row per (method, variant) run at several seeds: its finished runs' final eval loss
    (mean, sample sd, min, max), seed "mean"; none when every setting ran at one seed."""
    if not several_seeds(results):
        return []
    summaries = []
    for (method, variant), runs in groups(results).items():
        done = [r for r in runs if r.get("status") == "ok" and finite(r.get("eval_loss"))]
        if not done:
            continue
        losses = [r["eval_loss"] for r in done]

        def same(key):  # a column every finished seed agrees on
            values = {r.get(key) for r in done}
            return values.pop() if len(values) == 1 else None

        def mean(key):
            values = [r[key] for r in done if finite(r.get(key))]
            return statistics.fmean(values) if values else None

        summaries.append({
            "method": method, "variant": variant, "seed": SUMMARY, "eval_loss": statistics.fmean(losses),
            "eval_ppl": math.exp(statistics.fmean(losses)), "final_train_loss": mean("final_train_loss"),
            "peak_mem_gib": max((r["peak_mem_gib"] for r in done if r.get("peak_mem_gib")), default=None),
            "tokens_per_s": mean("tokens_per_s"), "tokens": same("tokens"), "steps": same("steps"),
            "trainable_params": same("trainable_params"), "status": "summary", "n_seeds": len(done),
            "eval_loss_sd": statistics.stdev(losses) if len(losses) > 1 else None,
            "eval_loss_min": min(losses), "eval_loss_max": max(losses)})
    return summaries


def eval_points(row: dict) -> dict[int, tuple[int | None, float]]:
    """step -> (tokens, eval loss) of one run."""
    return {x["step"]: (x.get("tokens"), x["eval_loss"]) for x in metrics(row) if "eval_loss" in x}


def envelope(results: list[dict], method: str) -> dict:
    """seed -> step -> (tokens, eval loss) of the method's best variant at that step (with no sweep:
    its one run of that seed)."""
    best: dict = {}
    for row in results:
        if row["method"] != method:
            continue
        curve = best.setdefault(row.get("seed"), {})
        for step, point in eval_points(row).items():
            if step not in curve or point[1] < curve[step][1]:
                curve[step] = point
    return best


def share(lora: float, full: float, x: float) -> float | None:
    """The share of the LoRA - full-rank eval-loss gap that x closes; None where LoRA is not behind."""
    return (lora - x) / (lora - full) if lora > full else None


def tokens_to_reach(curve: dict[int, tuple[int | None, float]], target: float) -> tuple[float | None, bool]:
    """(tokens, bound): the tokens at which an eval curve first reaches `target`, linear between
    evaluations; if its first evaluation is already there, that evaluation's tokens with bound True
    (it got there sooner, by how much no evaluation says); (None, False) if it never does."""
    before = None
    for step in sorted(curve):
        tokens, loss = curve[step]
        if tokens is None:
            return None, False
        if loss <= target:
            if before is None:
                return float(tokens), True
            t0, l0 = before
            return t0 + (l0 - target) / (l0 - loss) * (tokens - t0), False
        before = (tokens, loss)
    return None, False


def gap_measures(results: list[dict]) -> list[dict]:
    """For each run but LoRA's, against LoRA and full-rank of its own seed (each seed's best variant
    at each step): its share of the gap at every evaluation, the mean share after warm-up, and the
    tokens it needs to reach LoRA's final eval loss. Empty when LoRA or full-rank did not run."""
    lora, full = envelope(results, "lora"), envelope(results, "full")
    if not lora or not full:
        return []
    measured = []
    for row in results:
        seed = row.get("seed")
        if row["method"] == "lora" or not lora.get(seed):
            continue
        mine, ref = eval_points(row), lora[seed]
        entry = {"row": row, "shares": {}}
        if row["method"] != "full" and full.get(seed):
            for step in sorted(set(mine) & set(ref) & set(full[seed])):
                entry["shares"][step] = share(ref[step][1], full[seed][step][1], mine[step][1])
            after = [v for step, v in entry["shares"].items() if step > row.get("_warmup", 0) and v is not None]
            entry["mean_share"] = statistics.fmean(after) if after else None
            entry["n_shares"] = len(after)
        last = max(ref)
        entry["lora_tokens"], entry["lora_loss"] = ref[last]
        entry["tokens"], entry["bound"] = tokens_to_reach(mine, entry["lora_loss"])
        entry["speedup"] = entry["lora_tokens"] / entry["tokens"] if entry["tokens"] and entry["lora_tokens"] else None
        measured.append(entry)
    return measured


def spread(values: list[float], spec: str) -> str:
    """mean ± sample sd (one value: itself)."""
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.fmean(values), spec)} ± {format(statistics.stdev(values), spec)}"


def seed_text(seed) -> str:
    return "" if seed is None else str(seed)


def curves_section(results: list[dict]) -> list[str]:
    """Every setting's eval loss at every evaluation: mean ± sd over its seeds (one seed: the value)."""
    table = [(key, len(runs), across_runs([metrics(r) for r in runs])) for key, runs in groups(results).items()]
    steps = sorted({step for _, _, points in table for step, _, _ in points})
    if not steps:
        return []
    multi = several_seeds(results)
    what = "mean ± sample sd over the seeds that reached the step" if multi else "one seed"
    lines = ["", f"Eval loss at every evaluation ({what}):", "",
             "| method | variant | seeds | " + " | ".join(f"step {s}" for s in steps) + " |",
             "|" + " --- |" * (3 + len(steps))]
    for (method, variant), n, points in table:
        cells = {step: spread(values, ".4f") for step, _, values in points}
        lines.append(f"| {method} | {variant} | {n} | "
                     + " | ".join(cells.get(s, "") for s in steps) + " |")
    return lines


def gap_section(results: list[dict]) -> list[str]:
    measured = gap_measures(results)
    if not measured:
        return []
    multi = several_seeds(results)
    lines = ["", "Gap measures, each run against LoRA and full-rank of its own seed (with sweeps, each "
             "seed's best LoRA and best full-rank variant at each step); docs/quality.md says how to read them."]
    shared = [e for e in measured if e["shares"]]
    steps = sorted({s for e in shared for s in e["shares"]})
    if steps:
        lines += ["", "Share of the LoRA - full-rank eval-loss gap closed, (lora - x) / (lora - full), at every "
                  "evaluation (-: LoRA not behind full-rank there" + (", for some seed" if multi else "") + "):", "",
                  "| method | variant | seed | " + " | ".join(f"step {s}" for s in steps) + " |",
                  "|" + " --- |" * (3 + len(steps))]
        for (method, variant), entries in by_setting(shared, lambda e: e["row"]).items():
            for e in entries:
                cells = {s: "-" if v is None else f"{v:.2f}" for s, v in e["shares"].items()}
                lines.append(f"| {method} | {variant} | {seed_text(e['row'].get('seed'))} | "
                             + " | ".join(cells.get(s, "") for s in steps) + " |")
            if len(entries) > 1:
                cells = []
                for s in steps:
                    values = [e["shares"][s] for e in entries if s in e["shares"]]
                    cells.append("" if not values else "-" if None in values else f"**{statistics.fmean(values):.2f}**")
                lines.append(f"| {method} | {variant} | {SUMMARY} | " + " | ".join(cells) + " |")
    lines += ["", "Whole curve: the mean share over the evaluations after warm-up (step > optim.warmup_steps, "
              "where LoRA is behind full-rank), and the tokens a run needs to reach LoRA's final eval loss "
              "(linear between evaluations; <= where its first evaluation is already there), with the speed-up "
              "over LoRA (LoRA's tokens / the run's):", "",
              "| method | variant | seed | mean share after warm-up | evaluations | LoRA's final eval loss "
              "| at tokens | tokens to reach it | speed-up |", "|" + " --- |" * 9]
    for (method, variant), entries in by_setting(measured, lambda e: e["row"]).items():
        for e in entries:
            at, faster = ("<= ", ">= ") if e["bound"] else ("", "")
            tokens = at + fmt(e["tokens"], ",.0f") if e["tokens"] else "not reached"
            speedup = f"{faster}{e['speedup']:.2f}x" if e["speedup"] else "not reached"
            lines.append(f"| {method} | {variant} | {seed_text(e['row'].get('seed'))} | {fmt(e.get('mean_share'), '.3f')} "
                         f"| {fmt(e.get('n_shares'), 'd')} | {e['lora_loss']:.4f} | {fmt(e['lora_tokens'], ',')} "
                         f"| {tokens} | {speedup} |")
        if len(entries) > 1:
            shares = [e["mean_share"] for e in entries if e.get("mean_share") is not None]
            speedups = [e["speedup"] for e in entries if e["speedup"]]
            if len(speedups) < len(entries):
                reached = f"{len(speedups)} of {len(entries)} reached"
            else:
                mean = f"{statistics.fmean(speedups):.2f}x ± {statistics.stdev(speedups):.2f}"
                reached = (">= " if any(e["bound"] for e in entries) else "") + f"**{mean}**"
            lines.append(f"| {method} | {variant} | {SUMMARY} | {'**' + spread(shares, '.3f') + '**' if shares else ''} "
                         f"|  |  |  |  | {reached} |")
    return lines


def checks(results: list[dict]) -> list[str]:
    lines = []
    multi = several_seeds(results)
    rises = []
    for row in results:
        if row["method"] not in ("relora", "sst", "sst+galore"):
            continue
        name = label(row) + (f" seed {row.get('seed')}" if multi else "")
        rise = reset_rise(metrics(row))
        if rise is None:
            rises.append(f"{name}: no reset with {RISE_BEFORE} steps before and {RISE_WINDOW} after it")
        else:
            value, step, count = rise
            rises.append(f"{name}: {value:+.4f} (the reset before step {step}; "
                         f"{count} reset{'s' if count != 1 else ''} measured)")
    if rises:
        lines.append(f"- Largest training-loss rise after a reset, in nats: the highest {RISE_WINDOW}-step "
                     f"rolling mean within the {RISE_AFTER} steps from a reset, minus the mean of the "
                     f"{RISE_BEFORE} steps before it (negative: the loss kept falling):")
        lines += [f"  - {r}" for r in rises]

    # Compared at one step: the last evaluation all the runs compared reached, at every seed (an
    # interrupted run would otherwise be set against finished ones); each method's best variant at
    # that step, per seed; several seeds: the mean of the seeds' own shares.
    def last_common(*curves):
        seeds = set.intersection(*(set(c) for c in curves))
        steps = [set.intersection(*(set(c[seed]) for c in curves)) for seed in seeds]
        common = set.intersection(*steps) if steps else set()
        return sorted(seeds, key=str), (max(common) if common else None)

    full, lora = envelope(results, "full"), envelope(results, "lora")
    which = " (best variant of each)" if any(r["variant"] for r in results) else ""
    for method in ("sst", "sst+galore"):
        mine = envelope(results, method)
        name = "SST" if method == "sst" else "SST + GaLore"
        if not mine or not full or not lora:
            continue
        seeds, step = last_common(full, lora, mine)
        if step is None:
            continue
        head = f"- Fraction of the LoRA - full-rank eval-loss gap {name} closes"
        if len(seeds) == 1:
            f, l, m = (c[seeds[0]][step][1] for c in (full, lora, mine))
            if l <= f:
                lines.append(f"{head}: n/a, LoRA is not behind full-rank at step {step} ({l:.4f} vs {f:.4f})")
            else:
                lines.append(f"{head} at step {step}{which}: (lora - {method}) / (lora - full) = "
                             f"({l:.4f} - {m:.4f}) / ({l:.4f} - {f:.4f}) = **{share(l, f, m):.3f}**")
            continue
        shares = {seed: share(lora[seed][step][1], full[seed][step][1], mine[seed][step][1]) for seed in seeds}
        known = [v for v in shares.values() if v is not None]
        each = ", ".join(f"seed {seed}: " + ("n/a" if v is None else f"{v:.3f}") for seed, v in shares.items())
        if not known:
            lines.append(f"{head}: n/a, LoRA is not behind full-rank at step {step} at any of {len(seeds)} seeds")
            continue
        lines.append(f"{head} at step {step}{which}, (lora - {method}) / (lora - full), mean over "
                     f"{len(known)} seed{'s' if len(known) != 1 else ''}: **{statistics.fmean(known):.3f}** ({each})")
    sst, combined = envelope(results, "sst"), envelope(results, "sst+galore")
    if sst and combined:
        seeds, step = last_common(sst, combined)
        if step is not None:
            a = [sst[seed][step][1] for seed in seeds]
            b = [combined[seed][step][1] for seed in seeds]
            change = statistics.fmean((y - x) / x * 100 for x, y in zip(a, b))
            over = f", mean over {len(seeds)} seeds" if len(seeds) > 1 else ""
            lines.append(f"- SST + GaLore's eval loss against SST's at step {step}{which}{over}: "
                         f"{statistics.fmean(b):.4f} vs {statistics.fmean(a):.4f}, **{change:+.2f} %**")
    return lines


def markdown(results: list[dict]) -> str:
    head = ["method", "variant", "seed", "eval loss", "eval ppl", "final train loss", "peak GiB", "tokens/s",
            "tokens", "steps", "trainable", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        cells = [r["method"], r.get("variant", ""), seed_text(r.get("seed")), fmt(r.get("eval_loss"), ".4f"),
                 fmt(r.get("eval_ppl"), ".2f"), fmt(r.get("final_train_loss"), ".4f"), fmt(r.get("peak_mem_gib"), ".2f"),
                 fmt(r.get("tokens_per_s"), ",.0f"), fmt(r.get("tokens"), ","), fmt(r.get("steps"), "d"),
                 fmt(r.get("trainable_params"), ","), r.get("status", "")]
        lines.append("| " + " | ".join(cells) + " |")
    summaries = seed_summaries(results)
    if summaries:
        lines += ["", "Across seeds (the finished runs' final eval loss; sd: sample standard deviation):", "",
                  "| method | variant | seeds | eval loss mean | sd | min | max | eval ppl of the mean |",
                  "|" + " --- |" * 8]
        for r in summaries:
            lines.append(f"| {r['method']} | {r['variant']} | {r['n_seeds']} | {r['eval_loss']:.4f} | "
                         f"{fmt(r['eval_loss_sd'], '.4f')} | {r['eval_loss_min']:.4f} | {r['eval_loss_max']:.4f} | "
                         f"{r['eval_ppl']:.2f} |")
    lines += curves_section(results)
    lines += gap_section(results)
    notes = checks(results)
    if notes:
        lines += ["", "Checks:", "", *notes]
    return "\n".join(lines) + "\n"


def write_csv(results: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in results + seed_summaries(results):
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})


def plot(results: list[dict], out: Path) -> list[Path]:
    """eval_loss.png, train_loss.png, ppl_vs_memory.png from the run folders; returns the paths. A
    setting run at several seeds is one curve: its mean, with a min-max band for the eval loss."""
    plt = pyplot()
    if plt is None:
        return []
    colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(METHODS)}
    styles = ["-", "--", ":", "-."]
    variant_index: dict[str, int] = {}
    settings = []
    for (method, _), runs in groups(results).items():
        n = variant_index[method] = variant_index.get(method, -1) + 1
        settings.append((label(runs[0]), runs, dict(color=colors.get(method), linestyle=styles[n % len(styles)])))
    written = []

    fig, ax = plt.subplots(figsize=(8, 5))
    eval_band_panel(ax, [(name, [metrics(r) for r in runs], style) for name, runs, style in settings])
    written.append(save(fig, ax, out / "eval_loss.png"))

    fig, ax = plt.subplots(figsize=(8, 5))
    train_loss_panel(ax, [(name if len(runs) == 1 else f"{name} (mean of {len(runs)} seeds)",
                           mean_rows([metrics(r) for r in runs]), style) for name, runs, style in settings])
    written.append(save(fig, ax, out / "train_loss.png"))

    # on CPU no memory is measured: the trainable-parameter count stands in as the cost axis
    measured = [r for r in results if r.get("peak_mem_gib") and r.get("eval_ppl")]
    xkey = "peak_mem_gib" if measured else "trainable_params"
    fig, ax = plt.subplots(figsize=(7, 5))
    for name, runs, style in settings:
        points = [(r[xkey], r["eval_ppl"]) for r in runs if r.get(xkey) and r.get("eval_ppl")]
        if not points:
            continue
        x, y = statistics.fmean(p[0] for p in points), statistics.fmean(p[1] for p in points)
        low, high = min(p[1] for p in points), max(p[1] for p in points)  # several seeds: min to max
        ax.errorbar(x, y, yerr=[[y - low], [high - y]], fmt="o", color=style["color"], markersize=5, capsize=3)
        ax.annotate(name, (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
    if measured:
        ax.set(xlabel="peak GPU memory (GiB)", title="Final eval perplexity against peak memory")
    else:
        ax.set(xlabel="trainable parameters (no GPU memory measured)",
               title="Final eval perplexity against trainable parameters")
    ax.set_ylabel("eval perplexity" + (" (mean over seeds, bar: min to max)" if several_seeds(results) else ""))
    written.append(save(fig, ax, out / "ppl_vs_memory.png", legend=False))
    return written


def read_meta(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "bench.json").read_text())
    except (OSError, ValueError):
        return None


def write_meta(folder: Path, meta: dict) -> None:
    tmp = folder / "bench.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, folder / "bench.json")


def report(out: Path, specs: list[RunSpec] | None = None) -> str:
    """Re-reads the run folders (those of `specs`, or every OUT/runs/*/bench.json) and writes
    quality.csv, quality.md and the plots. Returns the markdown."""
    if specs is not None:
        folders = [s.folder(out) for s in specs]
    else:
        folders = sorted(p.parent for p in (out / "runs").glob("*/bench.json"))
        order = {m: i for i, m in enumerate(METHODS)}

        def where(folder):  # by method, then variant, then seed: a setting's seeds side by side
            meta = read_meta(folder) or {}
            seed = meta_seed(meta)
            return (order.get(meta.get("method"), 99), meta.get("variant", ""), -1 if seed is None else seed,
                    folder.name)

        folders.sort(key=where)
    results = []
    for folder in folders:
        meta = read_meta(folder)
        if meta is None:
            continue
        if meta.get("trainable_params") is None and meta.get("recipe_resolved"):
            meta["trainable_params"] = trainable_params(meta["recipe_resolved"])
        results.append(summarize(meta, folder, out))
    if not results:
        raise BenchError(f"--out {out}: no runs found under {out / 'runs'}")
    write_csv(results, out / "quality.csv")
    text = markdown(results)
    (out / "quality.md").write_text(text)
    plot(results, out)
    return text


# ----------------------------------------------------------------------------- running


def child_env(gpu: str | None, threads: int | None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    # the runs import this checkout's sst_dist, whatever is installed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):  # each run is a world of one
        env.pop(key, None)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    if threads is not None and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    # tqdm redraws with carriage returns: keep the last state of each line
    kept = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    return "\n".join(["    " + line for line in kept if line.strip()][-lines:])


def prepare_data(specs: list[RunSpec], out: Path) -> list[RunSpec]:
    """Tokenizes each distinct data source once, before side-by-side runs would race on the same
    folder. Returns the specs whose data could not be prepared (reported here)."""
    groups: dict[str, list[RunSpec]] = {}
    for spec in specs:
        groups.setdefault(json.dumps(spec.resolved["data"], sort_keys=True), []).append(spec)
    log = out / "prepare.log"
    failed = []
    for group in groups.values():
        spec = group[0]
        cmd = [sys.executable, "-m", "sst_dist.data", "prepare", "--recipe", str(spec.recipe), "--quiet",
               *[x for o in spec.overrides for x in ("--set", o)]]
        print(f"preparing data for {', '.join(s.name for s in group)} (log: {log})", flush=True)
        with open(log, "a") as f:
            f.write(f"\n$ {shlex.join(cmd)}\n")
            f.flush()
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env(None, None)).returncode
        if rc:
            print(f"FAILED data preparation for {', '.join(s.name for s in group)} (exit {rc}); "
                  f"last lines of {log}:\n{log_tail(log)}", flush=True)
            failed += group
    return failed


class Interrupted(Exception):
    pass


def run_all(specs: list[RunSpec], out: Path, slots: list[str | None], status_every: float
            ) -> tuple[list[str], list[RunSpec]]:
    """Runs what is not finished, one per slot (a GPU id, or None: this process's device) at once.
    Returns the names that failed and the specs whose folders hold this invocation's runs (not
    those holding other settings)."""
    todo, failed, mine = [], [], []
    for spec in specs:
        folder = spec.folder(out)
        folder.mkdir(parents=True, exist_ok=True)
        meta = read_meta(folder) or {}
        mismatch = recipe_mismatch(spec, folder)
        if mismatch:
            print(f"FAILED {spec.name}: {folder} holds a run with other settings ({mismatch}); "
                  f"delete it or use another --out", flush=True)
            failed.append(spec.name)
            continue
        mine.append(spec)
        meta.update({"method": spec.method, "variant": spec.variant, "seed": spec.seed, "name": spec.name,
                     "recipe": str(spec.recipe), "overrides": spec.overrides, "steps": spec.steps,
                     "recipe_resolved": spec.resolved})
        meta.pop("status", None)
        rows = read_rows(folder, spec.steps)
        if rows and rows[-1]["step"] >= spec.steps:
            meta.setdefault("trainable_params", trainable_params(spec.resolved))
            write_meta(folder, meta)
            print(f"reused {spec.name}: finished before ({ppl_text(rows)})", flush=True)
            continue
        write_meta(folder, meta)
        todo.append(spec)
    if len(slots) > 1 and len(todo) > 1:
        for spec in prepare_data(todo, out):
            todo.remove(spec)
            failed.append(spec.name)
            meta = read_meta(spec.folder(out)) or {}
            write_meta(spec.folder(out), {**meta, "status": "failed"})
    threads = max(1, (os.cpu_count() or 1) // len(slots)) if len(slots) > 1 else None
    running: dict = {}  # slot index -> (spec, Popen, start time, log file)
    total, started, last_status = len(todo), 0, time.time()

    def stop(signum, frame):
        raise Interrupted

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        while todo or running:
            for index, gpu in enumerate(slots):  # keyed by index: with --runs-per-gpu a GPU id repeats
                if index in running or not todo:
                    continue
                spec = todo.pop(0)
                started += 1
                running[index] = launch(spec, out, gpu, threads, f"{started}/{total}")
            time.sleep(0.5)
            for slot, (spec, proc, t0, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[slot]
                if not finish(spec, out, proc.returncode, time.time() - t0):
                    failed.append(spec.name)
            if running and status_every and time.time() - last_status >= status_every:
                last_status = time.time()
                print(status_line(running, out), flush=True)
    except (KeyboardInterrupt, Interrupted):
        # the trainers save a checkpoint at the end of the current step on SIGINT and exit 0
        print("\ninterrupted: asking the running trainers to checkpoint and stop ...", flush=True)
        for spec, proc, _, _ in running.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for spec, proc, _, log in running.values():
            proc.wait()
            log.close()
        print("stopped; re-run the same command to resume", flush=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return failed, mine


def run_and_report(specs: list[RunSpec], out: Path, slots: list[str | None], status_every: float,
                   t0: float) -> list[str] | None:
    """run_all, then this invocation's table; the names that failed, or None if interrupted."""
    try:
        failed, mine = run_all(specs, out, slots, status_every)
    except (KeyboardInterrupt, Interrupted):
        return None
    print(f"\nruns done in {time.time() - t0:.0f} s\n", flush=True)
    if mine:
        print(report(out, mine), end="", flush=True)
    return failed


def gpu_slots(count: int, per_gpu: int = 1) -> list[str]:
    """The GPU ids to pin runs to, within an inherited CUDA_VISIBLE_DEVICES if one is set; each id
    `per_gpu` times (a small model leaves a GPU idle between kernels: two runs fill it, at the
    cost of tokens/s that no longer measure one run alone)."""
    import torch

    if not torch.cuda.is_available():
        raise BenchError("--device cuda: no GPU is visible; use --device cpu")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else \
        [str(i) for i in range(torch.cuda.device_count())]
    if count > len(ids):
        raise BenchError(f"--gpus {count}: only {len(ids)} GPU(s) visible")
    return [gpu for gpu in ids[:count] for _ in range(per_gpu)]


def launch_command(spec: RunSpec, out: Path) -> list[str]:
    return [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--recipe", str(spec.recipe),
            "--output-dir", str(spec.folder(out)), *[x for o in spec.overrides for x in ("--set", o)]]


def launch(spec: RunSpec, out: Path, gpu: str | None, threads: int | None, counter: str):
    folder = spec.folder(out)
    cmd = launch_command(spec, out)
    rows = read_rows(folder, spec.steps)
    log = open(folder / "run.log", "a")  # appended: a resumed run keeps the earlier attempts' lines
    pinned = f" CUDA_VISIBLE_DEVICES={gpu}" if gpu is not None else ""
    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')}{pinned} {shlex.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(gpu, threads))
    where = f" on GPU {gpu}" if gpu is not None else ""
    what = f"resumed from step {rows[-1]['step']}" if rows else "started"
    print(f"[{counter}] {what} {spec.name}{where}: {spec.steps} steps (log: {folder / 'run.log'})", flush=True)
    return spec, proc, time.time(), log


def ppl_text(rows: list[dict]) -> str:
    evals = [r for r in rows if "eval_loss" in r]
    if not evals:
        return "no evaluation logged"
    return f"eval ppl {evals[-1]['eval_ppl']:.2f}, loss {evals[-1]['eval_loss']:.4f}"


def finish(spec: RunSpec, out: Path, rc: int, seconds: float) -> bool:
    folder = spec.folder(out)
    rows = read_rows(folder, spec.steps)
    meta = read_meta(folder) or {}
    if rc == 0 and rows and rows[-1]["step"] >= spec.steps:
        meta["trainable_params"] = trainable_params(spec.resolved)
        write_meta(folder, meta)
        print(f"done {spec.name} in {seconds:.0f} s: {ppl_text(rows)}", flush=True)
        return True
    meta["status"] = "failed"
    write_meta(folder, meta)
    reached = rows[-1]["step"] if rows else 0
    why = f"exit {rc}" if rc else f"exited at step {reached} of {spec.steps}"
    print(f"FAILED {spec.name} ({why}); last lines of {folder / 'run.log'}:\n{log_tail(folder / 'run.log')}",
          flush=True)
    return False


def status_line(running: dict, out: Path) -> str:
    parts = []
    for spec, _, t0, _ in running.values():
        row = last_row(spec.folder(out))
        where = f"{row['step']}/{spec.steps} loss {row['loss']:.3f}" if row else "starting"
        parts.append(f"{spec.name} {where}")
    return f"[{time.strftime('%H:%M:%S')}] " + " | ".join(parts)


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="See docs/quality.md for the offline GPU workflow.")
    p.add_argument("--size", default="125m",
                   help="recipes/opt-SIZE-METHOD.yaml, or 'tiny' for recipes/tiny-METHOD.yaml")
    p.add_argument("--steps", type=int, help="optimizer steps per run (train.max_steps)")
    p.add_argument("--gpus", type=int, default=1, help="--device cuda: runs side by side, one GPU each")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list (default: all six)")
    p.add_argument("--set", action="append", default=[], metavar="[METHOD:]KEY=VALUE",
                   help="recipe override for every run, or with METHOD: for that method's runs (repeatable)")
    p.add_argument("--sweep", action="append", default=[], metavar="[METHOD:]KEY=V1,V2,...",
                   help="one run per value (per method, or only METHOD's); several --sweep: every combination")
    p.add_argument("--one-at-a-time", action="store_true",
                   help="several --sweep: each value its own variant, every other key at the recipe's value "
                        "(an ablation), not every combination; the folders are those of one --sweep each")
    p.add_argument("--seeds", metavar="S1,S2,...",
                   help="run every method and variant once per seed (the recipe key `seed`); default: the "
                        "recipe's own seed")
    p.add_argument("--out", required=True, help="runs/<name>/, quality.csv, quality.md and the plots go here")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if a GPU is visible, else cpu")
    p.add_argument("--eval-every", type=int, help="eval.every_steps (default: steps // 10); checkpoints too")
    p.add_argument("--eval-tokens", type=int, help="eval.tokens (default: the recipe's)")
    p.add_argument("--warmup", type=int, help="optim.warmup_steps (default: min(2000, steps // 10))")
    p.add_argument("--status-every", type=float, default=60.0, help="seconds between progress lines (0: none)")
    p.add_argument("--runs-per-gpu", type=int, default=1,
                   help="--device cuda: runs sharing each GPU (tokens/s then measure shared GPUs)")
    p.add_argument("--best-to", type=int, metavar="N",
                   help="after the runs (a sweep), continue each method's best one (lowest eval loss) to N "
                        "steps; the sweep's table is kept as sweep.csv / sweep.md")
    p.add_argument("--dry-run", action="store_true", help="print each run's launcher command and stop")
    p.add_argument("--plot-only", action="store_true",
                   help="no training: re-read OUT/runs/*, rewrite quality.csv / quality.md and the plots")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    try:
        if args.plot_only:
            if not out.is_dir():
                raise BenchError(f"--out {out}: no such folder")
            print(report(out), end="", flush=True)
            return 0
        if args.steps is None or args.steps < 1:
            raise BenchError("--steps: required, a positive number of optimizer steps per run")
        if args.best_to is not None and args.best_to <= args.steps:
            raise BenchError(f"--best-to {args.best_to}: must be more than --steps {args.steps}")
        if args.runs_per_gpu < 1:
            raise BenchError(f"--runs-per-gpu {args.runs_per_gpu}: must be >= 1")
        if args.gpus < 1:
            raise BenchError(f"--gpus {args.gpus}: must be >= 1")
        for flag, value in (("--eval-every", args.eval_every), ("--eval-tokens", args.eval_tokens),
                            ("--warmup", args.warmup)):
            if value is not None and value < (1 if flag == "--eval-tokens" else 0):
                raise BenchError(f"{flag} {value}: must be {'>= 1' if flag == '--eval-tokens' else '>= 0'}")
        if args.device is None:
            import torch

            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        specs = plan(args)
        cosine = next((spec for spec in specs if spec.resolved["optim"]["schedule"] == "cosine"), None)
        if args.best_to and cosine is not None:  # its decay ends at --steps: continued, it would re-stretch
            raise BenchError(f"--best-to {args.best_to}: {cosine.method}'s recipe decays on a cosine that ends "
                             f"at --steps {args.steps}, so a continued run's lr would jump back up; run "
                             f"--steps {args.best_to} instead, or --set optim.schedule=constant")
        if args.dry_run:
            for spec in specs:
                print(shlex.join(launch_command(spec, out)))
            return 0
        slots = gpu_slots(args.gpus, args.runs_per_gpu) if args.device == "cuda" else [None]
        out.mkdir(parents=True, exist_ok=True)
        way = (f"up to {len(slots)} at a time, one GPU each" if args.device == "cuda"
               else "one after another on CPU")
        print(f"{len(specs)} run(s) of {args.steps} steps, {way}, under {out / 'runs'}", flush=True)
        t0 = time.time()
        failed = run_and_report(specs, out, slots, args.status_every, t0)
        if failed is not None and args.best_to and not failed:
            # the sweep's table stays as sweep.csv / sweep.md; quality.* then hold the winners
            for suffix in (".csv", ".md"):
                shutil.copyfile(out / f"quality{suffix}", out / f"sweep{suffix}")
            winners = best_of_each(specs, out, args.best_to)
            chosen = dict.fromkeys(f"{w.method} {w.variant}".strip() for w in winners)  # once per seed
            print(f"\ncontinuing each method's best run to {args.best_to} steps: " + ", ".join(chosen), flush=True)
            failed = run_and_report(winners, out, slots, args.status_every, t0)
        if failed is None:
            return 130
        if failed:
            print(f"\n{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
            return 1
        return 0
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

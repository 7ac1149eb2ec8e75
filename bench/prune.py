"""Singular-value pruning at inference (the SST paper's App. G): held-out loss against the fraction
of singular values each SST layer keeps.

    python -m bench.prune --output-dir runs/opt125m-sst --out runs/opt125m-sst/prune
    python -m bench.prune --output-dir RUN --fractions 1,0.9,0.75,0.5,0.25 --out DIR [--device cuda]

For each fraction F the run's checkpoint is exported as `python -m sst_dist.export --keep-singular F`
would (each SST layer keeps its ceil(F·k) largest singular values, then is made dense) and evaluated
by the trainer's own evaluation (sst_dist.evaluate.run_eval: the first eval.tokens of the run's
held-out split). Beside the dense parameter count stands that of a factored export, which keeps
U[:, :n], s[:n], Vh[:n] per SST layer instead of the dense matrix. Writes prune.csv, prune.md and
prune.png into --out and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import torch

from sst_dist.errors import ConfigError, DataError, RunError

FIELDS = ("fraction", "kept", "of", "eval_loss", "eval_ppl", "dense_params", "factored_params")


def parse_fractions(text: str) -> list[float]:
    from sst_dist.export import check_fraction

    try:
        fractions = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--fractions {text!r}: expected comma-separated numbers, e.g. 1,0.5") from None
    if not fractions:
        raise ConfigError("--fractions: empty")
    for f in fractions:
        check_fraction(f)
    return fractions


def measure(output_dir: Path, fractions: list[float], device: torch.device, step: int | None = None,
            eval_tokens: int | None = None, cache_dir: str | None = None) -> list[dict]:
    from sst_dist.data import open_data
    from sst_dist.export import (build_hf_model, check_prunable, dense_state_dict, engine_state_dict,
                                 read_checkpoint)
    from sst_dist.evaluate import run_eval

    ckpt = read_checkpoint(output_dir, step)
    check_prunable(ckpt)
    recipe = ckpt.recipe
    if eval_tokens is not None:
        recipe.eval.tokens = eval_tokens
    if cache_dir is not None:
        recipe.data.cache_dir = cache_dir
    data = open_data(recipe.data, seq_len=recipe.model.seq_len, global_batch=recipe.train.global_batch,
                     seed=recipe.seed)
    state = engine_state_dict(ckpt)  # read once, pruned once per fraction
    rows = []
    for fraction in fractions:
        dense, pruning = dense_state_dict(state, recipe, fraction)
        model = build_hf_model(ckpt, dense, torch.float32).to(device)
        del dense
        result = run_eval(model, data, recipe, device)
        params = sum(p.numel() for p in model.parameters())
        layers = pruning.layers.values()
        rows.append({"fraction": fraction, "kept": sum(n for _, n, _ in layers), "of": sum(k for k, _, _ in layers),
                     "eval_loss": result["eval_loss"], "eval_ppl": result["eval_ppl"],
                     "dense_params": params, "factored_params": pruning.factored_params(params)})
        print(f"F={fraction:g}: eval loss {result['eval_loss']:.4f}, ppl {result['eval_ppl']:.2f}", flush=True)
        del model
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| kept fraction F | singular values kept | eval loss | eval ppl | dense params | factored params |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['fraction']:g} | {r['kept']:,} / {r['of']:,} | {r['eval_loss']:.4f} | "
                     f"{r['eval_ppl']:.2f} | {r['dense_params']:,} | {r['factored_params']:,} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> Path | None:
    from sst_dist.plot import pyplot, save

    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 5))
    xs = [r["fraction"] for r in rows]
    ax.plot(xs, [r["eval_ppl"] for r in rows], marker="o", label="eval perplexity")
    for r in rows:
        ax.annotate(f"{r['factored_params'] / 1e6:.1f}M", (r["fraction"], r["eval_ppl"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.invert_xaxis()  # more pruning to the right
    ax.set(xlabel="fraction F of singular values kept per SST layer", ylabel="held-out perplexity",
           title=f"{title} (labels: factored parameter count)")
    return save(fig, ax, path, legend=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", required=True, help="an SST run folder (the trainer's --output-dir)")
    p.add_argument("--out", required=True, help="prune.csv, prune.md and prune.png go here")
    p.add_argument("--fractions", default="1,0.9,0.75,0.5,0.25", help="kept fractions F (default: %(default)s)")
    p.add_argument("--step", type=int, help="that step's checkpoint (default: the latest)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--eval-tokens", type=int, help="held-out tokens (default: the run's eval.tokens)")
    p.add_argument("--cache-dir", help="where the run's prepared data lies (default: its data.cache_dir)")
    args = p.parse_args(argv)
    try:
        fractions = parse_fractions(args.fractions)
        if args.eval_tokens is not None and args.eval_tokens <= 0:
            raise ConfigError(f"--eval-tokens: {args.eval_tokens} must be > 0")
        rows = measure(Path(args.output_dir), fractions, torch.device(args.device), args.step,
                       args.eval_tokens, args.cache_dir)
    except (ConfigError, RunError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "prune.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    text = markdown(rows)
    (out / "prune.md").write_text(text)
    plot(rows, out / "prune.png", f"Singular-value pruning of {Path(args.output_dir).name}")
    print(text, end="")
    print(f"wrote {out / 'prune.csv'}, {out / 'prune.md'}, {out / 'prune.png'}")
    return 0 if all(math.isfinite(r["eval_loss"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

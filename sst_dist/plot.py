"""Curves of runs from their metrics.jsonl: training loss, held-out loss and learning rate against tokens.

    python -m sst_dist.plot runs/tiny-sst runs/tiny-full --out curves.png

The panels are also drawn one by one (bench/quality.py draws its eval_loss.png and train_loss.png
with them), so every plot of a run reads the log the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESET_EVENTS = ("reset", "resample", "resvd")  # ReLoRA* merges, SST resamples and re-SVDs


def read_rows(folder: Path, max_step: int | None = None) -> list[dict]:
    """metrics.jsonl, one row per step: a resumed run re-logs the steps after its checkpoint, and
    the later row is the one the final model descends from."""
    path = Path(folder) / "metrics.jsonl"
    if not path.is_file():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if isinstance(row, dict) and "step" in row and (max_step is None or row["step"] <= max_step):
            by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` values (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def pyplot():
    """matplotlib's pyplot on the file-only backend, or None (with a line saying so) if not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib)", flush=True)
        return None
    return plt


def save(fig, axes, path: Path, legend: bool = True) -> Path:
    import matplotlib.pyplot as plt

    for ax in axes if isinstance(axes, (list, tuple)) else [axes]:
        ax.grid(alpha=0.3)
        if legend and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


# series: [(label, rows, style)] with style a dict of matplotlib line keywords (color, linestyle)

def across_runs(runs: list[list[dict]]) -> list[tuple[int, int, list[float]]]:
    """The eval losses of several runs of one setting (seeds), step by step: (step, tokens, the
    losses of the runs that evaluated at that step), over every step any of them evaluated."""
    by_step: dict[int, tuple[int, list[float]]] = {}
    for rows in runs:
        for x in rows:
            if "eval_loss" in x:
                by_step.setdefault(x["step"], (x.get("tokens"), []))[1].append(x["eval_loss"])
    return [(step, *by_step[step]) for step in sorted(by_step)]


def mean_rows(runs: list[list[dict]]) -> list[dict]:
    """One run's rows standing for several (seeds): the training loss averaged step by step over the
    runs that logged the step; tokens and events from the first that did."""
    by_step: dict[int, list[dict]] = {}
    for rows in runs:
        for x in rows:
            by_step.setdefault(x["step"], []).append(x)
    return [{**xs[0], "loss": sum(x["loss"] for x in xs) / len(xs)} for _, xs in sorted(by_step.items())]


def eval_loss_panel(ax, series) -> None:
    eval_band_panel(ax, [(name, [rows], style) for name, rows, style in series])


def eval_band_panel(ax, groups) -> None:
    """groups: [(label, [rows of each run], style)]. One line per group, the mean over its runs (a
    single run: its own curve), and where it has several runs a band from their min to their max."""
    drawn = banded = False
    for name, runs, style in groups:
        points = across_runs(runs)
        if not points:
            continue
        tokens = [t for _, t, _ in points]
        ax.plot(tokens, [sum(v) / len(v) for _, _, v in points], marker="o", markersize=3,
                label=name if len(runs) == 1 else f"{name} ({len(runs)} seeds)", **style)
        if len(runs) > 1:
            ax.fill_between(tokens, [min(v) for _, _, v in points], [max(v) for _, _, v in points],
                            color=style.get("color"), alpha=0.18, linewidth=0)
            banded = True
        drawn = True
    if not drawn:
        ax.text(0.5, 0.5, "no evaluation logged (eval.every_steps: 0)", ha="center", transform=ax.transAxes)
    title = "Held-out loss" + (" (line: mean over seeds; band: min to max)" if banded else "")
    ax.set(xlabel="tokens", ylabel="eval loss (nats)", title=title)


def train_loss_panel(ax, series) -> None:
    """Smoothed training loss; faint vertical lines where a method reset its low-rank state."""
    tops, lows, windows = [], [], set()
    for name, rows, style in series:
        if not rows:
            continue
        window = max(1, len(rows) // 50)
        windows.add(window)
        smoothed = smooth([x["loss"] for x in rows], window)
        ax.plot([x["tokens"] for x in rows], smoothed, label=name, linewidth=1, **style)
        for x in rows:
            if any(e in RESET_EVENTS for e in str(x.get("event", "")).split("+")):
                # the reset ran before this row's step: mark the tokens trained until then
                ax.axvline(x["tokens"] * (x["step"] - 1) / x["step"], color=style.get("color"), alpha=0.12,
                           linewidth=0.6)
        tops.append(max(smoothed[len(smoothed) // 10:]))  # past the first drop, which would flatten the rest
        lows.append(min(smoothed))
    if tops:
        span = max(tops) - min(lows)
        ax.set_ylim(min(lows) - 0.05 * span, max(tops) + 0.05 * span + 1e-6)
    mean = f", trailing mean of {max(windows)} steps" if windows and max(windows) > 1 else ""
    ax.set(xlabel="tokens", ylabel=f"training loss (nats{mean})",
           title="Training loss (faint lines: ReLoRA* resets, SST resamples)")


def lr_panel(ax, series) -> None:
    """The full-rank group's lr (solid) and the low-rank group's where it differs (dashed)."""
    for name, rows, style in series:
        if not rows:
            continue
        tokens = [x["tokens"] for x in rows]
        ax.plot(tokens, [x["lr"] for x in rows], label=name, linewidth=1, **style)
        if any(x.get("lowrank_lr") != x["lr"] for x in rows if "lowrank_lr" in x):
            ax.plot(tokens, [x.get("lowrank_lr", float("nan")) for x in rows], linewidth=1,
                    **{**style, "linestyle": "--"}, label=f"{name} (low-rank)")
    ax.set(xlabel="tokens", ylabel="learning rate", title="Learning rate")


def run_series(folders: list[Path], labels: list[str] | None = None) -> list[tuple[str, list[dict], dict]]:
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10")
    labels = labels or [Path(f).name for f in folders]
    return [(name, read_rows(folder), dict(color=cmap(i % 10))) for i, (name, folder) in
            enumerate(zip(labels, folders))]


def plot_runs(folders: list[Path], out: Path, labels: list[str] | None = None) -> Path | None:
    """One PNG: training loss, held-out loss and lr against tokens for each run folder."""
    plt = pyplot()
    if plt is None:
        return None
    series = run_series(folders, labels)
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    train_loss_panel(axes[0], series)
    eval_loss_panel(axes[1], series)
    lr_panel(axes[2], series)
    return save(fig, list(axes), Path(out))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sst_dist.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (the trainer's --output-dir)")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--labels", help="comma-separated legend names, one per run (default: folder names)")
    args = p.parse_args(argv)
    folders = [Path(r) for r in args.runs]
    empty = [str(f) for f in folders if not read_rows(f)]
    if empty:
        print(f"error: no metrics.jsonl rows in {', '.join(empty)}", file=sys.stderr)
        return 2
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    if labels is not None and len(labels) != len(folders):
        print(f"error: --labels names {len(labels)} runs, {len(folders)} were given", file=sys.stderr)
        return 2
    if Path(args.out).suffix.lower() != ".png":
        print(f"error: --out {args.out}: expected a .png file", file=sys.stderr)
        return 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    written = plot_runs(folders, Path(args.out), labels)
    if written is None:
        return 2
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

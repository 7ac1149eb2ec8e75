"""bench/quality.py: the six-method comparison end to end on CPU (tiny recipes), its reuse of
finished runs, the report, and the one-line errors."""

import csv
import importlib
import json
import math
import statistics
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, quiet_env
from sst_dist.registry import METHODS

STEPS = 20
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("eval_loss.png", "train_loss.png", "ppl_vs_memory.png")


def load_bench():
    return importlib.import_module("bench.quality")


def bench(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "bench.quality", *map(str, args)], cwd=ROOT, env=quiet_env(),
                          capture_output=True, text=True, timeout=timeout)


def tiny_args(out, *extra):
    return [str(a) for a in ("--size", "tiny", "--steps", STEPS, "--device", "cpu", "--out", out,
                             "--eval-every", 10, "--eval-tokens", 2048, *extra)]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def six(tmp_path_factory):
    """All six methods, 20 steps each, through the real command; then the same command again."""
    out = tmp_path_factory.mktemp("quality")
    first = bench(*tiny_args(out, "--methods", ",".join(METHODS)))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    metrics = sorted((out / "runs").glob("*/metrics.jsonl"))
    mtimes = {p: p.stat().st_mtime_ns for p in metrics}
    rows = read_csv(out / "quality.csv")
    second = bench(*tiny_args(out, "--methods", ",".join(METHODS)))
    return out, first, second, rows, mtimes


@pytest.mark.slow
def test_one_row_per_method_with_the_budget_and_finite_losses(six):
    out, first, _, rows, _ = six
    assert [r["method"] for r in rows] == list(METHODS)
    recipe = yaml.safe_load((ROOT / "recipes" / "tiny-sst.yaml").read_text())
    tokens = STEPS * recipe["train"]["global_batch"] * recipe["model"]["seq_len"]
    for r in rows:
        assert r["status"] == "ok" and r["variant"] == ""
        assert int(r["steps"]) == STEPS and int(r["tokens"]) == tokens
        loss, ppl = float(r["eval_loss"]), float(r["eval_ppl"])
        assert math.isfinite(loss) and 0 < loss < 20 and math.isclose(ppl, math.exp(loss), rel_tol=1e-9)
        assert math.isfinite(float(r["final_train_loss"])) and float(r["tokens_per_s"]) > 0
        assert r["peak_mem_gib"] == ""  # measured on GPU only
        assert int(r["trainable_params"]) > 0
    losses = sorted(float(r["eval_loss"]) for r in rows)
    assert all(b - a > 1e-7 for a, b in zip(losses, losses[1:])), losses  # six different trainings
    # folder names: no plus signs or commas; the CSV keeps the method's own name
    names = sorted(p.name for p in (out / "runs").iterdir())
    assert names == sorted(m.replace("+", "-") for m in METHODS)
    assert rows[-1]["run_dir"] == "runs/sst-galore"
    for r in rows:
        assert (out / r["run_dir"] / "run.log").stat().st_size > 0
    done = [line for line in first.stdout.splitlines() if line.startswith("done ")]
    assert len(done) == len(METHODS) and all("eval ppl" in line for line in done), first.stdout


@pytest.mark.slow
def test_report_markdown_checks_and_plots(six):
    out, first, _, rows, _ = six
    text = (out / "quality.md").read_text()
    assert text.splitlines()[0].startswith("| method | variant | seed | eval loss")
    table = text.split("\n\n")[0].splitlines()
    assert len(table) == 2 + len(METHODS) and all(line.startswith("| ") for line in table)
    assert "Across seeds" not in text  # one seed: no summary
    assert "Eval loss at every evaluation (one seed)" in text and "| sst |  | 1 | " in text
    assert "Largest training-loss rise after a reset" in text
    for method in ("relora", "sst", "sst+galore"):
        assert f"  - {method}: " in text
    assert "gap SST closes" in text
    assert text in first.stdout  # printed at the end
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000, name


@pytest.mark.slow
def test_second_invocation_reuses_finished_runs(six):
    out, _, second, rows, mtimes = six
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert second.stdout.count("reused ") == len(METHODS) and "started" not in second.stdout
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert read_csv(out / "quality.csv") == rows


@pytest.mark.slow
def test_plot_only_redraws_from_the_run_folders(six, tmp_path):
    out = six[0]
    for name in ("quality.csv", "quality.md", *PLOTS):
        (out / name).unlink()
    proc = bench("--plot-only", "--out", out, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert read_csv(out / "quality.csv") == six[3]
    assert all((out / name).read_bytes()[:8] == PNG_MAGIC for name in PLOTS)


@pytest.mark.slow
@pytest.mark.parametrize("gpus, per_gpu, pinned", [(2, 1, ("0", "1")), (1, 2, ("0", "0"))])
def test_side_by_side_runs_pin_one_gpu_each_and_share_prepared_data(tmp_path, monkeypatch, capsys, gpus, per_gpu,
                                                                    pinned):
    """The --device cuda scheduler on CPU: GPU ids stand in, the runs train on CPU. Two runs sharing one
    GPU (--runs-per-gpu 2) run at once too."""
    quality = load_bench()
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rc = quality.main(["--size", "tiny", "--steps", "6", "--device", "cuda", "--gpus", str(gpus),
                       "--runs-per-gpu", str(per_gpu), "--out", str(tmp_path),
                       "--methods", "full,sst", "--set", "train.device=cpu", "--eval-tokens", "1024",
                       "--status-every", "0"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    lines = printed.splitlines()
    starts = [i for i, line in enumerate(lines) if " started " in line]
    dones = [i for i, line in enumerate(lines) if line.startswith("done ")]
    assert len(starts) == len(dones) == 2 and max(starts) < min(dones), printed  # both ran at once
    assert f"on GPU {pinned[0]}" in lines[starts[0]] and f"on GPU {pinned[1]}" in lines[starts[1]]
    assert f"CUDA_VISIBLE_DEVICES={pinned[0]}" in (tmp_path / "runs" / "full" / "run.log").read_text()
    assert f"CUDA_VISIBLE_DEVICES={pinned[1]}" in (tmp_path / "runs" / "sst" / "run.log").read_text()
    assert "preparing data" in printed and (tmp_path / "prepare.log").is_file()
    assert [r["status"] for r in read_csv(tmp_path / "quality.csv")] == ["ok", "ok"]


@pytest.mark.slow
def test_a_failed_run_is_reported_with_its_log_and_the_exit_is_nonzero(tmp_path):
    proc = bench(*tiny_args(tmp_path, "--methods", "full", "--set", "data.source=local",
                            "--set", f"data.path={tmp_path / 'no-such-corpus'}"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED full (exit 2)" in proc.stdout and "error: " in proc.stdout  # the log's tail
    assert "1 run(s) failed: full" in proc.stderr
    assert [r["status"] for r in read_csv(tmp_path / "quality.csv")] == ["failed"]


@pytest.mark.parametrize("args, message", [
    (["--methods", "full,adam"], "error: --methods: unknown method 'adam'"),
    (["--set", "optim.nope=1"], "unknown recipe key 'optim.nope'"),
    (["--set", "optim.lr"], "error: --set 'optim.lr': expected [METHOD:]dotted.key=value"),
    (["--set", "adam:optim.lr=1"], "unknown method 'adam'"),
    (["--sweep", "optim.lr=1e-3,1e-3"], "a value is listed twice"),
    (["--size", "350m"], "no recipe recipes/opt-350m-lora.yaml"),
    (["--set", "sst:sst.steps_per_iteration=0"], "sst.steps_per_iteration: 0 must be > 0"),
    (["--seeds", "0,1,0"], "error: --seeds '0,1,0': a seed is listed twice"),
    (["--seeds", "0,-1"], "error: --seeds '0,-1': expected a comma list of integers >= 0"),
    (["--seeds", "0,1", "--sweep", "seed=2,3"], "use --seeds"),
    (["--set", "sst:optim.reset=zero"], "optim.reset: 'zero' is not one of exact, moments"),
    (["--set", "sst:optim.schedule=cosine", "--best-to", "40"], "sst's recipe decays on a cosine that ends at"),
])
def test_user_errors_are_one_line(tmp_path, capsys, args, message):
    quality = load_bench()
    assert quality.main(tiny_args(str(tmp_path / "out"), *args)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()  # nothing started


def test_llama_60m_plans_its_four_recipes_with_the_cosine_over_the_bench_steps(tmp_path):
    quality = load_bench()
    args = quality.parse_args(["--size", "llama-60m", "--methods", "full,lora,sst,galore", "--steps", "2000",
                               "--device", "cpu", "--out", str(tmp_path)])
    specs = quality.plan(args)
    assert [(s.method, s.recipe.name) for s in specs] == [(m, f"llama-60m-{m}.yaml") for m in ("full", "lora", "sst", "galore")]
    for s in specs:  # the decay ends at the bench's last step, not the recipe's
        assert s.resolved["optim"]["schedule"] == "cosine" and s.resolved["train"]["max_steps"] == 2000


def test_sweeps_and_per_method_sets_plan_one_folder_per_variant(tmp_path):
    quality = load_bench()
    args = quality.parse_args(tiny_args(str(tmp_path), "--methods", "full,sst+galore", "--set", "optim.grad_clip=0.5",
                                        "--set", "sst+galore:optim.lowrank_lr=2e-3",
                                        "--sweep", "optim.lr=1e-3,2e-3", "--sweep", "sst+galore:galore.scale=0.5,1"))
    specs = quality.plan(args)
    assert [(s.method, s.variant, s.name) for s in specs] == [
        ("full", "optim.lr=1e-3", "full__optim.lr=1e-3"),
        ("full", "optim.lr=2e-3", "full__optim.lr=2e-3"),
        ("sst+galore", "optim.lr=1e-3 galore.scale=0.5", "sst-galore__optim.lr=1e-3__galore.scale=0.5"),
        ("sst+galore", "optim.lr=1e-3 galore.scale=1", "sst-galore__optim.lr=1e-3__galore.scale=1"),
        ("sst+galore", "optim.lr=2e-3 galore.scale=0.5", "sst-galore__optim.lr=2e-3__galore.scale=0.5"),
        ("sst+galore", "optim.lr=2e-3 galore.scale=1", "sst-galore__optim.lr=2e-3__galore.scale=1"),
    ]
    assert all("+" not in s.name and "," not in s.name for s in specs)
    last = specs[-1].resolved
    assert last["optim"]["lr"] == 2e-3 and last["galore"]["scale"] == 1.0
    assert last["optim"]["lowrank_lr"] == 2e-3 and last["optim"]["grad_clip"] == 0.5
    assert specs[0].resolved["optim"]["lowrank_lr"] == 3e-3  # the per-method --set is sst+galore's only
    assert last["train"]["max_steps"] == STEPS and last["optim"]["warmup_steps"] == STEPS // 10
    assert last["eval"]["every_steps"] == 10 and last["checkpoint"]["every_steps"] == 10
    assert last["wandb"]["mode"] == "disabled" and last["train"]["device"] == "cpu"


def test_metrics_rows_deduplicated_and_reset_rise(tmp_path):
    quality = load_bench()
    # a resumed run re-logs the steps after its checkpoint: the later row counts
    lines = [{"step": s, "loss": 5.0} for s in range(1, 31)] + [{"step": 29, "loss": 1.0}]
    lines[19]["event"] = "resample"  # the reset before step 20
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + '\n{"step": 3')
    rows = quality.read_rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 31)) and rows[28]["loss"] == 1.0
    rows[28]["loss"] = 5.0
    for r in rows[19:24]:
        r["loss"] = 7.0  # five steps 2 nats up after the reset: the worst 10-step mean is 1 nat up
    rise, step, count = quality.reset_rise(rows)
    assert step == 20 and count == 1 and math.isclose(rise, 1.0)


@pytest.mark.slow
def test_best_to_continues_each_methods_best_sweep_run(tmp_path):
    """--best-to: the sweep's rows stay in sweep.csv; each method's lowest-eval-loss variant is
    continued in its own folder (resumed, not restarted) and is quality.csv's only row for it."""
    proc = bench("--size", "tiny", "--steps", 4, "--device", "cpu", "--out", tmp_path, "--eval-every", 2,
                 "--eval-tokens", 2048, "--warmup", 2, "--methods", "full,sst", "--status-every", 0,
                 "--sweep", "full:optim.lr=1e-3,4e-3", "--sweep", "sst:optim.lowrank_lr=1e-3,4e-3",
                 "--best-to", 8)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sweep = read_csv(tmp_path / "sweep.csv")
    assert len(sweep) == 4 and {r["steps"] for r in sweep} == {"4"}
    final = read_csv(tmp_path / "quality.csv")
    assert [r["method"] for r in final] == ["full", "sst"]
    for row in final:
        candidates = [r for r in sweep if r["method"] == row["method"]]
        best = min(candidates, key=lambda r: float(r["eval_loss"]))
        assert row["variant"] == best["variant"] and row["steps"] == "8"
        steps = [json.loads(line)["step"] for line in
                 (tmp_path / row["run_dir"] / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, 9))  # steps 1-4 from the sweep, 5-8 continued
        log = (tmp_path / row["run_dir"] / "run.log").read_text()
        assert "resuming from" in log


def test_gpu_slots_follow_visible_devices_and_runs_per_gpu(monkeypatch):
    quality = load_bench()
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert quality.gpu_slots(2, 2) == ["3", "3", "5", "5"]
    assert quality.gpu_slots(1) == ["3"]
    with pytest.raises(quality.BenchError, match="only 2 GPU"):
        quality.gpu_slots(3)


def test_gap_closure_compares_every_run_at_their_last_common_evaluation(tmp_path):
    """An interrupted LoRA run (evaluated to step 200) is set against full-rank and SST at step 200,
    not against their later evaluations; SST + GaLore against SST at their own last common step."""
    quality = load_bench()
    curves = {"full": {100: 5.0, 200: 4.0, 300: 3.0}, "lora": {100: 6.0, 200: 5.0},
              "sst": {100: 5.5, 200: 4.5, 300: 3.5}, "sst+galore": {100: 5.6, 200: 4.59, 300: 3.57}}
    results = []
    for method, evals in curves.items():
        folder = tmp_path / method.replace("+", "-")
        folder.mkdir()
        rows = [{"step": s, "loss": 1.0, **({"eval_loss": evals[s]} if s in evals else {})}
                for s in range(1, max(evals) + 1)]
        (folder / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
        results.append({"method": method, "variant": "", "_folder": folder, "_steps": 300})
    text = "\n".join(quality.checks(results))
    assert "gap SST closes at step 200: (lora - sst) / (lora - full) = (5.0000 - 4.5000) / (5.0000 - 4.0000) = " \
           "**0.500**" in text, text
    assert "gap SST + GaLore closes at step 200" in text and "**0.410**" in text, text
    assert "SST + GaLore's eval loss against SST's at step 300: 3.5700 vs 3.5000, **+2.00 %**" in text, text


# ----------------------------------------------------------------------------- seeds


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """full, LoRA and SST at seeds 0 and 1, 20 steps each. LoRA's lrs are lowered so that it trails
    full-rank at every evaluation of this short run (on the tiny recipes it leads), which gives the
    gap shares values to check."""
    out = tmp_path_factory.mktemp("seeds")
    args = tiny_args(out, "--seeds", "0,1", "--methods", "full,lora,sst", "--status-every", 0,
                     "--set", "lora:optim.lr=5e-4", "--set", "lora:optim.lowrank_lr=5e-4")
    proc = bench(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc, args


@pytest.mark.slow
def test_seeds_one_row_per_run_and_summary_rows_with_the_mean_and_spread(seeds):
    out, _, _ = seeds
    rows = read_csv(out / "quality.csv")
    runs = [r for r in rows if r["seed"] != "mean"]
    assert [(r["method"], r["seed"]) for r in runs] == [(m, s) for m in ("full", "lora", "sst") for s in "01"]
    assert [r["run_dir"] for r in runs[:2]] == ["runs/full", "runs/full__seed=1"]  # seed 0 is the recipe's own
    assert all(r["status"] == "ok" and int(r["steps"]) == STEPS for r in runs)
    recipes = [json.loads((out / r["run_dir"] / "recipe.json").read_text()) for r in runs]
    assert [str(r["seed"]) for r in recipes] == [r["seed"] for r in runs]
    summaries = [r for r in rows if r["seed"] == "mean"]
    assert [r["method"] for r in summaries] == ["full", "lora", "sst"]
    for summary in summaries:
        losses = [float(r["eval_loss"]) for r in runs if r["method"] == summary["method"]]
        assert losses[0] != losses[1]  # the seed changed the run
        assert summary["status"] == "summary" and summary["n_seeds"] == "2" and summary["run_dir"] == ""
        assert math.isclose(float(summary["eval_loss"]), statistics.fmean(losses), rel_tol=1e-12)
        assert math.isclose(float(summary["eval_loss_sd"]), statistics.stdev(losses), rel_tol=1e-9)
        assert (float(summary["eval_loss_min"]), float(summary["eval_loss_max"])) == (min(losses), max(losses))
        assert math.isclose(float(summary["eval_ppl"]), math.exp(statistics.fmean(losses)), rel_tol=1e-12)


@pytest.mark.slow
def test_seeds_report_gives_curves_and_per_step_gap_shares_and_draws_bands(seeds):
    out, proc, _ = seeds
    text = (out / "quality.md").read_text()
    assert text in proc.stdout
    assert "Across seeds" in text and "| sst |  | 2 | " in text
    curves = [line for line in text.splitlines() if line.startswith("| sst |  | 2 | ") and "±" in line]
    assert len(curves) == 1 and curves[0].count("±") == 2  # steps 10 and 20, mean ± sd
    final = {(r["method"], r["seed"]): float(r["eval_loss"]) for r in read_csv(out / "quality.csv")}
    shares = [(final["lora", s] - final["sst", s]) / (final["lora", s] - final["full", s]) for s in "01"]
    table = text.split("Share of the LoRA - full-rank eval-loss gap closed")[1].split("Whole curve")[0].splitlines()
    for seed, value in zip("01", shares):  # step 20 is the last column
        line = next(line for line in table if line.startswith(f"| sst |  | {seed} | "))
        assert line.endswith(f" | {value:.2f} |"), line
    mean = next(line for line in table if line.startswith("| sst |  | mean | "))
    assert mean.endswith(f" | **{statistics.fmean(shares):.2f}** |"), mean
    assert f"mean over 2 seeds: **{statistics.fmean(shares):.3f}**" in text
    assert "tokens to reach it" in text
    data = (out / "eval_loss.png").read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000


@pytest.mark.slow
def test_seeds_second_invocation_reuses_the_runs(seeds):
    out, _, args = seeds
    proc = bench(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("reused ") == 6 and "started" not in proc.stdout


def test_sweeps_compose_with_seeds_and_the_recipes_own_seed_keeps_its_folder(tmp_path):
    quality = load_bench()
    args = quality.parse_args(tiny_args(str(tmp_path), "--methods", "full,sst", "--seeds", "1,0",
                                        "--sweep", "sst:sst.steps_per_iteration=5,10"))
    specs = quality.plan(args)
    assert [(s.method, s.variant, s.seed, s.name) for s in specs] == [
        ("full", "", 1, "full__seed=1"),
        ("full", "", 0, "full"),
        ("sst", "sst.steps_per_iteration=5", 1, "sst__sst.steps_per_iteration=5__seed=1"),
        ("sst", "sst.steps_per_iteration=5", 0, "sst__sst.steps_per_iteration=5"),
        ("sst", "sst.steps_per_iteration=10", 1, "sst__sst.steps_per_iteration=10__seed=1"),
        ("sst", "sst.steps_per_iteration=10", 0, "sst__sst.steps_per_iteration=10"),
    ]
    assert all(s.resolved["seed"] == s.seed and s.overrides[-1] == f"seed={s.seed}" for s in specs)
    assert specs[-1].resolved["sst"]["steps_per_iteration"] == 10
    plain = quality.plan(quality.parse_args(tiny_args(str(tmp_path), "--methods", "sst")))
    assert [(s.name, s.seed) for s in plain] == [("sst", 0)] and not any("seed=" in o for o in plain[0].overrides)


def test_one_at_a_time_moves_one_key_per_variant_in_the_folders_of_single_sweeps(tmp_path):
    """--one-at-a-time: an ablation, each value a variant with every other swept key at the recipe's
    value, in the folders a separate --sweep per key would use (so the two forms reuse each other's runs)."""
    quality = load_bench()
    sweeps = ("--sweep", "sst:optim.lowrank_lr=2e-3,5e-4", "--sweep", "sst:sst.steps_per_iteration=5")
    args = quality.parse_args(tiny_args(str(tmp_path), "--methods", "full,sst", "--seeds", "1,2",
                                        "--one-at-a-time", *sweeps))
    specs = quality.plan(args)
    assert [(s.method, s.variant, s.seed) for s in specs] == [
        ("full", "", 1), ("full", "", 2),  # no sweep of its own: its one plain run per seed
        ("sst", "optim.lowrank_lr=2e-3", 1), ("sst", "optim.lowrank_lr=2e-3", 2),
        ("sst", "optim.lowrank_lr=5e-4", 1), ("sst", "optim.lowrank_lr=5e-4", 2),
        ("sst", "sst.steps_per_iteration=5", 1), ("sst", "sst.steps_per_iteration=5", 2),
    ]
    recipe = quality.plan(quality.parse_args(tiny_args(str(tmp_path), "--methods", "sst")))[0].resolved
    by_variant = {s.variant: s.resolved for s in specs if s.method == "sst"}
    lr, t3 = by_variant["optim.lowrank_lr=5e-4"], by_variant["sst.steps_per_iteration=5"]
    assert lr["optim"]["lowrank_lr"] == 5e-4 and lr["sst"]["steps_per_iteration"] == recipe["sst"]["steps_per_iteration"]
    assert t3["sst"]["steps_per_iteration"] == 5 and t3["optim"]["lowrank_lr"] == recipe["optim"]["lowrank_lr"]
    single = [s.name for item in ("sst:optim.lowrank_lr=2e-3,5e-4", "sst:sst.steps_per_iteration=5")
              for s in quality.plan(quality.parse_args(tiny_args(str(tmp_path), "--methods", "sst",
                                                                 "--seeds", "1,2", "--sweep", item)))]
    assert [s.name for s in specs if s.method == "sst"] == single
    product = quality.plan(quality.parse_args(tiny_args(str(tmp_path), "--methods", "sst", "--seeds", "1,2", *sweeps)))
    assert len(product) == 4 and all(len(s.variant.split()) == 2 for s in product)  # without it: every combination


def write_run(folder, evals, method, seed, steps=None, warmup=0, tokens_per_step=100):
    """A run folder as the bench leaves it: metrics.jsonl with eval losses at the given steps."""
    folder.mkdir(parents=True)
    steps = steps or max(evals)
    rows = [{"step": s, "loss": 1.0, "tokens": s * tokens_per_step, "tokens_per_s": 1.0,
             **({"eval_loss": evals[s], "eval_ppl": math.exp(evals[s])} if s in evals else {})}
            for s in range(1, steps + 1)]
    (folder / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    meta = {"method": method, "variant": "", "seed": seed, "steps": steps,
            "recipe_resolved": {"seed": seed, "optim": {"warmup_steps": warmup}}}
    (folder / "bench.json").write_text(json.dumps(meta))
    return folder


def test_gap_measures_per_seed_against_that_seeds_lora_and_full(tmp_path):
    """Shares from each seed's own LoRA and full-rank; the mean share skips the warm-up and the
    evaluations where LoRA is not behind; the tokens to LoRA's final loss are interpolated."""
    quality = load_bench()
    curves = {  # method, seed -> eval loss at steps 100, 200, 300, 400
        ("full", 0): [5.0, 4.0, 3.0, 2.0], ("lora", 0): [4.9, 5.0, 4.0, 3.0], ("sst", 0): [5.0, 4.5, 3.5, 2.5],
        ("full", 1): [5.0, 4.2, 3.2, 2.2], ("lora", 1): [5.5, 5.2, 4.2, 3.2], ("sst", 1): [5.6, 5.3, 4.3, 3.3],
    }
    for (method, seed), values in curves.items():
        write_run(tmp_path / "runs" / f"{method}__seed={seed}", dict(zip((100, 200, 300, 400), values)), method,
                  seed, warmup=100)
    results = [quality.summarize(quality.read_meta(f), f, tmp_path)
               for f in sorted((tmp_path / "runs").iterdir())]
    measured = {(e["row"]["method"], e["row"]["seed"]): e for e in quality.gap_measures(results)}
    assert sorted(measured) == [("full", 0), ("full", 1), ("sst", 0), ("sst", 1)]
    sst0, sst1 = measured["sst", 0], measured["sst", 1]
    assert sst0["shares"] == {100: None, 200: 0.5, 300: 0.5, 400: 0.5}  # step 100: LoRA ahead of full
    assert sst0["mean_share"] == 0.5 and sst0["n_shares"] == 3
    assert sst1["shares"] == pytest.approx({100: -0.2, 200: -0.1, 300: -0.1, 400: -0.1})
    assert sst1["mean_share"] == pytest.approx(-0.1) and sst1["n_shares"] == 3  # step 100 is warm-up
    # seed 0: LoRA ends at 3.0 (40,000 tokens); SST crosses it halfway from step 300 (3.5) to 400 (2.5)
    assert (sst0["lora_loss"], sst0["lora_tokens"]) == (3.0, 40000)
    assert sst0["tokens"] == pytest.approx(35000) and not sst0["bound"]
    assert sst0["speedup"] == pytest.approx(40000 / 35000)
    assert sst1["tokens"] is None and sst1["speedup"] is None  # never below LoRA's 3.2
    full0 = measured["full", 0]
    assert full0["tokens"] == pytest.approx(30000) and "mean_share" not in full0
    text = "\n".join(quality.gap_section(results))
    assert "| sst |  | 0 | - | 0.50 | 0.50 | 0.50 |" in text
    assert "| sst |  | mean | - | **0.20** | **0.20** | **0.20** |" in text
    assert "| sst |  | 1 | -0.100 | 3 | 3.2000 | 40,000 | not reached | not reached |" in text
    assert "| sst |  | mean | **0.200 ± 0.424** |  |  |  |  | 1 of 2 reached |" in text
    # without LoRA (or full-rank) in the run set, no gap measures
    assert quality.gap_measures([r for r in results if r["method"] != "lora"]) == []
    assert quality.gap_section([r for r in results if r["method"] != "full"]) == []


def test_tokens_to_reach_interpolates_and_says_when_the_first_evaluation_is_already_there():
    quality = load_bench()
    curve = {10: (1000, 5.0), 20: (2000, 4.0), 30: (3000, 3.0)}
    assert quality.tokens_to_reach(curve, 3.5) == (pytest.approx(2500), False)
    assert quality.tokens_to_reach(curve, 6.0) == (1000.0, True)
    assert quality.tokens_to_reach(curve, 2.0) == (None, False)


def test_best_to_picks_the_variant_with_the_best_mean_over_seeds_and_continues_every_seed(tmp_path):
    quality = load_bench()
    args = quality.parse_args(tiny_args(str(tmp_path), "--methods", "sst", "--seeds", "0,1",
                                        "--sweep", "sst:optim.lowrank_lr=1e-3,2e-3"))
    specs = quality.plan(args)
    finals = {"sst__optim.lowrank_lr=1e-3": 3.0, "sst__optim.lowrank_lr=1e-3__seed=1": 3.2,  # mean 3.1
              "sst__optim.lowrank_lr=2e-3": 2.9, "sst__optim.lowrank_lr=2e-3__seed=1": 3.5}  # best run, mean 3.2
    for spec in specs:
        write_run(spec.folder(tmp_path), {STEPS: finals[spec.name]}, "sst", spec.seed, steps=STEPS)
    winners = quality.best_of_each(specs, tmp_path, 40)
    assert [(w.name, w.seed, w.steps) for w in winners] == [
        ("sst__optim.lowrank_lr=1e-3", 0, 40), ("sst__optim.lowrank_lr=1e-3__seed=1", 1, 40)]
    assert all(w.resolved["train"]["max_steps"] == 40 and w.resolved["seed"] == w.seed for w in winners)


def test_a_folder_from_before_a_recipe_key_existed_is_the_same_run_at_its_default(tmp_path):
    quality = load_bench()
    spec = quality.plan(quality.parse_args(tiny_args(str(tmp_path), "--methods", "sst")))[0]
    folder = spec.folder(tmp_path)
    folder.mkdir(parents=True)
    older = json.loads(json.dumps(spec.resolved))
    del older["optim"]["reset"]
    (folder / "recipe.json").write_text(json.dumps(older))
    assert quality.recipe_mismatch(spec, folder) is None
    older["optim"]["reset"] = "moments"
    (folder / "recipe.json").write_text(json.dumps(older))
    assert quality.recipe_mismatch(spec, folder) == "optim.reset: 'moments' -> 'exact'"


def test_eval_band_panel_draws_a_band_only_for_several_seeds():
    plt = pytest.importorskip("matplotlib.pyplot")
    from sst_dist.plot import eval_band_panel

    def run(losses):
        return [{"step": s, "tokens": 10 * s, "eval_loss": v} for s, v in zip((1, 2, 3), losses)]

    fig, ax = plt.subplots()
    eval_band_panel(ax, [("sst", [run([5, 4, 3]), run([6, 4, 2])], {"color": "red"}),
                         ("full", [run([4, 3, 2])], {"color": "blue"})])
    (mean, single) = ax.get_lines()
    assert list(mean.get_ydata()) == [5.5, 4.0, 2.5] and list(single.get_ydata()) == [4, 3, 2]
    assert mean.get_label() == "sst (2 seeds)" and single.get_label() == "full"
    assert len(ax.collections) == 1  # one band: the two-seed curve's
    band = ax.collections[0].get_paths()[0].vertices
    assert {tuple(v) for v in band} >= {(10, 5), (30, 2), (10, 6), (30, 3)}  # min and max at each end
    plt.close(fig)

"""bench/quality.py: the six-method comparison end to end on CPU (tiny recipes), its reuse of
finished runs, the report, and the one-line errors."""

import csv
import importlib.util
import json
import math
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, quiet_env

BENCH = ROOT / "bench" / "quality.py"
sys.path.insert(0, str(BENCH.parent))  # its sibling size_recipe.py, as when it runs as a script
METHODS = ("full", "lora", "relora", "sst", "galore", "sst+galore")
STEPS = 20
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("eval_loss.png", "train_loss.png", "ppl_vs_memory.png")


def load_bench():
    spec = importlib.util.spec_from_file_location("quality_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def bench(*args, timeout=600):
    return subprocess.run([sys.executable, str(BENCH), *map(str, args)], cwd=ROOT, env=quiet_env(),
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
    assert text.splitlines()[0].startswith("| method | variant | eval loss")
    assert len([line for line in text.splitlines() if line.startswith("| ")]) == 2 + len(METHODS)
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
])
def test_user_errors_are_one_line(tmp_path, capsys, args, message):
    quality = load_bench()
    assert quality.main(tiny_args(str(tmp_path / "out"), *args)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()  # nothing started


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

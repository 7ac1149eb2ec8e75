"""bench/throughput.py: real runs through the launcher on CPU at the tiny size (the table's columns
and the file names, not timings); the FLOPs and scaling arithmetic on their own."""

import csv
import json
import subprocess
import sys

import pytest

from conftest import ROOT, quiet_env

from bench import throughput


@pytest.mark.slow
def test_a_tiny_cpu_run_reports_mfu_events_ratios_and_safe_names(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.throughput", "--size", "tiny", "--gpus", "1", "--steps", "8",
                           "--skip", "1", "--engines", "zero2", "--methods", "full,sst+galore", "--repeat", "2",
                           "--set", "sst.steps_per_iteration=3", "--set", "galore.update_proj_gap=100",
                           "--out", str(tmp_path)],
                          cwd=ROOT, env=quiet_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    names = {p.name for p in tmp_path.iterdir()}
    order = ["zero2-full-1gpu-r1", "zero2-sst-galore-1gpu-r1", "zero2-full-1gpu-r2", "zero2-sst-galore-1gpu-r2"]
    assert set(order) | {f"{n}.log" for n in order} | {"throughput.csv"} == names
    # interleaved: a log is last written when its run ends, and the runs run one after another
    assert sorted(order, key=lambda n: (tmp_path / f"{n}.log").stat().st_mtime_ns) == order
    rows = list(csv.DictReader(open(tmp_path / "throughput.csv")))
    runs = [r for r in rows if r["repeat"] != "summary"]
    assert [r["run"] for r in runs] == order and [r["repeat"] for r in runs] == ["1", "1", "2", "2"]
    flops = throughput.flops_per_token("tiny", 128)
    for row in runs:
        assert int(row["gpus"]) == 1 and float(row["tokens_per_s"]) > 0
        assert float(row["mfu"]) == pytest.approx(float(row["tokens_per_s"]) * flops / 989e12)
    full, sst = runs[0::2], runs[1::2]
    for f, s in zip(full, sst):  # resamples before steps 3 and 6 (T3 = 3): the period is read from the log
        assert s["events"] == "resample" and int(s["event_count"]) == 2 and float(s["event_period"]) == 3
        assert s["event_share"] != "" and s["first_event_s"] != "" and f["event_s"] == ""
        # each repeat's ratio is over full-rank's run of the same repeat
        assert float(s["tokens_x_full"]) == pytest.approx(float(s["tokens_per_s"]) / float(f["tokens_per_s"]))
        assert float(f["tokens_x_full"]) == 1.0

    summary = {r["method"]: r for r in rows if r["repeat"] == "summary"}
    assert [r["method"] for r in rows[len(runs):]] == ["full", "sst+galore"]
    for method, of_method in (("full", full), ("sst+galore", sst)):
        cell = summary[method]
        assert int(cell["runs"]) == 2 and int(cell["exit"]) == 0 and not cell.get("failed_run")
        for column in ("tokens_per_s", "mfu", "peak_mem_gib", "tokens_x_full"):
            values = [float(r[column]) for r in of_method]
            assert float(cell[column]) == pytest.approx(sum(values) / 2)  # the median of two
        ratios = [float(r["tokens_x_full"]) for r in of_method]
        assert float(cell["tokens_x_full_min"]) == min(ratios) and float(cell["tokens_x_full_max"]) == max(ratios)
    assert summary["sst+galore"]["events"] == "resample" and float(summary["sst+galore"]["event_count"]) == 2
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("engine"))
    for column in ("runs", "tokens/s", "x full", "min-max", "MFU", "peak GiB", "1st s", "event s", "event %"):
        assert column in lines[header]
    # one table line per cell, the spread of the ratio on it
    cell_lines = [line.split() for line in lines[header + 1:header + 3]]
    assert [(c[0], c[1], c[3]) for c in cell_lines] == [("zero2", "full", "2"), ("zero2", "sst+galore", "2")]
    low, high = (float(summary["sst+galore"][f"tokens_x_full_{end}"]) for end in ("min", "max"))
    assert cell_lines[1][6] == f"{low:.3f}-{high:.3f}"


def _run(method, repeat, tokens_per_s, **more):
    row = {"engine": "zero2", "method": method, "gpus": 1, "repeat": repeat, "run": f"{method}-r{repeat}",
           "exit": 0 if tokens_per_s else 1}
    return {**row, **({"tokens_per_s": tokens_per_s, **more} if tokens_per_s else {})}


def test_repeats_give_medians_and_the_spread_of_each_repeats_own_ratio():
    full = [_run("full", i + 1, t, peak_mem_gib=2.0) for i, t in enumerate([100.0, 110.0, 90.0, 120.0])]
    sst = [_run("sst", i + 1, t, peak_mem_gib=1.5, events="resample", event_count=2)
           for i, t in enumerate([95.0, 100.0, 99.0])] + [_run("sst", 4, None)]  # the 4th run failed
    results = [r for pair in zip(full, sst) for r in pair]
    throughput.add_ratios(results)
    assert [r.get("tokens_x_full") for r in sst] == pytest.approx([0.95, 100 / 110, 1.1, None])
    by = {r["method"]: r for r in throughput.summarize_repeats(results)}
    cell = by["sst"]
    assert cell["runs"] == 3 and cell["exit"] == 1 and cell["failed_run"] == "sst-r4"
    assert cell["tokens_per_s"] == 99.0 and cell["peak_mem_gib"] == 1.5
    # the median of the repeats' own ratios, not median(sst) / median(full) = 99 / 105
    assert cell["tokens_x_full"] == pytest.approx(0.95)
    assert cell["tokens_x_full_min"] == pytest.approx(100 / 110) and cell["tokens_x_full_max"] == pytest.approx(1.1)
    assert cell["events"] == "resample" and cell["event_count"] == 2
    assert by["full"]["runs"] == 4 and by["full"]["tokens_per_s"] == 105.0 and "failed_run" not in by["full"]
    assert by["full"]["tokens_x_full_min"] == by["full"]["tokens_x_full_max"] == 1.0
    line = throughput.format_row(cell, by["full"])
    assert " 0.950 " in line and f"{100 / 110:.3f}-1.100" in line and " 0.750 " in line  # memory: 1.5 / 2


def test_dense_flops_count_matmul_parameters_and_attention():
    # OPT-125m by hand: per layer q, k, v, o (d x d + d), fc1, fc2 (d x 4d + 4d, 4d x d + d), two
    # LayerNorms; the tied embedding once, the final LayerNorm; no position table
    d, L, vocab, seq = 768, 12, 50272, 2048
    layer = 4 * (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 2 * 2 * d
    n = L * layer + vocab * d + 2 * d
    assert throughput.flops_per_token("125m", seq) == 6 * n + 12 * L * d * seq


def test_side_by_side_gives_per_gpu_efficiency_over_the_smallest_count():
    results = [{"engine": "zero2", "method": "sst", "gpus": 1, "tokens_per_s": 100.0},
               {"engine": "zero2", "method": "sst", "gpus": 2, "tokens_per_s": 180.0},
               {"engine": "zero2", "method": "full", "gpus": 2}]  # a failed run: no figures
    (row,) = throughput.side_by_side(results)
    assert row["tokens_per_s"] == {1: 100.0, 2: 180.0} and row["efficiency"] == {2: pytest.approx(0.9)}


def test_run_names_have_no_commas_or_plus_signs():
    assert throughput.run_name("zero3", "sst+galore", 2) == "zero3-sst-galore-2gpu"
    assert throughput.run_name("zero3", "sst+galore", 2, repeat=3) == "zero3-sst-galore-2gpu-r3"
    assert throughput.safe_name("a,b+c d") == "a-b-c-d"


def test_the_first_event_is_reported_apart_from_the_repeated_ones(tmp_path):
    # steps of 1 s (1,000 tokens); resamples before steps 4, 8 and 12 (period 4) cost 5, 0.5 and
    # 0.7 s more: the first also paid a one-time cost, which a long run does not repeat
    extra = {5: 5.0, 9: 0.5, 13: 0.7}  # a record's step is 1 + the index of the step it ran before
    rows = []
    for step in range(1, 16):
        seconds = 1.0 + extra.get(step, 0.0)
        row = {"step": step, "tokens": 1000 * step, "tokens_per_s": 1000 / seconds, "elapsed_s": step, "loss": 5.0}
        if step in extra:
            row["event"] = "resample"
        rows.append(row)
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "recipe.json").write_text(json.dumps({"model": {"size": "tiny", "seq_len": 128}}))
    summary = throughput.summarize(tmp_path, skip=1, gpus=1, peak_tflops=989.0)
    assert summary["event_count"] == 3 and summary["event_period"] == 4
    assert summary["first_event_s"] == pytest.approx(5.0)
    assert summary["event_s"] == pytest.approx(0.6)
    assert summary["event_share"] == pytest.approx(0.6 / 4)


def test_a_failed_run_is_a_failed_row_not_zeros():
    results = [{"engine": "zero2", "method": "full", "gpus": 1, "repeat": 1, "run": "zero2-full-1gpu", "exit": 0,
                "tokens_per_s": 1000.0, "peak_mem_gib": 2.0},
               {"engine": "zero2", "method": "sst+galore", "gpus": 1, "repeat": 1, "run": "zero2-sst-galore-1gpu",
                "exit": 1}]
    throughput.add_ratios(results)
    full, failed = throughput.summarize_repeats(results)
    line = throughput.format_row(failed, full)
    assert "failed (exit 1)" in line and "zero2-sst-galore-1gpu.log" in line and " 0 " not in line
    line = throughput.format_row(full, full)
    assert "1.000" in line and "1.000-1.000" not in line  # one run: no spread to give


def test_deepspeed_runs_on_the_visible_gpus():
    # deepspeed --num_gpus N takes GPUs 0..N-1 whatever CUDA_VISIBLE_DEVICES says
    assert throughput.deepspeed_gpus(1, {"CUDA_VISIBLE_DEVICES": "1"}) == ["--include", "localhost:1"]
    assert throughput.deepspeed_gpus(2, {"CUDA_VISIBLE_DEVICES": "2, 3,4"}) == ["--include", "localhost:2,3"]
    assert throughput.deepspeed_gpus(2, {"CUDA_VISIBLE_DEVICES": "0"}) == ["--num_gpus", "2"]  # too few named
    assert throughput.deepspeed_gpus(2, {}) == ["--num_gpus", "2"]  # a CPU machine: gloo ranks


def test_under_zero3_only_sst_functional_layers_keep_model_compile():
    """ZeRO-3 compiles no block, so full-rank's runs there go eager; SST's functional layers
    compile alone (the 350M recipe's path), the dense path's do not."""
    assert throughput.compiles_layers_alone("recipes/opt-350m-sst.yaml", [])
    assert not throughput.compiles_layers_alone("recipes/opt-350m-full.yaml", ["--set", "model.compile=true"])
    assert not throughput.compiles_layers_alone("recipes/opt-350m-sst.yaml", ["--set", "sst.path=dense"])

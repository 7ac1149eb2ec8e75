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
def test_a_tiny_cpu_run_reports_mfu_events_and_safe_names(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.throughput", "--size", "tiny", "--gpus", "1", "--steps", "8",
                           "--skip", "1", "--engines", "zero2", "--methods", "full,sst+galore",
                           "--set", "sst.steps_per_iteration=3", "--set", "galore.update_proj_gap=100",
                           "--out", str(tmp_path)],
                          cwd=ROOT, env=quiet_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    names = {p.name for p in tmp_path.iterdir()}
    assert {"zero2-full-1gpu", "zero2-sst-galore-1gpu", "zero2-sst-galore-1gpu.log", "throughput.csv"} <= names
    assert not any("+" in n or "," in n for n in names)
    rows = {r["method"]: r for r in csv.DictReader(open(tmp_path / "throughput.csv"))}
    full, sst = rows["full"], rows["sst+galore"]
    for row in (full, sst):
        assert int(row["gpus"]) == 1 and float(row["tokens_per_s"]) > 0
        flops = throughput.flops_per_token("tiny", 128)
        assert float(row["mfu"]) == pytest.approx(float(row["tokens_per_s"]) * flops / 989e12)
    # resamples before steps 3 and 6 (T3 = 3): the period is read back from the log
    assert sst["events"] == "resample" and int(sst["event_count"]) == 2 and float(sst["event_period"]) == 3
    assert sst["event_share"] != "" and sst["first_event_s"] != "" and full["event_s"] == ""
    header = next(line for line in proc.stdout.splitlines() if line.startswith("engine"))
    for column in ("tokens/s", "MFU", "peak GiB", "1st s", "event s", "event %"):
        assert column in header


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
    full = {"engine": "zero2", "method": "full", "gpus": 1, "tokens_per_s": 1000.0, "peak_mem_gib": 2.0}
    failed = {"engine": "zero2", "method": "sst+galore", "gpus": 1, "exit": 1}
    line = throughput.format_row(failed, full)
    assert "failed (exit 1)" in line and "zero2-sst-galore-1gpu.log" in line and " 0 " not in line
    assert "1.000" in throughput.format_row(full, full)


def test_deepspeed_runs_on_the_visible_gpus():
    # deepspeed --num_gpus N takes GPUs 0..N-1 whatever CUDA_VISIBLE_DEVICES says
    assert throughput.deepspeed_gpus(1, {"CUDA_VISIBLE_DEVICES": "1"}) == ["--include", "localhost:1"]
    assert throughput.deepspeed_gpus(2, {"CUDA_VISIBLE_DEVICES": "2, 3,4"}) == ["--include", "localhost:2,3"]
    assert throughput.deepspeed_gpus(2, {"CUDA_VISIBLE_DEVICES": "0"}) == ["--num_gpus", "2"]  # too few named
    assert throughput.deepspeed_gpus(2, {}) == ["--num_gpus", "2"]  # a CPU machine: gloo ranks

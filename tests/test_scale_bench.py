"""bench/scale.py: real steps through launch/pretrain.py, on CPU at the tiny size; --search's stop."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, quiet_env

from bench import scale


def test_a_tiny_run_on_cpu_crosses_a_resample_and_reports(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.scale", "--method", "sst", "--size", "tiny", "--device", "cpu",
                           "--seq", "64", "--steps", "30", "--set", "model.build=meta", "--out", str(tmp_path)],
                          cwd=ROOT, env=quiet_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (row,) = list(csv.DictReader(open(tmp_path / "scale.csv")))
    assert row["status"] == "ok" and row["engine"] == "torch" and int(row["steps"]) == 30
    assert "11:resample" in row["events"] and "21:resample" in row["events"]  # T3 = 10
    assert float(row["tokens_per_s"]) > 0 and float(row["init_s"]) >= 0 and float(row["est_gib"]) > 0
    assert float(row["loss_last"]) < float(row["loss_first"])
    assert "| sst | tiny | 1 | torch | ok |" in (tmp_path / "scale.md").read_text()
    assert (tmp_path / "sst-tiny-1gpu" / "metrics.jsonl").is_file()
    assert "sst" in proc.stdout.splitlines()[-1]  # the table's row


def test_a_bench_killed_from_outside_leaves_the_runs_output(tmp_path):
    # the run writes stderr.txt as it goes, not after it returns: a bench killed mid-run (a job's
    # time limit) still shows how far the run got and why
    stderr_file = tmp_path / "sst-tiny-1gpu" / "stderr.txt"
    bench = subprocess.Popen([sys.executable, "-m", "bench.scale", "--method", "sst", "--size", "tiny", "--device",
                              "cpu", "--seq", "64", "--steps", "400", "--out", str(tmp_path)],
                             cwd=ROOT, env=quiet_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.time() + 240
        while "step/s" not in (stderr_file.read_text() if stderr_file.exists() else "") and time.time() < deadline:
            assert bench.poll() is None, "the bench ended before the run made progress"
            time.sleep(0.5)
    finally:
        os.killpg(bench.pid, signal.SIGKILL)  # the bench and its run, as a job scheduler would
        bench.wait()
    assert "step/s" in stderr_file.read_text()  # the trainer's progress bar, up to the kill
    assert not (tmp_path / "scale.csv").exists()  # the bench itself never got to write its table


def test_search_stops_at_the_first_size_that_does_not_fit(tmp_path, monkeypatch, capsys):
    tried = []

    def fake(args, method, size, gpus):
        tried.append(size)
        return {"method": method, "size": size, "gpus": gpus, "status": "oom" if size == "13b" else "ok"}

    monkeypatch.setattr(scale, "run_one", fake)
    assert scale.main(["--search", "--method", "full", "--sizes", "2.7b,6.7b,13b,30b", "--out", str(tmp_path)]) == 0
    assert tried == ["2.7b", "6.7b", "13b"]  # 30b is never started
    assert "largest full on 1 GPU: 6.7b; 13b: oom" in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "scale.csv")))
    assert [r["status"] for r in rows] == ["ok", "ok", "oom"]


@pytest.mark.parametrize("argv, message", [
    (["--method", "bogus", "--size", "tiny"], "--method: 'bogus'"),
    (["--method", "galore", "--size", "1.3b"], "no recipe recipes/opt-1.3b-galore.yaml"),
    (["--method", "sst"], "give --size"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, message):
    assert scale.main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1

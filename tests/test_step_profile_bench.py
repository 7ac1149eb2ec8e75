"""bench/step_profile.py: the GPU's busy time out of profiler events, the host waits out of CUDA's
sync debug warnings, the phase table on CPU under both engines the harness builds (the flow,
not timings), and ZeRO-3's hook rows."""

import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import ROOT, quiet_env, zero3_partitioned_config

from bench import step_profile


def event(start, end, device="CUDA"):
    return SimpleNamespace(time_range=SimpleNamespace(start=start, end=end),
                           device_type=SimpleNamespace(name=device))


def test_busy_time_counts_overlapping_kernels_once_and_ignores_host_events():
    events = [event(0, 10), event(5, 12), event(20, 30), event(22, 25), event(0, 100, device="CPU"),
              event(30, 31)]
    assert step_profile.busy_seconds(events) == pytest.approx((12 + 11) / 1e6)
    assert step_profile.busy_seconds([]) == 0


def test_host_waits_are_counted_per_step_by_caller():
    def warning(message, filename, lineno):
        return SimpleNamespace(message=UserWarning(message), filename=filename, lineno=lineno)

    sync = "called a synchronizing CUDA operation"
    caught = [warning(sync, "/x/site-packages/deepspeed/runtime/utils.py", 887)] * 4 + [
        warning(sync, "/x/site-packages/transformers/masking_utils.py", 269)] * 2 + [
        warning("an unrelated warning", "/x/a.py", 1)]
    waits = step_profile.waits_by_caller(caught, steps=2)
    assert waits["per_step"] == 3 and waits["steps"] == 2
    assert waits["sites"] == [("deepspeed/runtime/utils.py:887", 2.0), ("site-packages/transformers/masking_utils.py:269", 1.0)]


@pytest.mark.parametrize("engine", ["ds_configs/zero2.json", "fsdp"])
def test_the_phase_table_on_cpu_under_each_engine(engine):
    proc = subprocess.run([sys.executable, "-m", "bench.step_profile", "--device", "cpu", "--size", "tiny", "--seq", "32",
                           "--methods", "full,sst", "--warmup", "1", "--steps", "2", "--ds-config", engine],
                          cwd=ROOT, env=quiet_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert ("FSDP2" if engine == "fsdp" else "DeepSpeed zero2") in proc.stdout
    # a phase's row: milliseconds (peak GiB) for full, then for SST
    ms = {line[:12].strip(): [float(x) for x in re.findall(r"(\d+\.\d+) +\(", line)]
          for line in proc.stdout.splitlines() if line.strip()}
    assert all(len(ms[phase]) == 2 and min(ms[phase]) > 0 for phase in ("forward", "backward", "step"))
    assert ms["after_step"][1] > 0  # SST's renormalisation


def test_zero3_hooks_row_counts_each_parameter_an_sst_layer_adds(tmp_path):
    """Under ZeRO-3 the table gains the per-module hooks' host time and the parameters they
    gathered; with nothing persistent an SST layer hands ZeRO-3 one parameter more than
    nn.Linear (factors, spectral, bias against weight, bias): 12 more in the tiny OPT's 12 targets."""
    path = zero3_partitioned_config(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "bench.step_profile", "--device", "cpu", "--size", "tiny", "--seq", "32",
                           "--methods", "full,sst", "--warmup", "1", "--steps", "2", "--ds-config", str(path)],
                          cwd=ROOT, env=quiet_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = {line[:12].strip(): [float(x) for x in line[12:].split()] for line in proc.stdout.splitlines()
            if line[:12].strip() in ("fetch ms", "release ms", "gathered")}
    assert min(rows["fetch ms"]) > 0 and min(rows["release ms"]) > 0
    full, sst = rows["gathered"]
    assert sst - full == 12

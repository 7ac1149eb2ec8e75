import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sst_dist.engines import free_port  # noqa: F401 (tests import it from here)

ROOT = Path(__file__).resolve().parents[1]


# Threads per process for every run a test launches, reference and ranks alike (set_threads keeps
# an explicit OMP_NUM_THREADS). A CPU kernel splits its sums by thread count, so a 2-thread reference
# against 1-thread ranks differs from step 2 on (tiny-sst+galore: 1e-2 by step 40), while equal
# counts run bit-identical. SST_TEST_THREADS=2 runs the whole suite with 2 threads per process.
TEST_THREADS = os.environ.get("SST_TEST_THREADS", "1")


def quiet_env() -> dict:
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1", OMP_NUM_THREADS=TEST_THREADS,
               TOKENIZERS_PARALLELISM="false")
    env.pop("WORLD_SIZE", None)
    return env


def remove_shm_buffers(port: int) -> None:
    """DeepSpeed's shared-memory all-reduce leaves its buffers in /dev/shm (named by the master
    port) after the ranks exit; repeated test runs had filled 23 GiB of RAM there, so they go."""
    for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        leftover.unlink(missing_ok=True)


def run_deepspeed(args, nproc, timeout):
    """`deepspeed --num_gpus nproc ARGS` on CPU ranks: (cmd, completed process)."""
    port = free_port()
    cmd = ["deepspeed", "--num_gpus", str(nproc), "--master_port", str(port), *args]
    try:
        return cmd, subprocess.run(cmd, cwd=ROOT, env=quiet_env(), capture_output=True, text=True,
                                   timeout=timeout)
    finally:
        remove_shm_buffers(port)


def zero3_partitioned_config(folder) -> Path:
    """ds_configs/zero3.json with nothing persistent (stage3_param_persistence_threshold 0): every
    parameter partitioned, the tiny model's small ones too. Written into `folder`; returns its path."""
    config = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = Path(folder) / "zero3_partitioned.json"
    path.write_text(json.dumps(config))
    return path


def pretrain(output_dir, recipe, *extra, launcher=None, nproc=1, timeout=600, check=True):
    """Runs launch/pretrain.py as a user would: plain python, `deepspeed` or `torchrun`."""
    args = ["launch/pretrain.py", "--recipe", recipe, "--output-dir", str(output_dir),
            "--set", "wandb.mode=disabled", *extra]
    if launcher == "deepspeed":
        cmd, proc = run_deepspeed(args, nproc, timeout)
    else:
        cmd = [sys.executable, *args] if launcher is None else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), *args]
        proc = subprocess.run(cmd, cwd=ROOT, env=quiet_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_metrics(output_dir) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_rows(out, rows, proc, timeout=300):
    """Until `out`/metrics.jsonl holds `rows` rows; AssertionError if `proc` (the run) ends first,
    with the tail of `out`.log where the run writes one, or after `timeout` seconds."""
    deadline = time.time() + timeout
    path, log = Path(out) / "metrics.jsonl", Path(f"{out}.log")
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= rows:
            return
        if proc.poll() is not None:
            tail = log.read_text()[-3000:] if log.is_file() else ""
            raise AssertionError(f"run ended early ({proc.returncode}): {tail}")
        time.sleep(0.1)
    raise AssertionError(f"no {rows} rows in {path} after {timeout} s")


def losses(output_dir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(output_dir)}


def assert_curves_match(reference: dict, other: dict, rel: float, steps: int):
    assert sorted(other) == sorted(reference) == list(range(1, steps + 1)), (sorted(other), sorted(reference))
    worst = max(abs(other[s] - reference[s]) / abs(reference[s]) for s in reference)
    print(f"largest relative loss difference {worst:.3g}")  # shown by pytest -rP
    assert worst <= rel, f"largest relative loss difference {worst:.3g} > {rel}"


def engine_parity_overrides(recipe) -> tuple:
    """Overrides for the runs an engine's curve is compared on, reference and engine alike.

    The one place sharded arithmetic differs from a single process is the order in which the
    gradient-clipping norm is summed, and two parts of the methods amplify that last bit: GaLore's
    projector, the top-r singular subspace of G, is a discontinuous function of G where singular
    values crowd (a refresh turns 1e-7 into 1e-5), and SST's exact state resets restart a slot's
    Adam, whose first steps are about lr whatever the gradient's size (ZeRO-2: 1e-7 at the first
    resample, 1e-4 by step 40). Without clipping, the SST and GaLore recipes run bit-identical on
    1 and 2 ranks (on any ATen CPU capability, with TEST_THREADS threads on both sides), which
    checks the resample, reset, re-SVD and refresh paths strictly. Clipping itself is checked by
    the full-rank curves and by FSDP's float64 SST curve.
    """
    return ("--set", "optim.grad_clip=0") if ("galore" in recipe or "sst" in recipe) else ()


def assert_events_crossed(recipe, metrics):
    """The curve crossed the method's periodic work: SST resamples and a re-SVD, GaLore refreshes."""
    events = [part for m in metrics for part in m.get("event", "").split("+") if part]
    if "sst" in recipe:
        assert events.count("resample") >= 2 and events.count("resvd") >= 1, events
    if "galore" in recipe:
        assert events.count("refresh") >= 3, events


@pytest.fixture(scope="session")
def single_process_curves(tmp_path_factory):
    """Single-process (torch engine) reference runs, computed once per recipe per session."""
    cache = {}

    def get(recipe, *extra):
        key = (recipe, extra)
        if key not in cache:
            out = tmp_path_factory.mktemp("ref")
            pretrain(out, recipe, *extra)
            cache[key] = losses(out)
        return cache[key]

    return get


def assert_rounded_once(stored, exact):
    """`stored` (bf16) is `exact` (float64) rounded once to bf16: within half a bf16 unit in the last
    place of each element (8 significant bits), plus float32 arithmetic's own 2^-20. A value
    computed in bf16 steps, each rounded, strays past that."""
    import torch

    assert stored.dtype == torch.bfloat16
    exact = exact.double()
    _, exponent = torch.frexp(exact)  # |exact| in [2^(e-1), 2^e): a bf16 ulp there is 2^(e-8)
    half_ulp = torch.ldexp(torch.ones_like(exact), exponent - 9)
    error = (stored.double() - exact).abs()
    worst = (error / (half_ulp + exact.abs() * 2.0**-20)).max().item()
    assert worst <= 1.0, f"{worst:.3g} half-ulps off"

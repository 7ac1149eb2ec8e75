"""Distributed faults on 2 gloo ranks: a stalled rank ends the job within
train.collective_timeout_s with one line naming the rank; stopping a DeepSpeed job the ways the
README gives checkpoints every rank; so does killing the launcher outright."""

import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import ROOT, free_port, quiet_env, read_metrics, remove_shm_buffers, run_deepspeed, wait_for_rows
from sst_dist.checkpoint import resolve, step_name

pytestmark = pytest.mark.slow

TIMEOUT_S = 15  # long enough for 2 ranks' start-up skew on 2 busy cores


def test_a_stalled_rank_ends_the_job_within_the_collective_timeout(tmp_path, monkeypatch):
    mark = tmp_path / "stalled_at"
    for key, value in {"STALL_RANK": "1", "STALL_AT_STEP": "3", "STALL_MARK": str(mark)}.items():
        monkeypatch.setenv(key, value)  # read by the worker only; quiet_env copies os.environ
    _, proc = run_deepspeed(["tests/workers/stall_rank.py", "--recipe", "recipes/tiny-sst.yaml",
                             "--output-dir", str(tmp_path / "out"), "--ds-config", "ds_configs/zero2.json",
                             "--set", "wandb.mode=disabled", "--set", f"train.collective_timeout_s={TIMEOUT_S}"],
                            2, timeout=400)
    ended = time.time()
    assert proc.returncode != 0
    assert ended - float(mark.read_text()) < TIMEOUT_S + 30  # not gloo's default 30 minutes
    errors = [line for line in proc.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1, proc.stderr[-4000:]
    assert errors[0].split("error: ", 1)[1].startswith(
        f"rank 0 of 2: no answer from another rank within train.collective_timeout_s = {TIMEOUT_S} s ("), errors[0]
    assert "Traceback" not in proc.stderr
    assert [m["step"] for m in read_metrics(tmp_path / "out")] == [1, 2]


def start_deepspeed(tmp_path, port: int, via_wrapper: bool):
    args = ["--num_gpus", "2", "--master_port", str(port), "launch/pretrain.py",
            "--recipe", "recipes/tiny-sst.yaml", "--output-dir", str(tmp_path), "--ds-config",
            "ds_configs/zero2.json", "--set", "wandb.mode=disabled", "--max-steps", "100000"]
    cmd = [sys.executable, "launch/deepspeed_run.py", *args] if via_wrapper else ["deepspeed", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=quiet_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=not via_wrapper)


@pytest.mark.parametrize("how", ["kill the wrapper", "kill the process group"])
def test_stopping_a_deepspeed_job_checkpoints_every_rank(tmp_path, how):
    """launch/deepspeed_run.py passes SIGTERM to the ranks; with plain `deepspeed`, the README's
    `kill -TERM -- -PGID` reaches them directly. A SIGTERM to `deepspeed` alone would not."""
    port = free_port()
    proc = start_deepspeed(tmp_path, port, via_wrapper=how == "kill the wrapper")
    try:
        wait_for_rows(tmp_path, 3, proc, timeout=240)
        tree = psutil.Process(proc.pid).children(recursive=True)
        ranks = [p for p in tree if "--local_rank=" in " ".join(p.cmdline())]
        assert len(ranks) == 2, [p.cmdline() for p in tree]
        if how == "kill the wrapper":
            proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:  # a failed test leaves no training behind
            for p in psutil.Process(proc.pid).children(recursive=True):
                p.kill()
            proc.kill()
        remove_shm_buffers(port)
    _, alive = psutil.wait_procs(ranks, timeout=10)
    assert not alive  # no rank trains on unattended
    stopped = len(read_metrics(tmp_path))
    assert "checkpoint saved" in out, err[-3000:]
    candidates, warning = resolve(tmp_path)
    latest = candidates[0]
    assert warning is None and latest.name == step_name(stopped)
    shards = sorted(p.name for p in (latest / "engine").glob("*optim_states.pt"))
    assert len(shards) == 2, shards  # both ranks' ZeRO partitions: every rank saved
    if how == "kill the wrapper":
        assert proc.returncode == 0, err[-3000:]


@pytest.mark.parametrize("launcher", ["launch/deepspeed_run.py", "torchrun"])
def test_ranks_checkpoint_and_exit_when_their_launcher_is_killed(tmp_path, launcher):
    """SIGKILL leaves the launcher no chance to pass anything on: the ranks notice it is gone
    (sst_dist.runtime.watch_launcher) and all stop as on a SIGTERM."""
    port, out = free_port(), tmp_path / "out"
    args = ["launch/pretrain.py", "--recipe", "recipes/tiny-sst.yaml", "--output-dir", str(out),
            "--set", "wandb.mode=disabled", "--max-steps", "100000"]
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               *args, "--engine", "fsdp"]
    else:
        cmd = [sys.executable, launcher, "--num_gpus", "2", "--master_port", str(port), *args,
               "--ds-config", "ds_configs/zero2.json"]
    # the output into files: a pipe nobody reads while the ranks run would fill and block them
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=quiet_env(), stdout=stdout, stderr=stderr)
    ranks = []
    try:
        wait_for_rows(out, 3, proc, timeout=240)
        tree = psutil.Process(proc.pid).children(recursive=True)
        ranks = [p for p in tree if "launch/pretrain.py" in " ".join(p.cmdline()) and
                 not any(s in " ".join(p.cmdline()) for s in ("deepspeed.launcher", "torch.distributed.run"))]
        assert len(ranks) == 2, [p.cmdline() for p in tree]
        proc.kill()
        proc.wait()
        _, alive = psutil.wait_procs(ranks, timeout=240)
        assert not alive  # no rank trains on unattended
    finally:
        for p in [*ranks, *(psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else [])]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        remove_shm_buffers(port)
    err = (tmp_path / "stderr").read_text()
    assert "Traceback" not in err, err[-3000:]
    assert "is gone; checkpointing and stopping" in err, err[-3000:]  # the first rank to see it stops all
    stopped = len(read_metrics(out))
    candidates, warning = resolve(out)
    assert warning is None and candidates[0].name == step_name(stopped)
    assert not (out / "run.lock").exists()

"""Faults of one process and its disk: what would fail later is found before the first step, a
closed terminal checkpoints like a SIGTERM, a full disk is one line with the earlier checkpoints
intact, a dead launcher stops its ranks through the same stop path."""

import errno
import json
import os
import pty
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, quiet_env, read_metrics
from sst_dist import checkpoint, rundir, train
from sst_dist.checkpoint import problem, resolve, step_name
from sst_dist.config import load_recipe
from sst_dist.errors import RunError
from sst_dist.runtime import StopFlag

sys.path.insert(0, str(ROOT / "launch"))
from pretrain import parse_args  # noqa: E402

NO_SPACE = os.strerror(errno.ENOSPC)


def cli(tmp_path, capsys, *extra) -> tuple[int, list[str]]:
    """launch/pretrain.py in this process: (exit code, the error lines on stderr)."""
    from sst_dist.cli import run_cli

    code = run_cli(parse_args(["--recipe", "recipes/tiny-sst.yaml", "--output-dir", str(tmp_path / "out"),
                               "--set", "wandb.mode=disabled", *extra]))
    return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


@pytest.fixture
def signals():
    """train.main installs its stop handlers in this process: put pytest's back."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    saved = {sig: signal.getsignal(sig) for sig in sigs}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def run(out: Path, *overrides: str):
    recipe = load_recipe("recipes/tiny-sst.yaml", ["wandb.mode=disabled", *overrides])
    return train.main(train.Run(recipe, out))


# ---------------------------------------------------------------- before the first step


def test_a_held_out_split_without_a_block_stops_before_the_first_step(tmp_path, capsys, signals):
    src = tmp_path / "src"
    src.mkdir()
    words = "the spectral method trains low rank factors of every linear layer in the model".split()
    with open(src / "docs.jsonl", "w") as f:  # 60 documents: data.val_fraction 0.01 holds none out
        for i in range(60):
            f.write(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(40))}) + "\n")
    data = ("--set", "data.source=local", "--set", f"data.path={src}", "--set", "data.tokenizer=bundled",
            "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "data.num_proc=1",
            "--set", "model.seq_len=32")
    code, errors = cli(tmp_path, capsys, *data, "--set", "eval.every_steps=1000")
    assert code == 2 and len(errors) == 1, errors
    assert "eval.every_steps=1000: the held-out split" in errors[0]
    assert "holds no block of model.seq_len + 1 = 33 tokens" in errors[0] and "data.val_fraction" in errors[0]
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # not one step trained
    assert not (tmp_path / "out" / rundir.LOCK).exists()
    # without evaluations the same corpus trains
    code, errors = cli(tmp_path, capsys, *data, "--max-steps", "1")
    assert code == 0 and errors == []


def test_an_output_folder_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    real = Path.write_bytes

    def read_only(path, data):
        if path.name.startswith(".write-probe"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    with pytest.raises(RunError) as err:
        rundir.prepare(tmp_path / "out")
    assert str(err.value) == (f"--output-dir {tmp_path / 'out'}: cannot write in {tmp_path / 'out'} "
                              f"({os.strerror(errno.EROFS)})")
    assert list((tmp_path / "out").iterdir()) == []  # no probe left behind


def test_the_checkpoint_size_estimate_and_the_free_space_warning(tmp_path, monkeypatch, capsys):
    model = torch.nn.Sequential(torch.nn.Linear(10, 4), torch.nn.Linear(4, 3))
    model[1].weight.data = model[1].weight.data.bfloat16()
    model[1].weight.requires_grad_(False)
    model[1].bias.data = model[1].bias.data.bfloat16()  # trainable and narrow: an fp32 master too
    model.register_buffer("scale", torch.ones(5, dtype=torch.float64))
    # fp32 trainable: 4 + 8 (moments) + 4 (age) bytes an element; bf16 frozen: 2; bf16 trainable:
    # 2 + 8 + 4 + 4 (master); the buffer: 8
    assert checkpoint.estimated_size(model) == 44 * 16 + 12 * 2 + 3 * 18 + 5 * 8
    checkpoint.check_free_space(tmp_path, model)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 100))
    checkpoint.check_free_space(tmp_path, model)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: --output-dir {tmp_path}: 0.00 GiB free")


# ---------------------------------------------------------------- signals


def test_sighup_checkpoints_even_when_the_terminal_is_gone(tmp_path):
    """A closed terminal: SIGHUP, and every later write to it fails (EIO). The run saves at the end
    of its step, exits 0 and releases run.lock."""
    master, slave = pty.openpty()
    cmd = [sys.executable, "launch/pretrain.py", "--recipe", "recipes/tiny-sst.yaml", "--output-dir",
           str(tmp_path), "--set", "wandb.mode=disabled", "--max-steps", "100000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=quiet_env(), stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=slave, start_new_session=True,
                            # as a terminal's job starts: a SIGHUP ignored here (pytest under nohup) would be
                            # inherited, and the run rightly keeps ignoring it
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    os.close(slave)
    os.set_blocking(master, False)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                os.read(master, 65536)  # keep the terminal's buffer from filling
            except OSError:
                pass
            if (tmp_path / "metrics.jsonl").exists() and len(read_metrics(tmp_path)) >= 3:
                break
            time.sleep(0.1)
        os.close(master)  # the terminal hangs up
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped = len(read_metrics(tmp_path))
    candidates, warning = resolve(tmp_path)
    assert warning is None and candidates[0].name == step_name(stopped)
    assert not (tmp_path / rundir.LOCK).exists()


def test_an_ignored_sighup_stays_ignored(signals):
    """Under nohup a closed terminal must not stop the run."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    StopFlag()
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    flag = StopFlag()
    signal.raise_signal(signal.SIGHUP)
    assert flag.raised


# ---------------------------------------------------------------- a full disk


def test_a_failed_save_removes_its_folder_and_keeps_the_earlier_checkpoint(tmp_path, monkeypatch, signals):
    from sst_dist.engines.torch import TorchEngine

    real_save, sizes = TorchEngine.save, {}

    def save(engine, path):
        if path.name == step_name(6) + ".partial":
            (path / "state.pt").write_bytes(bytes(1000))
            raise OSError(errno.ENOSPC, NO_SPACE)
        real_save(engine, path)

    def check_free_space(out, model):
        sizes["estimate"] = checkpoint.estimated_size(model)

    monkeypatch.setattr(TorchEngine, "save", save)
    monkeypatch.setattr(checkpoint, "check_free_space", check_free_space)
    with pytest.raises(RunError) as err:
        run(tmp_path, "train.max_steps=6", "checkpoint.every_steps=3")
    partial = checkpoint.checkpoint_root(tmp_path) / (step_name(6) + ".partial")
    assert str(err.value).startswith(f"cannot write checkpoint {partial}: {NO_SPACE}; it is removed")
    assert not partial.exists()
    candidates, warning = resolve(tmp_path)
    assert warning is None and [p.name for p in candidates] == [step_name(3)]
    assert problem(candidates[0]) is None
    assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, 7))
    assert not (tmp_path / rundir.LOCK).exists()
    # the estimate covers what a checkpoint holds, without doubling it
    written = sum(p.stat().st_size for p in candidates[0].rglob("*") if p.is_file())
    assert written <= sizes["estimate"] <= 1.5 * written


def test_a_file_size_limit_during_a_save_is_one_line(tmp_path):
    """torch.save's own error names no errno: the line says a file size limit is set."""
    limit = 2**20  # above every log file of the run, below its checkpoint (about 7 MiB)

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    cmd = [sys.executable, "launch/pretrain.py", "--recipe", "recipes/tiny-sst.yaml", "--output-dir",
           str(tmp_path), "--set", "wandb.mode=disabled", "--max-steps", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=quiet_env(), capture_output=True, text=True, timeout=300,
                          preexec_fn=limited)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    partial = checkpoint.checkpoint_root(tmp_path) / (step_name(2) + ".partial")
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot write checkpoint {partial}: "), errors
    assert f"a file size limit is set (ulimit -f {limit // 1024})" in errors[0]
    assert not partial.exists() and resolve(tmp_path) == ([], None)


def test_a_metrics_row_that_cannot_be_written_saves_a_checkpoint_then_stops(tmp_path, monkeypatch, signals):
    from sst_dist.metrics import MetricsLogger

    real_log = MetricsLogger.log

    class FullDisk:  # metrics.jsonl as the disk fills: part of a line written, then ENOSPC
        def __init__(self, file):
            self.file = file

        def write(self, text):
            self.file.write(text[:10])
            self.file.flush()
            raise OSError(errno.ENOSPC, NO_SPACE)

        def close(self):
            self.file.close()

    def log(logger, record):
        if record["step"] == 4 and logger.file is not None:
            logger.file = FullDisk(logger.file)
        return real_log(logger, record)

    monkeypatch.setattr(MetricsLogger, "log", log)
    with pytest.raises(RunError) as err:
        run(tmp_path, "train.max_steps=20")
    assert str(err.value) == (f"cannot append step 4 to {tmp_path / 'metrics.jsonl'}: {NO_SPACE}; "
                              "checkpoint saved at step 5: free space, then re-run to resume")
    candidates, _ = resolve(tmp_path)
    assert [p.name for p in candidates] == [step_name(5)]  # the steps trained are kept
    assert not (tmp_path / rundir.LOCK).exists()
    monkeypatch.undo()
    run(tmp_path, "train.max_steps=6")  # resumes at step 5; the torn row is dropped
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 6]


def test_an_evaluation_log_that_cannot_be_written_is_one_line_and_the_result_is_printed(tmp_path, monkeypatch,
                                                                                      capsys):
    from sst_dist import evaluate
    from sst_dist.engines import DistributedContext

    monkeypatch.setattr(evaluate, "run_eval", lambda *args: {"eval_loss": 1.5, "eval_ppl": 4.48})
    (tmp_path / "eval.jsonl").mkdir()  # cannot be opened for appending
    engine = type("Engine", (), {"forward_context": lambda self: torch.no_grad(), "model": None})()
    with pytest.raises(RunError) as err:
        evaluate.evaluate_checkpoint(engine, None, None, "cpu", tmp_path, tmp_path / "step_0000003", 3,
                                     DistributedContext())
    assert str(err.value) == (f"cannot append the evaluation to {tmp_path / 'eval.jsonl'}: "
                              f"{os.strerror(errno.EISDIR)} (the result is the line above)")
    assert json.loads(capsys.readouterr().out) == {"step": 3, "checkpoint": "step_0000003", "eval_loss": 1.5,
                                                   "eval_ppl": 4.48}


def test_write_atomic_leaves_the_old_file_and_no_temporary_one_when_the_disk_is_full(tmp_path, monkeypatch):
    target = tmp_path / "latest"
    target.write_text("step_0000003")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, NO_SPACE)))
    with pytest.raises(OSError):
        rundir.write_atomic(target, "step_0000006")
    assert target.read_text() == "step_0000003" and [p.name for p in tmp_path.iterdir()] == ["latest"]


# ---------------------------------------------------------------- a dead launcher


WATCHER = """
import os, signal, sys, time
from sst_dist.runtime import watch_launcher
signal.signal(signal.SIGTERM, lambda *a: (open(sys.argv[1], "w").write("stopped"), os._exit(0)))
print("watching" if watch_launcher(interval_s=0.05) else "nothing to watch", flush=True)
time.sleep(60)
"""


def test_a_rank_stops_when_its_launcher_dies(tmp_path):
    """The launcher (the parent) killed outright: the rank sends itself SIGTERM, the stop path."""
    mark = tmp_path / "stopped"
    # the launcher: starts the rank (LOCAL_RANK set, as torchrun and deepspeed do) and waits
    launcher = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, os; subprocess.run([sys.executable, '-c', sys.argv[1], sys.argv[2]], "
        "env=dict(os.environ, LOCAL_RANK='0'))"), WATCHER, str(mark)],
        cwd=ROOT, env=quiet_env(), stdout=subprocess.PIPE, text=True)
    assert launcher.stdout.readline().strip() == "watching"
    launcher.kill()
    launcher.wait()
    deadline = time.time() + 30
    while not mark.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert mark.read_text() == "stopped"


@pytest.mark.parametrize("where", ["this host", "another host"])
def test_a_rank_stops_when_the_deepspeed_wrapper_dies(tmp_path, where):
    """launch/deepspeed_run.py is not the ranks' parent: they watch it by the pid it names, on its
    own host only (on another host that pid is another process)."""
    mark = tmp_path / "stopped"
    wrapper = subprocess.Popen(["sleep", "60"])
    host = socket.gethostname() if where == "this host" else "elsewhere"
    env = dict(quiet_env(), SST_DIST_SUPERVISOR=f"{host}:{wrapper.pid}")
    env.pop("LOCAL_RANK", None)
    rank = subprocess.Popen([sys.executable, "-c", WATCHER, str(mark)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        watching = rank.stdout.readline().strip()
        assert watching == ("watching" if where == "this host" else "nothing to watch")
        wrapper.kill()
        wrapper.wait()
        if where == "this host":
            assert rank.wait(timeout=30) == 0 and mark.read_text() == "stopped"
        else:
            time.sleep(0.5)
            assert rank.poll() is None and not mark.exists()
    finally:
        rank.kill()


# ---------------------------------------------------------------- FSDP2's checkpoints


def test_a_damaged_dcp_checkpoint_gives_way_to_the_next_older_one(tmp_path, monkeypatch, capsys, signals):
    """DCP reports a failed load as CheckpointException, a BaseException: the fallback sees it too."""
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)  # a world of one sets them; put back after

    def fsdp(*overrides):
        recipe = load_recipe("recipes/tiny-sst.yaml", ["wandb.mode=disabled", "checkpoint.every_steps=2",
                                                      *overrides])
        return train.main(train.Run(recipe, tmp_path, engine="fsdp"))

    fsdp("train.max_steps=4")
    metadata = checkpoint.checkpoint_root(tmp_path) / step_name(4) / ".metadata"
    damaged = bytearray(metadata.read_bytes())
    damaged[len(damaged) // 2:] = bytes(len(damaged) - len(damaged) // 2)  # same size: passes problem()
    metadata.write_bytes(damaged)
    capsys.readouterr()
    assert fsdp("train.max_steps=5")["step"] == 5
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning: cannot load")]
    assert len(warnings) == 1 and warnings[0].startswith(
        f"warning: cannot load {metadata.parent} ("), captured.err[-2000:]
    assert f"resuming from {checkpoint.checkpoint_root(tmp_path) / step_name(2)} at step 2" in captured.out
    assert "Traceback" not in captured.err
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]

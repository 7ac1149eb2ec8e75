"""Progress is never lost: which checkpoint a run resumes from, what pruning keeps, metrics after a
kill, the divergence guard, one run per output folder, resume compatibility, output folder errors."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from conftest import ROOT, free_port, losses, pretrain, quiet_env, read_metrics, wait_for_rows
from sst_dist import checkpoint, rundir
from sst_dist.errors import RunError
from sst_dist.rundir import RunLock

RECIPE = "recipes/tiny-sst.yaml"


# ----------------------------------------------------------------------------- helpers

def fake_checkpoint(out, step, keep=100, files=None):
    """A committed checkpoint holding `files` (name -> bytes) instead of engine state."""
    partial = checkpoint.partial_dir(out, step)
    for name, data in (files or {"state.pt": b"x" * 100}).items():
        (partial / name).write_bytes(data)
    return checkpoint.commit(out, step, {"step": step}, keep)


def names(paths):
    return [p.name for p in paths]


def spawn(out, *extra, launcher=None, nproc=1, recipe=RECIPE):
    """launch/pretrain.py in the background, its output in a file beside `out` (a pipe nobody reads
    would fill and stall it): (process, master port)."""
    port = free_port()
    args = ["launch/pretrain.py", "--recipe", recipe, "--output-dir", str(out), "--set", "wandb.mode=disabled",
            *extra]
    if launcher == "deepspeed":
        cmd = ["deepspeed", "--num_gpus", str(nproc), "--master_port", str(port), *args]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(port), *args]
    else:
        cmd = [sys.executable, *args]
    with open(f"{out}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=quiet_env(), stdout=log, stderr=subprocess.STDOUT)
    return proc, port


def kill_9(proc, port):
    """SIGKILL for the launcher and every rank at once, as when a node dies."""
    tree = [proc.pid] + [child.pid for child in psutil.Process(proc.pid).children(recursive=True)]
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)
    for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        leftover.unlink(missing_ok=True)


def one_error_line(proc):
    """The run stopped with exit code 2 and a single `error: ...` line, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors, proc.stderr[-3000:]
    return errors[0]


def state_is_finite(folder) -> bool:
    state = torch.load(Path(folder) / "state.pt", weights_only=True)

    def tensors(x):
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, dict):
            for v in x.values():
                yield from tensors(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from tensors(v)
    return all(torch.isfinite(t).all() for t in tensors(state) if t.is_floating_point())


def steps_once(out, last):
    steps = [m["step"] for m in read_metrics(out)]
    assert steps == list(range(1, last + 1)), steps


def assert_replay_matches(before: dict, after: dict):
    """Steps trained twice (before a kill or a fallback, and again after) give the same loss."""
    common = sorted(set(before) & set(after))
    assert common
    for step in common:
        assert abs(before[step] - after[step]) <= 1e-6 * abs(before[step]), (step, before[step], after[step])


@pytest.fixture(scope="module")
def finished_4(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4; tests work on copies."""
    out = tmp_path_factory.mktemp("finished") / "run"
    pretrain(out, RECIPE, "--max-steps", "4", "--set", "checkpoint.every_steps=2")
    return out


@pytest.fixture
def run_copy(finished_4, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_4, out)
    return out


# ----------------------------------------------------------------------------- which checkpoint

DAMAGES = {  # what is done to checkpoints/ (steps 10 and 20, latest = 20) -> (first choice, reason)
    "latest names a missing folder": (lambda root: (root / "latest").write_text("step_0000030"),
                                      "step_0000020", "latest names step_0000030 (missing)"),
    "latest is empty": (lambda root: (root / "latest").write_text(""), "step_0000020", "latest is empty"),
    "no trainer.json": (lambda root: (root / "step_0000020" / "trainer.json").unlink(),
                        "step_0000010", "latest names step_0000020 (no trainer.json)"),
    "model file truncated": (lambda root: (root / "step_0000020" / "state.pt").write_bytes(b"x" * 50),
                             "step_0000010", "latest names step_0000020 (state.pt truncated (50 of 100 bytes))"),
    "model file missing": (lambda root: (root / "step_0000020" / "state.pt").unlink(),
                           "step_0000010", "latest names step_0000020 (state.pt missing)"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_broken_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path, damage):
    for step in (10, 20):
        fake_checkpoint(tmp_path, step)
    spoil, first, why = DAMAGES[damage]
    spoil(checkpoint.checkpoint_root(tmp_path))
    found, warning = checkpoint.resolve(tmp_path)
    assert names(found) == [name for name in ("step_0000020", "step_0000010") if name <= first]
    assert warning.startswith("warning: ") and why in warning and f"resuming from {first}" in warning
    assert "\n" not in warning


def test_latest_is_used_when_complete_and_the_older_ones_follow(tmp_path):
    for step in (5, 10, 20):
        fake_checkpoint(tmp_path, step)
    found, warning = checkpoint.resolve(tmp_path)
    assert names(found) == ["step_0000020", "step_0000010", "step_0000005"] and warning is None
    assert checkpoint.resolve(tmp_path / "fresh") == ([], None)
    # latest names an older checkpoint (a save killed between its rename and `latest`): said, not hidden
    (checkpoint.checkpoint_root(tmp_path) / "latest").write_text("step_0000010")
    found, warning = checkpoint.resolve(tmp_path)
    assert names(found) == ["step_0000010", "step_0000005"] and "not from the newer step_0000020" in warning


@pytest.mark.parametrize("damage", ["every folder incomplete", "latest names a missing folder"])
def test_no_fresh_start_while_step_folders_exist(tmp_path, damage):
    fake_checkpoint(tmp_path, 10)
    root = checkpoint.checkpoint_root(tmp_path)
    if damage == "every folder incomplete":
        (root / "step_0000010" / "trainer.json").unlink()
        (root / "step_0000020").mkdir()
    else:
        shutil.rmtree(root / "step_0000010")
    with pytest.raises(RunError, match="no complete checkpoint .*To start fresh, move or delete"):
        checkpoint.resolve(tmp_path)


def test_pruning_is_numeric_and_spares_the_new_and_the_resumed_checkpoint(tmp_path):
    # past step 9,999,999 names sort before numbers: by name, the new checkpoint went at once
    fake_checkpoint(tmp_path, 9_999_999, keep=2)
    fake_checkpoint(tmp_path, 10_000_000, keep=2)
    fake_checkpoint(tmp_path, 10_000_001, keep=2)
    assert names(checkpoint.step_folders(tmp_path)) == ["step_10000000", "step_10000001"]
    # a run resumed from step 10 (step 30, higher, could not be loaded) writes step 15 with keep 1
    other = tmp_path / "other"
    for step in (10, 30):
        fake_checkpoint(other, step)
    resumed_from = checkpoint.checkpoint_root(other) / "step_0000010"
    partial = checkpoint.partial_dir(other, 15)
    (partial / "state.pt").write_bytes(b"y")
    (checkpoint.checkpoint_root(other) / "step_0000012.partial").mkdir()  # a killed save
    (checkpoint.checkpoint_root(other) / "step_0000011").mkdir()  # incomplete, older than the new one
    checkpoint.commit(other, 15, {"step": 15}, keep=1, resumed_from=resumed_from)
    assert sorted(p.name for p in checkpoint.checkpoint_root(other).iterdir()) == [
        "latest", "step_0000010", "step_0000015", "step_0000030"]


def test_logs_are_cut_back_to_the_resumed_step_atomically(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    assert rundir.cut_log(log, 5) == 3  # steps 6, 7 and the torn line
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert rundir.cut_log(log, 5) == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


# ----------------------------------------------------------------------------- the trainer, end to end

def test_a_truncated_latest_resumes_from_the_older_checkpoint(run_copy):
    before = losses(run_copy)
    (run_copy / "checkpoints" / "step_0000004" / "state.pt").write_bytes(b"\0" * 1000)
    proc = pretrain(run_copy, RECIPE, "--max-steps", "6")
    warning = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1 and "step_0000004" in warning[0] and "truncated" in warning[0], proc.stderr
    assert "resuming from" in proc.stdout and "step_0000002 at step 2" in proc.stdout
    steps_once(run_copy, 6)
    assert_replay_matches(before, losses(run_copy))
    assert (run_copy / "checkpoints" / "step_0000002").is_dir()  # resumed from: kept


def test_an_unloadable_latest_falls_back_and_pruning_keeps_what_matters(tmp_path):
    out = tmp_path / "run"
    pretrain(out, RECIPE, "--max-steps", "9", "--set", "checkpoint.every_steps=3", "--set", "checkpoint.keep=3")
    before = losses(out)
    state = out / "checkpoints" / "step_0000009" / "state.pt"
    state.write_bytes(b"\1" * state.stat().st_size)  # same size: only loading it can tell
    proc = pretrain(out, RECIPE, "--max-steps", "8", "--set", "checkpoint.every_steps=2",
                    "--set", "checkpoint.keep=1")  # below step 9: the step of latest alone is no reason to stop
    assert "warning: cannot load" in proc.stderr and "step_0000009" in proc.stderr
    assert "step_0000006 at step 6" in proc.stdout
    steps_once(out, 8)
    assert_replay_matches(before, losses(out))
    # keep 1: the newest by step (9), the one just written (8) and the one resumed from (6) stay
    assert names(checkpoint.step_folders(out)) == ["step_0000006", "step_0000008", "step_0000009"]
    assert (out / "checkpoints" / "latest").read_text() == "step_0000008"


def test_no_complete_checkpoint_stops_instead_of_starting_over(run_copy):
    for step in (2, 4):
        (run_copy / "checkpoints" / checkpoint.step_name(step) / "trainer.json").unlink()
    metrics = (run_copy / "metrics.jsonl").read_text()
    line = one_error_line(pretrain(run_copy, RECIPE, "--max-steps", "6", check=False))
    assert "no complete checkpoint" in line and "To start fresh" in line
    assert (run_copy / "metrics.jsonl").read_text() == metrics
    assert names(checkpoint.step_folders(run_copy)) == ["step_0000002", "step_0000004"]


def test_divergence_stops_without_saving_and_a_lower_lr_resumes(run_copy, single_process_curves):
    reference = single_process_curves(RECIPE)
    # step 5 at lr 1e4 is finite and blows the weights up; step 6 is NaN, and also the final step
    diverging = ("--set", "optim.lr=1e4", "--set", "optim.lowrank_lr=1e4", "--set", "optim.warmup_steps=0")
    proc = pretrain(run_copy, RECIPE, "--max-steps", "6", *diverging, check=False)
    line = one_error_line(proc)
    assert "diverged at step 6" in line and "step_0000004" in line and "--set optim.lr=" in line
    assert names(checkpoint.step_folders(run_copy)) == ["step_0000002", "step_0000004"]
    assert all(state_is_finite(p) for p in checkpoint.step_folders(run_copy))
    # the recipe's lr again: the run resumes from step 4 and follows the uninterrupted curve
    proc = pretrain(run_copy, RECIPE, "--max-steps", "8")
    assert "step_0000004 at step 4" in proc.stdout
    steps_once(run_copy, 8)
    resumed = losses(run_copy)
    for step in range(1, 9):
        assert abs(resumed[step] - reference[step]) <= 1e-6 * abs(reference[step]), step


def test_a_divergence_read_one_step_late_saves_nothing_after_it(tmp_path):
    """A step that is not a save step is read once the next step is queued: its divergence stops
    the run there, and the step queued after it is neither logged nor saved."""
    out, recipe = tmp_path / "run", "recipes/tiny-full.yaml"
    pretrain(out, recipe, "--max-steps", "4", "--set", "checkpoint.every_steps=2")
    # from step 5 at lr 1e4: step 6's gradient norm is inf; the next save would be step 8
    proc = pretrain(out, recipe, "--max-steps", "9", "--set", "checkpoint.every_steps=4", "--set", "optim.lr=1e4",
                    "--set", "optim.warmup_steps=0", check=False)
    line = one_error_line(proc)
    assert "diverged at step 6" in line and "gradient norm inf" in line and "step_0000004" in line
    steps_once(out, 6)
    assert names(checkpoint.step_folders(out)) == ["step_0000002", "step_0000004"]
    assert all(state_is_finite(p) for p in checkpoint.step_folders(out))


def test_kill_9_mid_run_then_every_step_is_logged_once(tmp_path):
    out = tmp_path / "run"
    proc, port = spawn(out, "--max-steps", "100000", "--set", "checkpoint.every_steps=3")
    wait_for_rows(out, 8, proc)
    kill_9(proc, port)
    before = losses(out)
    assert (out / rundir.LOCK).exists()  # left behind by the killed run
    proc = pretrain(out, RECIPE, "--max-steps", "14")
    assert "took over the lock" in proc.stderr
    steps_once(out, 14)
    assert_replay_matches(before, losses(out))
    assert not (out / rundir.LOCK).exists()


def test_a_second_run_in_the_same_folder_stops_naming_the_first(tmp_path):
    out = tmp_path / "run"
    first, _ = spawn(out, "--max-steps", "100000")
    try:
        wait_for_rows(out, 1, first)
        line = one_error_line(pretrain(out, RECIPE, check=False))
        assert f"in use by pid {first.pid} on {socket.gethostname()}" in line
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    assert first.returncode == 0
    steps = [m["step"] for m in read_metrics(out)]
    assert steps == list(range(1, len(steps) + 1))  # the second run wrote nothing


def test_the_lock_names_its_holder_and_stale_ones_are_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        theirs = RunLock(tmp_path)
        theirs.me = {"host": socket.gethostname(), "pid": holder.pid, "start": rundir.process_start(holder.pid)}
        assert theirs.acquire() is None
        with pytest.raises(RunError, match=f"in use by pid {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    mine = RunLock(tmp_path)
    assert f"took over the lock of pid {holder.pid}" in mine.acquire()
    assert json.loads((tmp_path / rundir.LOCK).read_text())["pid"] == os.getpid()
    mine.release()
    assert not (tmp_path / rundir.LOCK).exists()
    # another host's lock cannot be checked from here: it stops the run
    (tmp_path / rundir.LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    with pytest.raises(RunError, match="in use by pid 1 on elsewhere"):
        RunLock(tmp_path).acquire()


def test_resume_settings_are_checked_up_front(run_copy):
    recipe_json = (run_copy / "recipe.json").read_text()
    metrics = (run_copy / "metrics.jsonl").read_text()
    line = one_error_line(pretrain(run_copy, RECIPE, "--max-steps", "6", "--set", "rank=8",
                                   "--set", "model.seq_len=64", "--set", "method=lora", check=False))
    assert "step_0000004" in line and "method sst -> lora" in line and "rank 16 -> 8" in line
    assert "model.seq_len 128 -> 64" in line
    line = one_error_line(pretrain(run_copy, RECIPE, "--max-steps", "6", "--engine", "fsdp", check=False))
    assert "engine torch -> fsdp" in line
    assert (run_copy / "recipe.json").read_text() == recipe_json
    assert (run_copy / "metrics.jsonl").read_text() == metrics
    proc = pretrain(run_copy, RECIPE, "--max-steps", "6", "--set", "optim.lr=1e-3")
    changed = [line for line in proc.stdout.splitlines() if line.startswith("resuming with changed settings")]
    assert len(changed) == 1 and "optim.lr 0.003 -> 0.001" in changed[0] and "train.max_steps 4 -> 6" in changed[0]
    assert json.loads((run_copy / "recipe.json").read_text())["optim"]["lr"] == 1e-3
    steps_once(run_copy, 6)
    # a cosine ends at train.max_steps: moving the end re-stretches it, said in one warning line
    proc = pretrain(run_copy, RECIPE, "--max-steps", "7", "--set", "optim.lr=1e-3", "--set", "optim.schedule=cosine")
    warned = [line for line in proc.stdout.splitlines() if line.startswith("warning: optim.schedule=cosine")]
    assert len(warned) == 1 and "now 7" in warned[0] and "step 6" in warned[0], proc.stdout


def test_check_resume_world_size_matters_for_zero_only():
    def settings(engine, world, stage=None):
        return checkpoint.run_settings({"rank": 16, "optim": {"lr": 1.0}}, engine=engine, zero_stage=stage,
                                       world_size=world, vocab_size=100)
    path = Path("step_0000004")
    saved = {"settings": settings("fsdp", 2)}
    assert checkpoint.check_resume(path, saved, settings("fsdp", 1)) == []
    with pytest.raises(RunError, match="world size 2 -> 1"):
        checkpoint.check_resume(path, {"settings": settings("deepspeed", 2, 2)}, settings("deepspeed", 1, 2))
    with pytest.raises(RunError, match="ZeRO stage 2 -> 3"):
        checkpoint.check_resume(path, {"settings": settings("deepspeed", 2, 2)}, settings("deepspeed", 2, 3))
    assert checkpoint.check_resume(path, {"step": 4}, settings("torch", 1)) == []  # older checkpoints


def test_a_finished_run_says_there_is_nothing_to_do(run_copy):
    recipe_json = run_copy / "recipe.json"
    written = recipe_json.stat().st_mtime_ns, recipe_json.read_text()
    metrics = (run_copy / "metrics.jsonl").read_text()
    for extra in (("--max-steps", "3"), ("--max-steps", "4", "--set", "optim.lr=1e-3")):
        proc = pretrain(run_copy, RECIPE, *extra)
        assert proc.stdout.strip().splitlines()[-1].startswith("nothing to do: "), proc.stdout
        assert "step_0000004 is at step 4" in proc.stdout
    assert (recipe_json.stat().st_mtime_ns, recipe_json.read_text()) == written
    assert (run_copy / "metrics.jsonl").read_text() == metrics


def _drop_file_permissions() -> list:
    """A prefix that runs a command without root's permission override, or None where impossible."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}"]


@pytest.mark.parametrize("problem", ["a file", "under a file", "read-only"])
def test_output_folder_problems_are_one_line(tmp_path, problem):
    out = tmp_path / "out"
    prefix = []
    if problem == "a file":
        out.write_text("x")
        expected = "is a file, not a folder"
    elif problem == "under a file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
        expected = f"is inside {tmp_path / 'file'}, which is a file"
    else:
        prefix = _drop_file_permissions()
        if prefix is None:
            pytest.skip("root without setpriv: permissions are not enforced")
        out.mkdir()
        out.chmod(0o555)
        expected = "is read-only"
    cmd = [*prefix, sys.executable, "launch/pretrain.py", "--recipe", RECIPE, "--output-dir", str(out),
           "--set", "wandb.mode=disabled"]
    proc = subprocess.run(cmd, cwd=ROOT, env=quiet_env(), capture_output=True, text=True, timeout=300)
    if problem == "read-only":
        out.chmod(0o755)
    line = one_error_line(proc)
    assert f"--output-dir {out}" in line and expected in line


# ----------------------------------------------------------------------------- two ranks

@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_kill_9_on_two_ranks_then_every_step_is_logged_once(tmp_path, launcher):
    out = tmp_path / "run"
    engine = ("--ds-config", "ds_configs/zero2.json") if launcher == "deepspeed" else ("--engine", "fsdp")
    extra = (*engine, "--set", "checkpoint.every_steps=2")
    proc, port = spawn(out, *extra, "--max-steps", "100000", launcher=launcher, nproc=2)
    wait_for_rows(out, 5, proc)
    kill_9(proc, port)
    before = losses(out)
    pretrain(out, RECIPE, *extra, "--max-steps", "10", launcher=launcher, nproc=2)
    steps_once(out, 10)
    assert_replay_matches(before, losses(out))


@pytest.mark.slow
def test_zero_checkpoints_resume_only_on_their_world_size_and_stage(tmp_path):
    pretrain(tmp_path, RECIPE, "--ds-config", "ds_configs/zero2.json", "--max-steps", "2", launcher="deepspeed",
             nproc=2)
    one = pretrain(tmp_path, RECIPE, "--ds-config", "ds_configs/zero2.json", "--max-steps", "4", check=False)
    assert "world size 2 -> 1" in one_error_line(one)
    # both ranks stop on the same line; neither is left waiting for the other
    three = pretrain(tmp_path, RECIPE, "--ds-config", "ds_configs/zero3.json", "--max-steps", "4",
                     launcher="deepspeed", nproc=2, timeout=300, check=False)
    assert three.returncode != 0 and "Traceback" not in three.stderr, three.stderr[-3000:]
    assert "ZeRO stage 2 -> 3" in three.stderr
    steps_once(tmp_path, 2)


@pytest.mark.slow
def test_a_held_lock_stops_every_rank(tmp_path):
    tmp_path.joinpath(rundir.LOCK).write_text(json.dumps(
        {"host": socket.gethostname(), "pid": os.getpid(), "start": rundir.process_start(os.getpid())}))
    # (torchrun prints its own traceback for any rank that exits non-zero; deepspeed's launcher does not)
    proc = pretrain(tmp_path, RECIPE, "--ds-config", "ds_configs/zero2.json", launcher="deepspeed", nproc=2,
                    timeout=300, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # rank 0 decided and told rank 1, which stopped on the same line instead of waiting for rank 0
    assert proc.stderr.count(f"error: --output-dir {tmp_path} is in use by pid {os.getpid()}") == 2, proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()

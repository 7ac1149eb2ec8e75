"""The single-process trainer end to end: recipes learn, runs resume exactly, signals checkpoint."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, losses, pretrain, quiet_env, read_metrics
from sst_dist.runtime import set_threads


@pytest.mark.parametrize("method", ["sst", "full", "lora", "relora", "galore", "sst+galore"])
def test_tiny_recipes_reduce_the_loss(tmp_path, single_process_curves, method):
    curve = single_process_curves(f"recipes/tiny-{method}.yaml")
    assert sorted(curve) == list(range(1, 41))
    first, last = sum(curve[s] for s in (1, 2, 3)) / 3, sum(curve[s] for s in (38, 39, 40)) / 3
    assert last < first - 1.0, (first, last)


@pytest.mark.parametrize("method", ["sst", "full", "lora", "relora", "galore", "sst+galore"])
def test_every_method_trains_under_bf16_autocast_on_cpu(tmp_path, single_process_curves, method):
    """train.dtype: bfloat16 runs the forward and backward under autocast, on a CPU as on a GPU,
    so mixed precision is tested where CI runs; fp32 masters and states either way."""
    recipe = f"recipes/tiny-{method}.yaml"
    pretrain(tmp_path, recipe, "--max-steps", "3", "--set", "train.dtype=bfloat16")
    mixed, full = losses(tmp_path), single_process_curves(recipe)
    assert sorted(mixed) == [1, 2, 3]
    for step in (1, 2, 3):
        assert math.isfinite(mixed[step])
        assert mixed[step] != full[step]  # bf16 arithmetic really ran
        assert abs(mixed[step] - full[step]) < 0.01 * full[step]


@pytest.mark.parametrize("method", ["full", "lora", "relora", "galore", "sst", "sst+galore"])
def test_frozen_tensors_stay_bf16_through_training_and_its_merges(method):
    """model.frozen_dtype bfloat16 under bf16 compute: three steps that cross each method's
    periodic work (an SST resample, a ReLoRA* reset, a GaLore refresh: each writes into frozen
    tensors) leave every frozen tensor bf16, and every trained one and its AdamW state float32.
    The trainer's own build_run and train_step, in this process."""
    from sst_dist.config import load_recipe
    from sst_dist.engines import distributed_context
    from sst_dist.train import build_run, train_step

    vocab = 256
    recipe = load_recipe(f"recipes/tiny-{method}.yaml", [
        "model.frozen_dtype=bfloat16", "train.dtype=bfloat16", "model.seq_len=32",
        "sst.steps_per_iteration=2", "relora.reset_every=2", "galore.update_proj_gap=2"])
    built, engine = build_run(recipe, "torch", distributed_context("torch"), device=torch.device("cpu"),
                              dtype=torch.bfloat16, vocab_size=vocab, micro_batch=4, accumulation=1)
    frozen = {n: p for n, p in engine.model.named_parameters() if not p.requires_grad}
    assert bool(frozen) == (method != "full")  # full-rank has nothing frozen
    before = {n: p.detach().clone() for n, p in frozen.items()}
    tokens = torch.Generator().manual_seed(1)
    events = []
    for step in range(3):
        result = train_step(engine, built, step, [torch.randint(0, vocab, (4, 33), generator=tokens)])
        assert math.isfinite(float(result.loss))
        events.append(result.event)
    for name, param in engine.model.named_parameters():
        assert param.dtype == (torch.float32 if param.requires_grad else torch.bfloat16), name
    for state in engine.optimizer.state.values():
        assert all(v.dtype == torch.float32 for v in state.values() if torch.is_tensor(v) and v.is_floating_point())
    if method not in ("full", "lora"):  # step 2's periodic work wrote into the frozen tensors
        assert events[2] is not None
        assert any(not torch.equal(before[n], p) for n, p in frozen.items())


def test_bf16_frozen_storage_needs_bf16_compute(tmp_path):
    from sst_dist import train
    from sst_dist.config import load_recipe
    from sst_dist.errors import ConfigError

    recipe = load_recipe("recipes/tiny-lora.yaml", ["model.frozen_dtype=bfloat16", "train.dtype=float32",
                                                     "wandb.mode=disabled"])
    with pytest.raises(ConfigError, match="model.frozen_dtype: bfloat16 needs bfloat16 compute, but "
                                          "train.dtype is float32"):
        train.main(train.Run(recipe, tmp_path / "out"))


def test_metrics_fields_and_events(tmp_path):
    pretrain(tmp_path, "recipes/tiny-sst.yaml", "--max-steps", "21", "--set", "eval.every_steps=10",
             "--set", "eval.tokens=2048")
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == list(range(1, 22))
    for m in metrics:
        assert {"step", "loss", "lr", "tokens", "elapsed_s"} <= set(m)
    assert metrics[-1]["tokens"] == 21 * 8 * 128
    assert [m["step"] for m in metrics if "eval_loss" in m] == [10, 20, 21]
    events = {m["step"]: m["event"] for m in metrics if "event" in m}
    assert events == {6: "resample", 11: "resample", 16: "resample", 21: "resvd"}
    # an event step says where its time went; an ordinary step carries nothing extra
    for m in metrics:
        phases = m.get("event_phases_s")
        assert (phases is not None) == ("event" in m)
        if phases is not None:
            assert list(phases) == ["before_step", "forward", "backward", "step", "after_step"]
            assert all(seconds >= 0 for seconds in phases.values())
            assert phases["before_step"] > 0 and phases["forward"] > 0  # a resample and a forward ran
            elapsed = 8 * 128 / m["tokens_per_s"]
            assert sum(phases.values()) <= elapsed * 1.05 + 1e-3


def test_resume_continues_exactly_and_appends(tmp_path, single_process_curves):
    reference = single_process_curves("recipes/tiny-sst.yaml")
    pretrain(tmp_path, "recipes/tiny-sst.yaml", "--max-steps", "20")
    pretrain(tmp_path, "recipes/tiny-sst.yaml")
    resumed = losses(tmp_path)
    assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, 41))
    for step in range(21, 41):
        assert abs(resumed[step] - reference[step]) <= 1e-6 * abs(reference[step]), step


def test_sigterm_leaves_a_resumable_checkpoint(tmp_path, single_process_curves):
    reference = single_process_curves("recipes/tiny-sst.yaml")
    cmd = [sys.executable, "launch/pretrain.py", "--recipe", "recipes/tiny-sst.yaml", "--output-dir",
           str(tmp_path), "--set", "wandb.mode=disabled", "--max-steps", "100000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=quiet_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (tmp_path / "metrics.jsonl").exists() and len(read_metrics(tmp_path)) >= 5:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    stopped = len(read_metrics(tmp_path))
    assert "checkpoint saved" in out
    assert (tmp_path / "checkpoints" / "latest").is_file()
    pretrain(tmp_path, "recipes/tiny-sst.yaml")  # max_steps back to 40
    resumed = losses(tmp_path)
    assert sorted(resumed) == list(range(1, 41))
    for step in range(stopped + 1, 41):
        assert abs(resumed[step] - reference[step]) <= 1e-6 * abs(reference[step]), step


def test_eval_only_reproduces_the_evaluation_of_the_checkpoint(tmp_path):
    args = ("--max-steps", "10", "--set", "eval.every_steps=10", "--set", "eval.tokens=2048")
    pretrain(tmp_path, "recipes/tiny-sst.yaml", *args)
    during = read_metrics(tmp_path)[-1]
    proc = pretrain(tmp_path, "recipes/tiny-sst.yaml", *args, "--eval-only")
    after = json.loads((tmp_path / "eval.jsonl").read_text().splitlines()[-1])
    assert after["step"] == 10 and after["checkpoint"] == "step_0000010"
    assert after["eval_loss"] == during["eval_loss"]  # same model, same held-out blocks
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == after
    assert len(read_metrics(tmp_path)) == 10  # nothing trained, nothing logged as a step
    empty = pretrain(tmp_path / "none", "recipes/tiny-sst.yaml", "--eval-only", check=False)
    assert empty.returncode == 2 and "error: --eval-only: no checkpoint" in empty.stderr
    assert "Traceback" not in empty.stderr


def test_a_step_is_read_once_the_next_one_is_queued(tmp_path, monkeypatch):
    """Reading a loss off a GPU waits for everything queued before it, so the trainer reads step s
    once step s + 1 is queued, and at once only where something needs to know it is finite: a
    save, an evaluation, the last step, a step with periodic work and the step before one."""
    from sst_dist import train
    from sst_dist.config import load_recipe

    queued, read_when = [], {}  # steps queued; step -> how many were queued when it was read
    real_step, real_read = train.train_step, train.StepReadout.read

    def train_step(engine, method, step, *args):
        queued.append(step)
        return real_step(engine, method, step, *args)

    def read(readout):
        read_when[len(read_when) + 1] = len(queued)
        return real_read(readout)

    monkeypatch.setattr(train, "train_step", train_step)
    monkeypatch.setattr(train.StepReadout, "read", read)
    recipe = load_recipe("recipes/tiny-sst.yaml", ["train.max_steps=14", "checkpoint.every_steps=8",
                                                   "eval.every_steps=13", "eval.tokens=1024", "wandb.mode=disabled"])
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        train.main(train.Run(recipe, tmp_path))
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    events = {m["step"] for m in read_metrics(tmp_path) if "event" in m}
    assert events == {6, 11}  # tiny-sst: a resample before the 6th and the 11th step
    at_once = {5, 6, 10, 11} | {8} | {13} | {14}  # periodic work, a save, an evaluation, the last
    assert read_when == {s: s if s in at_once else s + 1 for s in range(1, 15)}
    assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, 15))


@pytest.mark.parametrize("norm, expected", [(torch.tensor(2.5), 2.5), (3.0, 3.0), (None, None),
                                             (torch.tensor(-1.0), "nan"), (float("inf"), math.inf)])
def test_a_readout_gives_the_mean_loss_and_marks_a_masked_norm_not_finite(norm, expected):
    """DeepSpeed masks a non-finite gradient norm to -1 where its own overflow check is off (the
    trainer turns it off): the divergence guard must see it as not finite."""
    from sst_dist.engines import DistributedContext
    from sst_dist.metrics import StepReadout
    from sst_dist.train import StepResult

    result = StepResult(event=None, lrs={}, loss=torch.tensor(4.25, dtype=torch.float64), grad_norm=norm)
    loss, read = StepReadout(result, DistributedContext()).read()
    assert loss == 4.25
    if expected == "nan":
        assert math.isnan(read)
    else:
        assert read == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="set_threads leaves GPU runs alone")
def test_set_threads_shares_the_cores_unless_omp_num_threads_is_set(monkeypatch):
    """The curve tests pin OMP_NUM_THREADS on the reference and on every rank (conftest.quiet_env):
    a rank must keep it, not take its share of os.cpu_count()."""
    before = torch.get_num_threads()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    try:
        torch.set_num_threads(3)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        set_threads()
        assert torch.get_num_threads() == 3
        monkeypatch.delenv("OMP_NUM_THREADS")
        set_threads()
        assert torch.get_num_threads() == max(1, (os.cpu_count() or 1) // 2)
    finally:
        torch.set_num_threads(before)

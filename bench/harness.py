"""What the GPU benchmarks share: one method built on one DeepSpeed process exactly as the trainer
builds it, and one training step on a random batch.

Used by bench/memory.py and bench/step_profile.py.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import torch


def fix_arch_list() -> None:
    """Hopper images may advertise TORCH_CUDA_ARCH_LIST=9.0a, which DeepSpeed's JIT build of
    FusedAdam cannot parse."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if archs:
        os.environ["TORCH_CUDA_ARCH_LIST"] = " ".join(a.rstrip("a") for a in archs.replace(";", " ").split())


@dataclass
class BenchRun:
    recipe: object
    method: object  # sst_dist.methods.Method
    engine: object  # sst_dist.engines.deepspeed.DeepSpeedEngine
    device: torch.device
    cuda: bool
    setup_s: float

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def batch(self, micro_batch: int, seq: int) -> torch.Tensor:
        from sst_dist.models import OPT_VOCAB

        return torch.randint(0, OPT_VOCAB, (micro_batch, seq + 1), device=self.device)

    def first_event_step(self) -> int | None:
        """The first step after step 0 at which the method does its periodic work (GaLore refresh,
        SST resample, ReLoRA* reset): where a real run's memory peaks, with Adam moments present
        (ZeRO creates them at the first step, so step 0's refresh runs without them)."""
        steps = []
        if self.method.galore_layers:
            steps.append(min(layer.update_proj_gap for layer in self.method.galore_layers))
        if self.method.controller is not None:
            steps.append(next((s for s in range(1, 100_000) if self.method.schedule.event(s)), None))
        steps = [s for s in steps if s]
        return min(steps) if steps else None

    def step(self, step: int, blocks: list[torch.Tensor],
             mark: Callable[[str], None] = lambda phase: None) -> None:
        """One optimizer step as the trainer runs it, one forward and backward per micro-batch in
        `blocks`; `mark(phase)` is called as each phase ends (probe, before_step, forward,
        backward, step, after_step)."""
        from sst_dist.train import lm_loss  # the trainer's loss; imported after fix_arch_list ran

        engine, method = self.engine, self.method

        def probe_pass(probe):
            mark("before_step")  # what ran before the probe (an SST resample) counts there
            with engine.probing() as probed:
                for block in blocks:
                    probe.backward(lm_loss(probed, block))
            mark("probe")

        method.before_step(step, probe_pass)
        lrs = method.learning_rates(step)
        engine.set_learning_rates(lrs)
        mark("before_step")
        for i, block in enumerate(blocks):
            method.before_micro_batch(last=i == len(blocks) - 1)
            loss = lm_loss(engine.model, block)
            mark("forward")
            engine.backward(loss)
            del loss
            mark("backward")
        engine.step()
        mark("step")
        method.after_step(lrs)
        mark("after_step")


def build(size: str, method: str, rank: int, seq: int, micro_batch: int, device_kind: str,
          ds_config: str, overrides: list[str] = (), accumulation: int = 1) -> BenchRun:
    """Model + method + DeepSpeed on this process (a world of one), as sst_dist.train sets them up.

    Raises NotImplementedError if this build has no `method`.
    """
    fix_arch_list()
    from sst_dist.config import load_recipe
    from sst_dist.engines import distributed_context
    from sst_dist.engines.deepspeed import DeepSpeedEngine
    from sst_dist.methods import build_method
    from sst_dist.models import OPT_VOCAB, build_model, enable_activation_checkpointing

    cuda = device_kind == "cuda"
    sets = [f"method={method}", f"rank={rank}", f"model.size={size}", f"model.seq_len={seq}",
            f"train.global_batch={micro_batch * accumulation}", f"train.micro_batch={micro_batch}",
            f"train.device={device_kind}", "wandb.mode=disabled"]
    if "galore" in method:
        sets.append(f"galore.rank={rank}")
    recipe = load_recipe(None, sets + list(overrides))
    ctx = distributed_context("deepspeed")
    device = torch.device("cuda", ctx.local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with device:  # initialised where it will run: CPU init of 1.3B weights takes longer than the bench
        model = build_model(size, vocab_size=OPT_VOCAB, seq_len=seq,
                            attn_implementation=recipe.model.attn_implementation)
    if recipe.model.gradient_checkpointing:  # as the trainer (the estimate assumes it off)
        enable_activation_checkpointing(model)
    model.to(dtype=torch.float32)  # as the trainer: DeepSpeed makes the bf16 copy
    built = build_method(recipe, model)
    engine = DeepSpeedEngine(model, built.param_groups(model), recipe, device=device,
                             dtype=torch.bfloat16 if cuda else torch.float32, micro_batch=micro_batch,
                             accumulation=accumulation, ds_config=ds_config, ctx=ctx)
    built.attach(engine.backend, recipe)
    return BenchRun(recipe, built, engine, device, cuda, round(time.perf_counter() - t0, 1))

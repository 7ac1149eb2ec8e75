"""What the GPU benchmarks share: one method built on one process by the trainer's own build_run
(DeepSpeed with a ds_config, or FSDP2), and the trainer's own train_step on a random batch.

Used by bench/memory.py and bench/step_profile.py.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import torch

from sst_dist.engines.base import Engine


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
    engine: Engine
    device: torch.device
    cuda: bool
    setup_s: float

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def batch(self, micro_batch: int, seq: int) -> torch.Tensor:
        from sst_dist.models import default_vocab

        vocab = default_vocab(self.recipe.model.size)
        return torch.randint(0, vocab, (micro_batch, seq + 1), device=self.device)

    def first_event_step(self) -> int | None:
        """The first step after step 0 at which the method does its periodic work (GaLore refresh,
        SST resample, ReLoRA* reset): where a real run's memory peaks, with Adam moments present
        (ZeRO creates them at the first step, so step 0's refresh runs without them)."""
        return self.method.first_event_step()

    def step(self, step: int, blocks: list[torch.Tensor],
             mark: Callable[[str], None] = lambda phase: None) -> None:
        """One optimizer step as the trainer runs it (sst_dist.train.train_step), one forward and
        backward per micro-batch in `blocks`; `mark(phase)` is called as each phase ends (probe,
        before_step, forward, backward, step, after_step)."""
        from sst_dist.train import train_step  # imported after fix_arch_list ran

        train_step(self.engine, self.method, step, blocks, mark)


def build(size: str, method: str, rank: int, seq: int, micro_batch: int, device_kind: str,
          ds_config: str | None, overrides: list[str] = (), accumulation: int = 1) -> BenchRun:
    """Model + method + engine on this process (a world of one), as sst_dist.train sets them up:
    DeepSpeed with `ds_config`, FSDP2 where it is None.

    Raises NotImplementedError if this build has no `method`.
    """
    fix_arch_list()
    from sst_dist.config import load_recipe
    from sst_dist.engines import distributed_context
    from sst_dist.models import default_vocab
    from sst_dist.registry import METHODS
    from sst_dist.train import build_run

    cuda = device_kind == "cuda"
    sets = [f"method={method}", f"rank={rank}", f"model.size={size}", f"model.seq_len={seq}",
            f"train.global_batch={micro_batch * accumulation}", f"train.micro_batch={micro_batch}",
            f"train.device={device_kind}", "wandb.mode=disabled"]
    if METHODS[method].uses_galore:
        sets.append(f"galore.rank={rank}")
    recipe = load_recipe(None, sets + list(overrides))
    engine_name = "deepspeed" if ds_config else "fsdp"
    ctx = distributed_context(engine_name)
    device = torch.device("cuda", ctx.local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    t0 = time.perf_counter()
    # initialised where it will run: CPU init of 1.3B weights takes longer than the bench
    built, engine = build_run(recipe, engine_name, ctx, device=device,
                              dtype=torch.bfloat16 if cuda or recipe.train.dtype == "bfloat16" else torch.float32,
                              vocab_size=default_vocab(size),
                              micro_batch=micro_batch, accumulation=accumulation, ds_config=ds_config,
                              init_device=device)
    return BenchRun(recipe, built, engine, device, cuda, round(time.perf_counter() - t0, 1))

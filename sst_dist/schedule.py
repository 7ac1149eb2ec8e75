"""When things happen: warm-up, decay, iterations and rounds, and the low-rank group's lr re-warm.

Pure bookkeeping on the step number, so a resumed run recomputes all of it from the step alone.
`step` is always the index of the optimizer step about to be taken (0-based).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DECAYS = ("constant", "cosine")  # optim.schedule


@dataclass(frozen=True)
class Event:
    iteration: int  # index of the iteration that starts at this step: a resample (SST), a reset (ReLoRA*)
    resvd: bool  # SST round start: re-orthogonalise (a re-SVD) instead of a resample


@dataclass(frozen=True)
class Schedule:
    lr: float  # full-rank group
    lowrank_lr: float
    warmup_steps: int
    rewarm_steps: int = 20
    steps_per_iteration: int | None = None  # T3; None: the method has no periodic reset
    iterations_per_round: int | None = None  # T2; None: no re-SVD
    decay: str = "constant"  # optim.schedule, after the warm-up: constant | cosine
    min_lr_ratio: float = 0.1  # cosine: the last step's lr over the peak's
    max_steps: int | None = None  # train.max_steps, where the cosine ends; required for cosine

    def __post_init__(self):
        if self.decay == "cosine" and not self.max_steps:
            raise ValueError("a cosine decay needs max_steps, the step it ends at")

    def event(self, step: int) -> Event | None:
        """The reset that happens before `step`, if any. Step 0 is the start: nothing to reset."""
        t3 = self.steps_per_iteration
        if not t3 or step == 0 or step % t3:
            return None
        iteration = step // t3
        t2 = self.iterations_per_round
        return Event(iteration, resvd=bool(t2) and iteration % t2 == 0)

    def warmup_factor(self, step: int) -> float:
        """Linear warm-up to the peak (then decay_factor; constant is the SST paper's OPT schedule)."""
        return min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0

    def decay_factor(self, step: int) -> float:
        """After the warm-up: 1 (constant), or a cosine from 1 at the warm-up's last step to
        min_lr_ratio at the run's last step (max_steps - 1), as GaLore's LLaMA runs decay."""
        if self.decay == "constant":
            return 1.0
        peak = max(self.warmup_steps - 1, 0)  # warmup_factor reaches 1 here
        span = self.max_steps - 1 - peak
        if step <= peak or span <= 0:
            return 1.0
        progress = min(1.0, (step - peak) / span)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def lr_factor(self, step: int) -> float:
        """Every group's lr over its peak at `step`, but for the low-rank group's re-warm."""
        return self.warmup_factor(step) * self.decay_factor(step)

    def rewarm_factor(self, step: int) -> float:
        """After every reset the low-rank group's lr climbs back linearly over rewarm_steps."""
        t3 = self.steps_per_iteration
        if not t3 or step < t3 or not self.rewarm_steps:
            return 1.0
        since = step % t3
        return min(1.0, (since + 1) / self.rewarm_steps)

    def learning_rates(self, step: int) -> tuple[float, float]:
        """(full-rank lr, low-rank lr) for `step`."""
        factor = self.lr_factor(step)
        return self.lr * factor, self.lowrank_lr * factor * self.rewarm_factor(step)

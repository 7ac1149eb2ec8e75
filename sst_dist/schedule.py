"""When things happen: warm-up, iterations and rounds, and the low-rank group's lr re-warm.

Pure bookkeeping on the step number, so a resumed run recomputes all of it from the step alone.
`step` is always the index of the optimizer step about to be taken (0-based).
"""

from __future__ import annotations

from dataclasses import dataclass


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

    def event(self, step: int) -> Event | None:
        """The reset that happens before `step`, if any. Step 0 is the start: nothing to reset."""
        t3 = self.steps_per_iteration
        if not t3 or step == 0 or step % t3:
            return None
        iteration = step // t3
        t2 = self.iterations_per_round
        return Event(iteration, resvd=bool(t2) and iteration % t2 == 0)

    def warmup_factor(self, step: int) -> float:
        """Linear warm-up, then constant: the paper's OPT schedule (no decay)."""
        return min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0

    def rewarm_factor(self, step: int) -> float:
        """After every reset the low-rank group's lr climbs back linearly over rewarm_steps."""
        t3 = self.steps_per_iteration
        if not t3 or step < t3 or not self.rewarm_steps:
            return 1.0
        since = step % t3
        return min(1.0, (since + 1) / self.rewarm_steps)

    def learning_rates(self, step: int) -> tuple[float, float]:
        """(full-rank lr, low-rank lr) for `step`."""
        warm = self.warmup_factor(step)
        return self.lr * warm, self.lowrank_lr * warm * self.rewarm_factor(step)

"""`method:` in a recipe -> the model surgery, the lr groups, and the periodic work of each method."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from sst_dist.config import Recipe
from sst_dist.lowrank import ReLoRAController, apply_lora
from sst_dist.schedule import Schedule
from sst_dist.sst import SSTController, apply_sst


@dataclass
class Method:
    name: str
    schedule: Schedule
    lowrank_params: list[nn.Parameter] = field(default_factory=list)
    layers: dict = field(default_factory=dict)
    controller: object = None

    def attach(self, backend, recipe: Recipe) -> None:
        """Binds the periodic work to the engine's seam; call once the engine exists."""
        if self.name == "sst":
            self.controller = SSTController(
                self.layers, backend, seed=recipe.seed, renormalize=recipe.sst.renormalize,
                uniform_mix=recipe.sst.uniform_mix, reset_s_state=recipe.sst.reset_s_state)
        elif self.name == "relora":
            self.controller = ReLoRAController(self.layers, backend, seed=recipe.seed)

    def before_step(self, step: int) -> str | None:
        """Runs the reset due before `step`; returns its name for the log, if any."""
        event = self.schedule.event(step)
        if event is None or self.controller is None:
            return None
        if isinstance(self.controller, SSTController):
            if event.resvd:
                self.controller.resvd(event.iteration)
                return "resvd"
            self.controller.resample(event.iteration)
            return "resample"
        self.controller.reset(event.iteration)
        return "reset"

    def after_step(self) -> None:
        if isinstance(self.controller, SSTController):
            self.controller.post_step()


def build_method(recipe: Recipe, model: nn.Module) -> Method:
    """Applies `recipe.method` to `model` in place (before any engine wraps it)."""
    o = recipe.optim
    plain = Schedule(o.lr, o.lowrank_lr, o.warmup_steps, o.rewarm_steps)
    if recipe.method == "full":
        return Method("full", plain)
    if recipe.method == "lora":
        layers = apply_lora(model, recipe.rank, recipe.targets, alpha=recipe.lora.alpha, seed=recipe.seed)
        return Method("lora", plain, _lowrank(layers), layers)
    if recipe.method == "relora":
        layers = apply_lora(model, recipe.rank, recipe.targets, alpha=recipe.lora.alpha, seed=recipe.seed)
        schedule = Schedule(o.lr, o.lowrank_lr, o.warmup_steps, o.rewarm_steps,
                            steps_per_iteration=recipe.relora.reset_every)
        return Method("relora", schedule, _lowrank(layers), layers)
    if recipe.method == "sst":
        layers = apply_sst(model, recipe.rank, recipe.targets, seed=recipe.seed, path=recipe.sst.path,
                           uniform_mix=recipe.sst.uniform_mix)
        k = max(layer.k for layer in layers.values())
        per_round = recipe.sst.iterations_per_round or max(1, k // recipe.rank)
        schedule = Schedule(o.lr, o.lowrank_lr, o.warmup_steps, o.rewarm_steps,
                            steps_per_iteration=recipe.sst.steps_per_iteration,
                            iterations_per_round=per_round)
        params = [p for layer in layers.values() for p in layer.sst_parameters()]
        return Method("sst", schedule, params, layers)
    raise NotImplementedError(f"method: {recipe.method!r} is not available in this build")


def _lowrank(layers) -> list[nn.Parameter]:
    return [p for layer in layers.values() for p in layer.lowrank_parameters()]

"""`method:` in a recipe -> the model surgery, the lr groups, and the periodic work of each method."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from sst_dist.config import Recipe
from sst_dist.galore import (GradientProbe, apply_galore, apply_galore_embedding, apply_weight_decay,
                             refresh_galore_layers)
from sst_dist.lowrank import ReLoRAController, apply_lora
from sst_dist.schedule import Schedule
from sst_dist.sst import SSTLinear, apply_sst
from sst_dist.sst_controller import SSTController

# ProbePass(probe) runs the step's forward passes, calling probe.backward(loss) on each micro-batch
ProbePass = Callable[[GradientProbe], None]


@dataclass
class Method:
    name: str
    schedule: Schedule
    lowrank_params: list[nn.Parameter] = field(default_factory=list)
    layers: dict = field(default_factory=dict)  # SST or LoRA layers by name
    galore_layers: list = field(default_factory=list)  # GaLoreLinear / GaLoreEmbedding
    galore_lr: float | None = None  # the galore group's peak lr
    weight_decay: float = 0.0
    controller_resets: bool = False  # whether the periodic work resets optimizer state (SST, ReLoRA*)
    controller: object = None
    backend: object = None

    def param_groups(self, model: nn.Module) -> list[dict]:
        """The optimizer's groups, named for set_learning_rates: `full` (every other trainable
        parameter), `lowrank` (SST / LoRA factors), `galore` (the B of each GaLore layer)."""
        lowrank = {id(p) for p in self.lowrank_params}
        galore = [layer.B for layer in self.galore_layers]
        special = lowrank | {id(p) for p in galore}
        groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in special],
                   "lr": self.schedule.lr, "name": "full"}]
        if self.lowrank_params:
            # the periodic resets zero slots of this group's state: it counts steps per element
            # (sst_dist.optim), so a reset slot restarts as a fresh Adam, bias correction included
            groups.append({"params": self.lowrank_params, "lr": self.schedule.lowrank_lr, "name": "lowrank",
                           "resettable": self.controller_resets})
        if galore:
            groups.append({"params": galore, "lr": self.galore_lr, "name": "galore"})
        return groups

    def learning_rates(self, step: int) -> dict[str, float]:
        full, lowrank = self.schedule.learning_rates(step)
        lrs = {"full": full, "lowrank": lowrank}
        if self.galore_layers:  # GaLore has no restarts: warm-up only, like the full-rank group
            lrs["galore"] = self.galore_lr * self.schedule.warmup_factor(step)
        return lrs

    def attach(self, backend, recipe: Recipe) -> None:
        """Binds the periodic work to the engine's seam; call once the engine exists."""
        self.backend = backend
        if self.name in ("sst", "sst+galore"):
            self.controller = SSTController(
                self.layers, backend, seed=recipe.seed, renormalize=recipe.sst.renormalize,
                uniform_mix=recipe.sst.uniform_mix, reset_s_state=recipe.sst.reset_s_state)
        elif self.name == "relora":
            self.controller = ReLoRAController(self.layers, backend, seed=recipe.seed)

    def before_step(self, step: int, probe_pass: ProbePass | None = None) -> str | None:
        """Runs the resets due before `step`; returns their names for the log ('+'-joined), if any.

        A GaLore refresh takes its projector from the gradient of this very step (as galore-torch
        does), so it needs `probe_pass` to run the step's batch through a GradientProbe first.
        """
        events = []
        event = self.schedule.event(step)
        if event is not None and self.controller is not None:
            if isinstance(self.controller, SSTController):
                if event.resvd:
                    self.controller.resvd(event.iteration)
                    events.append("resvd")
                else:
                    self.controller.resample(event.iteration)
                    events.append("resample")
            else:
                self.controller.reset(event.iteration)
                events.append("reset")
        if any(layer.refresh_due(step) for layer in self.galore_layers):
            if probe_pass is None:
                raise ValueError(f"step {step}: a GaLore refresh is due; pass probe_pass")
            with GradientProbe(self.galore_layers, step) as probe:
                probe_pass(probe)
            refresh_galore_layers(self.galore_layers, self.backend, probe.gradients)
            events.append("refresh")
        return "+".join(events) or None

    def before_micro_batch(self, last: bool) -> None:
        """SST's materialized path sums G over the micro-batches of a step and takes the factor
        gradients at the last one: all earlier ones hold their gradient."""
        for layer in self.layers.values():
            if isinstance(layer, SSTLinear) and layer.path == "materialized":
                layer.holds_gradient = not last

    def after_step(self, lrs: dict[str, float]) -> None:
        """The per-step work after the optimizer step; `lrs` are the step's learning rates."""
        if isinstance(self.controller, SSTController):
            self.controller.post_step()
        if self.galore_layers and self.weight_decay:
            apply_weight_decay(self.galore_layers, lrs["galore"], self.weight_decay)


def build_method(recipe: Recipe, model: nn.Module) -> Method:
    """Applies `recipe.method` to `model` in place (before any engine wraps it)."""
    o = recipe.optim
    plain = Schedule(o.lr, o.lowrank_lr, o.warmup_steps, o.rewarm_steps)
    galore = recipe.galore
    galore_kw = dict(scale=galore.scale, proj_type=galore.proj_type, update_proj_gap=galore.update_proj_gap)
    galore_rank = galore.rank or recipe.rank
    galore_lr = galore.lr
    if recipe.method == "full":
        return Method("full", plain)
    if recipe.method == "lora":
        layers = apply_lora(model, recipe.rank, recipe.targets, alpha=recipe.lora.alpha, seed=recipe.seed)
        return Method("lora", plain, _lowrank(layers), layers)
    if recipe.method == "relora":
        layers = apply_lora(model, recipe.rank, recipe.targets, alpha=recipe.lora.alpha, seed=recipe.seed)
        schedule = Schedule(o.lr, o.lowrank_lr, o.warmup_steps, o.rewarm_steps,
                            steps_per_iteration=recipe.relora.reset_every)
        return Method("relora", schedule, _lowrank(layers), layers, controller_resets=True)
    if recipe.method == "galore":
        layers = apply_galore(model, galore_rank, recipe.targets, **galore_kw)
        return Method("galore", plain, galore_layers=list(layers.values()), galore_lr=galore_lr,
                      weight_decay=o.weight_decay)
    if recipe.method in ("sst", "sst+galore"):
        layers = apply_sst(model, recipe.rank, recipe.targets, seed=recipe.seed, path=recipe.sst.path,
                           uniform_mix=recipe.sst.uniform_mix)
        k = max(layer.k for layer in layers.values())
        per_round = recipe.sst.iterations_per_round or max(1, k // recipe.rank)
        schedule = Schedule(o.lr, o.lowrank_lr, o.warmup_steps, o.rewarm_steps,
                            steps_per_iteration=recipe.sst.steps_per_iteration,
                            iterations_per_round=per_round)
        params = [p for layer in layers.values() for p in layer.sst_parameters()]
        method = Method(recipe.method, schedule, params, layers, controller_resets=True)
        if recipe.method == "sst+galore":
            # GaLore on the full-rank matrices SST leaves: the token embedding and its tied LM head
            method.galore_layers = list(apply_galore_embedding(model, galore_rank, **galore_kw).values())
            method.galore_lr, method.weight_decay = galore_lr, o.weight_decay
        return method
    raise NotImplementedError(f"method: {recipe.method!r} is not available in this build")


def _lowrank(layers) -> list[nn.Parameter]:
    return [p for layer in layers.values() for p in layer.lowrank_parameters()]

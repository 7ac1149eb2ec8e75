"""`method:` in a recipe -> what the method does to the model and the loop, through one protocol.

`Hooks` lists everything a method can hook into; a method is a list of such parts (sst+galore is
SST's part and GaLore's), built by the function registered under its name. The trainer and the
bench call `Method`'s verbs only; they never name a method, a layer class or a layer's path.

    surgery             the registered builder: swaps the model's layers, before any engine wraps it
    param_groups()      the optimizer groups besides `full` (every other trainable parameter)
    learning_rates(s)   the lr of each of those groups at step s
    attach(backend, recipe)  binds the periodic work to the engine's seam, once the engine exists
    work_due(s)         whether any of those is due before step s
    before_step(s)      the resets due before step s (resample, re-SVD, ReLoRA* reset, GaLore refresh)
    before_micro_batch  told before each micro-batch whether it is the step's last
    after_step(lrs)     the per-step work after the optimizer step
    first_event_step()  the first step (> 0) with periodic work, for the benchmarks
    state               lives in the model (buffers, extra state) and the optimizer: a checkpoint
                        of the engine holds all of it, and no hook is needed to save or load it
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from sst_dist.config import Recipe
from sst_dist.galore import (GaLoreLinear, GradientProbe, apply_galore, apply_galore_embedding,
                             apply_weight_decay, refresh_from_probe)
from sst_dist.lowrank import LoRALinear, ReLoRAController, apply_lora
from sst_dist.models import init_std
from sst_dist.registry import METHODS, galore_rank, spec  # noqa: F401 (METHODS: the registry, re-exported)
from sst_dist.schedule import Schedule
from sst_dist.sst import SSTLinear, apply_sst
from sst_dist.sst_controller import SSTController

@dataclass
class ProbePass:
    """The step's batch, for work that needs the step's own gradient before the step (a GaLore
    refresh): run(probe) runs the forward of each of the step's `micro_batches` micro-batches and
    calls probe.backward(loss) on it. The work may run it more than once (galore.refresh_layers)."""

    micro_batches: int
    run: Callable[[GradientProbe], None]


class Hooks:
    """One part of a method. Every hook's default does nothing."""

    layers: dict = {}  # the layers its surgery put in, by qualified name

    def param_groups(self) -> list[dict]:
        return []

    def learning_rates(self, step: int) -> dict[str, float]:
        return {}

    def attach(self, backend, recipe: Recipe) -> None:
        pass

    def work_due(self, step: int) -> bool:
        return False

    def before_step(self, step: int, probe_pass: ProbePass | None) -> list[str]:
        """Runs the work due before `step`; returns the names of what ran, for the log."""
        return []

    def before_micro_batch(self, last: bool) -> None:
        pass

    def after_step(self, lrs: dict[str, float]) -> None:
        pass

    def first_event_step(self) -> int | None:
        return None

    def materializer_kwargs(self) -> dict:
        """What build.Materializer needs to initialise this part's layers on the meta build."""
        return {}


class Method:
    """What the trainer sees: a method's parts behind one set of verbs (see the module docstring)."""

    def __init__(self, name: str, schedule: Schedule, parts: list[Hooks] = (), *,
                 frozen_dtype: torch.dtype | None = None):
        self.name, self.schedule, self.parts = name, schedule, list(parts)
        self.frozen_dtype = frozen_dtype  # model.frozen_dtype, where the meta build stores frozen tensors
        self.layers = {name: layer for part in self.parts for name, layer in part.layers.items()}

    def materializer_kwargs(self) -> dict:
        """The settings of build.Materializer for this method's layers (model.build: meta)."""
        kwargs = {"frozen_dtype": self.frozen_dtype}
        for part in self.parts:
            kwargs.update(part.materializer_kwargs())
        return kwargs

    def param_groups(self, model: nn.Module) -> list[dict]:
        """The optimizer's groups, named for set_learning_rates: `full` first, then the parts'."""
        groups = [group for part in self.parts for group in part.param_groups()]
        special = {id(p) for group in groups for p in group["params"]}
        full = [p for p in model.parameters() if p.requires_grad and id(p) not in special]
        return [{"params": full, "lr": self.schedule.lr, "name": "full"}, *groups]

    def learning_rates(self, step: int) -> dict[str, float]:
        full, lowrank = self.schedule.learning_rates(step)
        lrs = {"full": full, "lowrank": lowrank}
        for part in self.parts:
            lrs.update(part.learning_rates(step))
        return lrs

    @staticmethod
    def lr_fields(lrs: dict[str, float]) -> dict[str, float]:
        """learning_rates' groups as metrics.jsonl names them: `lr` the full group's, `<group>_lr`
        each other's, in the groups' order."""
        return {("lr" if group == "full" else f"{group}_lr"): lr for group, lr in lrs.items()}

    def attach(self, backend, recipe: Recipe) -> None:
        for part in self.parts:
            part.attach(backend, recipe)

    def work_due(self, step: int) -> bool:
        """Whether before_step(step) has periodic work to run."""
        return any(part.work_due(step) for part in self.parts)

    def before_step(self, step: int, probe_pass: ProbePass | None = None) -> str | None:
        """Runs the resets due before `step`; returns their names for the log ('+'-joined), if any."""
        return "+".join(name for part in self.parts for name in part.before_step(step, probe_pass)) or None

    def before_micro_batch(self, last: bool) -> None:
        for part in self.parts:
            part.before_micro_batch(last)

    def after_step(self, lrs: dict[str, float]) -> None:
        for part in self.parts:
            part.after_step(lrs)

    def first_event_step(self) -> int | None:
        """The first step after step 0 with periodic work (a resample, a reset, a GaLore refresh)."""
        steps = [s for s in (part.first_event_step() for part in self.parts) if s]
        return min(steps) if steps else None


# ----------------------------------------------------------------------------- the parts

class LowRankPart(Hooks):
    """Factors trained at the low-rank lr (LoRA, and the base of ReLoRA* and SST)."""

    def __init__(self, layers: dict, params: list[nn.Parameter], schedule: Schedule, resettable: bool):
        self.layers, self.params, self.schedule, self.resettable = layers, params, schedule, resettable
        self.controller = None

    def param_groups(self) -> list[dict]:
        if not self.params:
            return []
        # the periodic resets zero slots of this group's state: it counts steps per element
        # (sst_dist.optim), so a reset slot restarts as a fresh Adam, bias correction included
        return [{"params": self.params, "lr": self.schedule.lowrank_lr, "name": "lowrank",
                 "resettable": self.resettable}]

    def first_event_step(self) -> int | None:
        return self.schedule.steps_per_iteration if self.controller is not None else None

    def work_due(self, step: int) -> bool:
        return self.controller is not None and self.schedule.event(step) is not None


class ReLoRAPart(LowRankPart):
    def attach(self, backend, recipe: Recipe) -> None:
        self.controller = ReLoRAController(self.layers, backend, seed=recipe.seed)

    def before_step(self, step: int, probe_pass) -> list[str]:
        event = self.schedule.event(step)
        if event is None:
            return []
        self.controller.reset(event.iteration)
        return ["reset"]


class SSTPart(LowRankPart):
    def __init__(self, layers: dict, params: list[nn.Parameter], schedule: Schedule, *, init: str,
                 uniform_mix: bool):
        super().__init__(layers, params, schedule, resettable=True)
        self.init, self.uniform_mix = init, uniform_mix  # sst.init, sst.uniform_mix

    def materializer_kwargs(self) -> dict:
        return {"init": self.init, "uniform_mix": self.uniform_mix}

    def attach(self, backend, recipe: Recipe) -> None:
        self.controller = SSTController(
            self.layers, backend, seed=recipe.seed, renormalize=recipe.sst.renormalize,
            uniform_mix=recipe.sst.uniform_mix, reset_s_state=recipe.sst.reset_s_state)

    def before_step(self, step: int, probe_pass) -> list[str]:
        event = self.schedule.event(step)
        if event is None:
            return []
        if event.resvd:
            self.controller.resvd(event.iteration)
            return ["resvd"]
        self.controller.resample(event.iteration)
        return ["resample"]

    def before_micro_batch(self, last: bool) -> None:
        for layer in self.layers.values():
            layer.before_micro_batch(last)

    def after_step(self, lrs: dict[str, float]) -> None:
        self.controller.post_step()


class GaLorePart(Hooks):
    """GaLore layers: their B at the galore lr, refreshed from the step's own gradient."""

    def __init__(self, layers: dict, schedule: Schedule, lr: float, weight_decay: float, projector: str,
                 refresh_layers: int | None):
        self.layers, self.schedule, self.lr, self.weight_decay = layers, schedule, lr, weight_decay
        self.projector, self.refresh_layers = projector, refresh_layers  # galore.projector, galore.refresh_layers
        self.backend = None

    def param_groups(self) -> list[dict]:
        if not self.layers:
            return []
        return [{"params": [layer.B for layer in self.layers.values()], "lr": self.lr, "name": "galore"}]

    def learning_rates(self, step: int) -> dict[str, float]:
        # GaLore has no restarts: warm-up and decay only, like the full-rank group
        return {"galore": self.lr * self.schedule.lr_factor(step)}

    def attach(self, backend, recipe: Recipe) -> None:
        self.backend = backend

    def work_due(self, step: int) -> bool:
        return any(layer.refresh_due(step) for layer in self.layers.values())

    def before_step(self, step: int, probe_pass) -> list[str]:
        """A refresh takes its projector from the gradient of this very step (as galore-torch
        does), so it needs `probe_pass` to run the step's batch through a GradientProbe first."""
        if not self.work_due(step):
            return []
        if probe_pass is None:
            raise ValueError(f"step {step}: a GaLore refresh is due; pass probe_pass")
        refresh_from_probe(list(self.layers.values()), self.backend, probe_pass.run, probe_pass.micro_batches,
                           step=step, projector=self.projector, refresh_layers=self.refresh_layers)
        return ["refresh"]

    def after_step(self, lrs: dict[str, float]) -> None:
        if self.weight_decay:
            apply_weight_decay(self.layers.values(), lrs["galore"], self.weight_decay)

    def first_event_step(self) -> int | None:
        return min((layer.update_proj_gap for layer in self.layers.values()), default=None)


# ----------------------------------------------------------------------------- the registry

Builder = Callable[[Recipe, nn.Module], Method]


def register(name: str, layers: tuple = ()) -> Callable[[Builder], Builder]:
    """Sets the builder of the method `name` and the classes of the layers it puts in; its entry
    (what it supports, its checks) is in sst_dist.registry.METHODS."""
    def add(builder: Builder) -> Builder:
        METHODS[name].builder, METHODS[name].layer_classes = builder, tuple(layers)
        return builder
    return add


def build_method(recipe: Recipe, model: nn.Module) -> Method:
    """Applies `recipe.method` to `model` in place (before any engine wraps it)."""
    builder = spec(recipe.method).builder
    if builder is None:
        raise NotImplementedError(f"method: {recipe.method!r} is not available in this build")
    method = builder(recipe, model)
    method.frozen_dtype = frozen_dtype(recipe)
    return method


def _schedule(recipe: Recipe, **periodic) -> Schedule:
    o = recipe.optim
    return Schedule(o.lr, o.lowrank_lr, o.warmup_steps, o.rewarm_steps, decay=o.schedule,
                    min_lr_ratio=o.min_lr_ratio, max_steps=recipe.train.max_steps, **periodic)


def frozen_dtype(recipe: Recipe) -> torch.dtype | None:
    """model.frozen_dtype as a dtype, None where frozen tensors keep the model's own dtype."""
    return torch.bfloat16 if recipe.model.frozen_dtype == "bfloat16" else None


def _lowrank(layers) -> list[nn.Parameter]:
    return [p for layer in layers.values() for p in layer.lowrank_parameters()]


def _galore_kw(recipe: Recipe) -> dict:
    g = recipe.galore
    return dict(scale=g.scale, proj_type=g.proj_type, update_proj_gap=g.update_proj_gap,
                frozen_dtype=frozen_dtype(recipe))


def _galore_part(recipe: Recipe, layers: dict, schedule: Schedule) -> GaLorePart:
    g = recipe.galore
    return GaLorePart(layers, schedule, g.lr, recipe.optim.weight_decay, g.projector, g.refresh_layers)


@register("full")
def _full(recipe: Recipe, model: nn.Module) -> Method:
    return Method("full", _schedule(recipe))


@register("lora", layers=(LoRALinear,))
def _lora(recipe: Recipe, model: nn.Module) -> Method:
    layers = apply_lora(model, recipe.rank, recipe.targets, alpha=recipe.lora.alpha, seed=recipe.seed,
                        frozen_dtype=frozen_dtype(recipe))
    schedule = _schedule(recipe)
    return Method("lora", schedule, [LowRankPart(layers, _lowrank(layers), schedule, resettable=False)])


@register("relora", layers=(LoRALinear,))
def _relora(recipe: Recipe, model: nn.Module) -> Method:
    layers = apply_lora(model, recipe.rank, recipe.targets, alpha=recipe.lora.alpha, seed=recipe.seed,
                        frozen_dtype=frozen_dtype(recipe))
    schedule = _schedule(recipe, steps_per_iteration=recipe.relora.reset_every)
    return Method("relora", schedule, [ReLoRAPart(layers, _lowrank(layers), schedule, resettable=True)])


@register("galore", layers=(GaLoreLinear,))
def _galore(recipe: Recipe, model: nn.Module) -> Method:
    layers = apply_galore(model, galore_rank(recipe.galore.rank, recipe.rank), recipe.targets, **_galore_kw(recipe))
    schedule = _schedule(recipe)
    return Method("galore", schedule, [_galore_part(recipe, layers, schedule)])


def _sst_part(recipe: Recipe, model: nn.Module) -> tuple[Schedule, SSTPart]:
    layers = apply_sst(model, recipe.rank, recipe.targets, seed=recipe.seed, path=recipe.sst.path,
                       uniform_mix=recipe.sst.uniform_mix, init=recipe.sst.init,
                       init_std=init_std(getattr(model, "config", None)),
                       frozen_dtype=frozen_dtype(recipe))
    k = max(layer.k for layer in layers.values())
    schedule = _schedule(recipe, steps_per_iteration=recipe.sst.steps_per_iteration,
                         iterations_per_round=recipe.sst.iterations_per_round or max(1, k // recipe.rank))
    params = [p for layer in layers.values() for p in layer.sst_parameters()]
    return schedule, SSTPart(layers, params, schedule, init=recipe.sst.init, uniform_mix=recipe.sst.uniform_mix)


@register("sst", layers=(SSTLinear,))
def _sst(recipe: Recipe, model: nn.Module) -> Method:
    schedule, sst = _sst_part(recipe, model)
    return Method("sst", schedule, [sst])


@register("sst+galore", layers=(SSTLinear, GaLoreLinear))
def _sst_galore(recipe: Recipe, model: nn.Module) -> Method:
    schedule, sst = _sst_part(recipe, model)
    # GaLore on the full-rank matrices SST leaves: the token embedding and its tied LM head
    layers = apply_galore_embedding(model, galore_rank(recipe.galore.rank, recipe.rank), **_galore_kw(recipe))
    return Method("sst+galore", schedule, [sst, _galore_part(recipe, layers, schedule)])

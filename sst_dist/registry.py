"""The methods by name: what each supports and which recipe keys it checks, in one table.

A leaf module: sst_dist.config validates a recipe against it without importing the methods'
layers, and sst_dist.methods registers each method's builder on its entry (`register`). A method
is named here once; everything else (config, the estimator, the benchmarks, the tests) reads
`METHODS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from sst_dist.errors import ConfigError

# the linears of a decoder layer that a method may replace (the recipe's `targets`), per model
# family; a size's family is its name's prefix (`llama-60m`; OPT's sizes have none: `125m`)
OPT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS = {"opt": OPT_TARGETS, "llama": LLAMA_TARGETS}


def family(size: str) -> str:
    """The model family of a model.size: llama for `llama-*`, else opt."""
    return "llama" if size.startswith("llama-") else "opt"


ENGINES = ("torch", "deepspeed", "fsdp")


def galore_rank(galore: int | None, rank: int) -> int:
    """galore.rank as used: unset, the recipe's `rank`."""
    return galore or rank


def _never(recipe) -> bool:
    return False


@dataclass
class MethodSpec:
    """One method: its name, what it supports, its recipe checks; `builder` (Recipe, model) ->
    sst_dist.methods.Method and `layer_classes`, set by sst_dist.methods when it registers the
    method."""

    name: str
    adapts: bool = True  # replaces the target linears: `targets` and `rank` apply
    uses_galore: bool = False  # galore.* keys apply
    meta_build: bool = True  # model.build: meta (sst_dist.build.Materializer) initialises its layers
    engines: tuple[str, ...] = ENGINES
    prunable: bool = False  # its layers have singular values that export --keep-singular prunes
    # whether torch.compile can trace a checkpointed block (its layers are not kept eager)
    compiles_checkpointed: Callable[[object], bool] = _never
    # whether its layers compile alone, outside an engine's per-module hooks (model.compile under
    # ZeRO-3: sst_dist.models.compile_layers)
    compiles_layers_alone: Callable[[object], bool] = _never
    builder: Callable | None = None
    # its layer classes (each merges its own checkpoint entries into a dense weight for the
    # export: owns_state, dense_from_state), set with the builder
    layer_classes: tuple = ()

    def check(self, recipe, target_dim: Callable[[], int]) -> None:
        """The method's own checks of `recipe`, one line each (ConfigError). target_dim(): the
        smallest of min(out, in) over the targets of the recipe's model."""
        if recipe.model.build == "meta" and not self.meta_build:
            raise ConfigError(f"model.build: meta cannot initialise the {self.name} layers; use model.build=dense")
        if recipe.model.compile and recipe.model.gradient_checkpointing and not self.compiles_checkpointed(recipe):
            # a checkpointed block is traced as one graph, which the method's own layers (kept eager:
            # sst_dist.models.compile_blocks) break, so torch.compile would leave every block eager
            able = " and ".join(COMPILES_CHECKPOINTED)
            raise ConfigError(f"model.compile: with model.gradient_checkpointing, only {able} compile"
                              f" (the {self.name} layers run eagerly and break a checkpointed block's graph);"
                              " turn one of the two off")
        if not self.adapts:
            return
        if not recipe.targets:
            choices = TARGETS[family(recipe.model.size)]
            raise ConfigError(f"targets: empty; choose from {', '.join(choices)}")
        limit = target_dim()
        if recipe.rank > limit:
            raise ConfigError(f"rank: {recipe.rank} exceeds min(out, in) = {limit} of model '{recipe.model.size}';"
                              f" use 1..{limit}")
        # checked for every adapting method, as a recipe's galore.rank is kept in its checkpoints
        if recipe.galore.rank is not None and not 0 < recipe.galore.rank <= limit:
            raise ConfigError(f"galore.rank: {recipe.galore.rank} must be in 1..{limit}")

    def check_engine(self, engine: str) -> None:
        if engine not in self.engines:
            raise ConfigError(f"--engine {engine}: method {self.name} runs on {', '.join(self.engines)}; use one"
                              " of those")


def _functional_sst(recipe) -> bool:
    return recipe.sst.path == "functional"


METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("full", adapts=False, compiles_checkpointed=lambda recipe: True),
    MethodSpec("lora"),
    MethodSpec("relora"),
    MethodSpec("sst", compiles_checkpointed=_functional_sst, compiles_layers_alone=_functional_sst, prunable=True),
    MethodSpec("galore", uses_galore=True),
    MethodSpec("sst+galore", uses_galore=True, prunable=True),
)}
# what compiles_checkpointed allows, in words, for the message that refuses the rest
COMPILES_CHECKPOINTED = ("method full", "method sst with sst.path=functional")


def spec(name: str) -> MethodSpec:
    entry = METHODS.get(name)
    if entry is None:
        raise ConfigError(f"method: {name!r} is not one of {', '.join(METHODS)}")
    return entry


__all__ = ["ENGINES", "LLAMA_TARGETS", "METHODS", "MethodSpec", "OPT_TARGETS", "TARGETS", "family", "galore_rank",
           "spec"]

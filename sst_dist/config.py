"""Recipes: dataclasses, YAML loading, `--set key=value` overrides, validation.

A recipe says *what* to train. Every key a user can write is a field below; anything else is
rejected here, early, with one line naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sst_dist.errors import ConfigError
from sst_dist.registry import METHODS, OPT_TARGETS, TARGETS, family  # noqa: F401 (re-exported: a recipe's choices)
from sst_dist.schedule import DECAYS
SST_PATHS = ("dense", "materialized", "factored", "functional")  # how an SSTLinear computes (SSTConfig.path)
WANDB_MODES = ("offline", "online", "disabled")
FROZEN_DTYPES = ("float32", "bfloat16")  # model.frozen_dtype
# keys that moved, old -> new (same values): a recipe that writes the old one is told where it went
MOVED_KEYS = {"sst.frozen_dtype": "model.frozen_dtype"}
# Environment settings that fill a recipe key the recipe (file or --set) leaves unset, so that a
# cluster script's `export WANDB_MODE=offline` takes effect; a value written in the recipe wins.
ENV_DEFAULTS = {"WANDB_MODE": ("wandb.mode", WANDB_MODES), "WANDB_PROJECT": ("wandb.project", None)}


@dataclass
class ModelConfig:
    # a key of sst_dist.models.MODEL_SIZES: OPT's (tiny, 125m .. 66b) or LLaMA's (llama-tiny, llama-60m ..)
    size: str = "tiny"
    seq_len: int = 128
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False  # recompute each decoder block in the backward (any method)
    # torch.compile each decoder block (every method and engine; the methods' own layers stay
    # eager inside it, but SST's with sst.path=functional: sst_dist.models.compile_blocks). Under
    # ZeRO-3 only SST's functional layers, each alone (sst_dist.models.compile_layers)
    compile: bool = False
    # dense: the HF model built whole, then the method's surgery | meta: built on the meta device,
    # each module materialised on its device, SST layers directly as their factors (sst_dist.build)
    build: str = "dense"
    # continued pretraining: start from a transformers OPT folder (a local path, or a hub name when
    # the hub is reachable) instead of a fresh initialisation; every method's surgery follows
    init_from: str | None = None
    # storage of every method's frozen tensors (SST's factors U ‖ Vh, LoRA's and ReLoRA*'s W, GaLore's W
    # and projector): bfloat16 halves the largest tensors a low-rank method holds (they have no
    # gradient, master or optimizer state); what trains stays float32. Needs bfloat16 compute.
    frozen_dtype: str = "float32"


@dataclass
class SSTConfig:
    steps_per_iteration: int = 200  # T3: optimizer steps between resamples
    iterations_per_round: int | None = None  # T2: iterations between re-SVDs; None = k // rank
    renormalize: bool = True  # active u_i, v_i back to unit length after each step
    uniform_mix: bool = False  # p_i = (1/k + sigma_i / sum(sigma)) / 2 instead of p_i ~ sigma_i
    reset_s_state: bool = False  # also zero the Adam state of s at each resample
    # dense: form W per forward and backward | materialized: W once per step, kept, and G summed
    # over micro-batches (+1 W, +1 fp32 G per layer; docs/design.md §4) | factored: x -> Vh -> s -> U
    # | functional: dense's formulas as a pure function, W kept by autograd for the backward (+1 W
    # per layer), which model.compile traces into the block's graph (the others stay eager there)
    path: str = "dense"
    # the initial factors: svd (of the layer's W0) | haar (drawn directly, W0 := U diag(s) Vh) |
    # auto (haar from k = 4096 on); sst_dist.spectral_init
    init: str = "auto"


@dataclass
class LoRAConfig:
    alpha: float | None = None  # scaling alpha / rank; None means alpha = rank (scale 1)


@dataclass
class ReLoRAConfig:
    reset_every: int = 200  # T3: merge, re-init and reset the factors every this many steps


@dataclass
class GaLoreConfig:
    rank: int | None = None  # None = the recipe's rank
    update_proj_gap: int = 200
    scale: float = 0.25
    proj_type: str = "std"
    # peak lr of the projected weights: GaLore's published 0.01 (with scale 0.25, LLaMA 60M-1B on
    # C4); its update is scale x Adam-normalised, so this is 0.0025 in full-rank AdamW terms
    lr: float = 1e-2
    # how a refresh finds the top-r singular vectors of G: svd (exact, as galore-torch) |
    # randomized (a range finder: GEMMs instead of a full SVD) | auto (randomized from k = 4096 on)
    projector: str = "auto"
    # with several micro-batches per step, a refresh sums each layer's G over them in probe passes
    # of this many layers (null: all in one pass), holding their sums: ceil(layers / this) passes
    # of the step's forwards and backwards. One micro-batch per step: one pass, one layer's G at a time
    refresh_layers: int | None = None


@dataclass
class OptimConfig:
    lr: float = 1e-3  # full-rank parameters
    lowrank_lr: float = 1e-3  # s, u_active, vh_active; LoRA/ReLoRA* factors
    warmup_steps: int = 2000
    rewarm_steps: int = 20  # linear lr re-warm of the low-rank group after each reset
    # after the warm-up: constant (the SST paper's OPT runs) | cosine (GaLore's LLaMA runs: every
    # group's lr decays to min_lr_ratio x its peak at train.max_steps; a re-warm multiplies on top)
    schedule: str = "constant"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables
    # what a ReLoRA* restart or an SST resample resets: exact (the reset slots restart as a fresh
    # Adam, their own age in the bias correction: sst_dist.optim) | moments (m and v zeroed under the
    # running step count: the state-reset trap of docs/design.md §1, kept as an ablation)
    reset: str = "exact"


@dataclass
class TrainConfig:
    global_batch: int = 8  # sequences per optimizer step, whatever the world size
    micro_batch: int | None = None  # sequences per rank per forward; None = global_batch / world
    max_steps: int = 40
    log_every: int = 1  # progress bar and wandb every this many steps; metrics.jsonl gets every step
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float64
    # longest wait of one rank for the others in a collective before the job ends with an error
    # naming the rank (a stalled or dead rank); rank 0's data preparation is not bound by it
    collective_timeout_s: float = 300.0


@dataclass
class DataConfig:
    source: str = "sample"  # sample | local | openwebtext | c4 (allenai/c4 en; its validation split held out)
    # source=local: a folder of .txt/.jsonl/.parquet files | source=c4: a downloaded copy of C4's
    # en folder (c4-train.*.json.gz, c4-validation.*.json.gz) instead of streaming the hub
    path: str | None = None
    hf_dataset: str = "Skylion007/openwebtext"
    tokenizer: str = "auto"  # auto | opt | bundled | a local tokenizer path
    cache_dir: str = "data"  # where prepared shards live
    val_fraction: float = 0.01
    num_proc: int = 0  # tokenizer processes; 0 = all cores
    max_docs: int | None = None  # stop preparing after this many documents
    on_bad_file: str = "stop"  # source=local, a file that does not read (not UTF-8, a broken .gz): stop | skip


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0 disables periodic evaluation
    tokens: int = 65536  # held-out tokens per evaluation


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: only at the end and on SIGTERM/SIGINT
    save: bool = True  # false: never written (measurements, where a 30B model's would take minutes)
    keep: int = 2


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "sst-dist"
    name: str | None = None


@dataclass
class Recipe:
    method: str = "sst"
    rank: int = 64
    targets: list[str] | None = None  # None: every target linear of the model's family (registry.TARGETS)
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    sst: SSTConfig = field(default_factory=SSTConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    relora: ReLoRAConfig = field(default_factory=ReLoRAConfig)
    galore: GaLoreConfig = field(default_factory=GaLoreConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def flatten(tree: dict, prefix: str = "") -> dict:
    """A recipe tree (Recipe.to_dict(), recipe.json) as {"section.key": value}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def upgrade_saved(tree: dict) -> dict:
    """A recipe tree the trainer wrote (recipe.json, a checkpoint's settings) with its moved keys
    (MOVED_KEYS) under their new names, so a run from before a move still exports and compares."""
    tree = json.loads(json.dumps(tree))
    for old, new in MOVED_KEYS.items():
        (old_section, old_key), (new_section, new_key) = old.split("."), new.split(".")
        section = tree.get(old_section)
        if isinstance(section, dict) and old_key in section:
            value = section.pop(old_key)
            target = tree.setdefault(new_section, {})
            if isinstance(target, dict):
                target.setdefault(new_key, value)
    return tree


def _allowed_keys(cls) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _coerce(value, annotation, key: str):
    """Checks `value` against a field's type, converting the harmless cases (int -> float)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], key) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)  # YAML 1.1 reads 1e-3 as a string
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):  # every float key is a rate, scale or fraction
            raise ConfigError(f"{key}: {value!r} is not a finite number")
        return number
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if f"{prefix}{key}" in MOVED_KEYS:
            new = MOVED_KEYS[f"{prefix}{key}"]
            raise ConfigError(f"{prefix}{key}: moved to {new} (same values); write {new}: {value}")
        if key not in names:
            raise ConfigError(f"unknown recipe key '{prefix}{key}'; allowed here: {_allowed_keys(cls)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, f"{prefix}{key}")
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str):
    if "=" not in dotted:
        raise ConfigError(f"--set {dotted!r}: expected dotted.key=value")
    key, raw = dotted.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else None
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")


def _positive(key: str, value, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}: {value!r} must be {bound}")


def _unit_interval(key: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{key}: {value!r} must be in [0, 1)")


def validate(recipe: Recipe) -> Recipe:
    from sst_dist.models import MODEL_SIZES, attn_implementations, min_target_dim

    _choice("method", recipe.method, METHODS)
    _choice("model.size", recipe.model.size, tuple(MODEL_SIZES))
    _choice("model.attn_implementation", recipe.model.attn_implementation, attn_implementations())
    choices = TARGETS[family(recipe.model.size)]
    if recipe.targets is None:
        recipe.targets = list(choices)
    for t in recipe.targets:
        _choice("targets", t, choices)
    if recipe.rank <= 0:
        raise ConfigError(f"rank: {recipe.rank} must be a positive integer")
    _choice("sst.path", recipe.sst.path, SST_PATHS)
    _choice("sst.init", recipe.sst.init, ("auto", "svd", "haar"))
    _choice("model.frozen_dtype", recipe.model.frozen_dtype, FROZEN_DTYPES)
    _choice("model.build", recipe.model.build, ("dense", "meta"))
    # the method's own checks (targets, rank, what it supports): sst_dist.registry
    METHODS[recipe.method].check(recipe, lambda: min_target_dim(recipe.model.size, recipe.targets))
    _choice("optim.reset", recipe.optim.reset, ("exact", "moments"))
    _choice("optim.schedule", recipe.optim.schedule, DECAYS)
    if not 0.0 <= recipe.optim.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio: {recipe.optim.min_lr_ratio!r} must be in [0, 1] "
                          "(the last step's lr over the peak's)")
    _choice("galore.proj_type", recipe.galore.proj_type, ("std", "reverse_std", "left", "right"))
    _choice("galore.projector", recipe.galore.projector, ("auto", "svd", "randomized"))
    _choice("train.device", recipe.train.device, ("auto", "cpu", "cuda"))
    _choice("train.dtype", recipe.train.dtype, ("auto", "float32", "bfloat16", "float64"))
    from sst_dist.data.shards import SOURCES

    _choice("data.source", recipe.data.source, SOURCES)
    _choice("data.on_bad_file", recipe.data.on_bad_file, ("stop", "skip"))
    _choice("wandb.mode", recipe.wandb.mode, WANDB_MODES)
    if recipe.model.init_from is not None:
        if recipe.model.build == "meta":
            raise ConfigError("model.init_from: loads a whole model, which model.build: meta never holds; "
                              "use model.build=dense")
        from sst_dist.models import check_init_from

        check_init_from(recipe.model.init_from, recipe.model.size)
    if recipe.data.source == "local" and not recipe.data.path:
        raise ConfigError("data.path: required when data.source is 'local' (a folder of text files)")
    for key, value in [
        ("sst.steps_per_iteration", recipe.sst.steps_per_iteration),
        ("sst.iterations_per_round", recipe.sst.iterations_per_round),
        ("relora.reset_every", recipe.relora.reset_every),
        ("galore.update_proj_gap", recipe.galore.update_proj_gap),
        ("galore.refresh_layers", recipe.galore.refresh_layers),
        ("model.seq_len", recipe.model.seq_len),
        ("train.global_batch", recipe.train.global_batch),
        ("train.micro_batch", recipe.train.micro_batch),
        ("train.max_steps", recipe.train.max_steps),
        ("train.log_every", recipe.train.log_every),
        ("optim.lr", recipe.optim.lr),
        ("optim.lowrank_lr", recipe.optim.lowrank_lr),
        ("galore.lr", recipe.galore.lr),
        ("galore.scale", recipe.galore.scale),
        ("lora.alpha", recipe.lora.alpha),
        ("optim.eps", recipe.optim.eps),
        ("train.collective_timeout_s", recipe.train.collective_timeout_s),
        ("data.max_docs", recipe.data.max_docs),
        ("checkpoint.keep", recipe.checkpoint.keep),
        ("eval.tokens", recipe.eval.tokens),
    ]:
        _positive(key, value)
    for key, value in [
        ("seed", recipe.seed),
        ("data.num_proc", recipe.data.num_proc),
        ("optim.warmup_steps", recipe.optim.warmup_steps),
        ("optim.rewarm_steps", recipe.optim.rewarm_steps),
        ("optim.weight_decay", recipe.optim.weight_decay),
        ("optim.grad_clip", recipe.optim.grad_clip),
        ("eval.every_steps", recipe.eval.every_steps),
        ("checkpoint.every_steps", recipe.checkpoint.every_steps),
    ]:
        _positive(key, value, allow_zero=True)
    _unit_interval("optim.beta1", recipe.optim.beta1)
    _unit_interval("optim.beta2", recipe.optim.beta2)
    if not 0.0 < recipe.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: {recipe.data.val_fraction} must be in (0, 1)")
    return recipe


class _RecipeLoader(yaml.SafeLoader):
    """yaml.safe_load, but a key written twice in one mapping is an error: PyYAML keeps the
    second silently, so a section written twice would drop the first one's settings."""


def _mapping_without_duplicates(loader, node, deep=False):
    first_line = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges are not duplicates
            continue
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, typing.Hashable):  # construct_mapping reports it
            continue
        line = key_node.start_mark.line + 1
        if key in first_line:
            raise ConfigError(f"line {line}: '{key}' is written twice (first on line {first_line[key]});"
                              " keep one")
        first_line[key] = line
    return loader.construct_mapping(node, deep)


_RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _read_yaml(path: Path) -> dict:
    try:
        tree = yaml.load(path.read_text(), Loader=_RecipeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"--recipe {path}:{where} is not valid YAML") from None
    except ConfigError as err:
        raise ConfigError(f"--recipe {path}: {err}") from None
    if tree is None:  # an empty file would train every default without a word
        raise ConfigError(f"--recipe {path}: the recipe is empty; write at least method and model "
                          "(start from recipes/tiny-sst.yaml)")
    if not isinstance(tree, dict):
        raise ConfigError(f"--recipe {path}: expected a mapping of recipe keys, got {type(tree).__name__}"
                          f" {tree!r:.60}")
    return tree


def _apply_environment(tree: dict) -> None:
    """Fills the keys of ENV_DEFAULTS from the environment where the recipe leaves them unset."""
    for variable, (dotted, allowed) in ENV_DEFAULTS.items():
        value = os.environ.get(variable)
        if not value:
            continue
        section, key = dotted.split(".")
        node = tree.get(section)
        if node is None:
            node = tree[section] = {}
        if not isinstance(node, dict) or key in node:
            continue  # not a section: _build reports it
        if allowed is not None and value not in allowed:
            raise ConfigError(f"{variable}: {value!r} is not one of {', '.join(allowed)} (it sets {dotted}"
                              " when the recipe does not); unset it or fix it")
        node[key] = value


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Recipe:
    """Reads a YAML recipe (or the defaults), applies `dotted.key=value` overrides and the
    environment (ENV_DEFAULTS) where neither set a key, validates."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--recipe {path}: no such file")
        tree = _read_yaml(path)
    for item in overrides:
        _set_dotted(tree, item)
    _apply_environment(tree)
    return validate(_build(Recipe, tree))

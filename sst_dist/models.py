"""OPT models by size name, built from config (no download): the published shapes plus `tiny`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn
from transformers import OPTConfig, OPTForCausalLM

from sst_dist.errors import ConfigError
from sst_dist.hub import hub_reachable

# hidden, layers, heads, ffn (Zhang et al. 2022, Table 1; HF facebook/opt-* configs)
OPT_SIZES: dict[str, dict] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=256),
    "125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072),
    # 350m is the odd one: post-LayerNorm and a 512-wide embedding projected in and out.
    "350m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
                 word_embed_proj_dim=512, do_layer_norm_before=False),
    "1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192),
    "2.7b": dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240),
    "6.7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384),
    "13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, ffn_dim=20480),
    "30b": dict(hidden_size=7168, num_hidden_layers=48, num_attention_heads=56, ffn_dim=28672),
    "66b": dict(hidden_size=9216, num_hidden_layers=64, num_attention_heads=72, ffn_dim=36864),
}
OPT_VOCAB = 50272  # the OPT tokenizer's 50265 entries padded to a multiple of 8


def target_shapes(size: str) -> dict[str, tuple[int, int]]:
    """(out, in) of each targetable linear in one decoder layer."""
    dims = OPT_SIZES[size]
    h, f = dims["hidden_size"], dims["ffn_dim"]
    attn = {name: (h, h) for name in ("q_proj", "k_proj", "v_proj", "out_proj")}
    return {**attn, "fc1": (f, h), "fc2": (h, f)}


def min_target_dim(size: str, targets) -> int:
    shapes = target_shapes(size)
    return min(min(shapes[t]) for t in targets)


def opt_config(size: str, vocab_size: int = OPT_VOCAB, seq_len: int = 2048,
               attn_implementation: str = "sdpa") -> OPTConfig:
    dims = dict(OPT_SIZES[size])
    dims.setdefault("word_embed_proj_dim", dims["hidden_size"])
    config = OPTConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max(seq_len, 2048 if size != "tiny" else seq_len),
        dropout=0.0,  # pretraining from scratch, as in the paper's OPT runs
        attention_dropout=0.0,
        activation_dropout=0.0,
        pad_token_id=1, bos_token_id=2, eos_token_id=2,
        **dims,
    )
    config._attn_implementation = attn_implementation
    return config


def attn_implementations() -> tuple[str, ...]:
    """model.attn_implementation values: eager plus the kernels this transformers registers for
    OPT (sdpa, flash_attention_2/3/4, flex_attention); `paged|` ones serve generation only."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    registered = [name for name in ALL_ATTENTION_FUNCTIONS.keys() if not name.startswith("paged|")]
    return ("eager", "sdpa", *sorted(set(registered) - {"sdpa"}))


def check_attn_implementation(name: str, device) -> None:
    """ConfigError (one line) if OPT cannot train with attention `name` on `device` here: a kernel
    whose package is missing, flex_attention on CPU. Found before the data is prepared, not at
    the first step, by building a 2-layer model of width 64 with it."""
    key = "model.attn_implementation"
    if name == "flex_attention" and device.type == "cpu":
        raise ConfigError(f"{key}: flex_attention has no backward on CPU; use sdpa or eager")
    try:
        OPTForCausalLM(opt_config("tiny", vocab_size=16, seq_len=8, attn_implementation=name))
    except (ImportError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ConfigError(f"{key}: {name!r} cannot be used here ({reason}); use sdpa or eager") from None


def enable_activation_checkpointing(model: OPTForCausalLM) -> None:
    """Recomputes each decoder block's forward in the backward (model.gradient_checkpointing).
    Non-reentrant: its recompute runs with autograd on, which the methods' own autograd functions
    and GaLore's gradient probe need (the reentrant form runs the first forward under no_grad)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: what FSDP2 shards as one unit each, and what compile_blocks compiles
    (HF keeps them in a ModuleList named `layers`: model.decoder.layers for OPT, model.layers for
    Llama-style models)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers":
            return list(module)
    raise ConfigError(f"{type(model).__name__}: found no ModuleList named 'layers' (its decoder blocks)")


def compile_blocks(model: torch.nn.Module, method_layers=()) -> int:
    """model.compile: torch.compile of each decoder block, in place (nn.Module.compile: the module,
    its parameters and state-dict names stay the same, so every engine's hooks, checkpoints and
    the methods' writes through the seam are untouched). Returns the number of blocks compiled.

    Per block rather than the whole model: blocks are what FSDP2 shards and what activation
    checkpointing recomputes, so a block's compiled graph and the engines' per-block hooks line
    up (FSDP2's and ZeRO-3's hooks are compiler-disabled and run eagerly between graphs); and the
    blocks share one graph instead of the model's one long one.

    `method_layers` (the methods' own layers) run eagerly inside the compiled blocks unless they
    say they are `traceable`: their autograd functions keep Python state across calls (SST's W kept
    per step and keyed on tensor versions, its gradient summed over micro-batches; GaLore's
    gradient probes), which a traced graph would freeze at its first call. SST's functional path
    is a pure function and is traced with its block."""
    for layer in method_layers:
        if not getattr(layer, "traceable", False):
            layer.forward = torch.compiler.disable(layer.forward, recursive=True)
    blocks = decoder_blocks(model)
    for block in blocks:
        block.compile()
    return len(blocks)


def build_model(size: str, vocab_size: int = OPT_VOCAB, seq_len: int = 2048,
                attn_implementation: str = "sdpa", init_from: str | None = None) -> OPTForCausalLM:
    model = OPTForCausalLM(opt_config(size, vocab_size, seq_len, attn_implementation))
    if init_from is not None:
        load_init_weights(model, init_from, size)
    return model


# ----------------------------------------------------------------------------- model.init_from

_ARCHITECTURE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim", "word_embed_proj_dim",
                 "do_layer_norm_before")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def _architecture(config: dict) -> dict:
    """The keys of an OPT config that fix its weights' shapes (the size), with OPTConfig's defaults."""
    defaults = {"word_embed_proj_dim": config.get("hidden_size"), "do_layer_norm_before": True}
    return {key: config.get(key, defaults.get(key)) for key in _ARCHITECTURE}


def _size_mismatch(path, theirs: dict, size: str) -> str | None:
    ours = _architecture({**OPT_SIZES[size]})
    theirs = _architecture(theirs)
    if theirs == ours:
        return None
    same = [name for name in OPT_SIZES if _architecture(dict(OPT_SIZES[name])) == theirs]
    hint = f"set model.size: {same[0]}" if same else "it is none of the OPT sizes built here"
    differ = ", ".join(f"{k} {theirs[k]} (model.size {size}: {ours[k]})" for k in _ARCHITECTURE if theirs[k] != ours[k])
    return f"model.init_from: {path} does not have the shape of model.size {size!r}: {differ}; {hint}"


def check_init_from(path: str, size: str) -> None:
    """ConfigError (one line) for a model.init_from that cannot start a `size` model: a folder
    without an OPT config.json, or an OPT of another size. A hub name is checked when it loads."""
    folder = Path(path).expanduser()
    if not folder.exists():
        if _HUB_NAME.fullmatch(path) and not path.startswith("."):
            return
        raise ConfigError(f"model.init_from: {path}: no such folder")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"model.init_from: {path} is not a transformers model folder (no config.json)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        raise ConfigError(f"model.init_from: {config_file} is not readable JSON") from None
    if config.get("model_type") != "opt":
        raise ConfigError(f"model.init_from: {path} holds a {config.get('model_type')!r} model, not OPT")
    problem = _size_mismatch(path, config, size)
    if problem:
        raise ConfigError(problem)


def load_init_weights(model: OPTForCausalLM, path: str, size: str) -> None:
    """Copies a transformers OPT's weights (a local folder, or the hub when reachable) into `model`,
    which has the recipe's shapes; ConfigError (one line) if they differ (size, vocabulary, seq_len)."""
    local = Path(path).expanduser().exists()
    try:
        source = OPTForCausalLM.from_pretrained(str(Path(path).expanduser()) if local else path,
                                                dtype=torch.float32,
                                                local_files_only=local or not hub_reachable())
    except Exception as err:  # OSError, ValueError, hub errors: all mean "cannot load it here"
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ConfigError(f"model.init_from: cannot load {path} ({reason})") from None
    problem = _size_mismatch(path, source.config.to_dict(), size)
    if problem:
        raise ConfigError(problem)
    theirs, ours = source.state_dict(), model.state_dict()
    for name, tensor in ours.items():
        if name not in theirs:
            raise ConfigError(f"model.init_from: {path} has no {name}")
        if theirs[name].shape != tensor.shape:
            raise ConfigError(f"model.init_from: {path}: {name} is {tuple(theirs[name].shape)} there, "
                              f"{tuple(tensor.shape)} here (the run's vocabulary and model.seq_len must match)")
    with torch.no_grad():
        for name, tensor in ours.items():
            tensor.copy_(theirs[name])

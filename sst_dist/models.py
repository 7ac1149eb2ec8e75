"""Models by size name, built from config (no download), in two families: OPT (its published
shapes plus `tiny`) and LLaMA-style decoders (`llama-*`: GaLore's published shapes plus
`llama-tiny`). A size's family (sst_dist.registry.family) decides the transformers class, its
config, the target linears and the vocabulary; the rest of the project asks here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from sst_dist.errors import ConfigError
from sst_dist.hub import hub_reachable
from sst_dist.registry import family

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

# hidden, intermediate (SwiGLU), heads, layers: GaLore's configs (Zhao et al. 2024, configs/llama_*.json),
# which APOLLO's and Fira's tables share; llama-tiny trains on a CPU in seconds (k = 64, as OPT's tiny)
LLAMA_SIZES: dict[str, dict] = {
    "llama-tiny": dict(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_hidden_layers=2),
    "llama-60m": dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_hidden_layers=8),
    "llama-130m": dict(hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_hidden_layers=12),
    "llama-350m": dict(hidden_size=1024, intermediate_size=2736, num_attention_heads=16, num_hidden_layers=24),
    "llama-1b": dict(hidden_size=2048, intermediate_size=5461, num_attention_heads=32, num_hidden_layers=24),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=32),
}
MODEL_SIZES: dict[str, dict] = {**OPT_SIZES, **LLAMA_SIZES}  # model.size's choices
# the vocabulary the estimator assumes when given none: LLaMA's 32000 tokens, as GaLore's tables count
LLAMA_VOCAB = 32000


def sizes_of(size: str) -> dict[str, dict]:
    """The sizes of `size`'s family."""
    return LLAMA_SIZES if family(size) == "llama" else OPT_SIZES


def target_shapes(size: str) -> dict[str, tuple[int, int]]:
    """(out, in) of each targetable linear in one decoder layer."""
    dims = MODEL_SIZES[size]
    h = dims["hidden_size"]
    if family(size) == "llama":
        f = dims["intermediate_size"]
        attn = {name: (h, h) for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
        return {**attn, "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}
    f = dims["ffn_dim"]
    attn = {name: (h, h) for name in ("q_proj", "k_proj", "v_proj", "out_proj")}
    return {**attn, "fc1": (f, h), "fc2": (h, f)}


def default_vocab(size: str) -> int:
    """The vocabulary of a `size` model with no data to take it from (the estimator, the benchmarks)."""
    return LLAMA_VOCAB if family(size) == "llama" else OPT_VOCAB


def model_vocab(size: str, data_vocab: int) -> int:
    """The embedding rows of a `size` model trained on data of `data_vocab` tokens: the tokenizer's
    own for LLaMA and OPT's tiny; OPT's published 50272 (or more) for its other sizes, so an OPT
    checkpoint keeps its shapes."""
    if family(size) == "llama" or size == "tiny":
        return data_vocab
    return max(OPT_VOCAB, data_vocab)


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


def llama_config(size: str, vocab_size: int, seq_len: int = 2048,
                 attn_implementation: str = "sdpa") -> LlamaConfig:
    """GaLore's LLaMA settings: RMSNorm eps 1e-6, SiLU gates, rotary positions, no biases, an untied
    head, init N(0, 0.02²); no dropout."""
    dims = LLAMA_SIZES[size]
    config = LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=seq_len,
        num_key_value_heads=dims["num_attention_heads"],
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_dropout=0.0,
        pad_token_id=None,  # no padding row: every id is a token of the data
        **dims,
    )
    config._attn_implementation = attn_implementation
    return config


def model_config(size: str, vocab_size: int = OPT_VOCAB, seq_len: int = 2048, attn_implementation: str = "sdpa"):
    """The transformers config of a model.size, of its family."""
    make = llama_config if family(size) == "llama" else opt_config
    return make(size, vocab_size, seq_len, attn_implementation)


def model_class(size: str) -> type:
    return LlamaForCausalLM if family(size) == "llama" else OPTForCausalLM


def tied_head(size: str) -> bool:
    """Whether the LM head is the token embedding: OPT ties them, LLaMA does not."""
    return family(size) == "opt"


def init_std(config) -> float:
    """The std of a fresh model's N(0, std²) weights (OPT calls it init_std, LLaMA initializer_range)."""
    return getattr(config, "init_std", None) or getattr(config, "initializer_range", 0.02)


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


def compile_layers(method_layers) -> int:
    """model.compile where blocks cannot be compiled (ZeRO-3: its per-module hooks fetch and release
    parameters inside every block, which dynamo would trace and recompile past its limit): the
    methods' layers that can compile their computation alone do (`compile_alone`: SST's
    functional path), between the hooks; the rest of the model runs eagerly. Returns the number
    of layers compiled."""
    return sum(bool(layer.compile_alone()) for layer in method_layers if hasattr(layer, "compile_alone"))


def build_model(size: str, vocab_size: int = OPT_VOCAB, seq_len: int = 2048,
                attn_implementation: str = "sdpa", init_from: str | None = None) -> nn.Module:
    model = model_class(size)(model_config(size, vocab_size, seq_len, attn_implementation))
    if init_from is not None:
        load_init_weights(model, init_from, size)
    return model


# ----------------------------------------------------------------------------- model.init_from

# the keys of a family's config that fix its weights' shapes (the size), with the config's defaults
_ARCHITECTURE = {
    "opt": ("hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim", "word_embed_proj_dim",
            "do_layer_norm_before"),
    "llama": ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "tie_word_embeddings"),
}
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def _architecture(config: dict, kind: str) -> dict:
    defaults = {"word_embed_proj_dim": config.get("hidden_size"), "do_layer_norm_before": True,
                "num_key_value_heads": config.get("num_attention_heads"), "tie_word_embeddings": kind == "opt"}
    return {key: config.get(key, defaults.get(key)) for key in _ARCHITECTURE[kind]}


def _ours(size: str) -> dict:
    kind = family(size)
    return _architecture(model_config(size, vocab_size=16, seq_len=16).to_dict(), kind)


def _size_mismatch(path, theirs: dict, size: str) -> str | None:
    kind = family(size)
    ours, theirs = _ours(size), _architecture(theirs, kind)
    if theirs == ours:
        return None
    same = [name for name in sizes_of(size) if _ours(name) == theirs]
    hint = f"set model.size: {same[0]}" if same else f"it is none of the {kind.upper()} sizes built here"
    keys = _ARCHITECTURE[kind]
    differ = ", ".join(f"{k} {theirs[k]} (model.size {size}: {ours[k]})" for k in keys if theirs[k] != ours[k])
    return f"model.init_from: {path} does not have the shape of model.size {size!r}: {differ}; {hint}"


def check_init_from(path: str, size: str) -> None:
    """ConfigError (one line) for a model.init_from that cannot start a `size` model: a folder
    without a config.json of the size's family, or one of another size. A hub name is checked when
    it loads."""
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
    kind, theirs = family(size), config.get("model_type")
    if theirs != kind:
        hint = f"; set a model.size of its family ({'llama-*' if theirs == 'llama' else 'OPT'})" if (
            theirs in _ARCHITECTURE) else ""
        raise ConfigError(f"model.init_from: {path} holds a {theirs!r} model, not {kind.upper()} "
                          f"(model.size {size!r}){hint}")
    problem = _size_mismatch(path, config, size)
    if problem:
        raise ConfigError(problem)


def load_init_weights(model: nn.Module, path: str, size: str) -> None:
    """Copies the weights of a transformers model of the size's family (a local folder, or the hub
    when reachable) into `model`, which has the recipe's shapes; ConfigError (one line) if they
    differ (size, vocabulary, seq_len)."""
    local = Path(path).expanduser().exists()
    try:
        source = model_class(size).from_pretrained(str(Path(path).expanduser()) if local else path,
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

"""Per-GPU memory of each method under DeepSpeed ZeRO, estimated without a GPU.

    python -m sst_dist.memory --model opt-1.3b --methods full,lora,relora,galore,sst,sst+galore \\
        --rank 64 --zero 2 --gpus 8 --micro-batch 8 --seq 2048

Parameters are counted, not re-derived: the real model (OPT or LLaMA) is built on the `meta` device and the
method's registered builder puts its real layers in place (each says what it holds beyond its
parameters: `footprint()`), so a change in the code changes the numbers. Bytes per parameter follow DeepSpeed's mixed precision
(its `estimate_zero2_model_states_mem_needs` counts 2 + 18/gpus bytes per parameter for ZeRO-2):

    bf16   weights 2, gradients 2, fp32 master 4, Adam 4 + 4; for the step, copies of the gradient
           partition: flattened 2 and fp32 4 (DeepSpeed's estimator counts 2 + 4 for gradients)
    fp32   weights 4, gradients 4, Adam 4 + 4; the flattened copy 4; no masters

Only trainable parameters have gradients, masters and Adam moments; frozen ones (SST's factors U ‖ Vh,
LoRA's W, GaLoreLinear's W and projector) are weights only, in bf16 under DeepSpeed's bf16, which
casts every weight (model.frozen_dtype changes nothing there). ZeRO-1 shards masters and Adam
moments (and the step's gradient copies, made per partition) over the GPUs, ZeRO-2 also the
gradients, ZeRO-3 also every weight, frozen ones included. Activations are an estimate for
Hugging Face OPT or LLaMA with SDPA, with or without activation checkpointing (`activation_bytes`).
`--engine torch` / `--engine fsdp` estimate the trainer's own engines instead (`estimate_engine`).

`total` is the peak, not the sum of the columns: activations live in the forward and backward,
the reduce bucket through the backward, the gradient copies only in the optimizer step.
Checked on one H200 (bench/memory.py, ZeRO-2, OPT-125M to 1.3B): within 0.5-4 % of the measured
peak for full-rank and LoRA; the rest is the CUDA libraries' workspaces (about 70 MB).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from sst_dist.config import FROZEN_DTYPES, SST_PATHS
from sst_dist.registry import METHODS, TARGETS, family, galore_rank as resolve_galore_rank
from sst_dist.errors import ConfigError

GIB = 2**30
PRECISIONS = ("bf16", "fp32")
ZERO_STAGES = (0, 1, 2, 3)
# optimizer: GaLoreAdamW's own accounting (full weights, gradients and masters; Adam moments in the
#   projected space), as the GaLore paper counts it.
# layer: GaLoreLinear / GaLoreEmbedding, the fixed-shape form the trainer uses under every engine
#   (frozen W and projector, trainable B).
GALORE_FORMS = ("optimizer", "layer")
GALORE_PROJ_TYPE = "std"  # the recipe default (galore.proj_type)
# DeepSpeed's default zero_optimization.reduce_bucket_size (elements): the bucket is allocated
# whole at the first gradient of every backward, however small the model.
REDUCE_BUCKET_SIZE = 500_000_000
CATEGORIES = ("weights", "gradients", "masters", "optimizer", "buffers", "activations", "total")


def _sizes():
    from sst_dist.models import MODEL_SIZES

    return MODEL_SIZES


def _dims(size: str) -> dict:
    return _sizes()[size]


def model_name(size: str) -> str:
    """A model.size as the tables name it: opt-1.3b, llama-60m."""
    return size if family(size) == "llama" else f"opt-{size}"


def resolve_model(name: str) -> str:
    """'opt-1.3b', 'OPT-1.3B' or '1.3b' -> '1.3b'; 'LLaMA-60M' -> 'llama-60m' (a model.size)."""
    sizes = _sizes()
    key = str(name).lower().removeprefix("opt-")
    if key not in sizes:
        allowed = ", ".join(model_name(s) for s in sizes)
        raise ConfigError(f"--model: {name!r} is not one of {allowed} (the 'opt-' prefix is optional)")
    return key


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")


def _at_least(key: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{key}: {value!r} must be an integer >= {low}")


# ----------------------------------------------------------------------------- counting

@dataclass(frozen=True)
class ParamCounts:
    """Element counts of one model + method, each parameter once (OPT ties lm_head to embed_tokens)."""

    total: int
    trainable: int  # have a gradient and an fp32 master
    frozen: int
    moments: int  # elements of ONE Adam moment: trainable, GaLore targets in their projected shape
    ages: int  # elements of the per-element step counts of the groups whose slots are reset
    #            (SST's s, u_active, vh_active; ReLoRA*'s factors): sst_dist.optim
    projectors: int  # GaLoreAdamW's projectors, kept in its optimizer state (optimizer form only)
    largest_module: int  # parameters of the largest single module (what ZeRO-3 gathers at once)
    buffer_bytes: int  # module buffers (SST's active indices), replicated under every stage
    # per token, summed over all layers: what method layers keep for backward beyond nn.Linear's
    # input (LoRA x·Aᵀ: r; factored SST x·Vhᵀ: k; GaLoreLinear with a right projector x·Qᵀ: r)
    extra_saved_width: int
    # GaLore's layer form: per layer, in model order, (elements of its full G, probe views per
    # forward: 2 for a tied embedding, whose head and lookup each send a G), for refresh_bytes
    refresh_grads: tuple[tuple[int, int], ...]
    # SST materialized: elements of every layer's W (kept) and G (summed); functional: its W, which
    # autograd keeps from the forward to the backward
    kept_weight: int = 0
    block: int = 0  # parameters of one decoder block (an FSDP unit), and of them trainable
    block_trainable: int = 0
    formed_weight: int = 0  # out x in of the largest W a layer forms while it computes (SST dense, functional)
    uncast: int = 0  # trainable elements autocast keeps no bf16 copy of (SST's spectral, read as stored)


@lru_cache(maxsize=64)
def count_parameters(model: str, method: str, rank: int = 64, *, galore_rank: int | None = None,
                     sst_path: str = "dense", galore_form: str = "optimizer",
                     targets: tuple[str, ...] | None = None, seq: int = 2048,
                     vocab_size: int | None = None) -> ParamCounts:
    """Builds the model on the meta device, applies the method's registered builder (its real
    layers, as the trainer does), and counts. What the parameters do not say, each layer says in
    its `footprint()`: extra width kept for the backward (saved_width), a W kept (kept_weight) or
    formed while it computes (formed_weight), trainable elements autocast does not copy (uncast),
    a GaLore refresh's G (refresh_grad), GaLoreAdamW's own form (optimizer_form). The ages are the
    elements of the method's resettable optimizer groups. `targets`: None, every target of the
    model's family.
    """
    from sst_dist.config import GaLoreConfig, ModelConfig, Recipe, SSTConfig
    from sst_dist.methods import build_method
    from sst_dist.models import build_model, decoder_blocks, default_vocab

    size = resolve_model(model)
    targets = TARGETS[family(size)] if targets is None else targets
    _validate_method(size, method, rank, galore_rank, sst_path, galore_form, targets)
    recipe = Recipe(method=method, rank=rank, targets=list(targets), sst=SSTConfig(path=sst_path),
                    model=ModelConfig(size=size), galore=GaLoreConfig(rank=galore_rank, proj_type=GALORE_PROJ_TYPE))
    with torch.device("meta"):
        net = build_model(size, vocab_size=vocab_size or default_vocab(size), seq_len=seq)
    built = build_method(recipe, net)

    sums = dict(saved_width=0, kept_weight=0, uncast=0)
    formed = 0
    refresh_grads: list[tuple[int, int]] = []
    full_ids, low_ids, proj_ids = set(), set(), set()  # the optimizer form: W trained, B and P not parameters
    for layer in built.layers.values():
        footprint = layer.footprint()
        if galore_form == "optimizer" and "optimizer_form" in footprint:
            weight, low, proj = footprint["optimizer_form"]
            full_ids.add(id(weight)), low_ids.add(id(low)), proj_ids.add(id(proj))
            continue
        for key in sums:
            sums[key] += footprint.get(key, 0)
        formed = max(formed, footprint.get("formed_weight", 0))
        if "refresh_grad" in footprint:
            refresh_grads.append(footprint["refresh_grad"])
    groups = built.param_groups(net)
    ages = sum(p.numel() for group in groups if group.get("resettable") for p in group["params"])

    def kept(p):
        return id(p) not in low_ids and id(p) not in proj_ids

    def trains(p):
        return p.requires_grad or id(p) in full_ids

    params = [p for p in net.parameters() if kept(p)]  # each tensor once: the tied LM head is not counted again
    trainable = sum(p.numel() for p in params if trains(p))
    # one Adam moment: every trainable element, GaLoreAdamW's targets in their projected (B's) shape
    moments = sum(p.numel() for p in params if trains(p) and id(p) not in full_ids)
    moments += sum(p.numel() for p in net.parameters() if id(p) in low_ids)
    projectors = sum(p.numel() for p in net.parameters() if id(p) in proj_ids)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False) if kept(p)) for m in net.modules())
    block = [p for p in decoder_blocks(net)[0].parameters() if kept(p)]
    return ParamCounts(
        total=sum(p.numel() for p in params), trainable=trainable,
        frozen=sum(p.numel() for p in params if not trains(p)), moments=moments, ages=ages,
        projectors=projectors, largest_module=largest,
        buffer_bytes=sum(b.numel() * b.element_size() for b in net.buffers()),
        extra_saved_width=sums["saved_width"], refresh_grads=tuple(refresh_grads),
        kept_weight=sums["kept_weight"], block=sum(p.numel() for p in block),
        block_trainable=sum(p.numel() for p in block if trains(p)), formed_weight=formed,
        uncast=sums["uncast"])


def _validate_method(size, method, rank, galore_rank, sst_path, galore_form, targets) -> None:
    from sst_dist.models import min_target_dim

    _choice("--methods", method, METHODS)
    _choice("--sst-path", sst_path, SST_PATHS)
    _choice("--galore-form", galore_form, GALORE_FORMS)
    for t in targets:
        _choice("targets", t, TARGETS[family(size)])
    if method == "full":
        return
    limit = min_target_dim(size, targets)
    for key, value in (("--rank", rank), ("--galore-rank", galore_rank)):
        if value is not None and (not isinstance(value, int) or not 0 < value <= limit):
            raise ConfigError(f"{key}: {value!r} must be in 1..{limit} for {model_name(size)}")


def refresh_bytes(counts: ParamCounts, micro_batches: int = 1, refresh_layers: int | None = None) -> int:
    """The dense G (fp32 at least: GaLoreLinear.new_probe) that a GaLore refresh in the layer form
    holds at its peak, as galore.GradientProbe holds it: one micro-batch per step, each layer's G
    while it is turned into a projector (a tied embedding's head G waits for its lookup's: two);
    several, in each probe pass (galore.refresh_groups) its layers' running sums and the G
    arriving. Unsharded under every engine; the owner's reduce sums in place."""
    from sst_dist.galore import refresh_groups

    sizes = counts.refresh_grads
    peak = 0
    for group in refresh_groups(range(len(sizes)), micro_batches, refresh_layers):
        arriving = max(sizes[i][0] * sizes[i][1] for i in group)
        held = sum(sizes[i][0] for i in group) if micro_batches > 1 else 0
        peak = max(peak, held + arriving)
    return 4 * peak


# ----------------------------------------------------------------------------- activations

def activation_bytes(model: str, micro_batch: int, seq: int, *, precision: str = "bf16",
                     extra_saved_width: int = 0, vocab_size: int | None = None,
                     checkpointing: bool = False) -> int:
    """Bytes autograd holds at the peak of one micro-batch: Hugging Face OPT or LLaMA, SDPA (flash
    or memory-efficient kernels, which keep no s x s matrix), with or without activation
    checkpointing, no dropout (the recipes train without it), then sst_dist.evaluate.lm_loss's fp32
    cross-entropy.

    Each term was checked against torch.autograd.graph.saved_tensors_hooks and a profiled peak on
    CPU; on a GPU the caching allocator adds rounding and fragmentation on top.
    """
    from sst_dist.models import default_vocab

    size = resolve_model(model)
    dims = _dims(size)
    e = 2 if precision == "bf16" else 4  # bytes per activation element
    tokens = micro_batch * seq
    logits = 12 * (vocab_size or default_vocab(size))  # the loss, as below
    h, heads, layers = dims["hidden_size"], dims["num_attention_heads"], dims["num_hidden_layers"]
    if family(size) == "llama":
        f = dims["intermediate_size"]
        # Per decoder layer and token: each RMSNorm keeps its input cast to fp32 (4h), its rsqrt (4)
        # and its normed output in the weights' dtype (eh); q/k/v's shared input, q and k after the
        # rotary embedding, v, SDPA's output and o_proj's input (6eh) and SDPA's log-sum-exp (one
        # per head); SwiGLU's gate and up outputs, SiLU's output and their product, down_proj's
        # input (4ef). Outside: token and position ids, the final RMSNorm, the head's input and
        # the rotary cos/sin.
        per_layer = 2 * ((4 + e) * h + 4) + 6 * e * h + 4 * e * f + heads * 4
        edges = 2 * 8 + (4 + e) * h + 4 + e * h + e * (h // heads)
    else:
        f = dims["ffn_dim"]
        proj = dims.get("word_embed_proj_dim", h)
        pre_ln = dims.get("do_layer_norm_before", True)
        # Per decoder layer and token, kept for backward: the two LayerNorm inputs (2h); the input of
        # q/k/v, one tensor shared by the three (h); q, k, v, kept by SDPA (3h); the attention output,
        # kept by SDPA and, being the same tensor, by out_proj as its input (h); fc1's input (h); ReLU's
        # output, kept by ReLU and by fc2 as its input (f) (fc1's own output is freed). In fp32: each
        # LayerNorm's mean and rstd (2 x 2) and SDPA's log-sum-exp (one per head).
        # The layout holds for post-LayerNorm 350m as well: the residual sum, not the input, is normed.
        per_layer = (8 * h + f) * e + 2 * 2 * 4 + heads * 4
        # Outside the layers: token and position ids (int64); the LM head's input; pre-LN models keep
        # the final LayerNorm's input and statistics; 350m keeps project_in's and project_out's inputs.
        edges = 2 * 8 + proj * e
        if pre_ln:
            edges += h * e + 2 * 4
        if proj != h:
            edges += proj * e + h * e
    # The loss: cross-entropy keeps fp32 log-probabilities (b·s·V); the peak is its backward, which
    # holds those, the gradient coming in and the gradient going out, all fp32: 12 bytes per logit.
    # (The forward's bf16 logits and fp32 copy, 6 bytes, are gone by then.)
    if checkpointing:  # every block's input, and one block's activations while it recomputes
        return tokens * (layers * h * e + per_layer + extra_saved_width * e // layers + edges + logits)
    return tokens * (layers * per_layer + extra_saved_width * e + edges + logits)


# ----------------------------------------------------------------------------- the estimate

def estimate(model: str, method: str, rank: int, zero: int, gpus: int, micro_batch: int, seq: int,
             precision: str = "bf16", offload: bool = False, galore_rank: int | None = None,
             sst_path: str = "dense", *, galore_form: str = "optimizer", grad_accum: int = 1,
             reduce_bucket_size: int = REDUCE_BUCKET_SIZE, vocab_size: int | None = None,
             checkpointing: bool = False, refresh_layers: int | None = None) -> dict:
    """Bytes per GPU by category (CATEGORIES), plus 'cpu': bytes per GPU's process kept in host
    memory when the optimizer is offloaded (masters, Adam moments, fp32 gradient copy).

    precision 'bf16': DeepSpeed's bf16 mixed precision (bf16 weights and gradients, fp32 masters
    and Adam); 'fp32': everything fp32, no masters. offload: optimizer states and masters on the CPU
    (DeepSpeed's offload_optimizer; ZeRO 1-3). grad_accum > 1: the gradients of earlier
    micro-batches are held through the later forwards.
    """
    size = resolve_model(model)
    _choice("--zero", zero, ZERO_STAGES)
    _choice("--precision", precision, PRECISIONS)
    for key, value, low in (("--gpus", gpus, 1), ("--micro-batch", micro_batch, 1), ("--seq", seq, 1),
                            ("--grad-accum", grad_accum, 1), ("reduce_bucket_size", reduce_bucket_size, 0)):
        _at_least(key, value, low)
    if offload and zero == 0:
        raise ConfigError("--offload: needs ZeRO stage 1, 2 or 3 (DeepSpeed's offload_optimizer)")
    counts = count_parameters(size, method, rank, galore_rank=galore_rank, sst_path=sst_path,
                              galore_form=galore_form, seq=seq, vocab_size=vocab_size)

    def shard(nbytes: float, from_stage: int) -> float:
        return nbytes / gpus if zero >= from_stage else nbytes

    bf16 = precision == "bf16"
    wb = 2 if bf16 else 4  # bytes of a weight and of its gradient
    # SST materialized: each rank forms and keeps every layer's whole W, from the gathered factors,
    # from a step's first forward to the end of its optimizer step
    kept = counts.kept_weight * wb
    weights = shard(counts.total * wb, 3) + counts.buffer_bytes + kept
    grads = shard(counts.trainable * wb, 2)
    # SST materialized: with accumulation, G summed in float32 through the step's micro-batches
    grads += counts.kept_weight * 4 if grad_accum > 1 and sst_path == "materialized" else 0
    # GaLoreLinear's refresh probe runs its own backward and holds full gradients G, unsharded,
    # while projectors are taken from them: galore.refresh_layers (refresh_layers) bounds how many
    # with accumulation
    refresh = refresh_bytes(counts, grad_accum, refresh_layers)
    # The step: ZeRO flattens this rank's gradient partition into a new buffer and, under bf16,
    # casts that to fp32 for the optimizer; the gradients, both copies and the optimizer live together.
    step_copies = shard(counts.trainable * wb, 1) + (shard(counts.trainable * 4, 1) if bf16 else 0.0)
    masters = shard(counts.trainable * 4, 1) if bf16 else 0.0
    optimizer = shard((2 * counts.moments + counts.ages + counts.projectors) * 4, 1)
    bucket = reduce_bucket_size * wb if zero >= 1 else 0
    # ZeRO-3 gathers a module's weights (and reduces its gradients) at a time; DeepSpeed's own
    # estimator reserves 2 x the largest module for it
    gathered = 2 * wb * counts.largest_module if zero == 3 else 0
    activations = activation_bytes(size, micro_batch, seq, precision=precision,
                                   extra_saved_width=counts.extra_saved_width, vocab_size=vocab_size,
                                   checkpointing=checkpointing)
    cpu = 0.0
    if offload:  # the step runs on the CPU, from copies made there
        cpu = masters + optimizer + step_copies
        masters = optimizer = step_copies = 0.0
    persistent = weights + masters + optimizer
    held_grads = grads if grad_accum > 1 else 0.0
    phases = (
        activations + held_grads + gathered,  # the forward, and the loss backward at its start
        grads + bucket + gathered,  # the end of the backward: every gradient made, bucket still held
        grads + step_copies,  # the optimizer step
        refresh + gathered,  # GaLoreLinear's refresh steps, before their own forward
    )
    result = {
        "weights": weights, "gradients": grads + step_copies, "masters": masters, "optimizer": optimizer,
        "buffers": bucket + gathered, "activations": activations, "total": persistent + max(phases),
        "cpu": cpu, "kept_weight": kept,  # within weights; released between steps
    }
    return {k: int(round(v)) for k, v in result.items()}


# ----------------------------------------------------------------------------- torch and FSDP2

ENGINES = ("deepspeed", "torch", "fsdp")


def autocast_activation_bytes(model: str, micro_batch: int, seq: int, *, extra_saved_width: int = 0,
                              vocab_size: int | None = None, checkpointing: bool = False) -> int:
    """Bytes autograd holds at the peak of one micro-batch under the torch engine: fp32 weights,
    bf16 autocast. The residual stream, LayerNorm inputs and outputs stay fp32 there, so a layer
    keeps more than under DeepSpeed's bf16 weights (activation_bytes). Per layer and token: the two
    LayerNorm inputs (2 x 4h); q/k/v's input, as a bf16 cast per linear (3 x 2h) for nn.Linear or
    one fp32 tensor kept by the three SST functions (4h) plus fc1's (4h vs 2h) - either way 24h with
    q, k, v (3 x 2h) and the attention output (2h); ReLU's output (2f); the statistics. Outside:
    the final LayerNorm's input (4h), the head's bf16 input (2h), the ids; the loss as in
    activation_bytes. Checked against saved_tensors_hooks on CPU (tests/test_memory.py).

    checkpointing: each block keeps only its fp32 input (4h) until its backward, which recomputes
    one block's activations at a time.

    LLaMA: per layer and token, each RMSNorm's fp32 input and normed output (2 x 2 x 4h) and
    rsqrt; q, k, v's bf16 input casts (3 x 2h), q and k after the rotary embedding and v (3 x 2h),
    SDPA's output, which o_proj reads as it is (2h); gate's and up's input casts (2 x 2h); SwiGLU's
    four f-wide tensors in bf16 (8f). Outside: the final RMSNorm (8h), the head's bf16 input (2h).
    """
    from sst_dist.models import default_vocab

    size = resolve_model(model)
    dims = _dims(size)
    heads, layers, h = dims["num_attention_heads"], dims["num_hidden_layers"], dims["hidden_size"]
    if family(size) == "llama":
        f = dims["intermediate_size"]
        per_layer = 34 * h + 8 * f + 2 * 4 + heads * 4 + extra_saved_width * 2 // layers
        edges = 2 * 8 + 10 * h + 4
    else:
        f = dims["ffn_dim"]
        per_layer = 24 * h + 2 * f + 2 * 2 * 4 + heads * 4 + extra_saved_width * 2 // layers
        edges = 2 * 8 + 6 * h + 2 * 4
    logits = 12 * (vocab_size or default_vocab(size))
    held = layers * 4 * h + per_layer if checkpointing else layers * per_layer
    return micro_batch * seq * (held + edges + logits)


def estimate_engine(model: str, method: str, rank: int, engine: str, gpus: int, micro_batch: int, seq: int, *,
                    frozen_dtype: str = "float32", checkpointing: bool = False, sst_path: str = "dense",
                    galore_rank: int | None = None, vocab_size: int | None = None, grad_accum: int = 1,
                    refresh_layers: int | None = None) -> dict:
    """Bytes per GPU by category (CATEGORIES) under the torch engine (one GPU: fp32 weights,
    gradients and AdamW, bf16 autocast) or FSDP2 (every tensor sharded over `gpus`, bf16 gathers
    of a block and its prefetched successor, fp32 sharded gradients and AdamW) - what
    launch/pretrain.py builds with model.build meta, where no dense weight of an SST layer exists.
    GaLore is the layer form the trainer uses (frozen W, trainable B).

    frozen_dtype: model.frozen_dtype, the storage of every method's frozen tensors (SST's U and Vh,
    LoRA's W, GaLore's W and projector). checkpointing: model.gradient_checkpointing. grad_accum:
    micro-batches per step on a GPU, and refresh_layers: galore.refresh_layers, for what a GaLore
    refresh holds (refresh_bytes).
    """
    size = resolve_model(model)
    _choice("--engine", engine, ENGINES[1:])
    _choice("--frozen-dtype", frozen_dtype, FROZEN_DTYPES)
    for key, value, low in (("--gpus", gpus, 1), ("--micro-batch", micro_batch, 1), ("--seq", seq, 1),
                            ("--grad-accum", grad_accum, 1)):
        _at_least(key, value, low)
    if engine == "torch" and gpus != 1:
        raise ConfigError(f"--gpus: the torch engine runs on one GPU, got {gpus}; use --engine fsdp")
    c = count_parameters(size, method, rank, galore_rank=galore_rank, sst_path=sst_path, galore_form="layer",
                         seq=seq, vocab_size=vocab_size)
    fb = 2 if frozen_dtype == "bfloat16" else 4
    weights = (c.trainable * 4 + c.frozen * fb) / gpus + c.buffer_bytes
    grads = c.trainable * 4 / gpus
    optimizer = (2 * c.moments + c.ages) * 4 / gpus
    if engine == "torch":
        activations = autocast_activation_bytes(size, micro_batch, seq, extra_saved_width=c.extra_saved_width,
                                                vocab_size=vocab_size, checkpointing=checkpointing)
        # autocast keeps a bf16 copy of every trainable dense weight its matmuls used, through the
        # backward (SST's own function casts nothing: its frozen factors are read as stored)
        gathered = 2 * (c.trainable - c.uncast)
    else:
        activations = activation_bytes(size, micro_batch, seq, extra_saved_width=c.extra_saved_width,
                                       vocab_size=vocab_size, checkpointing=checkpointing)
        # bf16 copies of the block in use and the one prefetched, and of the root unit (embedding,
        # tied head), which FSDP2 keeps gathered from the forward to the backward
        root = c.total - c.block * _layers(size)
        gathered = 2 * (2 * c.block + root)
        # a block's unsharded bf16 gradients and their fp32 cast for the reduce-scatter
        gathered += 6 * c.block_trainable
    # SST's dense path forms one layer's W (bf16) from an fp32 U·diag(s), and in the backward its G
    transient = (4 + 2 + 2) * c.formed_weight
    kept = c.kept_weight * 2
    persistent = weights + optimizer + kept
    # The backward frees each block's saved activations (and, under the torch engine, the bf16
    # weight copies autograd saved) as it makes that block's gradients: at its end only the first
    # block's share is left beside every gradient (measured on one H200: full-rank OPT-6.7B peaks at
    # weights + AdamW + gradients + 0.9 GiB, not + the whole forward's 14.9 GiB)
    if engine == "torch":
        left_at_backward_end = (gathered + activations) / _layers(size)
    else:  # FSDP2's gathers are per block already
        left_at_backward_end = gathered + activations / _layers(size)
    phases = (
        activations + gathered + transient,  # the forward's end, the backward's start
        grads + left_at_backward_end + transient,  # the backward's end: every gradient made
        grads,  # the optimizer step (torch's fused / foreach AdamW adds a little)
        # GaLoreLinear's refresh: its probe pass holds full fp32 G, unsharded (refresh_bytes)
        refresh_bytes(c, grad_accum, refresh_layers) + activations + gathered,
    )
    result = {"weights": weights + kept, "gradients": grads, "masters": 0, "optimizer": optimizer,
              "buffers": gathered + transient, "activations": activations,
              "total": persistent + max(phases), "cpu": 0, "kept_weight": kept}
    return {k: int(round(v)) for k, v in result.items()}


def _layers(size: str) -> int:
    return _dims(size)["num_hidden_layers"]


# ----------------------------------------------------------------------------- the command line

def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f}"


def format_table(model: str, methods, args) -> str:
    size = resolve_model(model)
    galore_rank = resolve_galore_rank(args.galore_rank, args.rank)
    columns = ("weights", "gradients", "masters", "optimizer", "buffers", "activations", "total")
    heads = ("weights", "grads", "masters", "optim", "buffers", "activ", "total")
    if args.offload:
        columns += ("cpu",)
        heads += ("cpu",)
    rows = []
    for method in methods:
        form = args.galore_form if args.engine == "deepspeed" else "layer"
        counts = count_parameters(size, method, args.rank, galore_rank=args.galore_rank,
                                  sst_path=args.sst_path, galore_form=form, seq=args.seq)
        if args.engine == "deepspeed":
            est = estimate(size, method, args.rank, args.zero, args.gpus, args.micro_batch, args.seq,
                           args.precision, args.offload, args.galore_rank, args.sst_path,
                           galore_form=args.galore_form, grad_accum=args.grad_accum,
                           checkpointing=args.checkpointing)
        else:
            est = estimate_engine(size, method, args.rank, args.engine, args.gpus, args.micro_batch, args.seq,
                                  frozen_dtype=args.frozen_dtype, checkpointing=args.checkpointing,
                                  sst_path=args.sst_path, galore_rank=args.galore_rank)
        rows.append((method, f"{counts.total / 1e6:.1f}M", f"{counts.trainable / 1e6:.1f}M",
                     *(_gib(est[c]) for c in columns)))
    mixed = "bf16 weights/grads, fp32 masters and Adam" if args.precision == "bf16" else "fp32, no masters"
    how = f"ZeRO-{args.zero}"
    if args.engine != "deepspeed":
        how = f"the {args.engine} engine"
        mixed = f"fp32 trainable weights, grads and AdamW, frozen weights in {args.frozen_dtype}, bf16 compute"
    if args.checkpointing:
        mixed += ", activation checkpointing"
    lines = [
        f"{model_name(size)}: {how} on {args.gpus} GPU{'s' if args.gpus > 1 else ''}, {mixed}"
        f"{', optimizer offloaded to CPU' if args.offload else ''}; micro-batch {args.micro_batch} x "
        f"{args.seq} tokens{f', grad-accum {args.grad_accum}' if args.grad_accum > 1 else ''}; "
        f"rank {args.rank}, GaLore rank {galore_rank} "
        f"({args.galore_form if args.engine == 'deepspeed' else 'layer'} form), SST path {args.sst_path}",
        "GiB per GPU",
    ]
    header = ("method", "params", "trainable", *heads)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w)
                               for i, (v, w) in enumerate(zip(row, widths))))
    if args.engine != "deepspeed":
        return "\n".join(lines + [
            "weights: trainable fp32, frozen ones (SST's U and Vh, LoRA's W, GaLore's W and projector) in "
            "--frozen-dtype (model.build meta: no dense weight of an SST layer); under fsdp each rank's shard.",
            "buffers: " + ("autocast's bf16 copies of the trainable dense weights" if args.engine == "torch" else
                           "bf16 gathers of two blocks and the root unit, a block's unsharded gradients")
            + "; SST's dense path: one layer's W and G while it computes.",
            f"activ: estimated, Hugging Face {family(size).upper()} with SDPA, fp32 logits and loss"
            + (", activation checkpointing." if args.checkpointing else "."),
            "galore: the layer form the trainer uses (frozen W and projector, trainable B); at its "
            "refresh steps the probe holds one layer's full fp32 G at a time (in total, not in grads)."])
    lines += [
        "grads: the gradients plus the copies ZeRO makes of its partition for the step (flattened, "
        "and under bf16 cast to fp32).",
        f"buffers: ZeRO's gradient reduce bucket ({REDUCE_BUCKET_SIZE:.0e} elements, held through the "
        "backward)" + ("; ZeRO-3: the gathered largest module" if args.zero == 3 else "") + ".",
        f"activ: estimated, Hugging Face {family(size).upper()} with SDPA, fp32 logits and loss"
        + (", activation checkpointing." if args.checkpointing else ", no activation checkpointing."),
        "total: the peak, not the sum: weights + masters + optim + the largest of activations, "
        "grads and bucket at the end of the backward, grads in the step.",
    ]
    galore = any(METHODS[m].uses_galore for m in methods)
    if galore and args.galore_form == "optimizer":
        lines.append("galore (optimizer form): full weights, gradients and masters, Adam moments and "
                     "projector in the rank-r space, as GaLoreAdamW keeps them.")
    elif galore:
        lines.append("galore (layer form): GaLoreLinear's frozen W and projector, trainable B; at refresh "
                     "steps its probe holds one target's full gradient at a time, with --grad-accum > 1 "
                     "every target's running sum (in total, not in grads).")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as for every other user error
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m sst_dist.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="opt-125m",
                   help="opt-125m, opt-350m, opt-1.3b, ... ('opt-' optional), llama-60m, ..., llama-7b")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--galore-rank", type=int, default=None, help="default: --rank")
    p.add_argument("--galore-form", default="optimizer", help=f"{' | '.join(GALORE_FORMS)}")
    p.add_argument("--sst-path", default="dense", help=f"{' | '.join(SST_PATHS)}")
    p.add_argument("--zero", type=int, default=2, help="0 | 1 | 2 | 3")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--precision", default="bf16", help="bf16 | fp32")
    p.add_argument("--offload", action="store_true", help="optimizer states and masters on the CPU")
    p.add_argument("--engine", default="deepspeed", help=f"{' | '.join(ENGINES)} (the trainer's --engine)")
    p.add_argument("--checkpointing", action="store_true", help="model.gradient_checkpointing")
    p.add_argument("--frozen-dtype", default="float32",
                   help="model.frozen_dtype, every method's frozen tensors (torch, fsdp): float32 | bfloat16")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        if not methods:
            raise ConfigError(f"--methods: empty; choose from {', '.join(METHODS)}")
        _choice("--engine", args.engine, ENGINES)
        for m in methods:
            if m not in METHODS:
                raise ConfigError(f"--methods: {m!r} is not one of {', '.join(METHODS)}")
        print(format_table(args.model, methods, args))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

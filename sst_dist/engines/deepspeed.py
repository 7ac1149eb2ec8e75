"""DeepSpeed ZeRO 1/2/3 behind the seam.

ZeRO owns the fp32 masters and Adam moments as flat partitions; the model's own tensors are
low-precision copies (stage 1/2: full on every rank; stage 3: `ds_tensor` partitions). A write
therefore goes to the master *and* to the low-precision copy, or the next forward runs on stale
values; a state reset zeroes only this rank's fragment, located through DeepSpeed's own mapping,
with no gather (docs/design.md §3).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state,
                             safe_get_local_fp32_param, safe_set_full_fp32_param)

from sst_dist.engines import deepspeed_internals as internals
from sst_dist.engines.base import Backend, Engine, Shard
from sst_dist.engines.deepspeed_internals import is_zero3
from sst_dist.errors import ConfigError
from sst_dist.layouts import older_names, pack
from sst_dist.optim import RESET_KEYS, build_optimizer
from sst_dist.registry import spec


def _resident_full(param) -> bool:
    """ZeRO-3 keeps small ("persistent") parameters gathered between steps: the forward then reads
    param.data, not the partition, so a write must reach both."""
    return is_zero3(param) and param.data.numel() == param.ds_numel


def _slot_mask(param, index, dim, device) -> torch.Tensor:
    """A flat boolean mask over the full parameter, on `device` (the state's): True where the state
    must be zeroed. Made there and applied with masked_fill_: no host-to-device copy and no
    host sync per parameter (a boolean-index assignment waits for the device's nonzero)."""
    mask = torch.zeros(param.ds_shape if is_zero3(param) else param.shape, dtype=torch.bool, device=device)
    if index is None:
        mask.fill_(True)
    else:
        mask.index_fill_(dim, index.to(device), True)
    return mask.flatten()


class DeepSpeedBackend(Backend):
    def __init__(self, engine, device: torch.device):
        self.engine = engine
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self._device = device
        self._linked = None  # the optimizer state relink_state_fragments last linked

    @property
    def compute_device(self):
        return self._device

    def read(self, param):
        if param.requires_grad:
            value = safe_get_full_fp32_param(param)
            if value is not None:
                return value.detach().clone().to(self._device)
        with self._gathered(param):
            return param.data.detach().to(self._device, torch.float32).clone()

    @torch.no_grad()
    def read_many(self, params):
        """ZeRO-1/2 masters together: each rank copies its fragments into one zeroed buffer per
        process group and one all-reduce assembles them all, where read() (safe_get_full_fp32_param)
        makes one all-reduce per parameter (a resample reads every SST layer's trainables). The
        values are views of that buffer; other parameters are read one by one."""
        linked: dict = {}  # process group -> its parameters, in order
        for param in params:
            if internals.has_fragment_link(param) and not is_zero3(param):
                linked.setdefault(internals.data_parallel_group(param), []).append(param)
        values: dict[int, torch.Tensor] = {}
        for group, members in linked.items():
            buffer = torch.zeros(sum(p.numel() for p in members), dtype=torch.float32, device=self._device)
            for param, piece in zip(members, buffer.split([p.numel() for p in members])):
                fragment = internals.fragment(param)
                if fragment is not None:
                    local, start = fragment
                    piece[start:start + local.numel()].copy_(local.view(-1))
                values[id(param)] = piece.view(param.shape)
            if self.world_size > 1:
                dist.all_reduce(buffer, group=group)
        return [values[id(p)] if id(p) in values else self.read(p) for p in params]

    @torch.no_grad()
    def write(self, param, value):
        value = value.to(self._device, torch.float32).reshape(self._shape(param))
        if param.requires_grad:
            safe_set_full_fp32_param(param, value)
            if is_zero3(param):
                # the bf16 partition must follow its fp32 master before the next forward
                param.ds_tensor.data.copy_(safe_get_local_fp32_param(param).to(param.ds_tensor.dtype))
                if _resident_full(param):
                    param.data.copy_(value.to(param.dtype))
                return
        local = internals.frozen_partition(param) if is_zero3(param) else None
        if local is not None:
            # every rank holds the whole value: each writes its own partition, with no gather and
            # no broadcast (GatheredParameters' modifier path costs both, per parameter)
            part, start = local
            valid = max(0, min(part.numel(), param.ds_numel - start))
            part.view(-1)[:valid].copy_(value.reshape(-1)[start:start + valid].to(part.dtype))
            if _resident_full(param):
                param.data.copy_(value.to(param.dtype))
        elif is_zero3(param):
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if self.rank == 0:
                    param.data.copy_(value.to(param.dtype))
        else:
            param.data.copy_(value.to(param.dtype))

    @torch.no_grad()
    def reset_state(self, param, index=None, dim=0):
        if not param.requires_grad:
            return
        if is_zero3(param):
            numel, keys = internals.partition_numel_and_state_keys(param)
            start = internals.partition_rank(param) * numel
            part = None
            for key in RESET_KEYS:
                if key in keys:  # this rank's slice of the state, zeroed in place
                    local = internals.partition(param, key)
                    if part is None:
                        part = _slot_mask(param, index, dim, local.device)[start:start + numel]
                    local.view(-1)[:part.numel()].masked_fill_(part, 0)  # the padding past the end stays
            return
        self._relink()
        if internals.fragment(param) is None:  # this rank's partition holds no piece of the parameter
            return
        keys = internals.fragment_state_keys(param)
        part = None
        for key in RESET_KEYS:
            if key in keys:
                fragment, start = internals.fragment(param, key)
                if part is None:
                    part = _slot_mask(param, index, dim, fragment.device)[start:start + internals.fragment_numel(param)]
                fragment.view(-1).masked_fill_(part, 0)

    def _relink(self):
        """ZeRO-1/2: relink_state_fragments when the optimizer's state changed since the last
        time: it walks every parameter of every group, once per reset otherwise (a resample resets
        every SST layer: quadratic in the layers)."""
        signature = internals.state_signature(self.engine.optimizer)
        if signature != self._linked:
            internals.relink_state_fragments(self.engine.optimizer)
            self._linked = signature

    def shards(self, param):
        if is_zero3(param):
            master = internals.partition(param)
            start = internals.partition_rank(param) * param.ds_tensor.numel()
            valid = max(0, min(param.ds_tensor.numel(), param.ds_numel - start))
            mirrors = [Shard(param.ds_tensor.data.view(-1).narrow(0, 0, valid), start)]
            if _resident_full(param):
                mirrors.append(Shard(param.data.view(-1), 0))
            return [Shard(master.view(-1).narrow(0, 0, valid), start)], mirrors
        owned = []
        fragment = internals.fragment(param)
        if fragment is not None:
            values, start = fragment
            owned.append(Shard(values.view(-1), start))
        return owned, [Shard(param.data.view(-1), 0)]

    def optimizer_state(self, param, key):
        if not is_zero3(param):
            self._relink()
        value = safe_get_full_optimizer_state(param, key)
        return None if value is None else value.detach().clone().reshape(self._shape(param))

    def _shape(self, param):
        return param.ds_shape if is_zero3(param) else param.shape

    def _gathered(self, param):
        if is_zero3(param):
            return deepspeed.zero.GatheredParameters([param])
        return contextlib.nullcontext()


def upgrade_frozen_fragments(state: dict, file: Path, names: dict) -> None:
    """A model-states file of an older parameter layout, in place: ZeRO-2/3 save each frozen
    parameter's fragment by name, and DeepSpeed copies them back by name. `names` (layouts.
    older_names): {new name: [old names]}; each new name's old fragments become one fragment (as
    layouts.pack_older packs a state dict). ZeRO-2's are whole tensors; ZeRO-3's are this rank's
    partitions of each, so the whole old tensors are put together from every rank's file, and
    this rank's partition of the packed one cut from them."""
    fragments, shapes = state["frozen_param_fragments"], state["frozen_param_shapes"]
    old = {new: olds for new, olds in names.items()
           if new not in fragments and all(name in fragments for name in olds)}
    if not old:
        return
    whole = all(fragments[name].numel() == math.prod(shapes[name]) for olds in old.values() for name in olds)
    if whole:
        parts, rank = [state], 0
    else:  # ZeRO-3's files are zero_pp_rank_<r>_mp_rank_<m>_model_states.pt, one per rank
        pattern = re.compile(r"zero_pp_rank_(\d+)_(mp_rank_\d+_model_states\.pt)")
        match = pattern.fullmatch(file.name)
        if match is None:
            raise ConfigError(f"checkpoint {file.parent}: holds partitioned parameters of an older layout "
                              "in files this version cannot read; resume it with the version that wrote it")
        rank = int(match.group(1))
        files = sorted(file.parent.glob(f"zero_pp_rank_*_{match.group(2)}"),
                       key=lambda f: int(pattern.fullmatch(f.name).group(1)))
        parts = [state if f == file else torch.load(f, map_location="cpu", weights_only=False) for f in files]
    for new, olds in old.items():
        packed = pack(torch.cat([part["frozen_param_fragments"][name].reshape(-1) for part in parts])
                      [:math.prod(shapes[name])] for name in olds)
        shapes[new] = torch.Size([packed.numel()])
        if not whole:  # this rank's partition: ceil(numel / ranks) elements, zero-padded at the end
            size = -(-packed.numel() // len(parts))
            piece = packed[rank * size:(rank + 1) * size]
            packed = torch.cat([piece, piece.new_zeros(size - piece.numel())])
        for name in olds:
            fragments.pop(name)
            shapes.pop(name)
        fragments[new] = packed


STAGES = (1, 2, 3)  # stage 0 keeps no per-parameter link to the Adam state, which SST resets


def _json(value) -> str:
    return json.dumps(value)


def read_ds_config(path: str | None, recipe) -> dict:
    """The ds_config at `path`, checked: a JSON object, a ZeRO stage this engine runs, and no
    optimizer setting or scheduler that contradicts the recipe, which owns them (an "auto" or
    equal value passes)."""
    if path is None:
        return {"zero_optimization": {"stage": 2}}
    where = f"--ds-config {path}"
    try:
        config = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where}: not valid JSON (line {err.lineno})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: expected a JSON object {{...}}, got {_json(config)[:60]}")
    zero = config.get("zero_optimization")
    if not isinstance(zero, dict) or "stage" not in zero:
        raise ConfigError(f"{where}: zero_optimization is {_json(zero)[:60]}; write it as an object such as"
                          " {\"stage\": 2}")
    stage = zero["stage"]
    if isinstance(stage, bool) or stage not in STAGES:
        raise ConfigError(f"{where}: zero_optimization.stage is {_json(stage)}; use 1, 2 or 3 (no sharding:"
                          " drop --ds-config for the torch engine)")
    if stage == 3 and recipe.model.compile and not spec(recipe.method).compiles_layers_alone(recipe):
        raise ConfigError(f"{where}: model.compile under ZeRO-3 compiles only method sst's layers with"
                          " sst.path=functional, each alone (a whole block's graph would hold ZeRO-3's parameter"
                          f" hooks, which dynamo recompiles past its limit), and this {recipe.method} recipe has"
                          " none; use sst.path=functional (method sst), ZeRO-1/2 or --engine fsdp, or --set model.compile=false")
    fp16 = config.get("fp16")
    if fp16 is not None and (not isinstance(fp16, dict) or fp16.get("enabled", False) not in (False, "auto")):
        # the recipe owns the precision (train.dtype); DeepSpeed's fp16 fails on CPU ranks and cannot
        # be combined with the bf16 the trainer turns on for a GPU
        raise ConfigError(f"{where}: fp16 is {_json(fp16)[:60]}, but the recipe owns the precision "
                          "(train.dtype: float32, or bfloat16 on a GPU); remove the fp16 section")
    if "scheduler" in config:
        raise ConfigError(f"{where}: has a scheduler, but the recipe owns the lr schedule (optim.warmup_steps,"
                          " optim.schedule, optim.rewarm_steps); remove the scheduler section")
    optimizer = config.get("optimizer")
    if optimizer is None:
        return config
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("params", {}), dict):
        raise ConfigError(f"{where}: optimizer is {_json(optimizer)[:60]}; write it as"
                          " {\"type\": \"AdamW\", \"params\": {...}}")
    if str(optimizer.get("type", "")).lower() not in ("adamw", "adam"):
        raise ConfigError(f"{where}: optimizer.type {optimizer.get('type')!r}; use AdamW")
    o = recipe.optim
    owned = {"lr": ("optim.lr", o.lr), "betas": ("optim.beta1, optim.beta2", [o.beta1, o.beta2]),
             "eps": ("optim.eps", o.eps), "weight_decay": ("optim.weight_decay", o.weight_decay)}
    params = optimizer.get("params", {})
    for key, (recipe_key, value) in owned.items():
        given = params.get(key, "auto")
        if given != "auto" and given != value:
            shown = ", ".join(map(str, value)) if isinstance(value, list) else value
            raise ConfigError(f"{where}: optimizer.params.{key} is {_json(given)} but the recipe has {recipe_key}"
                              f" = {shown}; set it to \"auto\" (the recipe owns it) or change the recipe")
    return config


def load_ds_config(path: str | None, recipe, *, device, dtype, micro_batch, accumulation, world_size) -> dict:
    """Reads a ds_config (read_ds_config) and fills its "auto" fields from the recipe, so the two
    cannot disagree."""
    config = read_ds_config(path, recipe)
    o = recipe.optim
    bf16 = dtype == torch.bfloat16 and device.type == "cuda"
    filled = {
        "train_batch_size": recipe.train.global_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": o.grad_clip,
    }
    for key, value in filled.items():
        current = config.get(key, "auto")
        if current != "auto" and current != value:
            raise ConfigError(f"--ds-config: {key} is {current} but the recipe and world size give {value};"
                              f" set it to \"auto\"")
        config[key] = value
    config.setdefault("bf16", {})["enabled"] = bf16
    if "fp16" in config:
        config["fp16"]["enabled"] = False  # "auto" would read as true to DeepSpeed; read_ds_config allows no other
    # the trainer's divergence guard stops a run at a non-finite loss or gradient norm before any
    # save; DeepSpeed's own overflow check would test every gradient again and wait for the device
    config["bf16"].setdefault("check_grad_overflow", False)
    config.setdefault("steps_per_print", 10**9)
    # DeepSpeed's throughput timer synchronises the device at every micro-batch's forward and at
    # every step, so the host never queues work ahead of the GPU; the trainer times steps itself
    config.setdefault("timers", {}).setdefault("throughput", {}).setdefault("enabled", False)
    # an optimizer section is checked (read_ds_config) but not filled: the engine steps
    # sst_dist.optim.AdamW with the recipe's settings, never DeepSpeed's optimizer
    return config


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, model, param_groups, recipe, *, device, dtype, micro_batch, accumulation,
                 ds_config, ctx):
        self.device = device
        self.accumulation = accumulation
        self.rank, self.world_size = ctx.rank, ctx.world_size
        internals.check_version()
        internals.install_step_without_host_reads()
        config = load_ds_config(ds_config, recipe, device=device, dtype=dtype, micro_batch=micro_batch,
                                accumulation=accumulation, world_size=ctx.world_size)
        # The optimizer is always sst_dist.optim.AdamW, DeepSpeed's own never: its per-element ages
        # make a slot's state reset exact (a fresh Adam), which no DeepSpeed optimizer can do. The
        # ds_config's optimizer section only names the type; the recipe gives its settings.
        config.pop("optimizer", None)
        config["zero_allow_untested_optimizer"] = True  # a torch.optim.AdamW subclass
        offload = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") in ("cpu", "nvme")
        if offload:  # the states live in host memory: torch's CPU AdamW steps them there
            config["zero_force_ds_cpu_optimizer"] = False
        optimizer = build_optimizer(param_groups, recipe, torch.device("cpu") if offload else device)
        self.config = config
        self.model, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.backend = DeepSpeedBackend(self.model, device)
        self._micro = 0

    @contextlib.contextmanager
    def probing(self):
        """The model a GaLore probe pass runs through: the wrapped module, not the DeepSpeedEngine.

        A backward through the engine's own outputs arms ZeRO's gradient-reduction epilogue, even
        an autograd.grad that makes no parameter gradient (it then fails on an empty bucket).
        ZeRO-3's gather hooks sit on the submodules, so they still run; but with no epilogue,
        modules whose post-backward hook never fires (the embedding: its input needs no grad)
        keep their weights gathered, so they are released here.
        """
        yield self.model.module
        if self.model.zero_optimization_stage() == 3:
            self.model.empty_partition_cache()

    def backward(self, loss):
        self.model.backward(loss)
        self._micro += 1
        if self._micro < self.accumulation:
            self.model.step()  # not a boundary: DeepSpeed only counts the micro-step

    def step(self):
        """One optimizer step; returns ZeRO's gradient norm for the divergence guard (None if the
        config turns its computation off)."""
        self.model.step()
        self._micro = 0
        return self.model.get_global_grad_norm()

    @property
    def zero_stage(self) -> int:
        return self.model.zero_optimization_stage()

    @property
    def compiles_blocks(self) -> bool:
        return self.zero_stage != 3  # ZeRO-3's per-module hooks sit inside every block

    def save(self, path):
        self.model.save_checkpoint(str(path), tag="engine", save_latest=False)

    def load(self, path):
        names = older_names(self.model.module)
        engine, read = self.model.checkpoint_engine, self.model.checkpoint_engine.load

        def upgraded(file, *args, **kwargs):
            state = read(file, *args, **kwargs)
            if isinstance(state, dict) and state.get("frozen_param_fragments"):
                upgrade_frozen_fragments(state, Path(file), names)
            return state

        # DeepSpeed reads the model-states files through its checkpoint engine and copies the frozen
        # fragments in by name, with no hook between: each file read is upgraded as it comes (the
        # module's own state dict is upgraded by its layers' load hooks, layouts.upgrade_on_load)
        engine.load = upgraded
        try:
            loaded, _ = self.model.load_checkpoint(str(path), tag="engine", load_lr_scheduler_states=False)
        finally:
            del engine.load
        if loaded is None:
            raise ConfigError(f"checkpoint {path}: DeepSpeed could not read its engine state")

"""PyTorch FSDP2 (`fully_shard`) behind the seam.

Every parameter, the frozen factors included, is a DTensor sharded on dim 0 over one mesh
dimension; its local shard *is* the fp32 master (FSDP2 all-gathers a fresh, possibly bf16, copy for
each forward and frees it after), and AdamW's moments are DTensors sharded the same way. So a
write copies this rank's rows of the full value into its local shard, and a state reset zeroes
the chosen slots in the local shards of the moments: no gather, no mirror to keep in step
(docs/design.md §3). Only `read` and `optimizer_state` gather; they run at resample / re-SVD time and in
tests, never per step. On one process the functional path's frozen factors are left out
(unsharded_frozen): plain tensors, whole.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard as ShardPlacement

from sst_dist.engines.base import Backend, Engine, Shard
from sst_dist.errors import ConfigError
from sst_dist.layouts import older_names, pack
from sst_dist.models import decoder_blocks
from sst_dist.optim import RESET_KEYS, build_optimizer
from sst_dist.sst import SSTLinear


def local_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this rank's shard, index of its first row in the full tensor) of a dim-0-sharded DTensor.

    FSDP2 shards like torch.chunk: rank i holds rows [i·c, min((i+1)·c, n)) with c = ceil(n / world),
    so trailing ranks may hold fewer rows, or none. A plain tensor is its own whole shard.
    """
    if not isinstance(tensor, DTensor):
        return tensor.data, 0
    if tuple(tensor.placements) != (ShardPlacement(0),):
        raise NotImplementedError(f"FSDP backend: expected Shard(0) placement, got {tensor.placements}")
    mesh = tensor.device_mesh
    rows = tensor.shape[0]
    chunk = -(-rows // mesh.size()) if rows else 0
    start = min(mesh.get_local_rank() * chunk, rows)
    with torch.no_grad():  # to_local() then returns the shard itself, not an autograd view
        local = tensor.to_local()
    if local.shape[0] != min(chunk, rows - start):
        raise RuntimeError(f"FSDP backend: local shard of {local.shape[0]} rows, expected "
                           f"{min(chunk, rows - start)} at row {start} of {rows}")
    return local, start


@contextlib.contextmanager
def _plain_failures():
    """DCP's CheckpointException derives from BaseException, past every `except Exception` (the
    trainer's fallback to an older checkpoint, its one-line save failure): re-raised as the first
    failing rank's own exception (an UnpicklingError, an OSError and its errno)."""
    try:
        yield
    except CheckpointException as err:
        failures = sorted(err.failures.items())
        cause = failures[0][1][0] if failures else None
        if isinstance(cause, Exception):
            raise cause from None
        raise RuntimeError(str(err).strip().splitlines()[-1] if str(err).strip() else "DCP failed") from None


def _older_entries(path, model_state: dict, names: dict) -> dict:
    """A DCP checkpoint of an older parameter layout (`names`, layouts.older_names: {new name:
    [old names]}): each new name's entry of `model_state` that the checkpoint holds only as its old
    entries is replaced by whole, plain tensors of those (DCP reads them whole on every rank), to
    be packed into the sharded new one after the load. Returns {new name: (its sharded tensor, old
    names)}; empty for a checkpoint of this layout."""
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    older = {}
    for name, olds in names.items():
        if name not in model_state or f"model.{name}" in saved or not all(f"model.{o}" in saved for o in olds):
            continue
        sharded = model_state.pop(name)
        for key in olds:
            meta = saved[f"model.{key}"]
            model_state[key] = torch.empty(meta.size, dtype=meta.properties.dtype, device=sharded.device)
        older[name] = (sharded, olds)
    return older


class FSDPBackend(Backend):
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device):
        self.optimizer = optimizer
        self._device = device
        self._units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self._maybe_gathered = True  # a forward ran since the units were last resharded
        self._shard_cache: dict[int, tuple] = {}  # id(param) -> (param, local tensor, its data_ptr, shards)
        model.register_forward_pre_hook(self._forward_ran)

    def _forward_ran(self, *_):
        self._maybe_gathered = True

    @property
    def compute_device(self):
        return self._device

    def _sharded(self) -> None:
        """The root unit keeps its parameters gathered after a forward with no backward (an
        evaluation), so its module attributes would be the unsharded copies; put the shards back.
        Only after a forward: every read, write and per-step shard lookup asks, and a pass over all
        units each time costs more host time than the work itself (~13 units x 72 layers a step)."""
        if self._maybe_gathered:
            for unit in self._units:
                unit.reshard()
            self._maybe_gathered = False

    @torch.no_grad()
    def read(self, param):
        self._sharded()
        value = param.full_tensor() if isinstance(param, DTensor) else param.detach()
        return value.to(self._device).clone()

    @torch.no_grad()
    def write(self, param, value):
        self._sharded()
        local, start = local_rows(param)
        value = value.reshape(param.shape)
        local.copy_(value[start:start + local.shape[0]].to(device=local.device, dtype=local.dtype))

    @torch.no_grad()
    def reset_state(self, param, index=None, dim=0):
        state = self.optimizer.state.get(param, {})
        for key in RESET_KEYS:
            moment = state.get(key)
            if moment is None:
                continue
            local, start = local_rows(moment)
            if index is None:
                local.zero_()
                continue
            slots = index.to(local.device)
            if dim == 0:
                # the sharded dim: this rank's slots, in local coordinates, through a mask whose
                # extra last row takes the other ranks' slots (selecting them by a boolean index
                # would wait for the device, at every reset of every layer)
                rows = local.shape[0]
                slots = slots - start
                slots = torch.where((slots >= 0) & (slots < rows), slots, rows)
                mask = torch.zeros(rows + 1, dtype=torch.bool, device=local.device).index_fill_(0, slots, True)
                local.masked_fill_(mask[:rows].view(rows, *[1] * (local.dim() - 1)), 0)
                continue
            local.index_fill_(dim, slots, 0)

    def shards(self, param):
        self._sharded()
        # asked for every SST layer at every step: the last answer, while the DTensor's local
        # tensor is the same object on the same storage (read as attributes, which dispatch no op)
        local = param._local_tensor if isinstance(param, DTensor) else None
        hit = self._shard_cache.get(id(param))
        if local is not None and hit is not None and hit[0] is param and hit[1] is local \
                and hit[2] == local.data_ptr():
            return hit[3]
        values, start = local_rows(param)
        row = values[0].numel() if values.dim() > 1 else 1
        shards = [Shard(values.view(-1), start * row)], []
        if local is not None:
            self._shard_cache[id(param)] = (param, local, local.data_ptr(), shards)
        return shards

    @torch.no_grad()
    def optimizer_state(self, param, key):
        value = self.optimizer.state.get(param, {}).get(key)
        if value is None:
            return None
        value = value.full_tensor() if isinstance(value, DTensor) else value
        return value.to(self._device).clone()


def unsharded_frozen(module: nn.Module, world_size: int) -> set[nn.Parameter] | None:
    """The frozen parameters FSDP2 leaves alone (fully_shard's ignored_params): on one process, the
    factors of the SST layers that cast them themselves (the functional path forms W from them
    inside the block's compiled graph). There a shard is the whole tensor, and FSDP2 would copy
    it, and cast it, in at every unshard, forward and backward: one tensor per layer more than
    nn.Linear's weight and bias, a host cost that bounds the step at 125M-350M. On more ranks
    sharding them is what saves memory, and they stay sharded."""
    if world_size != 1:
        return None
    ignored = {m.factors for m in module.modules() if isinstance(m, SSTLinear) and m.traceable}
    return ignored or None


class FSDPEngine(Engine):
    """fully_shard per decoder block and at the root; torch AdamW over the DTensor parameters;
    DCP checkpoints that load onto any world size."""

    name = "fsdp"

    def __init__(self, model, param_groups, recipe, *, device, dtype, accumulation, ctx, materialize=None):
        self.device = device
        self.accumulation = accumulation
        self.rank, self.world_size = ctx.rank, ctx.world_size
        # fully_shard replaces every parameter by a new DTensor one: remember the groups by name
        names = {id(p): n for n, p in model.named_parameters()}
        group_names = [[names[id(p)] for p in group["params"]] for group in param_groups]
        # OPT's decoder layer returns `(residual + h).view(shape)`, and FSDP2 warns that an
        # in-place op on such a view would skip its pre-backward hook; the next layer only reads it
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        mesh = init_device_mesh(device.type, (ctx.world_size,))
        if dtype == torch.bfloat16:
            # bf16 gathers and compute; fp32 masters, states and gradient reduction
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        else:
            mp = MixedPrecisionPolicy()
        # a model on the meta device (model.build meta) is materialised one block at a time, each
        # sharded before the next exists: a rank holds its shards and one whole block at most
        for block in decoder_blocks(model):
            if materialize is not None:
                materialize(block)
            fully_shard(block, mesh=mesh, mp_policy=mp, ignored_params=unsharded_frozen(block, ctx.world_size))
        if materialize is not None:
            materialize(model)
        # the root unit holds the embeddings, the tied LM head and the final LayerNorm
        fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=unsharded_frozen(model, ctx.world_size))
        self.model = model
        first: dict[int, str] = {}  # a tied weight's later names -> its first name
        self._aliases = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            if first.setdefault(id(param), name) != name:
                self._aliases[name] = first[id(param)]
        sharded = dict(model.named_parameters())
        groups = [{**group, "params": [sharded[n] for n in names]}
                  for group, names in zip(param_groups, group_names)]
        # fully_shard made new, sharded Parameters; the caller's lists (the method's) still hold
        # the unsharded originals, a whole copy of every trainable tensor on each rank: free them
        live = {id(p) for p in sharded.values()}
        for group in param_groups:
            for param in group["params"]:
                if id(param) not in live:
                    param.data = torch.empty(0, dtype=param.dtype, device=param.device)
        self.optimizer = build_optimizer(groups, recipe, device)
        self.params = [p for group in groups for p in group["params"]]
        self.grad_clip = recipe.optim.grad_clip
        self.backend = FSDPBackend(model, self.optimizer, device)

    def backward(self, loss):
        # every micro-batch reduce-scatters into the sharded gradient: accumulation then costs
        # sharded, not full, gradient memory
        (loss / self.accumulation).backward()

    def step(self):
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        if isinstance(norm, DTensor):  # the sum of squares is partial per rank until reduced
            norm = norm.full_tensor()
        if self.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.grad_clip, norm, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _state(self) -> dict:
        """Model and optimizer state as sharded DTensors under their unsharded names, so DCP can
        reshard them onto any world size. A tied weight (OPT's lm_head = embed_tokens) is kept
        under its first name only: the state dict would otherwise store the vocabulary matrix twice."""
        self.backend._sharded()
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        for alias in self._aliases:
            model_state.pop(alias, None)
        return {"model": model_state, "optimizer": optim_state}

    def save(self, path):
        with _plain_failures():
            dcp.save(self._state(), checkpoint_id=str(path))

    def load(self, path):
        if not (path / ".metadata").is_file():
            raise ConfigError(f"checkpoint {path}: no DCP metadata; was it written by another engine?")
        state = self._state()  # the sharded layout of this world size; DCP reshards into it
        with _plain_failures():
            older = _older_entries(path, state["model"], older_names(self.model))
            dcp.load(state, checkpoint_id=str(path))
        for name, (sharded, olds) in older.items():
            local, start = local_rows(sharded)
            packed = pack(state["model"].pop(old) for old in olds)
            local.copy_(packed[start:start + local.shape[0]].to(local.dtype))
            state["model"][name] = sharded
        for alias, name in self._aliases.items():
            state["model"][alias] = state["model"][name]
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])

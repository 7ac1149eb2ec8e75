"""Building a model larger than any one copy of it could be: on the meta device, then materialised.

model.build: meta builds the OPT model and the method's layers on the meta device (shapes only),
then `Materializer` gives each module its tensors on its own device, initialised as OPT
initialises them (N(0, init_std²) weights, zero biases, unit LayerNorm scales), every frozen
tensor in model.frozen_dtype. An SSTLinear is materialised directly as its factors
(sst_dist.spectral_init), so the dense weight of a targeted layer never exists (sst.init haar;
svd draws one W0 per layer, on the device, for its SVD). Under FSDP2 the engine materialises one
decoder block, shards it, then the next (sst_dist.engines.fsdp), so no rank ever holds more than
its shards and one block; each SST layer's factors are drawn on one owner rank and broadcast.

Every tensor is drawn from a generator seeded by (seed, its name) on the device that holds it, so
the torch engine and every FSDP rank build the same model; a LoRA layer's A, like SST's factors,
by (seed, its layer index), as the dense build draws it.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from sst_dist.galore import GaLoreLinear  # GaLoreEmbedding is one
from sst_dist.lowrank import LoRALinear, initial_A
from sst_dist.sst import SSTLinear, layer_generator, sample_active
from sst_dist.spectral_init import init_factors, init_generator


def _generator(seed: int, name: str, device) -> torch.Generator:
    state = np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(2, np.uint64)
    return torch.Generator(device=device).manual_seed(int(state[0] >> np.uint64(1)))


def _swap_in(param: nn.Parameter, value: torch.Tensor) -> None:
    """Gives the meta Parameter `param` the tensor `value`, keeping the Parameter object: optimizer
    groups, the method's lists and tied modules (OPT's LM head) all hold that object."""
    torch.utils.swap_tensors(param, nn.Parameter(value, requires_grad=param.requires_grad))


def is_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


class Materializer:
    """Called on a module (the whole model, or one block at a time), materialises every meta
    tensor under it on `device`. Trainable tensors in `dtype`; frozen ones (SST's U and Vh, LoRA's
    W, GaLore's W and projector) in `frozen_dtype` (model.frozen_dtype; None: `dtype`).

    rank, world_size: under FSDP, SST layer i's factors are computed on rank i mod world_size only
    and broadcast; every other tensor is cheap and drawn on every rank alike.
    """

    def __init__(self, model: nn.Module, *, seed: int, device, dtype=torch.float32, init: str = "auto",
                 frozen_dtype: torch.dtype | None = None, uniform_mix: bool = False, rank: int = 0,
                 world_size: int = 1):
        config = getattr(model, "config", None)
        self.std = getattr(config, "init_std", 0.02)
        self.names = {id(m): n for n, m in model.named_modules()}
        sst_layers = [m for m in model.modules() if isinstance(m, SSTLinear)]
        self.sst_index = {id(m): i for i, m in enumerate(sst_layers)}  # apply_sst's order
        lora_layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
        self.lora_index = {id(m): i for i, m in enumerate(lora_layers)}  # apply_lora's order
        self.seed, self.device, self.dtype, self.init = seed, torch.device(device), dtype, init
        self.frozen_dtype = frozen_dtype or dtype
        self.uniform_mix = uniform_mix
        self.rank, self.world_size = rank, world_size

    @torch.no_grad()
    def __call__(self, module: nn.Module) -> None:
        pending = [sub for sub in module.modules() if isinstance(sub, SSTLinear) and is_meta(sub)]
        # every rank draws the factors it owns first, then all are exchanged: drawn one layer at a
        # time, each rank would wait for the other's QR before starting its own
        drawn = {id(layer): self._draw(layer) for layer in pending
                 if self.sst_index[id(layer)] % self.world_size == self.rank}
        for sub in module.modules():
            if not any(t.is_meta for t in (*sub.parameters(recurse=False), *sub.buffers(recurse=False))):
                continue
            name = self.names.get(id(sub), type(sub).__name__)
            if isinstance(sub, SSTLinear):
                self._sst(sub, drawn.pop(id(sub), None))
            elif isinstance(sub, LoRALinear):
                self._lora(sub, name)
            elif isinstance(sub, (nn.Linear, nn.Embedding, GaLoreLinear)):
                self._dense(sub, name)
            elif isinstance(sub, nn.LayerNorm):
                self._fill(sub, "weight", 1.0)
                self._fill(sub, "bias", 0.0)
            else:
                raise NotImplementedError(f"model.build meta: no initialisation for {type(sub).__name__} "
                                          f"({name}); use model.build=dense")

    def _storage(self, param) -> torch.dtype:
        return self.dtype if param.requires_grad else self.frozen_dtype

    def _fill(self, module, name, value):
        param = module._parameters.get(name)
        if param is not None and param.is_meta:
            _swap_in(param, torch.full(param.shape, value, device=self.device, dtype=self._storage(param)))

    def _dense(self, module, name):
        """nn.Linear / nn.Embedding as OPTPreTrainedModel._init_weights; a GaLore layer's W the
        same, its projector and B zero (as after GaLoreLinear.from_linear)."""
        weight = module.weight
        if weight.is_meta:
            # drawn in `dtype` whatever the storage: a frozen W is the trainable one, rounded once
            value = torch.empty(weight.shape, device=self.device, dtype=self.dtype)
            value.normal_(0.0, self.std, generator=_generator(self.seed, name + ".weight", self.device))
            padding = getattr(module, "padding_idx", None)
            if padding is not None:
                value[padding] = 0
            _swap_in(weight, value.to(self._storage(weight)))
        for other in ("bias", "proj", "B"):
            self._fill(module, other, 0.0)

    def _lora(self, layer: LoRALinear, name):
        """W and bias as an nn.Linear's; A Gaussian and B zero, as LoRALinear.from_linear."""
        self._dense(layer, name)
        self._fill(layer, "lora_B", 0.0)
        if layer.lora_A.is_meta:
            generator = layer_generator(self.seed, self.lora_index[id(layer)], 0)
            A = initial_A(layer.rank, layer.in_features, generator, self.dtype)
            _swap_in(layer.lora_A, A.to(self.device))

    def _draw(self, layer: SSTLinear):
        """U, s, Vh of SST layer `layer`, in their storage dtypes."""
        # float32 at least for the QR / SVD, whatever the storage
        work = torch.float64 if self.dtype == torch.float64 else torch.float32
        index = self.sst_index[id(layer)]
        U, s, Vh = init_factors(layer.out_features, layer.in_features, self.std,
                                init_generator(self.seed, index, self.device), self.init,
                                device=self.device, dtype=work)
        return U.to(self.frozen_dtype), s.to(self.dtype), Vh.to(self.frozen_dtype)

    def _sst(self, layer: SSTLinear, factors):
        """factors: this layer's (U, s, Vh) where this rank drew them, else None (its owner did)."""
        index = self.sst_index[id(layer)]
        owner = index % self.world_size
        if factors is None:
            shapes = [(layer.out_features, layer.k), (layer.k,), (layer.k, layer.in_features)]
            dtypes = [self.frozen_dtype, self.dtype, self.frozen_dtype]
            factors = [torch.empty(shape, device=self.device, dtype=dt) for shape, dt in zip(shapes, dtypes)]
        U, s, Vh = factors
        if self.world_size > 1:
            for t in (U, s, Vh):
                dist.broadcast(t, owner)
        idx = sample_active(s.cpu(), layer.rank, layer_generator(self.seed, index, 0), self.uniform_mix)
        spectral = layer.pack(s.to(self.dtype), U[:, idx.to(U.device)].to(self.dtype),
                              Vh[idx.to(Vh.device)].to(self.dtype))
        _swap_in(layer.U, U)
        _swap_in(layer.Vh, Vh)
        _swap_in(layer.spectral, spectral)
        layer.active_indices = idx.to(self.device)
        self._fill(layer, "bias", 0.0)


def build_on_meta(size: str, **model_kwargs) -> nn.Module:
    """The OPT model of `size`, on the meta device: shapes, no memory."""
    from sst_dist.models import build_model

    with torch.device("meta"):
        return build_model(size, **model_kwargs)


__all__ = ["Materializer", "build_on_meta", "is_meta"]

"""Building a model larger than any one copy of it could be: on the meta device, then materialised.

model.build: meta builds the OPT model and the method's layers on the meta device (shapes only),
then `Materializer` gives each module its tensors on its own device, initialised as OPT
initialises them (N(0, init_std²) weights, zero biases, unit LayerNorm scales), every frozen
tensor in model.frozen_dtype; each method's layer initialises its own (its `meta_init`). An
SSTLinear is materialised directly as its factors (sst_dist.spectral_init), so the dense weight of a targeted layer never exists (sst.init haar;
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
    tensor under it on `device`. Trainable tensors in `dtype`; frozen ones (SST's factors U ‖ Vh, LoRA's
    W, GaLore's W and projector) in `frozen_dtype` (model.frozen_dtype; None: `dtype`).

    torch's own modules (nn.Linear, nn.Embedding, nn.LayerNorm) are initialised here, as OPT
    initialises them; a method's layer initialises itself (as torchtitan's init_weights after
    to_empty): `layer.meta_init(materializer, name, drawn)`, with this object's settings and
    helpers (dense, fill, swap_in, index). A layer whose tensors are costly to draw (SST's
    factors: a QR or an SVD) also has `layer.meta_draw(materializer)`: it runs on the layer's
    owner rank only (`owns`), and meta_init gets what it drew there (None elsewhere) and
    exchanges it through `share`.

    rank, world_size: under FSDP, method layer i is drawn on rank i mod world_size only; every
    other tensor is cheap and drawn on every rank alike. init, uniform_mix: SST's sst.init and
    sst.uniform_mix (Method.materializer_kwargs).
    """

    def __init__(self, model: nn.Module, *, seed: int, device, dtype=torch.float32, init: str = "auto",
                 frozen_dtype: torch.dtype | None = None, uniform_mix: bool = False, rank: int = 0,
                 world_size: int = 1):
        from sst_dist.models import init_std

        self.std = init_std(getattr(model, "config", None))
        self.names = {id(m): n for n, m in model.named_modules()}
        # a method layer's position among the layers of its class, in model order: its surgery's
        # order, which seeds its draws as the dense build seeds them
        self._index, counts = {}, {}
        for m in model.modules():
            if hasattr(m, "meta_init"):
                self._index[id(m)] = counts.get(type(m), 0)
                counts[type(m)] = self._index[id(m)] + 1
        self.seed, self.device, self.dtype, self.init = seed, torch.device(device), dtype, init
        self.frozen_dtype = frozen_dtype or dtype
        self.uniform_mix = uniform_mix
        self.rank, self.world_size = rank, world_size

    @torch.no_grad()
    def __call__(self, module: nn.Module) -> None:
        pending = [sub for sub in module.modules() if hasattr(sub, "meta_draw") and is_meta(sub)]
        # every rank draws the tensors it owns first, then all are exchanged: drawn one layer at a
        # time, each rank would wait for the other's QR before starting its own
        drawn = {id(layer): layer.meta_draw(self) for layer in pending if self.owns(layer)}
        for sub in module.modules():
            if not any(t.is_meta for t in (*sub.parameters(recurse=False), *sub.buffers(recurse=False))):
                continue
            name = self.names.get(id(sub), type(sub).__name__)
            if hasattr(sub, "meta_init"):
                sub.meta_init(self, name, drawn.pop(id(sub), None))
            elif isinstance(sub, (nn.Linear, nn.Embedding)):
                self.dense(sub, name)
            elif isinstance(sub, nn.LayerNorm) or type(sub).__name__.endswith("RMSNorm"):
                self.fill(sub, "weight", 1.0)
                self.fill(sub, "bias", 0.0)
            elif hasattr(sub, "rope_init_fn") or hasattr(sub, "compute_default_rope_parameters"):
                self.rotary(sub)
            else:
                raise NotImplementedError(f"model.build meta: no initialisation for {type(sub).__name__} "
                                          f"({name}); use model.build=dense")

    # ------------------------------------------------------------------ what a layer's meta_init uses

    def index(self, layer: nn.Module) -> int:
        """The layer's position among its class's layers (its surgery's order)."""
        return self._index[id(layer)]

    def owns(self, layer: nn.Module) -> bool:
        return self.index(layer) % self.world_size == self.rank

    def share(self, layer: nn.Module, tensors):
        """The tensors the layer's owner drew, on every rank: `tensors` there, empty ones of the
        same shapes and dtypes elsewhere, filled by a broadcast."""
        if self.world_size > 1:
            for t in tensors:
                dist.broadcast(t, self.index(layer) % self.world_size)
        return tensors

    def storage(self, param) -> torch.dtype:
        return self.dtype if param.requires_grad else self.frozen_dtype

    swap_in = staticmethod(_swap_in)

    def fill(self, module, name, value):
        param = module._parameters.get(name)
        if param is not None and param.is_meta:
            _swap_in(param, torch.full(param.shape, value, device=self.device, dtype=self.storage(param)))

    def rotary(self, module):
        """A rotary embedding's inverse frequencies (non-persistent buffers, computed, not drawn),
        in float32 as transformers keeps them."""
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        config = module.config
        kind = config.rope_parameters["rope_type"]
        compute = module.compute_default_rope_parameters if kind == "default" else ROPE_INIT_FUNCTIONS[kind]
        with torch.device("cpu"):
            inv_freq, module.attention_scaling = compute(config)
        module.inv_freq = inv_freq.float().to(self.device)
        module.original_inv_freq = module.inv_freq.clone()

    def dense(self, module, name):
        """`weight` and `bias` as OPTPreTrainedModel._init_weights draws an nn.Linear's /
        nn.Embedding's: N(0, init_std²), the padding row zero, the bias zero."""
        weight = module.weight
        if weight.is_meta:
            # drawn in `dtype` whatever the storage: a frozen W is the trainable one, rounded once
            value = torch.empty(weight.shape, device=self.device, dtype=self.dtype)
            value.normal_(0.0, self.std, generator=_generator(self.seed, name + ".weight", self.device))
            padding = getattr(module, "padding_idx", None)
            if padding is not None:
                value[padding] = 0
            _swap_in(weight, value.to(self.storage(weight)))
        self.fill(module, "bias", 0.0)


def build_on_meta(size: str, **model_kwargs) -> nn.Module:
    """The model of `size` (its family's), on the meta device: shapes, no memory."""
    from sst_dist.models import build_model

    with torch.device("meta"):
        return build_model(size, **model_kwargs)


__all__ = ["Materializer", "build_on_meta", "is_meta"]

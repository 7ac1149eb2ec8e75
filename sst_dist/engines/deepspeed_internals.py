"""Every private DeepSpeed internal sst_dist reaches, in one place, and the version they were
written against.

DeepSpeed's public API (deepspeed.utils.safe_*) reads and writes whole fp32 masters and optimizer
states. The per-step work and the slot resets need less and more than that: this rank's own piece
of a master or of a state, in place, with no gather, and the link from a parameter to that piece.
Those live in private attributes of ZeRO's optimizers (`_hp_mapping`, `_z3_optimizer`, ...) that
change between minor releases, so they are reached only through the functions below, and
`check_version` refuses any other DeepSpeed major.minor with one line. (A ZeRO-3 parameter's
`ds_id`, `ds_shape`, `ds_numel` and `ds_tensor` are DeepSpeed's documented parameter attributes.)
"""

from __future__ import annotations

import contextlib
import re
import time

import deepspeed
import torch
from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

from sst_dist.errors import ConfigError

WRITTEN_FOR = (0, 19)  # DeepSpeed 0.19.x; checked on 0.19.8


def check_version(version: str | None = None) -> None:
    """One line, before anything starts, if the installed DeepSpeed is not the major.minor the
    internals below were written against."""
    version = version or deepspeed.__version__
    found = tuple(int(n) for n in re.findall(r"\d+", version)[:2])
    if found != WRITTEN_FOR:
        want = ".".join(map(str, WRITTEN_FOR))
        raise ConfigError(f"DeepSpeed {version} is installed, but sst_dist's ZeRO backend reaches into the "
                          f"internals of DeepSpeed {want}.x (sst_dist/engines/deepspeed_internals.py); "
                          f"install deepspeed=={want}.* or use --engine fsdp")


def is_zero3(param) -> bool:
    return hasattr(param, "ds_id")


# ----------------------------------------------------------------------------- ZeRO-1/2

def state_signature(zero_optimizer) -> tuple:
    """What relink_state_fragments' views depend on: which flat partitions have Adam state, and
    the storage of each state tensor (a checkpoint load replaces them)."""
    state = zero_optimizer.optimizer.state
    return tuple((id(flat), tuple(v.data_ptr() for v in state[flat].values() if torch.is_tensor(v)))
                 for flat in state)


def relink_state_fragments(zero_optimizer) -> None:
    """Points every parameter's `_hp_mapping` at its slice of the current Adam state.

    ZeRO-1/2 steps its param groups one at a time and links the state after the first group's
    step, when the later groups have no state yet; those stay unlinked for good ("exp_avg not found
    in optimizer state fragment"), so the safe_* state API fails on every group but the first.
    Re-linking only makes views, and is idempotent.
    """
    if hasattr(zero_optimizer, "single_partition_of_fp32_groups"):
        pairs = zip(zero_optimizer.bit16_groups, zero_optimizer.single_partition_of_fp32_groups)
    elif hasattr(zero_optimizer, "fp32_groups_flat_partition"):
        pairs = zip(zero_optimizer.bf16_groups, zero_optimizer.fp32_groups_flat_partition)
    else:
        return
    state = zero_optimizer.optimizer.state
    for lp_params, flat in pairs:
        if flat in state and state[flat]:
            lazy_init_hp_params_optimizer_state(lp_params, flat, state)


def fragment(param, key: str | None = None) -> tuple[torch.Tensor, int] | None:
    """ZeRO-1/2: this rank's piece of the fp32 master (key None) or of the optimizer state `key`,
    as a view, and where it starts in the flattened parameter; None if this rank's partition holds
    no piece of it."""
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return None
    return mapping.get_hp_fragment(key), mapping.lp_fragment_address.start


def has_fragment_link(param) -> bool:
    """ZeRO-1/2: the parameter is linked to the optimizer's flat partitions (a trainable one)."""
    return hasattr(param, "_hp_mapping")


def data_parallel_group(param):
    """ZeRO-1/2: the process group over which the parameter's fragments are spread."""
    return param._dp_group


def fragment_numel(param) -> int:
    return param._hp_mapping.lp_fragment_address.numel


def fragment_state_keys(param) -> set[str]:
    """ZeRO-1/2: the optimizer-state keys linked to this rank's fragment of `param`."""
    mapping = getattr(param, "_hp_mapping", None)
    return set(mapping.get_optim_state_keys()) if mapping is not None else set()


# ----------------------------------------------------------------------------- ZeRO-1/2: a step the host need not wait for

def _mask_invalid_norm(norm, device=None, val=-1.0):
    """DeepSpeed's mask_nan_or_inf_with_val_inplace with the fill value as a scalar: its
    torch.tensor(val, device=...) is a host-to-device copy, which waits for every queued kernel."""
    norm.masked_fill_(~torch.isfinite(norm), val)


def _unscale_and_clip_grads(self, grad_groups_flat, total_norm):
    """DeepSpeedZeroOptimizer.unscale_and_clip_grads with its invalid-norm test on the device: its
    `if is_invalid_grad_norm(norm)` reads the norm back, which waits for the whole backward. The
    same scale results (an invalid norm clips as an infinite one)."""
    if not torch.is_tensor(total_norm):
        return _DEEPSPEED_UNSCALE_AND_CLIP(self, grad_groups_flat, total_norm)
    if self.clip_grad == 0.0 and self.loss_scale == 1.0:
        return
    combined_scale = self.loss_scale
    if self.clip_grad > 0.0:
        valid = torch.isfinite(total_norm) & (total_norm >= 0)
        clip_norm = torch.where(valid, total_norm, torch.full_like(total_norm, float("inf")))
        clip = ((clip_norm / self.loss_scale) + 1e-6) / self.clip_grad  # the norm is norm x scale
        combined_scale = torch.clamp(clip, min=1.0) * self.loss_scale
    for grad in grad_groups_flat:
        for g in grad if isinstance(grad, list) else [grad]:
            g.data.mul_(1.0 / combined_scale)


_DEEPSPEED_UNSCALE_AND_CLIP = None


def install_step_without_host_reads() -> None:
    """ZeRO-1/2's step read the gradient norm back to the host twice per param group (see the two
    functions above), so the host could never queue the next step while the GPU finished this one;
    with these two replaced it reads nothing (bf16 with the overflow check off: that check, and
    fp16 / fp32's skip of a step with a non-finite norm, still read it). Idempotent."""
    global _DEEPSPEED_UNSCALE_AND_CLIP
    from deepspeed.runtime.zero import stage_1_and_2

    optimizer = stage_1_and_2.DeepSpeedZeroOptimizer
    if optimizer.unscale_and_clip_grads is not _unscale_and_clip_grads:
        _DEEPSPEED_UNSCALE_AND_CLIP = optimizer.unscale_and_clip_grads
        optimizer.unscale_and_clip_grads = _unscale_and_clip_grads
    stage_1_and_2.mask_nan_or_inf_with_val_inplace = _mask_invalid_norm


# ----------------------------------------------------------------------------- ZeRO-3

def partition(param, key: str | None = None) -> torch.Tensor:
    """ZeRO-3: this rank's partition of the fp32 master (key None) or of the optimizer state
    `key`: the partition itself, not safe_get_local_fp32_param's .to(device) copy (offload)."""
    tensor, _ = param._z3_optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False,
                                                                   optim_state_key=key)
    return tensor


def frozen_partition(param) -> tuple[torch.Tensor, int] | None:
    """ZeRO-3, a parameter outside the optimizer (SST's frozen factors): this rank's partition
    `ds_tensor` and where it starts in the flattened parameter, as ZeRO-3's own partitioning puts
    it (partition size x rank in the parameter's group); None where the partition is not a plain
    resident tensor (quantized non-trainable weights, an NVMe partition swapped out)."""
    import deepspeed.comm as ds_dist
    from deepspeed.runtime.zero.partition_parameters import PartitionedParamStatus

    part = param.ds_tensor
    if hasattr(part, "ds_quant_scale") or getattr(part, "status", None) != PartitionedParamStatus.AVAILABLE:
        return None
    return part, part.ds_numel * ds_dist.get_rank(group=param.ds_process_group)


def partition_rank(param) -> int:
    """ZeRO-3: which partition of `param` this rank holds (its start is this times its size)."""
    return param._z3_optimizer._get_param_partition_rank(param)


def partition_numel_and_state_keys(param) -> tuple[int, set[str]]:
    """ZeRO-3: the size of each partition of `param`, and the state keys its group holds."""
    optimizer = param._z3_optimizer
    group, _, numel = optimizer.grad_position[optimizer.get_param_id(param)]
    return numel, set(optimizer.optimizer.state.get(optimizer.fp32_partitioned_groups_flat[group], {}))


@contextlib.contextmanager
def parameter_traffic():
    """ZeRO-3: what its per-module hooks cost the host while the block runs. Yields a dict that
    fills in: `fetch_s` and `release_s`, host seconds in the parameter coordinator's
    fetch_sub_module (which gathers a module's parameters, and waits for them) and
    release_sub_module (which frees them again), and `gathered`, the parameters it gathered (a
    persistent one, below stage3_param_persistence_threshold, stays gathered and counts nothing)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as C

    traffic = {"fetch_s": 0.0, "release_s": 0.0, "gathered": 0}
    gather_name = "_PartitionedParameterCoordinator__all_gather_params_"  # name-mangled private
    originals = {name: getattr(C, name) for name in ("fetch_sub_module", "release_sub_module", gather_name)}

    def timed(name, key):
        def hook(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return originals[name](self, *args, **kwargs)
            finally:
                traffic[key] += time.perf_counter() - start
        return hook

    def gather(self, params, *args, **kwargs):
        traffic["gathered"] += sum(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in params)
        return originals[gather_name](self, params, *args, **kwargs)

    C.fetch_sub_module = timed("fetch_sub_module", "fetch_s")
    C.release_sub_module = timed("release_sub_module", "release_s")
    setattr(C, gather_name, gather)
    try:
        yield traffic
    finally:
        for name, original in originals.items():
            setattr(C, name, original)

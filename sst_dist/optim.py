"""The optimizer every engine builds: torch's AdamW, with exact per-slot state resets.

SST's resample and ReLoRA*'s restart reset the Adam moments of some slots (vectors, factors)
while the rest of the tensor trains on. Zeroing the moments alone is not a fresh start: Adam's
bias correction divides by 1 - beta^t with the optimizer's step t, which keeps counting, so a slot
zeroed at t = 600 then moves 2-4 times faster than a fresh Adam would for a whole iteration
(docs/design.md §1, the state-reset trap). Optimizers count steps per tensor (torch) or per flat
partition (ZeRO), never per slot.

So a parameter group marked `resettable` keeps one more state tensor, `age`: the number of steps
each element has taken since its last reset, and its bias correction uses that age. A reset
(engines' `reset_state`) zeroes exp_avg, exp_avg_sq *and* age of the chosen elements, after which
they compute exactly what a new AdamW on those elements alone would. Every other group is plain
torch.optim.AdamW, fused on a GPU and on the CPU alike (ZeRO-Offload steps there). The update is
elementwise, so it is the same on a whole tensor, a ZeRO flat partition or an FSDP shard.
"""

from __future__ import annotations

import math

import torch

# optimizer-state keys a slot reset zeroes
RESET_KEYS = ("exp_avg", "exp_avg_sq", "age")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """An FSDP2 DTensor's local shard (the update is elementwise), any other tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class BiasCorrection:
    """1 - beta1^a and sqrt(1 - beta2^a) for integer ages a, looked up, not computed per element:
    a table gather rounds the same for every element, wherever it lies in a vector, a shard or a
    flat partition, so the update does not depend on the engine's layout or the CPU's kernels.
    Ages past the table's end are clamped: there both corrections are 1.0 in float32."""

    def __init__(self, beta1: float, beta2: float, dtype: torch.dtype, device):
        length = max(_saturation(beta1), _saturation(beta2)) + 1
        ages = torch.arange(length, dtype=torch.float64)
        bc1 = 1.0 - torch.tensor(beta1, dtype=torch.float64) ** ages
        bc2 = 1.0 - torch.tensor(beta2, dtype=torch.float64) ** ages
        bc1[0], bc2[0] = 1.0, 1.0  # age 0 only occurs for elements never stepped; never divides
        self.bc1 = bc1.to(dtype=dtype, device=device)
        self.bc2_sqrt = bc2.sqrt().to(dtype=dtype, device=device)
        self.last = length - 1

    def lookup(self, age: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = age.reshape(-1).clamp(max=self.last).to(torch.int32)
        return self.bc1.index_select(0, index).view_as(age), self.bc2_sqrt.index_select(0, index).view_as(age)


def _saturation(beta: float) -> int:
    """The age past which 1 - beta^a rounds to 1 even in float64 (beta^a < 2^-54)."""
    if beta <= 0.0:
        return 1
    return min(int(math.ceil(-54 * math.log(2) / math.log(beta))) + 1, 1 << 24)


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW; groups with `resettable: True` count steps per element (`age`).

    Group keys beyond torch's: `name` (the trainer's lr groups) and `resettable`. For a resettable
    group the arithmetic is torch's single-tensor AdamW with the bias corrections taken per element:
        p <- p (1 - lr wd);  m <- lerp(m, g, 1 - b1);  v <- b2 v + (1 - b2) g^2
        p <- p - lr (m / bc1(age)) / (sqrt(v) / sqrt(bc2(age)) + eps)
    """

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self._tables: dict[tuple, BiasCorrection] = {}
        self._batch_cache: dict[int, tuple] = {}  # id(group) -> (group, _batches' last result)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.param_groups
        plain = [g for g in groups if not g.get("resettable")]
        if len(plain) < len(groups):
            for group in groups:
                if group.get("resettable"):
                    self._resettable_step(group)
            live = {id(group) for group in groups}
            for key in [key for key in self._batch_cache if key not in live]:  # groups replaced
                del self._batch_cache[key]
        if plain:
            # torch's own implementation (fused or foreach) for every other group; engines such as
            # ZeRO swap param_groups themselves, so swapping here composes with theirs
            self.param_groups = plain
            try:
                super().step()
            finally:
                self.param_groups = groups
        return loss

    def _table(self, beta1, beta2, dtype, device) -> BiasCorrection:
        key = (beta1, beta2, dtype, torch.device(device))
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = BiasCorrection(beta1, beta2, dtype, device)
        return table

    # elements per batch of the list update: bounds its temporaries (the ages side by side, their
    # two bias corrections, the denominators, the steps: 5 float32 copies of a batch, 320 MB), not
    # the tensors stepped (a ZeRO partition above it is a batch of its own, as before batching)
    BATCH = 1 << 24

    def _resettable_step(self, group: dict) -> None:
        """The per-element-age update as list operations (torch._foreach_*): a few kernel launches
        per batch of tensors, however many tensors the group has (FSDP2 holds one shard per
        parameter, where ZeRO holds one flat partition). Elementwise, so batching changes nothing
        but the launches. The batches of local tensors are built once (_batches); a step reads
        only the gradients, so its host work does not grow with the number of tensors."""
        beta1, beta2 = (float(b) for b in group["betas"])
        lr, eps, decay = float(group["lr"]), group["eps"], group["weight_decay"]
        stepped, batches = self._batches(group)
        if not stepped:
            return
        # each tensor's own count, kept for tools that read it
        torch._foreach_add_([self.state[p]["step"] for p in stepped], 1)
        for dtype, device, members, params, exp_avgs, exp_avg_sqs, ages, sizes, flat1d in batches:
            grads = [_local(p.grad) for p in members]
            table = self._table(beta1, beta2, dtype, device)
            torch._foreach_add_(ages, 1)
            # one table lookup for the batch: its ages side by side (FSDP2's shards of a flat
            # parameter are 1-D already, flat1d: no reshape, no view back)
            flat = ages[0].reshape(-1) if len(ages) == 1 else \
                torch.cat(ages if flat1d else [a.reshape(-1) for a in ages])
            bc1, bc2_sqrt = (c.split(sizes) for c in table.lookup(flat))
            if not flat1d:
                bc1 = [b.view_as(a) for b, a in zip(bc1, ages)]
                bc2_sqrt = [b.view_as(a) for b, a in zip(bc2_sqrt, ages)]
            if decay:
                torch._foreach_mul_(params, 1.0 - lr * decay)
            torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
            denom = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denom, bc2_sqrt)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, torch._foreach_div(exp_avgs, bc1), denom, value=-lr)

    def _batches(self, group: dict) -> tuple[list, list]:
        """(the group's parameters that have a gradient, their batches), each batch (dtype, device,
        parameters, local params, exp_avgs, exp_avg_sqs, ages, sizes, whether every age is 1-D).
        Built again only when the parameters stepped or their state tensors are other objects than
        last time (a first step, a checkpoint load): the cache holds those objects, so their ids
        cannot be reused."""
        stepped = [p for p in group["params"] if p.grad is not None]
        for p in stepped:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                for key in RESET_KEYS:
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        objects = [(p, *(self.state[p][key] for key in ("step", *RESET_KEYS))) for p in stepped]
        _, cached, batches = self._batch_cache.get(id(group), (None, None, None))
        if cached is not None and len(cached) == len(objects) and all(
                a is b for old, new in zip(cached, objects) for a, b in zip(old, new)):
            return stepped, batches
        kinds: dict[tuple, list[list]] = {}  # (dtype, device) -> batches of (p, param, m, v, age)
        filled: dict[tuple, int] = {}  # (dtype, device) -> elements in its last batch
        for p in stepped:
            param = _local(p)
            key = (param.dtype, param.device)
            kind = kinds.setdefault(key, [[]])
            if kind[-1] and filled[key] + param.numel() > self.BATCH:
                kind.append([])
                filled[key] = 0
            kind[-1].append((p, param, *(_local(self.state[p][k]) for k in RESET_KEYS)))
            filled[key] = filled.get(key, 0) + param.numel()
        batches = []
        for (dtype, device), kind in kinds.items():
            for batch in kind:
                members, params, exp_avgs, exp_avg_sqs, ages = (list(column) for column in zip(*batch))
                batches.append((dtype, device, members, params, exp_avgs, exp_avg_sqs, ages,
                                [a.numel() for a in ages], all(a.dim() == 1 for a in ages)))
        self._batch_cache[id(group)] = (group, objects, batches)
        return stepped, batches


# the devices whose plain groups step with torch's fused AdamW: one pass over each tensor. On the
# CPU (ZeRO-Offload's step; 50M fp32 parameters, 2 cores) it takes 36 ms where foreach takes 235:
# foreach makes a pass over memory per operation. Both kernels take every floating dtype.
FUSED_DEVICES = ("cuda", "cpu")


def build_optimizer(param_groups: list[dict], recipe, device: torch.device) -> AdamW:
    """The AdamW of every engine, from the recipe's optim section; `device` is where it steps (the
    CPU under ZeRO-Offload). Elsewhere torch picks its foreach path."""
    o = recipe.optim
    if o.reset == "moments":
        # the ablation: a reset zeroes m and v and the tensor's step count runs on, which is torch's
        # own AdamW on that group (the engines' reset zeroes whatever moments the state holds)
        param_groups = [{**group, "resettable": False} for group in param_groups]
    return AdamW(param_groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay,
                 fused=True if torch.device(device).type in FUSED_DEVICES else None)


def set_learning_rates(optimizer: torch.optim.Optimizer, lrs: dict[str, float]) -> None:
    """Sets each named group's lr (`full`, `lowrank`, `galore`) for this step."""
    for group in optimizer.param_groups:
        group["lr"] = lrs[group["name"]]

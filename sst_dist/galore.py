"""GaLore (Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
ICML 2024) in an exact layer form that an engine can shard.

galore-torch's GaLoreAdamW projects each 2-D weight's gradient G to rank r by a projector P from
the SVD of G, refreshed every `update_proj_gap` of its steps; the Adam moments live in the
projected space; the update is projected back and multiplied by `scale`. It needs the full 2-D
gradient of each weight, so it cannot run under ZeRO, which hands the optimizer flat 1-D
partitions. (tests/galore_reference.py keeps that optimizer form as the float64 reference.)

`GaLoreLinear` (via `apply_galore`) gives the same trajectory as fixed-shape parameters. With a left
  projector P (out, r), W_eff = c·W + scale·P·B: W is frozen, B (r, in) trains and receives the
  gradient Pᵀ G, exactly what GaLore's Adam sees; a right projector Q (r, in) gives
  W_eff = c·W + scale·B·Q with B (out, r) and gradient G Qᵀ. Any elementwise AdamW on B then
  moves W_eff exactly as GaLoreAdamW moves W. A refresh merges scale·P·B into W, zeroes B and
  loads the new P; shapes never change, so ZeRO's flat buffers never need rebuilding. The scalar
  c carries W's share of decoupled weight decay between refreshes (W itself is frozen).

Semantics of galore-torch 1.0 that the layer form keeps:
- the projector of a weight is taken on its first step and then whenever its step count (steps
  taken before this one) is a multiple of `update_proj_gap`, from the gradient of that very step;
- the SVD runs in float32 whatever the gradient's dtype (float64 included), and the projector is
  cast back to the gradient's dtype;
- the Adam moments are *not* reset when the projector changes, and the step count (hence the bias
  correction) runs on;
- `scale` multiplies the back-projected, already Adam-normalised update, not the gradient;
- decoupled weight decay acts on the full weight W.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from sst_dist.precision import autocast_backward, autocast_forward, full_precision
from sst_dist.registry import OPT_TARGETS
from sst_dist.surgery import store_frozen, swap_modules

PROJ_TYPES = ("std", "reverse_std", "left", "right")

# galore-torch's GaLoreProjector defaults, used when a `rank` group leaves a key out
DEFAULT_UPDATE_PROJ_GAP = 200
DEFAULT_SCALE = 1.0
DEFAULT_PROJ_TYPE = "std"


# ----------------------------------------------------------------------------- projector math

def projection_side(shape: Sequence[int], proj_type: str = DEFAULT_PROJ_TYPE) -> str:
    """Which side of a (out, in) weight the projector sits on: 'left' or 'right'.

    left:  P (out, r), low-rank gradient Pᵀ G (r, in).
    right: Q (r, in),  low-rank gradient G Qᵀ (out, r).
    'std' projects the right side when out >= in, 'reverse_std' the opposite (galore-torch).
    """
    if proj_type not in PROJ_TYPES:
        raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")
    if proj_type in ("left", "right"):
        return proj_type
    tall = shape[0] >= shape[1]
    return ("right" if tall else "left") if proj_type == "std" else ("left" if tall else "right")


def projector_shape(shape: Sequence[int], rank: int, side: str) -> tuple[int, int]:
    """(out, r) for left, (r, in) for right; r is clamped to min(out, in) as a thin SVD does."""
    out, inp = shape
    r = min(rank, out, inp)
    return (out, r) if side == "left" else (r, inp)


def low_rank_shape(shape: Sequence[int], rank: int, side: str) -> tuple[int, int]:
    """Shape of the projected gradient (and of B): (r, in) for left, (out, r) for right."""
    out, inp = shape
    r = min(rank, out, inp)
    return (r, inp) if side == "left" else (out, r)


def orthogonal_projector(grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """The top-r singular vectors of G (out, in): U[:, :r] (out, r) for left, Vh[:r] (r, in) for
    right. The SVD runs in float32 for any input dtype, as in galore-torch, and the result comes
    back in G's dtype (so float64 inputs get a float32-accurate projector)."""
    U, _, Vh = torch.linalg.svd(grad.detach().float(), full_matrices=False)
    P = U[:, :rank] if side == "left" else Vh[:rank, :]
    # a contiguous copy of its own: a slice would keep the whole k x k factor alive (on a GPU, a
    # refresh of every layer then held 1.9 GiB of them at OPT-1.3B), and LAPACK's column-major
    # factors would be sent as raw storage by a collective
    return P.to(grad.dtype).clone(memory_format=torch.contiguous_format)


def randomized_projector(grad: torch.Tensor, rank: int, side: str, generator: torch.Generator,
                         power_iterations: int = 2) -> torch.Tensor:
    """orthogonal_projector's top-r singular vectors by a randomized range finder with power
    iterations (Halko, Martinsson & Tropp 2011, Alg. 4.4), in float32: GEMMs and thin QRs of
    2r columns in place of a full SVD. The full SVD of an OPT-13B fc1 gradient (20480 x 5120)
    takes seconds on a GPU, and a refresh takes 240 of them; a gradient's spectrum decays fast
    enough that two power iterations find its top-r subspace (tests/test_galore.py)."""
    A = grad.detach().float()
    if side == "right":  # Q's rows are the top right singular vectors of G: the left ones of Gᵀ
        A = A.T
    rows, cols = A.shape
    sketch = min(2 * rank, rows, cols)
    Q = torch.linalg.qr(A @ torch.randn(cols, sketch, generator=generator, device=A.device)).Q
    for _ in range(power_iterations):  # re-orthogonalised each half-step: fp32 loses the tail
        Q = torch.linalg.qr(A.T @ Q).Q
        Q = torch.linalg.qr(A @ Q).Q
    U_small = torch.linalg.svd(Q.T @ A, full_matrices=False).U  # (sketch, sketch)
    U = Q @ U_small[:, :rank]  # (rows, r)
    return (U if side == "left" else U.T).to(grad.dtype).contiguous()


# galore.projector auto: the exact SVD while a layer's k = min(out, in) is below this (an SVD of
# 2048 x 8192 takes well under a second on a GPU), the randomized one from OPT-6.7B on
RANDOMIZED_FROM_K = 4096


def uses_randomized(projector: str, shape: Sequence[int]) -> bool:
    """Whether galore.projector `projector` takes a layer of `shape`'s projector randomized."""
    return projector == "randomized" or (projector == "auto" and min(shape) >= RANDOMIZED_FROM_K)


def projector_generator(layer_index: int, refresh: int, device) -> torch.Generator:
    """The sketch's RNG: a pure function of (layer, refresh), so a resumed run draws the same
    projector, and the global RNG streams (dropout) are left alone."""
    return torch.Generator(device=device).manual_seed(0x6A10 + 1_000_003 * layer_index + refresh)


def project(grad: torch.Tensor, P: torch.Tensor, side: str) -> torch.Tensor:
    """G (out, in) -> Pᵀ G (r, in) for left, G Qᵀ (out, r) for right."""
    return P.T @ grad if side == "left" else grad @ P.T


def project_back(low: torch.Tensor, P: torch.Tensor, side: str, scale: float) -> torch.Tensor:
    """scale · P N (left, N: (r, in)) or scale · N Q (right, N: (out, r)) -> (out, in)."""
    full = P @ low if side == "left" else low @ P
    return full * scale


def merged_weight(W: torch.Tensor, P: torch.Tensor, B: torch.Tensor, decay: float, scale: float,
                  side: str) -> torch.Tensor:
    """W_eff = decay·W + scale·P·B (left) or decay·W + scale·B·Q (right): (out, in)."""
    return W * decay + project_back(B, P, side, scale)


# ----------------------------------------------------------------------------- autograd

class _GaLoreMatmul(torch.autograd.Function):
    """y = x W_effᵀ with W_eff = decay·W + scale·P·B (left) or decay·W + scale·B·Q (right),
    computed factored (never forming W_eff, like LoRA).

    B's gradient is Pᵀ G (left) or G Qᵀ (right) with G = gyᵀ x: the projected gradient GaLore's
    Adam sees, *without* the factor `scale` that the chain rule would add, because Adam is not
    scale-invariant once eps is counted; `scale` enters in the forward, where GaLore applies it
    to the update. W and P get no gradient. An optional `probe` (a zero (out, in) view) receives
    G itself, for the projector refresh.
    """

    @staticmethod
    @autocast_forward
    def forward(ctx, x, weight, proj, B, probe, decay, scale, side):
        dense = x @ weight.T
        if decay != 1.0:
            dense = dense * decay
        if side == "left":
            h = x @ B.T  # (..., r)
            y = dense + (h @ proj.T) * scale
            ctx.save_for_backward(x, weight, proj, B)
        else:
            h = x @ proj.T  # (..., r)
            y = dense + (h @ B.T) * scale
            ctx.save_for_backward(x, weight, proj, B, h)
        ctx.decay, ctx.scale, ctx.side = decay, scale, side
        return y

    @staticmethod
    @autocast_backward
    def backward(ctx, gy):
        # read once: a checkpointed (recomputed) forward lets each saved tensor be unpacked once
        saved = ctx.saved_tensors
        x, weight, proj, B = saved[:4]
        decay, scale = ctx.decay, ctx.scale
        x2 = x.reshape(-1, x.shape[-1])
        g2 = gy.reshape(-1, gy.shape[-1])
        grad_x = grad_B = grad_probe = None
        if ctx.side == "left":
            gp = gy @ proj  # (..., r): gy P
            if ctx.needs_input_grad[0]:
                grad_x = gy @ weight * decay + (gp @ B) * scale
            if ctx.needs_input_grad[3]:
                grad_B = gp.reshape(-1, gp.shape[-1]).T @ x2  # Pᵀ gyᵀ x = Pᵀ G
        else:
            (h,) = saved[4:]
            if ctx.needs_input_grad[0]:
                grad_x = gy @ weight * decay + ((gy @ B) @ proj) * scale
            if ctx.needs_input_grad[3]:
                grad_B = g2.T @ h.reshape(-1, h.shape[-1])  # gyᵀ x Qᵀ = G Qᵀ
        if ctx.needs_input_grad[4]:
            wide = torch.promote_types(x.dtype, torch.float32)
            with full_precision(x):
                grad_probe = g2.T.to(wide) @ x2.to(wide)
        return grad_x, None, None, grad_B, grad_probe, None, None, None


class _GaLoreLookup(torch.autograd.Function):
    """Rows of W_eff = decay·W + scale·P·B (left) or decay·W + scale·B·Q (right) at `ids`: an
    embedding lookup, with the same gradients as _GaLoreMatmul.

    G (V, h) of a lookup is gy scattered into the rows `ids` (none into `padding_idx`, as
    nn.Embedding); B receives Pᵀ G = P[ids]ᵀ gy (left) or G Qᵀ = scatter(gy Qᵀ) (right), without
    `scale`; the probe receives G itself.
    """

    @staticmethod
    @autocast_forward
    def forward(ctx, ids, weight, proj, B, probe, decay, scale, side, padding_idx):
        rows = F.embedding(ids, weight)
        if decay != 1.0:
            rows = rows * decay
        low = F.embedding(ids, proj) @ B if side == "left" else F.embedding(ids, B) @ proj
        ctx.save_for_backward(ids, proj)
        ctx.side, ctx.padding_idx = side, padding_idx
        ctx.shapes = (weight.shape, B.shape)
        return rows + low * scale

    @staticmethod
    @autocast_backward
    def backward(ctx, gy):
        ids, proj = ctx.saved_tensors
        (vocab, width), B_shape = ctx.shapes
        flat = ids.reshape(-1)
        g2 = gy.reshape(-1, gy.shape[-1])
        if ctx.padding_idx is not None:
            g2 = g2.masked_fill((flat == ctx.padding_idx)[:, None], 0)
        grad_B = grad_probe = None
        if ctx.needs_input_grad[3]:
            if ctx.side == "left":
                grad_B = proj.index_select(0, flat).T @ g2  # P[ids]ᵀ gy: (r, h)
            else:
                low = g2 @ proj.T  # (T, r), in the autocast dtype where autocast is on
                grad_B = low.new_zeros(B_shape).index_add_(0, flat, low)  # (V, r)
        if ctx.needs_input_grad[4]:
            wide = torch.promote_types(gy.dtype, torch.float32)
            grad_probe = g2.new_zeros((vocab, width), dtype=wide).index_add_(0, flat, g2.to(wide))
        return None, None, None, grad_B, grad_probe, None, None, None, None


# ----------------------------------------------------------------------------- the layer

class GaLoreLinear(nn.Module):
    """A linear layer trained as GaLore, in fixed-shape parameters an engine can shard.

    weight (out, in): frozen (requires_grad=False), so ZeRO-3 / FSDP shard it like any weight.
    proj: frozen projector, P (out, r) for a left side or Q (r, in) for a right side; zeros until
        the first refresh, which must come before the first optimizer step (step 0).
    B: trainable, (r, in) for left, (out, r) for right; zero after every refresh.
    bias (out,): trainable, unchanged from the nn.Linear.
    decay: a Python float c with W_eff = c·W + scale·(P B | B Q): W's share of decoupled weight
        decay since the last refresh (`apply_weight_decay` after every optimizer step); it is
        folded into W at the refresh. Kept in float64 on every rank, saved with the state dict.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *,
                 scale: float = DEFAULT_SCALE, proj_type: str = DEFAULT_PROJ_TYPE,
                 update_proj_gap: int = DEFAULT_UPDATE_PROJ_GAP, device=None, dtype=None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if update_proj_gap < 1:
            raise ValueError(f"update_proj_gap must be >= 1, got {update_proj_gap}")
        factory = dict(device=device, dtype=dtype)
        shape = (out_features, in_features)
        self.in_features, self.out_features = in_features, out_features
        self.side = projection_side(shape, proj_type)
        self.rank = min(rank, out_features, in_features)
        self.scale, self.proj_type, self.update_proj_gap = scale, proj_type, update_proj_gap
        # shapes kept here too: under ZeRO-3 a parameter's own .shape is that of its local shard
        self.proj_shape = projector_shape(shape, rank, self.side)
        self.B_shape = low_rank_shape(shape, rank, self.side)
        self.weight = nn.Parameter(torch.empty(shape, **factory), requires_grad=False)
        self.proj = nn.Parameter(torch.zeros(self.proj_shape, **factory), requires_grad=False)
        self.B = nn.Parameter(torch.zeros(self.B_shape, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        self.decay = 1.0
        self.refreshes = 0
        # set by a GradientProbe whose pass covers this layer: makes its probe views
        self._probe: Callable[[torch.dtype, torch.device], torch.Tensor] | None = None

    # the G a refresh probe receives per forward: 2 for an embedding whose tied head sends its own
    probe_views = 1

    def footprint(self) -> dict:
        """What sst_dist.memory counts beyond the parameters: x·Qᵀ kept for the backward (right
        projector); the full G a refresh holds, and its probe views; and for GaLoreAdamW's own
        accounting (the optimizer form), W trained in full with Adam's moments in B's shape and the
        projector in the optimizer's state: (W, B, projector)."""
        return {"saved_width": self.rank if self.side == "right" else 0,
                "refresh_grad": (self.weight.numel(), self.probe_views),
                "optimizer_form": (self.weight, self.B, self.proj)}

    @staticmethod
    def owns_state(prefix: str, state: dict) -> bool:
        """Whether `prefix` in a checkpoint's state dict is a GaLoreLinear or GaLoreEmbedding (export)."""
        return f"{prefix}.proj" in state and f"{prefix}.B" in state

    @staticmethod
    def dense_from_state(prefix: str, state: dict, recipe, keep_singular: float | None = None):
        """Export: the layer's entries popped from `state` (its decay from the extra state),
        merged into decay·W + scale·P·B (float64); (weight, None)."""
        weight = state.pop(f"{prefix}.weight").double()
        proj, B = state.pop(f"{prefix}.proj").double(), state.pop(f"{prefix}.B").double()
        extra = state.pop(f"{prefix}._extra_state", None)  # get_extra_state's
        decay = float(extra["decay"]) if isinstance(extra, dict) else 1.0
        side = projection_side(tuple(weight.shape), recipe.galore.proj_type)
        return merged_weight(weight, proj, B, decay, recipe.galore.scale, side), None

    def meta_init(self, m, name: str, drawn=None) -> None:
        """model.build meta (build.Materializer `m`): W and bias as the nn.Linear's (an
        embedding's, its padding row zero), the projector and B zero, as after from_linear."""
        m.dense(self, name)
        m.fill(self, "proj", 0.0)
        m.fill(self, "B", 0.0)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, rank: int, scale: float = DEFAULT_SCALE,
                    proj_type: str = DEFAULT_PROJ_TYPE,
                    update_proj_gap: int = DEFAULT_UPDATE_PROJ_GAP) -> "GaLoreLinear":
        """The same function as `linear` (B = 0), awaiting its first projector."""
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, rank, linear.bias is not None,
                    scale=scale, proj_type=proj_type, update_proj_gap=update_proj_gap,
                    device=weight.device, dtype=weight.dtype)
        layer.weight.copy_(weight)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x):
        y = _GaLoreMatmul.apply(x, self.weight, self.proj, self.B, self.new_probe(x), self.decay,
                                self.scale, self.side)
        return y if self.bias is None else y + self.bias

    def new_probe(self, x: torch.Tensor) -> torch.Tensor | None:
        """A zero (out, in) input that receives G in a GradientProbe pass, else None.

        At least float32, so G sums over micro-batches and ranks without bf16 rounding.
        """
        if self._probe is None or not torch.is_grad_enabled():
            return None
        return self._probe(torch.promote_types(x.dtype, torch.float32), x.device)

    def refresh_due(self, step: int) -> bool:
        """Whether a new projector is due before optimizer step `step` (0-based, steps taken so
        far), as galore-torch decides it: at step 0 and every update_proj_gap steps."""
        return step % self.update_proj_gap == 0

    def apply_weight_decay(self, lr: float, weight_decay: float) -> None:
        """After every optimizer step: W <- (1 - lr·wd)·W, kept as the scalar `decay`.

        `lr` and `weight_decay` are those B's parameter group used in that step, so W decays
        exactly as B does and W_eff as GaLoreAdamW's W.
        """
        self.decay *= 1.0 - lr * weight_decay

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """W_eff (out, in), from this process's tensors (single-process use)."""
        return merged_weight(self.weight, self.proj, self.B, self.decay, self.scale, self.side)

    def get_extra_state(self) -> dict:
        return {"decay": self.decay, "refreshes": self.refreshes}

    def set_extra_state(self, state: dict) -> None:
        self.decay, self.refreshes = float(state["decay"]), int(state["refreshes"])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, side={self.side}, scale={self.scale}, "
                f"update_proj_gap={self.update_proj_gap}")


class GaLoreEmbedding(GaLoreLinear):
    """An nn.Embedding (V, h) trained as GaLore: W (V, h) frozen, projector and B as in
    GaLoreLinear with out_features = V, in_features = h, so refreshes, probes, weight decay and
    state are GaLoreLinear's. Its forward is the lookup of W_eff's rows.

    When the LM head is tied to the embedding (OPT), `tied_head()` gives the head that computes
    x W_effᵀ from the *same* W, P and B: both paths add into B's gradient and into the probe's G,
    which is what GaLoreAdamW sees for a tied weight, the sum of both gradients.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, *,
                 padding_idx: int | None = None, **kwargs):
        super().__init__(embedding_dim, num_embeddings, rank, bias=False, **kwargs)
        self.padding_idx = padding_idx

    @classmethod
    @torch.no_grad()
    def from_embedding(cls, embedding: nn.Embedding, rank: int, scale: float = DEFAULT_SCALE,
                       proj_type: str = DEFAULT_PROJ_TYPE,
                       update_proj_gap: int = DEFAULT_UPDATE_PROJ_GAP) -> "GaLoreEmbedding":
        weight = embedding.weight
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, rank,
                    padding_idx=embedding.padding_idx, scale=scale, proj_type=proj_type,
                    update_proj_gap=update_proj_gap, device=weight.device, dtype=weight.dtype)
        layer.weight.copy_(weight)
        return layer

    def forward(self, ids):
        return _GaLoreLookup.apply(ids, self.weight, self.proj, self.B, self.new_probe(self.weight),
                                   self.decay, self.scale, self.side, self.padding_idx)

    def tied_head(self) -> "GaLoreTiedHead":
        self.probe_views = 2
        return GaLoreTiedHead(self)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", padding_idx={self.padding_idx}"


class GaLoreTiedHead(nn.Module):
    """The LM head tied to a GaLoreEmbedding: logits = x W_effᵀ, no bias.

    It registers the embedding's own Parameter objects (as a tied nn.Linear shares its weight),
    so an engine sees one tensor under two names and gathers it for either module; the scalar
    state (decay, probes) is read from the embedding, which is not a submodule of the head.
    """

    def __init__(self, embedding: GaLoreEmbedding):
        super().__init__()
        self.weight, self.proj, self.B = embedding.weight, embedding.proj, embedding.B
        self._source = [embedding]  # in a list: not registered as a child module

    def forward(self, x):
        source = self._source[0]
        return _GaLoreMatmul.apply(x, self.weight, self.proj, self.B, source.new_probe(x),
                                   source.decay, source.scale, source.side)

    def extra_repr(self) -> str:
        return "tied to the GaLore embedding"


# ----------------------------------------------------------------------------- refresh

def refresh_groups(indices: Iterable[int], micro_batches: int,
                   refresh_layers: int | None = None) -> list[list[int]]:
    """The probe passes of a refresh, as the layer indices each covers (galore.refresh_layers).

    One micro-batch per step: one pass over every layer, each layer's G taken as the backward
    makes it. Several: a layer's G is its sum over the step's micro-batches, so a pass keeps a
    running sum for every layer it covers; passes of `refresh_layers` consecutive layers (None:
    all in one) bound that to a group's sums, at the price of one pass per group, each of them
    every micro-batch's forward and a backward down to the group's first layer.
    """
    indices = list(indices)
    size = len(indices) if micro_batches == 1 or refresh_layers is None else refresh_layers
    return [indices[i:i + size] for i in range(0, len(indices), max(size, 1))]


class GradientProbe:
    """Takes the full weight gradients G = ∂L/∂W_eff of GaLore layers, for their refresh, one
    layer at a time.

    GaLore takes the new projector from the gradient of the step that will use it, so at a refresh
    step the trainer runs a probe pass on the step's batch first, refreshes, then runs the step as
    usual: B's gradient is then P_newᵀ G exactly. Each covered layer's forward gets, as its probe
    input, a zero-strided (out, in) view of a scalar leaf; `backward` runs torch.autograd.grad
    over those scalars alone, so no parameter's gradient accumulator runs (.grad untouched, and an
    engine's reduce hooks on them stay idle) and autograd returns nothing large. A hook on each
    view takes G as the backward makes it and hands autograd a zero view instead, keeping no
    reference to G once the layer is done with.

    A layer's G is its sum over the pass's `micro_batches` backward calls (this rank's share of
    the step). In the last of them each layer's final G goes to `on_gradient(index, G)` as soon
    as the backward has made it, before the next layer's G exists (autograd runs a probe's node
    right after its layer's, ahead of anything earlier in the forward): with one micro-batch a
    pass holds one layer's G at a time. What else it holds, bounded: a tied embedding's G is its
    head's (which arrives first) plus its lookup's (which arrives last), so that one layer's
    head G is held across the pass; with several micro-batches every covered layer keeps a
    running sum until the last one (refresh_groups bounds how many layers a pass covers).

    `on_gradient` runs inside the backward, so a collective it issues (refresh_projector's reduce)
    is issued in backward order, which is the same on every rank as long as every rank's forward
    reaches the same layers; an engine's own collectives in that backward (ZeRO-3's and FSDP2's
    gathers) are issued in that same order too.

        with GradientProbe(layers, micro_batches=len(batch), on_gradient=take) as probe:
            for micro_batch in batch:
                probe.backward(loss_fn(model, micro_batch))

    group: the layer indices this pass covers (default: every layer due at `step`; step None: all).
    Without `on_gradient`, each final G is kept in gradients[index] (None for a layer not covered).
    The overall scale of G does not matter: the projector is its top singular vectors. Randomness
    in the model (dropout) makes the probe's G differ from the step's; the OPT recipes train
    without dropout.
    """

    def __init__(self, layers: Iterable[GaLoreLinear], step: int | None = None, *, micro_batches: int = 1,
                 group: Iterable[int] | None = None,
                 on_gradient: Callable[[int, torch.Tensor], None] | None = None):
        self.layers = list(layers)
        if group is None:
            group = [i for i, layer in enumerate(self.layers) if step is None or layer.refresh_due(step)]
        self.group, self.micro_batches = list(group), micro_batches
        self.gradients: list[torch.Tensor | None] = [None] * len(self.layers)
        self.on_gradient = on_gradient or self.gradients.__setitem__
        self._leaves: dict[int, list[torch.Tensor]] = {i: [] for i in self.group}  # since the last backward
        self._waiting: dict[int, int] = {}  # probes of this backward yet to send their G, by layer
        self._parts: dict[int, torch.Tensor] = {}  # this backward's G of a layer with probes still to come
        self._sums: dict[int, torch.Tensor] = {}  # G summed over the earlier backward calls
        self._calls = 0
        self._taken: set[int] = set()

    def __enter__(self) -> "GradientProbe":
        for index in self.group:
            self.layers[index]._probe = functools.partial(self._view, index)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        for layer in self.layers:
            layer._probe = None
        missed = [i for i in self.group if i not in self._taken]
        if exc_type is None and missed:
            # a silent skip would leave those layers on a stale (or, at step 0, zero) projector
            raise RuntimeError(
                f"no gradient reached GaLore layers {missed} in the probe pass ({self._calls} of "
                f"{self.micro_batches} micro-batches ran probe.backward(loss)); run probe.backward(loss) "
                f"once per micro-batch, without reentrant activation checkpointing, whose forward "
                f"runs under no_grad")

    def _view(self, index: int, dtype: torch.dtype, device) -> torch.Tensor:
        layer = self.layers[index]
        leaf = torch.zeros((), dtype=dtype, device=device, requires_grad=True)
        view = leaf.expand(layer.out_features, layer.in_features)  # no (out, in) memory
        view.register_hook(functools.partial(self._arrived, index))
        self._leaves[index].append(leaf)
        return view

    def _arrived(self, index: int, grad: torch.Tensor) -> torch.Tensor:
        # what autograd gets instead of G (it only sums it into the scalar leaf): G is then ours
        zero = grad.new_zeros(()).expand(grad.shape)
        part = self._parts.pop(index, None)
        part = grad if part is None else part.add_(grad)
        self._waiting[index] -= 1
        if self._waiting[index]:
            self._parts[index] = part
        else:
            self._add(index, part)
        return zero

    def _add(self, index: int, this_pass: torch.Tensor) -> None:
        # one backward's G first (a tied embedding's head and lookup), then the running sum: the
        # grouping a data-parallel reduce of per-rank sums has too
        total = self._sums.pop(index, None)
        total = this_pass if total is None else total.add_(this_pass)
        if self._calls == self.micro_batches:
            self._taken.add(index)
            self.on_gradient(index, total)
        else:
            self._sums[index] = total

    def backward(self, loss: torch.Tensor) -> None:
        if self._calls == self.micro_batches:
            raise RuntimeError(f"probe.backward ran more often than the {self.micro_batches} "
                               f"micro-batches this GradientProbe was made for")
        self._calls += 1
        leaves = []
        for index in self.group:
            self._waiting[index] = len(self._leaves[index])
            leaves += self._leaves[index]
            self._leaves[index] = []
        if leaves:
            # allow_unused: a probe from a forward that did not reach this loss sends nothing
            torch.autograd.grad(loss, leaves, allow_unused=True)
        for index in self.group:
            # views a checkpointed block's recomputation made in this backward: never reached
            self._leaves[index] = []
            part = self._parts.pop(index, None)
            if part is not None:  # a probe of this layer sent nothing
                self._add(index, part)
        if self._calls == self.micro_batches:  # layers the last micro-batch did not reach
            for index in self.group:
                if index in self._sums:
                    self._taken.add(index)
                    self.on_gradient(index, self._sums.pop(index))


@torch.no_grad()
def refresh_projector(layer: GaLoreLinear, index: int, grad: torch.Tensor, backend,
                      projector: str = "svd", *, own: bool = False) -> torch.Tensor:
    """Layer `index`'s next projector from this rank's G (out, in). Collective (a reduce).

    G is summed onto rank backend.owner(index), which alone takes the projector from it (exact, or
    randomized where `projector`, galore.projector, says so: uses_randomized); any other rank gets a
    receive buffer for load_projectors' broadcast. own: the caller gives G up (a GradientProbe's
    G), so the reduce may sum into it rather than into a copy.
    """
    owner = backend.owner(index)
    grad = backend.reduce_sum_to(grad.detach().to(backend.compute_device), owner, in_place=own)
    if backend.rank != owner:
        return grad.new_empty(layer.proj_shape)
    # called from inside a probe's backward too: an autocast region there must not make it bf16
    with full_precision(grad):
        if uses_randomized(projector, grad.shape):
            generator = projector_generator(index, layer.refreshes, grad.device)
            return randomized_projector(grad, layer.rank, layer.side, generator)
        return orthogonal_projector(grad, layer.rank, layer.side)


@torch.no_grad()
def load_projectors(layers: Sequence[GaLoreLinear], backend, projectors: dict[int, torch.Tensor]) -> None:
    """Merges B into W, zeroes B and loads the new projector of every layer index in `projectors`
    (refresh_projector's: the owner's projector, a receive buffer elsewhere). Collective: every
    rank calls it with the same keys.

    W, P and B are read and written only through the backend, so the fp32 masters of an engine
    hold the new values. The Adam state of B is kept, as galore-torch keeps its projected moments
    across a projector change. The function the network computes is unchanged.
    """
    for index in sorted(projectors):
        layer = layers[index]
        P = backend.broadcast(projectors[index], backend.owner(index))
        # float32 at least: a bf16 W (model.frozen_dtype) is rounded once, where it is written
        W = backend.read(layer.weight)
        W = W.to(torch.promote_types(W.dtype, torch.float32))
        P_old, B = backend.read(layer.proj).to(W.dtype), backend.read(layer.B).to(W.dtype)
        merged = merged_weight(W, P_old, B, layer.decay, layer.scale, layer.side)
        backend.write(layer.weight, merged)
        backend.write(layer.proj, P)
        backend.write(layer.B, torch.zeros(layer.B_shape, dtype=W.dtype, device=W.device))
        layer.decay = 1.0
        layer.refreshes += 1


def refresh_galore_layers(layers: Sequence[GaLoreLinear], backend,
                          gradients: Sequence[torch.Tensor | None], projector: str = "svd") -> None:
    """The refresh from gradients at hand: a new projector (refresh_projector) for every layer with
    a gradient (None: not due, left alone), then load_projectors. Collective: every rank calls it
    with the same layers and the same None pattern; `gradients` are this rank's."""
    projectors = {index: refresh_projector(layer, index, grad, backend, projector)
                  for index, (layer, grad) in enumerate(zip(layers, gradients)) if grad is not None}
    load_projectors(layers, backend, projectors)


def refresh_from_probe(layers: Sequence[GaLoreLinear], backend, probe_pass: Callable[[GradientProbe], None],
                       micro_batches: int, *, step: int | None = None, projector: str = "svd",
                       refresh_layers: int | None = None) -> int:
    """The refresh as the trainer runs it, for the layers due at `step` (None: all): probe passes
    (refresh_groups) in which each layer's projector is taken as its G is made, then
    load_projectors. `probe_pass(probe)` runs the step's `micro_batches` forwards, calling
    probe.backward(loss) on each; it runs once per group. Returns the number of passes.

    Held at once, beside the model: one layer's G (one micro-batch per step), or a group's running
    sums and the G arriving (several); and every layer's projector, (out, r) or (r, in).
    """
    due = [i for i, layer in enumerate(layers) if step is None or layer.refresh_due(step)]
    projectors: dict[int, torch.Tensor] = {}

    def take(index: int, grad: torch.Tensor) -> None:
        projectors[index] = refresh_projector(layers[index], index, grad, backend, projector, own=True)

    groups = refresh_groups(due, micro_batches, refresh_layers)
    for group in groups:
        with GradientProbe(layers, micro_batches=micro_batches, group=group, on_gradient=take) as probe:
            probe_pass(probe)
    load_projectors(layers, backend, projectors)
    return len(groups)


def apply_weight_decay(layers: Iterable[GaLoreLinear], lr: float, weight_decay: float) -> None:
    """After every optimizer step, with the lr and weight decay of the group that holds B."""
    for layer in layers:
        layer.apply_weight_decay(lr, weight_decay)


# ----------------------------------------------------------------------------- model level

def apply_galore(model: nn.Module, rank: int, targets: Iterable[str] = OPT_TARGETS, *,
                 scale: float = DEFAULT_SCALE, proj_type: str = DEFAULT_PROJ_TYPE,
                 update_proj_gap: int = DEFAULT_UPDATE_PROJ_GAP,
                 frozen_dtype: torch.dtype | None = None) -> dict[str, GaLoreLinear]:
    """Replaces every nn.Linear whose attribute name is in `targets` by a GaLoreLinear, its frozen
    W and projector in `frozen_dtype` (model.frozen_dtype; None: the linear's own).

    Returns the new layers by qualified name, in model order (their index is their owner key).
    `targets` may name any nn.Linear, `lm_head` included, as long as its weight is not shared:
    OPT ties lm_head to embed_tokens (config.tie_word_embeddings), and freezing one tensor that
    two modules train through would be wrong, so a tied target is refused. An nn.Embedding is
    refused too; GaLore on OPT's tied embedding would need one module owning W, P, B that serves
    both the lookup (rows W[ids] + scale·P[ids]·B, whose B gradient is a scatter of gy over the
    ids) and the output projection (x W_effᵀ as here), so the two gradient paths add into one B.
    """
    targets = set(targets)
    counts: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        counts.setdefault(id(param), []).append(name)
    found, matched = [], set()
    for name, module in model.named_modules():
        attr = name.rsplit(".", 1)[-1]
        if attr not in targets:
            continue
        matched.add(attr)
        if isinstance(module, nn.Embedding):
            raise NotImplementedError(
                f"{name} is an nn.Embedding; apply_galore swaps nn.Linear only (see its docstring "
                f"for what a GaLore embedding would take), or use apply_galore_embedding")
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{name} is a {type(module).__name__}, not an nn.Linear")
        others = [n for n in counts[id(module.weight)] if n != f"{name}.weight"]
        if others:
            raise ValueError(
                f"{name}.weight is tied to {', '.join(others)}; "
                f"untie it first (tie_word_embeddings=False) or leave {attr} out of the targets")
        found.append((name, module))
    missing = targets - matched
    if missing:
        raise ValueError(f"no module named {sorted(missing)} in the model")
    return swap_modules(model, found, lambda index, linear: GaLoreLinear.from_linear(
        linear, rank, scale, proj_type, update_proj_gap), frozen_dtype)


def apply_galore_embedding(model, rank: int, *, scale: float = DEFAULT_SCALE,
                           proj_type: str = DEFAULT_PROJ_TYPE,
                           update_proj_gap: int = DEFAULT_UPDATE_PROJ_GAP,
                           frozen_dtype: torch.dtype | None = None) -> dict[str, GaLoreLinear]:
    """GaLore on a transformers model's token embedding and LM head (the full-rank matrices
    that hold most of SST's optimizer state). A tied head becomes the embedding's
    GaLoreTiedHead (one W, P, B); an untied nn.Linear head becomes a GaLoreLinear of its own.
    Frozen W and projectors in `frozen_dtype`, as apply_galore.
    Returns the GaLore layers by qualified name, as apply_galore does.
    """
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(embedding, nn.Embedding):
        raise TypeError(f"the input embedding is a {type(embedding).__name__}, not an nn.Embedding")
    names = {id(m): n for n, m in model.named_modules()}
    layers = {}
    galore = GaLoreEmbedding.from_embedding(embedding, rank, scale, proj_type, update_proj_gap)
    store_frozen(galore, frozen_dtype)  # the tied head below shares its W and P
    layers[names[id(embedding)]] = galore
    if head is not None:
        if head.weight is embedding.weight:
            model.set_output_embeddings(galore.tied_head())
        else:
            layers[names[id(head)]] = GaLoreLinear.from_linear(head, rank, scale, proj_type,
                                                               update_proj_gap)
            store_frozen(layers[names[id(head)]], frozen_dtype)
            model.set_output_embeddings(layers[names[id(head)]])
    model.set_input_embeddings(galore)
    return layers


__all__ = ["GaLoreLinear", "GaLoreEmbedding", "GaLoreTiedHead", "GradientProbe", "apply_galore",
           "apply_galore_embedding", "refresh_groups", "refresh_projector", "load_projectors",
           "refresh_galore_layers", "refresh_from_probe", "apply_weight_decay", "projection_side",
           "orthogonal_projector", "randomized_projector", "uses_randomized", "project", "project_back",
           "merged_weight", "projector_shape", "low_rank_shape"]

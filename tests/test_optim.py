"""The optimizer's exact state resets, against torch.optim.AdamW in float64 as the reference."""

import math

import pytest
import torch

from sst_dist.config import load_recipe
from sst_dist.engines.torch import TorchBackend
from sst_dist.optim import AdamW, BiasCorrection, build_optimizer

SETTINGS = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)


def _grads(steps, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a steady direction plus noise: the regime where the bias-correction trap shows most
    return [torch.ones(shape, dtype=torch.float64) + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
            for _ in range(steps)]


def _run(optimizer, param, grads, on_step=None):
    trajectory = []
    for t, grad in enumerate(grads):
        if on_step is not None:
            on_step(t)
        param.grad = grad.clone()
        optimizer.step()
        trajectory.append(param.detach().clone())
    return trajectory


def test_a_resettable_group_without_resets_is_torch_adamw():
    start = torch.randn(5, 4, dtype=torch.float64)
    grads = _grads(30, (5, 4))
    ours = torch.nn.Parameter(start.clone())
    ref = torch.nn.Parameter(start.clone())
    a = _run(AdamW([{"params": [ours], "resettable": True}], **SETTINGS), ours, grads)
    b = _run(torch.optim.AdamW([ref], **SETTINGS), ref, grads)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-14)


def test_plain_groups_step_exactly_as_torch_adamw():
    start = torch.randn(5, 4, dtype=torch.float64)
    grads = _grads(10, (5, 4))
    ours, other = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    ref = torch.nn.Parameter(start.clone())
    optimizer = AdamW([{"params": [ours]}, {"params": [other], "resettable": True}], **SETTINGS)
    for grad in grads:
        ours.grad, other.grad = grad.clone(), grad.clone()
        optimizer.step()
    _run(torch.optim.AdamW([ref], **SETTINGS), ref, grads)
    assert torch.equal(ours.detach(), ref.detach())  # the same torch code path, bit for bit


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-14)])
def test_fused_plain_groups_on_the_cpu_step_as_foreach_and_float64(dtype, tol):
    """The CPU's fused kernel (ZeRO-Offload's step) beside a resettable group: the plain group takes
    foreach's steps within rounding, and both stay within it of float64 from the same start."""
    start = torch.randn(7, 9, dtype=torch.float64)
    grads = _grads(12, (7, 9), seed=3)
    fused, foreach, low = (torch.nn.Parameter(start.to(dtype).clone()) for _ in range(3))
    exact = torch.nn.Parameter(start.to(dtype).double().clone())
    optimizers = [AdamW([{"params": [fused]}, {"params": [low], "resettable": True}], fused=True, **SETTINGS),
                  AdamW([foreach], foreach=True, **SETTINGS), torch.optim.AdamW([exact], **SETTINGS)]
    for grad in grads:
        fused.grad, foreach.grad, low.grad = (grad.to(dtype) for _ in range(3))
        exact.grad = grad.to(dtype).double()
        for optimizer in optimizers:
            optimizer.step()
        torch.testing.assert_close(fused.detach(), foreach.detach(), rtol=tol, atol=tol)
        torch.testing.assert_close(fused.detach().double(), exact.detach(), rtol=tol, atol=tol)
    assert not torch.equal(fused.detach(), start.to(dtype))  # the steps moved it (wd and lr 1e-2)


def test_the_optimizer_steps_plain_groups_fused_on_the_cpu(monkeypatch):
    """build_optimizer on the CPU: the plain group goes through torch's fused kernel, the resettable
    group through its own per-element-age update, never the fused kernel."""
    plain, low = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))
    optimizer = build_optimizer([{"params": [plain], "name": "full"},
                                 {"params": [low], "name": "lowrank", "resettable": True}],
                                load_recipe(), torch.device("cpu"))
    fused_kernel, stepped = torch._fused_adamw_, []

    def spy(params, *args, **kwargs):
        stepped.extend(params)
        return fused_kernel(params, *args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", spy)
    plain.grad, low.grad = torch.ones(4, 3), torch.ones(5)
    optimizer.step()
    assert [p is plain for p in stepped] == [True]
    assert optimizer.state[low]["age"].eq(1).all()


@pytest.mark.parametrize("dim", [0, 1])
def test_reset_slots_continue_as_a_fresh_adamw(dim):
    """Slots reset at step T take, from then on, exactly the steps of a new AdamW started at T on
    those slots alone; the other slots take the steps of the AdamW that never stopped."""
    shape, T, steps = (6, 5), 40, 120
    slots = torch.tensor([1, 3])
    start = torch.randn(shape, dtype=torch.float64)
    grads = _grads(steps, shape, seed=1)
    param = torch.nn.Parameter(start.clone())
    optimizer = AdamW([{"params": [param], "resettable": True}], **SETTINGS)
    backend = TorchBackend(optimizer)
    ours = _run(optimizer, param, grads, lambda t: t == T and backend.reset_state(param, slots, dim))

    # reference: one AdamW over all steps, and a new one for the reset slots from step T on
    whole = torch.nn.Parameter(start.clone())
    continuous = _run(torch.optim.AdamW([whole], **SETTINGS), whole, grads)
    picked = (lambda x: x.index_select(dim, slots))
    fresh = torch.nn.Parameter(picked(continuous[T - 1]).clone())
    restarted = _run(torch.optim.AdamW([fresh], **SETTINGS), fresh, [picked(g) for g in grads[T:]])

    others = torch.ones(shape[dim], dtype=torch.bool)
    others[slots] = False
    kept = torch.arange(shape[dim])[others]
    for t in range(steps):
        torch.testing.assert_close(ours[t].index_select(dim, kept), continuous[t].index_select(dim, kept),
                                   rtol=0, atol=1e-13)
        expected = picked(continuous[t]) if t < T else restarted[t - T]
        torch.testing.assert_close(picked(ours[t]), expected, rtol=0, atol=1e-13)


def test_zeroing_the_moments_alone_inflates_the_step():
    """The trap the per-element age removes: with the moments zeroed under a running step count,
    the first steps of a reset slot are several times a fresh Adam's (docs/design.md §1: 2.1x after 1 step,
    4.4x after 10 at t = 600)."""
    T = 600
    param = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    plain = torch.optim.AdamW([param], lr=1e-3, betas=(0.9, 0.999), eps=1e-12, weight_decay=0.0)
    for _ in range(T):
        param.grad = torch.ones(1, dtype=torch.float64)
        plain.step()
    for key in ("exp_avg", "exp_avg_sq"):
        plain.state[param][key].zero_()
    sizes = []
    for _ in range(10):
        before = param.detach().clone()
        param.grad = torch.ones(1, dtype=torch.float64)
        plain.step()
        sizes.append(float((before - param.detach()).abs()) / 1e-3)  # a steady gradient: fresh Adam moves lr
    assert sizes[0] == pytest.approx(2.1, abs=0.1) and sizes[9] == pytest.approx(4.4, abs=0.1)

    ours = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    optimizer = AdamW([{"params": [ours], "resettable": True}], lr=1e-3, betas=(0.9, 0.999), eps=1e-12,
                      weight_decay=0.0)
    for _ in range(T):
        ours.grad = torch.ones(1, dtype=torch.float64)
        optimizer.step()
    TorchBackend(optimizer).reset_state(ours)
    for _ in range(10):
        before = ours.detach().clone()
        ours.grad = torch.ones(1, dtype=torch.float64)
        optimizer.step()
        assert float((before - ours.detach()).abs()) == pytest.approx(1e-3, rel=1e-9)


def test_bias_corrections_are_exact_at_every_age_and_saturate():
    table = BiasCorrection(0.9, 0.999, torch.float64, "cpu")
    ages = torch.tensor([1.0, 2.0, 10.0, 600.0, 17000.0, table.last + 5.0, 1e7], dtype=torch.float64)
    bc1, bc2_sqrt = table.lookup(ages)
    for a, x, y in zip(ages.tolist(), bc1.tolist(), bc2_sqrt.tolist()):
        assert x == pytest.approx(1 - 0.9 ** a, rel=1e-15)
        assert y == pytest.approx(math.sqrt(1 - 0.999 ** a), rel=1e-15)


def test_the_state_dict_keeps_the_ages_so_a_resume_is_exact():
    shape, steps = (4, 3), 30
    grads = _grads(steps, shape, seed=2)
    start = torch.randn(shape, dtype=torch.float64)

    def build(value):
        p = torch.nn.Parameter(value.clone())
        return p, AdamW([{"params": [p], "resettable": True}], **SETTINGS)

    param, optimizer = build(start)
    reset = (lambda t: t == 5 and TorchBackend(optimizer).reset_state(param, torch.tensor([2]), 0))
    straight = _run(optimizer, param, grads, reset)

    param, optimizer = build(start)
    reset = (lambda t: t == 5 and TorchBackend(optimizer).reset_state(param, torch.tensor([2]), 0))
    _run(optimizer, param, grads[:12], reset)
    saved = optimizer.state_dict()
    resumed_param, resumed = build(param.detach())
    resumed.load_state_dict(saved)
    assert torch.equal(resumed.state[resumed_param]["age"][2], torch.full((3,), 7.0, dtype=torch.float64))
    after = _run(resumed, resumed_param, grads[12:])
    for x, y in zip(after, straight[12:]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("batch", [AdamW.BATCH, 25])
def test_a_group_of_many_tensors_steps_each_as_if_alone(monkeypatch, batch):
    """The group is stepped by list operations over batches of its tensors (FSDP2: one shard per
    parameter); each tensor, reset slots included, takes exactly its steps as the only parameter
    of its own optimizer. Batch 25 splits the group across batches, one tensor alone in its own."""
    monkeypatch.setattr(AdamW, "BATCH", batch)
    shapes, steps = [(5, 4), (3,), (30,), (2, 6)], 12
    starts = [torch.randn(shape, dtype=torch.float64) for shape in shapes]
    grads = [_grads(steps, shape, seed=i) for i, shape in enumerate(shapes)]
    together = [torch.nn.Parameter(s.clone()) for s in starts]
    optimizer = AdamW([{"params": together, "resettable": True}], **SETTINGS)
    alone = [torch.nn.Parameter(s.clone()) for s in starts]
    optimizers = [AdamW([{"params": [p], "resettable": True}], **SETTINGS) for p in alone]
    for t in range(steps):
        if t == 5:  # a reset of slot 1 of the first tensor, in both
            TorchBackend(optimizer).reset_state(together[0], torch.tensor([1]), 0)
            TorchBackend(optimizers[0]).reset_state(alone[0], torch.tensor([1]), 0)
        for p, q, g in zip(together, alone, grads):
            p.grad, q.grad = g[t].clone(), g[t].clone()
        optimizer.step()
        for o in optimizers:
            o.step()
    for p, q in zip(together, alone):
        assert torch.equal(p.detach(), q.detach())


def test_the_reset_knob_exact_is_the_per_slot_reset_and_moments_zeroes_m_and_v_under_the_step_count():
    """optim.reset: exact steps the group as today (per-element ages); moments as torch's AdamW
    whose m and v of the reset slots are zeroed while its step count runs on (docs/design.md §1)."""
    shape, T, steps = (6, 5), 40, 80
    slots = torch.tensor([1, 3])
    start = torch.randn(shape, dtype=torch.float64)
    grads = _grads(steps, shape, seed=3)

    def built(mode):
        recipe = load_recipe(None, [f"optim.reset={mode}", f"optim.weight_decay={SETTINGS['weight_decay']}"])
        param = torch.nn.Parameter(start.clone())
        optimizer = build_optimizer([{"params": [param], "lr": SETTINGS["lr"], "name": "lowrank", "resettable": True}],
                                    recipe, torch.device("cpu"))
        backend = TorchBackend(optimizer)
        return _run(optimizer, param, grads, lambda t: t == T and backend.reset_state(param, slots, 0))

    # exact: what a resettable group of sst_dist.optim.AdamW computes, bit for bit
    today = torch.nn.Parameter(start.clone())
    optimizer = AdamW([{"params": [today], "resettable": True}], **SETTINGS)
    backend = TorchBackend(optimizer)
    expected = _run(optimizer, today, grads, lambda t: t == T and backend.reset_state(today, slots, 0))
    exact = built("exact")
    for x, y in zip(exact, expected):
        assert torch.equal(x, y)

    # moments: the float64 reference zeroes m and v of the slots and leaves torch's step count alone
    ref = torch.nn.Parameter(start.clone())
    plain = torch.optim.AdamW([ref], **SETTINGS)

    def zero_slots(t):
        if t == T:
            for key in ("exp_avg", "exp_avg_sq"):
                plain.state[ref][key].index_fill_(0, slots, 0)
            assert float(plain.state[ref]["step"]) == T  # the count runs on

    reference = _run(plain, ref, grads, zero_slots)
    moments = built("moments")
    for x, y in zip(moments, reference):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-13)
    # the two knobs part at the reset, and only in the reset slots
    torch.testing.assert_close(moments[T - 1], exact[T - 1], rtol=0, atol=1e-13)
    kept = torch.tensor([0, 2, 4, 5])
    torch.testing.assert_close(moments[-1].index_select(0, kept), exact[-1].index_select(0, kept), rtol=0, atol=1e-13)
    assert (moments[-1] - exact[-1]).index_select(0, slots).abs().max() > 1e-3

"""ZeRO-1/2's gradient clipping with no read-back to the host (deepspeed_internals): the same
scaled gradients as DeepSpeed's own, for finite, clipped, non-finite and sentinel norms."""

import types

import pytest
import torch

from sst_dist.engines import deepspeed_internals as internals


def refuse_host_reads(monkeypatch):
    """From here on, any read of a tensor's value into Python (what waits for a GPU) raises."""
    def refuse(*_):
        raise AssertionError("a tensor was read back to the host")

    for name in ("__bool__", "item", "__float__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


def deepspeed_clip():
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    internals.install_step_without_host_reads()
    return internals._DEEPSPEED_UNSCALE_AND_CLIP, DeepSpeedZeroOptimizer


@pytest.mark.parametrize("loss_scale", [1.0, 8.0])
@pytest.mark.parametrize("norm", [0.25, 3.0, float("nan"), float("inf"), -1.0])
def test_clipping_matches_deepspeed_without_reading_the_norm(norm, loss_scale, monkeypatch):
    original, _ = deepspeed_clip()
    optimizer = types.SimpleNamespace(clip_grad=1.0, loss_scale=loss_scale, device="cpu")
    grads = [torch.randn(7, dtype=torch.float64), [torch.randn(3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)]]
    theirs = [g.clone() if torch.is_tensor(g) else [x.clone() for x in g] for g in grads]
    scaled = norm * loss_scale if norm > 0 else norm  # DeepSpeed's norm is norm x scale
    original(optimizer, theirs, torch.tensor(scaled))
    refuse_host_reads(monkeypatch)
    internals._unscale_and_clip_grads(optimizer, grads, torch.tensor(scaled))
    monkeypatch.undo()
    flat = lambda gs: torch.cat([g if torch.is_tensor(g) else torch.cat(g) for g in gs])  # noqa: E731
    torch.testing.assert_close(flat(grads), flat(theirs), rtol=0, atol=0, equal_nan=True)


def test_deepspeed_own_clipping_reads_the_norm(monkeypatch):
    """What the replacement is for: DeepSpeed's clipping reads the norm back (so the check above
    can fail)."""
    original, _ = deepspeed_clip()
    refuse_host_reads(monkeypatch)
    optimizer = types.SimpleNamespace(clip_grad=1.0, loss_scale=1.0, device="cpu")
    with pytest.raises(AssertionError, match="read back"):
        original(optimizer, [torch.ones(3)], torch.tensor(2.0))


def test_invalid_norms_are_marked_as_deepspeed_marks_them():
    from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace

    for value in (0.5, float("nan"), float("inf"), -float("inf")):
        ours, theirs = torch.tensor(value), torch.tensor(value)
        internals._mask_invalid_norm(ours, device="cpu")
        mask_nan_or_inf_with_val_inplace(theirs, device="cpu")
        assert ours.item() == theirs.item()


def test_installing_twice_keeps_deepspeed_own_function():
    from deepspeed.runtime.zero import stage_1_and_2

    original, optimizer = deepspeed_clip()
    internals.install_step_without_host_reads()
    assert optimizer.unscale_and_clip_grads is internals._unscale_and_clip_grads
    assert internals._DEEPSPEED_UNSCALE_AND_CLIP is original is not internals._unscale_and_clip_grads
    assert stage_1_and_2.mask_nan_or_inf_with_val_inplace is internals._mask_invalid_norm

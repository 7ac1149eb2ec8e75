"""Four gloo ranks: ZeRO-2, ZeRO-3 and FSDP2 runs of tiny-sst follow the single-process curve.

Two ranks split each layer's flat buffer (ZeRO) or each parameter's rows (FSDP2) in halves; four
ranks cut them where a layer's factors, a slot's state and the renormalisation's row pieces start
on one rank and end on another, the layouts a larger machine gives. The global batch (8) and the
micro-batch (2, so 4 ranks can share 8 sequences) are those of the reference run.
"""

import pytest

from conftest import assert_curves_match, assert_events_crossed, engine_parity_overrides, losses, pretrain, read_metrics

pytestmark = pytest.mark.slow

RECIPE = "recipes/tiny-sst.yaml"
MICRO = ("--set", "train.micro_batch=2")
F64 = ("--set", "train.dtype=float64")


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_on_four_ranks_follows_the_single_process_curve(tmp_path, single_process_curves, stage):
    extra = (*engine_parity_overrides(RECIPE), *MICRO)
    pretrain(tmp_path, RECIPE, "--ds-config", f"ds_configs/zero{stage}.json", *extra, launcher="deepspeed",
             nproc=4)
    assert_curves_match(single_process_curves(RECIPE, *extra), losses(tmp_path), rel=1e-4, steps=40)
    assert_events_crossed(RECIPE, read_metrics(tmp_path))


def test_fsdp_on_four_ranks_follows_the_single_process_curve(tmp_path, single_process_curves):
    pretrain(tmp_path, RECIPE, "--engine", "fsdp", *F64, *MICRO, launcher="torchrun", nproc=4)
    assert_curves_match(single_process_curves(RECIPE, *F64, *MICRO), losses(tmp_path), rel=1e-4, steps=40)
    assert_events_crossed(RECIPE, read_metrics(tmp_path))

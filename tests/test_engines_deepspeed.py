"""DeepSpeed ZeRO 1/2/3 on 2 gloo ranks, launched with the real `deepspeed` launcher."""

import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, assert_curves_match, free_port, losses, pretrain, quiet_env, read_metrics

pytestmark = pytest.mark.slow


def prune_reports(tmp_path, stage, skip=False):
    out = tmp_path / f"z{stage}{'-skip' if skip else ''}"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
           "tests/workers/ds_prune_check.py", "--stage", str(stage), "--out", str(out)]
    if skip:
        cmd.append("--skip-prune")
    proc = subprocess.run(cmd, cwd=ROOT, env=quiet_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def pruned(reports) -> bool:
    return all(layer["full_changed_moment_abs"] == 0 and layer["local_changed_moment_abs"] == 0
               for report in reports for layer in report["layers"])


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_resample_reaches_masters_and_moments_through_the_engine(tmp_path, stage):
    reports = prune_reports(tmp_path, stage)
    assert pruned(reports)
    for report in reports:
        assert report["logits_max_diff"] < 1e-5  # the bf16/fp32 copy the forward uses was updated too
        assert sum(len(layer["changed"]) for layer in report["layers"]) > 0
        assert any(layer["full_kept_moment_abs"] > 0 for layer in report["layers"])  # kept slots keep state
        for layer in report["layers"]:
            assert layer["master_holds_new_vectors"] == 0.0


def test_the_prune_check_detects_a_skipped_reset(tmp_path):
    assert not pruned(prune_reports(tmp_path, 3, skip=True))


@pytest.mark.parametrize("recipe, stage", [("recipes/tiny-sst.yaml", 1), ("recipes/tiny-sst.yaml", 2),
                                           ("recipes/tiny-sst.yaml", 3), ("recipes/tiny-full.yaml", 3)])
def test_zero_follows_the_single_process_curve(tmp_path, single_process_curves, recipe, stage):
    reference = single_process_curves(recipe)
    pretrain(tmp_path, recipe, "--ds-config", f"ds_configs/zero{stage}.json", launcher="deepspeed", nproc=2)
    assert_curves_match(reference, losses(tmp_path), rel=1e-4, steps=40)
    events = [m.get("event") for m in read_metrics(tmp_path)]
    if "sst" in recipe:
        assert events.count("resample") >= 2 and events.count("resvd") >= 1


def test_zero2_resume_continues_the_curve_exactly(tmp_path):
    full = tmp_path / "full"
    pretrain(full, "recipes/tiny-sst.yaml", "--ds-config", "ds_configs/zero2.json", launcher="deepspeed", nproc=2)
    split = tmp_path / "split"
    pretrain(split, "recipes/tiny-sst.yaml", "--ds-config", "ds_configs/zero2.json", "--max-steps", "20",
             launcher="deepspeed", nproc=2)
    pretrain(split, "recipes/tiny-sst.yaml", "--ds-config", "ds_configs/zero2.json", launcher="deepspeed", nproc=2)
    a, b = losses(full), losses(split)
    assert sorted(b) == list(range(1, 41))
    for step in range(21, 41):
        assert abs(a[step] - b[step]) <= 1e-6 * abs(a[step]), (step, a[step], b[step])

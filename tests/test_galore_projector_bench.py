"""bench/galore_projector.py: the exact and the randomized projector side by side, on CPU."""

import subprocess
import sys

from conftest import ROOT
from sst_dist.models import OPT_SIZES


def bench(*args):
    return subprocess.run([sys.executable, "-m", "bench.galore_projector", "--device", "cpu", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_both_projectors_capture_the_same_energy_per_layer_shape():
    proc = bench("--sizes", "125m", "--rank", "16")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("125m ")]
    layer_rows = [r for r in rows if r[1] != "refresh"]
    assert [r[1] for r in layer_rows] == ["768x768", "3072x768", "768x3072"]
    for row in layer_rows:
        energy_svd, energy_randomized = float(row[5]), float(row[6])
        assert 0.5 < energy_svd < 1 and abs(energy_svd - energy_randomized) < 1e-3
    (refresh,) = [r for r in rows if r[1] == "refresh"]
    assert float(refresh[2]) > 0 and float(refresh[3]) > 0  # whole-model seconds, both methods


def test_an_unknown_size_is_one_line():
    proc = bench("--sizes", "7b")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown size 7b; choose from " + ", ".join(OPT_SIZES)

"""sst.init haar: factors drawn directly have the distribution the SVD of a Gaussian W0 has.

Each statistic is checked against a wrong construction that it must reject (no sign correction,
a wrong scale), so the tolerance is known to bite."""

import math

import numpy as np
import pytest
import torch

from sst_dist.spectral_init import (haar_factors, haar_orthonormal, init_factors, init_generator,
                                    marchenko_pastur_singular_values, uses_haar)

STD = 0.02


def ks_statistic(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    grid = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, grid, side="right") / a.size
                                - np.searchsorted(b, grid, side="right") / b.size)))


def gaussian_svd(out, inp, seed):
    w = torch.randn(out, inp, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * STD
    return torch.linalg.svd(w, full_matrices=False)


@pytest.mark.parametrize("shape", [(384, 384), (256, 1024), (1024, 256)])
def test_factors_are_orthonormal_and_zero_distortion_by_construction(shape):
    g = torch.Generator().manual_seed(0)
    U, s, Vh = haar_factors(*shape, STD, g, dtype=torch.float64)
    k = min(shape)
    assert U.shape == (shape[0], k) and s.shape == (k,) and Vh.shape == (k, shape[1])
    assert U.is_contiguous() and Vh.is_contiguous()  # FSDP2 shards only contiguous parameters
    eye = torch.eye(k, dtype=torch.float64)
    torch.testing.assert_close(U.T @ U, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(Vh @ Vh.T, eye, rtol=0, atol=1e-12)
    assert torch.all(s[:-1] >= s[1:]) and torch.all(s >= 0)  # descending, as an SVD returns them
    # W0 := U diag(s) Vh is what the layer computes; its SVD gives back s exactly
    w0 = (U * s) @ Vh
    torch.testing.assert_close(torch.linalg.svdvals(w0), s, rtol=1e-10, atol=1e-14)
    # and its entries have the std OPT initialises with
    assert abs(w0.std().item() / STD - 1) < 0.01


@pytest.mark.parametrize("shape", [(384, 384), (256, 1024), (1024, 256)])
def test_singular_values_follow_the_svd_of_a_gaussian_w0(shape):
    s = marchenko_pastur_singular_values(*shape, STD)
    _, reference, _ = gaussian_svd(*shape, seed=0)
    # seeds 0-2 give 0.005-0.012 here; the same quantiles 5 % too large give 0.034-0.074
    assert ks_statistic(s, reference) < 0.02
    assert abs(s.mean().item() / reference.mean().item() - 1) < 0.01
    assert abs(s.max().item() / reference.max().item() - 1) < 0.03  # the edge, not only the bulk
    # a 5 % wrong scale, or the two dimensions' roles swapped in the scale, is rejected
    assert ks_statistic(1.05 * s, reference) > 0.03
    m, n = sorted(shape)
    swapped = s * math.sqrt(m / n)
    if m != n:
        assert ks_statistic(swapped, reference) > 0.5


def test_haar_columns_have_the_haar_entry_and_trace_statistics():
    """For Haar Q in O(n): n·Q_ij² ~ n·Beta(1/2, (n-1)/2) (mean 1, variance 2(n-1)/(n+2)),
    E tr Q = 0 and E (tr Q)² = 1. QR without Mezzadri's sign correction fails the trace test."""
    n, draws = 24, 400
    g = torch.Generator().manual_seed(3)
    traces, raw_traces, entries = [], [], []
    for _ in range(draws):
        q = haar_orthonormal(n, n, g, dtype=torch.float64)
        traces.append(torch.trace(q).item())
        entries.append((n * q**2).flatten())
        raw, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
        raw_traces.append(torch.trace(raw).item())
    traces, raw_traces = np.array(traces), np.array(raw_traces)
    se = 1 / math.sqrt(draws)  # the trace has variance 1
    assert abs(traces.mean()) < 3.5 * se
    assert abs((traces**2).mean() - 1) < 0.25
    assert abs(raw_traces.mean()) > 10 * se  # the uncorrected QR is not Haar
    entries = torch.cat(entries)
    assert abs(entries.mean().item() - 1) < 0.01
    assert abs(entries.var().item() / (2 * (n - 1) / (n + 2)) - 1) < 0.06


@pytest.mark.parametrize("shape", [(256, 256), (512, 128)])
def test_singular_vectors_match_those_of_the_svd(shape):
    """The entries of U and Vh are distributed as those of the SVD of a Gaussian W0 (KS)."""
    out, inp = shape
    g = torch.Generator().manual_seed(5)
    U, _, Vh = haar_factors(out, inp, STD, g, dtype=torch.float64)
    Ur, _, Vhr = gaussian_svd(out, inp, seed=6)
    assert ks_statistic(U.flatten() * math.sqrt(out), Ur.flatten() * math.sqrt(out)) < 0.02
    assert ks_statistic(Vh.flatten() * math.sqrt(inp), Vhr.flatten() * math.sqrt(inp)) < 0.02
    # the leading vectors are not special (the SVD orders by σ, which is independent of the vectors)
    assert ks_statistic(U[:, :16].flatten(), Ur[:, -16:].flatten()) < 0.08


def test_init_factors_picks_by_k_and_is_reproducible():
    assert not uses_haar("auto", 2048) and uses_haar("auto", 4096)
    assert uses_haar("haar", 8) and not uses_haar("svd", 9216)
    a = init_factors(64, 128, STD, init_generator(0, 3, "cpu"), "haar")
    b = init_factors(64, 128, STD, init_generator(0, 3, "cpu"), "haar")
    c = init_factors(64, 128, STD, init_generator(0, 4, "cpu"), "haar")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    # svd: the exact factors of a drawn W0 whose entries have std STD
    U, s, Vh = init_factors(64, 128, STD, init_generator(0, 3, "cpu"), "svd")
    w0 = (U * s) @ Vh
    assert abs(w0.std().item() / STD - 1) < 0.05
    torch.testing.assert_close(U.T @ U, torch.eye(64), rtol=0, atol=1e-5)

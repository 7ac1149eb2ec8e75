"""SST's initial factors without the SVD of a dense W0.

OPT initialises a linear's W0 with i.i.d. N(0, std²) entries. Such a matrix is invariant under
W -> O1 W O2 for any orthogonal O1, O2, so in W0 = U diag(s) Vh the singular vectors U and Vh are
Haar-distributed (uniform on the Stiefel manifold), independent of each other and of s. Drawing
them directly gives the SVD's distribution at the cost of two QRs instead of one SVD per layer;
W0 is then *defined* as U diag(s) Vh, so the swap to factors changes nothing (zero distortion by
construction). `init_factors` picks between this and the exact SVD of a drawn W0 (sst.init).

s comes from the Marchenko-Pastur law that the singular values of an (m x n) Gaussian matrix
follow: the k = min(m, n) quantiles at (i - 1/2) / k. The empirical spectrum of one Gaussian
matrix lies within O(1/k) of them (eigenvalue rigidity), far below anything training can see,
and they cost O(k) where sampling them would cost an SVD.
"""

from __future__ import annotations

import numpy as np
import torch

SST_INITS = ("auto", "svd", "haar")
# sst.init auto: the exact SVD while a layer's k is below this (an SVD of 2048 x 8192 takes well
# under a second on a GPU), the Haar draw from here on (OPT-6.7B and larger)
HAAR_FROM_K = 4096


def uses_haar(init: str, k: int) -> bool:
    """Whether sst.init `init` draws the factors of a layer of rank k directly."""
    return init == "haar" or (init == "auto" and k >= HAAR_FROM_K)


def init_generator(seed: int, layer_index: int, device) -> torch.Generator:
    """The RNG of one SST layer's initial factors, on the device that draws them: a pure function
    of (seed, layer), so every build and every rank draws the same factors on one device type."""
    state = np.random.SeedSequence([seed, layer_index, 0x1A17]).generate_state(2, np.uint64)
    return torch.Generator(device=device).manual_seed(int(state[0] >> np.uint64(1)))


def haar_orthonormal(rows: int, cols: int, generator: torch.Generator, *, device=None,
                     dtype=torch.float32) -> torch.Tensor:
    """(rows, cols), rows >= cols: orthonormal columns, Haar-distributed on the Stiefel manifold.

    The Q of a Gaussian matrix's QR, each column multiplied by the sign of R's diagonal entry
    (Mezzadri, "How to generate random matrices from the classical compact groups", 2007): without
    the correction Q's distribution depends on the QR routine's sign convention and is not Haar.
    """
    g = torch.randn(rows, cols, generator=generator, device=device, dtype=dtype)
    q, r = torch.linalg.qr(g)
    del g
    return q.mul_(torch.sgn(torch.diagonal(r)))


def marchenko_pastur_singular_values(out_features: int, in_features: int, std: float,
                                     grid: int = 1 << 16) -> torch.Tensor:
    """(k,) float64, descending: the (i - 1/2)/k quantiles of the singular values of an
    (out x in) matrix of i.i.d. N(0, std²) entries, k = min(out, in), from the Marchenko-Pastur law.

    With m = k, n = max(out, in), c = m/n, the eigenvalues x of X Xᵀ / n (X standard Gaussian)
    have density sqrt((b - x)(x - a)) / (2π c x) on [a, b], a = (1 - √c)², b = (1 + √c)², and
    s = std √(n x). The CDF is integrated in θ with x = a + (b - a)(1 - cos θ)/2, which removes the
    square-root edges (and, for square matrices, the x^(-1/2) pole at 0) from the integrand.
    """
    m, n = sorted((out_features, in_features))
    c = m / n
    a, b = (1 - c ** 0.5) ** 2, (1 + c ** 0.5) ** 2
    edges = np.linspace(0.0, np.pi, grid + 1)
    mid = 0.5 * (edges[1:] + edges[:-1])
    x_mid = a + (b - a) * (1 - np.cos(mid)) / 2
    density = ((b - a) / 2) ** 2 * np.sin(mid) ** 2 / (2 * np.pi * c * x_mid)
    cdf = np.concatenate([[0.0], np.cumsum(density) * (np.pi / grid)])
    cdf /= cdf[-1]  # the midpoint rule's last ~1e-9
    quantiles = (np.arange(m, 0, -1) - 0.5) / m  # descending, as an SVD returns them
    x = np.interp(quantiles, cdf, a + (b - a) * (1 - np.cos(edges)) / 2)
    return torch.from_numpy(std * np.sqrt(n * x))


def haar_factors(out_features: int, in_features: int, std: float, generator: torch.Generator, *,
                 device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (out, k), s (k,), Vh (k, in) distributed as the SVD of an (out x in) N(0, std²) matrix."""
    k = min(out_features, in_features)
    # LAPACK's Q is column-major: U needs a row-major copy, Vh = Qᵀ already is row-major
    U = haar_orthonormal(out_features, k, generator, device=device, dtype=dtype).contiguous()
    Vh = haar_orthonormal(in_features, k, generator, device=device, dtype=dtype).T.contiguous()
    s = marchenko_pastur_singular_values(out_features, in_features, std).to(device=device, dtype=dtype)
    return U, s, Vh


def svd_factors(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact thin SVD of a given W0, in float32 (float64 if W0 is)."""
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    U, s, Vh = torch.linalg.svd(weight.to(dtype), full_matrices=False)
    return U.contiguous(), s, Vh.contiguous()  # LAPACK's are column-major; FSDP2 needs row-major


def init_factors(out_features: int, in_features: int, std: float, generator: torch.Generator, init: str,
                 *, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, s, Vh of a fresh layer whose W0 has i.i.d. N(0, std²) entries: drawn directly (haar), or
    the SVD of a W0 drawn with `generator` (svd); sst.init auto picks by the layer's k."""
    if uses_haar(init, min(out_features, in_features)):
        return haar_factors(out_features, in_features, std, generator, device=device, dtype=dtype)
    weight = torch.randn(out_features, in_features, generator=generator, device=device, dtype=dtype)
    return svd_factors(weight.mul_(std))


__all__ = ["SST_INITS", "HAAR_FROM_K", "uses_haar", "init_generator", "haar_orthonormal", "marchenko_pastur_singular_values",
           "haar_factors", "svd_factors", "init_factors"]

"""The time of one GaLore refresh's projector per OPT layer shape: the exact SVD (galore.projector
svd) against the randomized range finder (randomized), with the share of G's energy each
projector captures, on gradient-like matrices (singular values i^-decay, Haar vectors).

    python -m bench.galore_projector --sizes 1.3b,6.7b,13b --rank 64 [--device cuda]

A refresh takes one projector per targeted linear (6 per decoder block); the table gives the
seconds per refresh of the whole model beside the per-layer figures.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from sst_dist.galore import orthogonal_projector, project, projection_side, randomized_projector
from sst_dist.models import OPT_SIZES


def gradient_like(rows: int, cols: int, decay: float, device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(0)
    k = min(rows, cols)
    U = torch.linalg.qr(torch.randn(rows, k, generator=g, device=device)).Q
    V = torch.linalg.qr(torch.randn(cols, k, generator=g, device=device)).Q
    s = torch.arange(1, k + 1, device=device, dtype=torch.float32) ** -decay
    return (U * s) @ V.T


def timed(fn, device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def captured(G: torch.Tensor, P: torch.Tensor, side: str) -> float:
    return float(project(G, P, side).norm() ** 2 / G.norm() ** 2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1.3b,6.7b,13b")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--decay", type=float, default=1.0, help="singular values i^-decay")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    sizes = args.sizes.split(",")
    unknown = [s for s in sizes if s not in OPT_SIZES]
    if unknown:
        print(f"error: unknown size {unknown[0]}; choose from {', '.join(OPT_SIZES)}", file=sys.stderr)
        return 2
    print(f"rank {args.rank}, singular values i^-{args.decay:g}, {device}")
    print(f"{'size':6} {'shape':>13} {'svd s':>8} {'randomized s':>13} {'x faster':>9} "
          f"{'energy svd':>11} {'randomized':>11} {'svd s/refresh':>14} {'randomized':>11}")
    for size in sizes:
        spec = OPT_SIZES[size]
        hidden, ffn, layers = spec["hidden_size"], spec["ffn_dim"], spec["num_hidden_layers"]
        per_block_svd = per_block_rand = 0.0
        # per decoder block: q, k, v, out (hidden x hidden), fc1 (ffn x hidden), fc2 (hidden x ffn)
        for shape, count in (((hidden, hidden), 4), ((ffn, hidden), 1), ((hidden, ffn), 1)):
            G = gradient_like(*shape, args.decay, device)
            side = projection_side(shape)
            orthogonal_projector(G[:64, :64], 8, side)  # the solver's first-call setup, not timed
            t_svd, exact = timed(lambda: orthogonal_projector(G, args.rank, side), device)
            gen = torch.Generator(device=device).manual_seed(1)
            t_rand, fast = timed(lambda: randomized_projector(G, args.rank, side, gen), device)
            per_block_svd += count * t_svd
            per_block_rand += count * t_rand
            print(f"{size:6} {f'{shape[0]}x{shape[1]}':>13} {t_svd:8.3f} {t_rand:13.4f} {t_svd / t_rand:9.1f} "
                  f"{captured(G, exact, side):11.5f} {captured(G, fast, side):11.5f}", flush=True)
            del G
        print(f"{size:6} {'refresh':>13} {'':8} {'':13} {'':9} {'':11} {'':11} "
              f"{layers * per_block_svd:14.1f} {layers * per_block_rand:11.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

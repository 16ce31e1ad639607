"""Vectorized ``similarity_matrix`` vs a per-pair, per-image loop, and its agreement with float64.

    python scripts/bench_similarity.py [--images 256] [--loop-images 4] [--threads N]

The loop computes one SSIM per (image, pair) call, the textbook way: a 2-D Gaussian convolution for maps
of at least the window's size, global statistics for smaller ones (the 8x8 case). It is timed on the first ``--loop-images`` images (all pairs) and its time extrapolated
linearly to all images; the output says so. Agreement is checked twice: the float32 vectorized result vs
the same code in float64 on all images, and vs the float64 loop on the timed images.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from qsfm_cli.scoring import similarity_matrix


def ssim_loop(maps: torch.Tensor, k1: float = 0.01, k2: float = 0.03, window: int = 11,
              sigma: float = 1.5) -> torch.Tensor:
    """S by one call per image and channel pair (i < j): the per-pair baseline."""
    n, c, h, w = maps.shape
    offsets = torch.arange(window, dtype=maps.dtype) - (window - 1) / 2
    g = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel = (torch.outer(g, g) / g.sum() ** 2).view(1, 1, window, window)
    total = torch.zeros(c, c, dtype=torch.float64)
    counted = 0
    for image in maps:
        span = float(image.max() - image.min())
        if span == 0:
            continue
        counted += 1
        c1, c2 = (k1 * span) ** 2, (k2 * span) ** 2
        for i in range(c):
            total[i, i] += 1.0
            for j in range(i + 1, c):
                value = _ssim_pair(image[i], image[j], kernel, c1, c2)
                total[i, j] += value
                total[j, i] += value
    return total / max(counted, 1)


def _ssim_pair(a: torch.Tensor, b: torch.Tensor, kernel: torch.Tensor, c1: float, c2: float) -> float:
    h, w = a.shape
    if h < kernel.shape[-2] or w < kernel.shape[-1]:
        ma, mb = a.mean(), b.mean()
        va, vb = ((a - ma) ** 2).mean(), ((b - mb) ** 2).mean()
        cov = ((a - ma) * (b - mb)).mean()
        return float((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    x = torch.stack([a, b, a * a, b * b, a * b]).unsqueeze(1)
    mu_a, mu_b, aa, bb, ab = F.conv2d(x, kernel).squeeze(1)
    va, vb, cov = aa - mu_a ** 2, bb - mu_b ** 2, ab - mu_a * mu_b
    ssim = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (va + vb + c2))
    return float(ssim.mean())


def relu_maps(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """ReLU-like maps with correlated channels and one dead channel."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    shared = torch.randn(n, 1, h, w, generator=g)
    maps = torch.relu(shared * torch.rand(1, c, 1, 1, generator=g) + torch.randn(shape, generator=g))
    maps[:, 0] = 0
    return maps


def best_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--loop-images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32 inputs, metric ssim")
    for c, side in ((64, 8), (16, 32)):
        shape = (args.images, c, side, side)
        maps = relu_maps(shape, args.seed)
        fast = best_time(lambda: similarity_matrix(maps, "ssim"), args.repeats)
        subset = maps[:args.loop_images]
        loop_part = best_time(lambda: ssim_loop(subset), 2)
        loop = loop_part * args.images / args.loop_images
        s32 = similarity_matrix(maps, "ssim")
        err64 = (s32 - similarity_matrix(maps.double(), "ssim")).abs().max().item()
        err_loop = (similarity_matrix(subset, "ssim") - ssim_loop(subset.double())).abs().max().item()
        pairs = c * (c - 1) // 2
        print(f"\n[{', '.join(map(str, shape))}]  ({pairs} pairs per image)")
        print(f"  vectorized               {fast * 1e3:10.1f} ms")
        print(f"  per-pair per-image loop  {loop * 1e3:10.1f} ms  (timed on {args.loop_images} images x "
              f"{pairs} pairs = {loop_part * 1e3:.1f} ms, extrapolated x{args.images / args.loop_images:g})")
        print(f"  speed-up                 {loop / fast:10.1f} x")
        print(f"  max |S32 - S64| vectorized float64: {err64:.2e}; float64 loop ({args.loop_images} images): "
              f"{err_loop:.2e}  (target 1e-4: {'ok' if max(err64, err_loop) <= 1e-4 else 'FAILED'})")
    for metric in ("cosine", "pearson"):
        maps = relu_maps((args.images, 64, 8, 8), args.seed)
        fast = best_time(lambda: similarity_matrix(maps, metric), args.repeats)
        err = (similarity_matrix(maps, metric) - similarity_matrix(maps.double(), metric)).abs().max().item()
        print(f"\n{metric} [{args.images}, 64, 8, 8]: {fast * 1e3:.1f} ms, max |S32 - S64| = {err:.2e}")


if __name__ == "__main__":
    main()

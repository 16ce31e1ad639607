"""similarity_matrix against a slow, independent float64 implementation of docs/method.md's definitions."""
from __future__ import annotations

import math

import pytest
import torch

import qsfm_cli.similarity as sim_module
from qsfm_cli.scoring import similarity_matrix, similarity_sums


def _gaussian(window: int, sigma: float) -> list[list[float]]:
    g = [math.exp(-((k - (window - 1) / 2) ** 2) / (2 * sigma ** 2)) for k in range(window)]
    total = sum(g)
    return [[a * b / total ** 2 for b in g] for a in g]


def _ssim_pair(a: torch.Tensor, b: torch.Tensor, L: float, k1: float, k2: float, window: int,
               sigma: float) -> float:
    """Mean SSIM of two H x W maps, one window position at a time, statistics from their definitions."""
    c1, c2 = (k1 * L) ** 2, (k2 * L) ** 2
    h, w = a.shape
    if h < window or w < window:
        weight = torch.full((h, w), 1.0 / (h * w), dtype=torch.float64)
        patches = [(a, b, weight)]
    else:
        weight = torch.tensor(_gaussian(window, sigma), dtype=torch.float64)
        patches = [(a[y:y + window, x:x + window], b[y:y + window, x:x + window], weight)
                   for y in range(h - window + 1) for x in range(w - window + 1)]
    values = []
    for pa, pb, wt in patches:
        ma, mb = float((wt * pa).sum()), float((wt * pb).sum())
        va, vb = float((wt * (pa - ma) ** 2).sum()), float((wt * (pb - mb) ** 2).sum())
        cov = float((wt * (pa - ma) * (pb - mb)).sum())
        values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return sum(values) / len(values)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return 0.0 if na == 0 or nb == 0 else float((a * b).sum()) / (na * nb)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.max() == a.min() or b.max() == b.min():
        return 0.0
    return _cosine(a - a.mean(), b - b.mean())


def slow_similarity(maps: torch.Tensor, metric: str, k1: float = 0.01, k2: float = 0.03, window: int = 11,
                    sigma: float = 1.5) -> torch.Tensor:
    maps = maps.double()
    n, c = maps.shape[:2]
    total = torch.zeros(c, c, dtype=torch.float64)
    counted = 0
    for image in maps:
        L = float(image.max() - image.min())
        if metric == "ssim" and L == 0:
            continue
        counted += 1
        for i in range(c):
            for j in range(c):
                if metric == "ssim":
                    total[i, j] += _ssim_pair(image[i], image[j], L, k1, k2, window, sigma)
                elif metric == "cosine":
                    total[i, j] += _cosine(image[i], image[j])
                else:
                    total[i, j] += _pearson(image[i], image[j])
    return total / max(counted, 1)


def relu_maps(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """ReLU-like float32 maps with correlated channels, a dead (all-zero) channel and a constant one."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, h, w, generator=g)
    maps = torch.relu(base * torch.rand(1, c, 1, 1, generator=g) + torch.randn(n, c, h, w, generator=g) * 0.7)
    maps[:, 1] = 0.0
    maps[:, 2 % c] = 0.25
    return maps


SHAPES = [
    (3, 5, 13, 14),   # windowed: 3 x 4 valid positions, not square (catches transposed filters)
    (3, 6, 11, 11),   # windowed, one position; even C (offset C/2 pairs each channel twice)
    (3, 5, 6, 9),     # both sides < 11: one uniform window
    (2, 4, 12, 8),    # only W < 11: one uniform window
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("metric", ["ssim", "cosine", "pearson"])
def test_matches_slow_float64_definition(shape, metric):
    maps = relu_maps(*shape)
    fast = similarity_matrix(maps, metric)
    assert fast.dtype == torch.float64 and fast.shape == (shape[1], shape[1])
    torch.testing.assert_close(fast, slow_similarity(maps, metric), atol=1e-5, rtol=0)
    torch.testing.assert_close(fast, fast.T, atol=0, rtol=0)


@pytest.mark.parametrize("metric", ["ssim", "cosine", "pearson"])
def test_diagonal_follows_the_same_rules(metric):
    maps = relu_maps(4, 5, 12, 12)
    diag = similarity_matrix(maps, metric).diagonal()
    # channel 1 is all zero, channel 2 constant: SSIM counts them (1), cosine zeroes only the zero map,
    # pearson both
    expected = {"ssim": [1, 1, 1, 1, 1], "cosine": [1, 0, 1, 1, 1], "pearson": [1, 0, 0, 1, 1]}[metric]
    assert diag.tolist() == expected


def test_ssim_skips_images_whose_layer_is_constant():
    maps = relu_maps(3, 4, 12, 12)
    maps[1] = 0.7                               # L = 0 on image 1
    total, counted = similarity_sums(maps, "ssim")
    assert counted == 2
    torch.testing.assert_close(total / counted, similarity_matrix(maps[[0, 2]], "ssim"))
    torch.testing.assert_close(similarity_matrix(maps, "ssim"), slow_similarity(maps, "ssim"), atol=1e-5, rtol=0)
    assert similarity_sums(maps, "cosine")[1] == 3


def test_ssim_with_no_counted_image_is_zero():
    assert similarity_matrix(torch.zeros(2, 3, 12, 12)).eq(0).all()


@pytest.mark.parametrize("shape", [(3, 5, 13, 14), (3, 5, 6, 9)])
def test_ssim_constants_are_configurable(shape):
    maps = relu_maps(*shape)
    options = dict(k1=0.05, k2=0.1, window=5, sigma=0.8)
    torch.testing.assert_close(similarity_matrix(maps, "ssim", **options),
                               slow_similarity(maps, "ssim", **options), atol=1e-5, rtol=0)
    assert not torch.allclose(similarity_matrix(maps, "ssim", **options), similarity_matrix(maps, "ssim"))


@pytest.mark.parametrize("metric", ["ssim", "cosine", "pearson"])
def test_chunking_does_not_change_the_result(metric, monkeypatch):
    maps = relu_maps(5, 7, 13, 13)
    whole = similarity_matrix(maps, metric)
    monkeypatch.setitem(sim_module._CHUNK_ELEMENTS, "cpu", 2 * 7 * 13 * 13)
    torch.testing.assert_close(similarity_matrix(maps, metric), whole, atol=1e-6, rtol=0)


@pytest.mark.parametrize("metric", ["ssim", "cosine", "pearson"])
def test_streaming_sums_add_up_to_the_matrix(metric):
    maps = relu_maps(7, 4, 12, 12)
    maps[3] = 0.0
    parts = [similarity_sums(maps[s], metric) for s in (slice(0, 3), slice(3, 4), slice(4, 7))]
    total = sum(p[0] for p in parts)
    counted = sum(p[1] for p in parts)
    torch.testing.assert_close(total / counted, similarity_matrix(maps, metric), atol=1e-6, rtol=0)


def test_bad_input_is_rejected_with_the_accepted_values():
    with pytest.raises(ValueError, match="^scorer.metric=l2; accepted: ssim, cosine, pearson$"):
        similarity_matrix(torch.rand(1, 2, 4, 4), "l2")
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        similarity_matrix(torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match="window"):
        similarity_matrix(torch.rand(1, 2, 4, 4), window=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda():
    maps = relu_maps(3, 5, 13, 14)
    for metric in ("ssim", "cosine", "pearson"):
        on_gpu = similarity_matrix(maps.cuda(), metric)
        assert on_gpu.is_cuda
        torch.testing.assert_close(on_gpu.cpu(), similarity_matrix(maps, metric), atol=1e-5, rtol=0)

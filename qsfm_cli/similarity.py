"""Channel-by-channel similarity of feature maps (this project's definitions, docs/method.md).

For one image n and two channels i, j of a layer (maps H x W):

- ``ssim``: SSIM of Wang et al. 2004 with C1 = (k1 L)^2, C2 = (k2 L)^2, L = max - min over all channels and
  pixels of the layer for that image (an image with L = 0 is not counted for that layer). A Gaussian
  ``window`` x ``window`` window (``sigma``) at the valid positions, SSIM = mean over positions; when H or W
  is smaller than the window, the whole map is one window with uniform weights. Biased (population)
  variances and covariance.
- ``cosine``: cosine of the flattened maps; 0 when either map is all zero.
- ``pearson``: correlation of the flattened maps; 0 when either map is constant.

S[i, j] is the mean over the counted images (every image for cosine/pearson), diagonal included.

Everything is batched over images: cosine, pearson and the one-window SSIM come from Gram products over all
channel pairs at once; the windowed SSIM loops over the C // 2 channel offsets, each step taking every pair
at that offset together and filtering their products with one separable Gaussian, applied as two matrix
products with band matrices (see ``_windowed_ssim``).
Images are processed in chunks to bound memory. The diagonal needs no work: a map's similarity with itself
is exactly 1 for ssim (when counted), and 1 or 0 (by the rules above) for cosine/pearson.
"""
from __future__ import annotations

from functools import lru_cache

import torch

METRICS = ("ssim", "cosine", "pearson")
SSIM_DEFAULTS = {"k1": 0.01, "k2": 0.03, "window": 11, "sigma": 1.5}

# Elements of one [images, C, H, W] (or [images, C, C]) slice processed at once. On the CPU: small enough
# that the working tensors stay in cache, large enough for efficient matrix products (measured, 2 cores).
# Elsewhere larger, to amortize kernel launches (not measured: no GPU was at hand).
_CHUNK_ELEMENTS = {"cpu": 1 << 19}
_DEFAULT_CHUNK_ELEMENTS = 1 << 23


def check_metric_options(metric: str, k1: float, k2: float, window: int, sigma: float) -> None:
    """Raise ``ValueError`` naming the bad value when a metric or SSIM option is outside its domain."""
    if metric not in METRICS:
        raise ValueError(f"scorer.metric={metric}; accepted: {', '.join(METRICS)}")
    if not (k1 > 0 and k2 > 0):
        raise ValueError(f"scorer.k1={k1}, scorer.k2={k2}; accepted: > 0 each")
    if int(window) != window or window < 1:
        raise ValueError(f"scorer.window={window}; accepted: a positive integer")
    if not sigma > 0:
        raise ValueError(f"scorer.sigma={sigma}; accepted: > 0")


def similarity_matrix(maps: torch.Tensor, metric: str = "ssim", *, k1: float = 0.01, k2: float = 0.03,
                      window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """S [C, C] (float64, on ``maps``' device): the mean per-image similarity of ``maps`` [N, C, H, W].

    All zeros when no image is counted (ssim with every image constant over the whole layer).
    """
    total, counted = similarity_sums(maps, metric, k1=k1, k2=k2, window=window, sigma=sigma)
    return total / max(counted, 1)


def similarity_sums(maps: torch.Tensor, metric: str = "ssim", *, k1: float = 0.01, k2: float = 0.03,
                    window: int = 11, sigma: float = 1.5) -> tuple[torch.Tensor, int]:
    """The streaming form: (sum over the counted images of the per-image [C, C] similarity in float64,
    number of counted images). Summing both over batches and dividing gives ``similarity_matrix``."""
    check_metric_options(metric, k1, k2, window, sigma)
    if maps.dim() != 4:
        raise ValueError(f"maps must be [N, C, H, W], got shape {tuple(maps.shape)}")
    if not maps.is_floating_point():
        maps = maps.float()
    n, c, h, w = maps.shape
    total = torch.zeros(c, c, dtype=torch.float64, device=maps.device)
    counted = 0
    budget = _CHUNK_ELEMENTS.get(maps.device.type, _DEFAULT_CHUNK_ELEMENTS)
    step = max(1, budget // max(1, c * h * w, c * c))
    for start in range(0, n, step):
        x = maps[start:start + step]
        if metric == "ssim":
            x = x[layer_range(x) > 0]
            if len(x) == 0:
                continue
            total += _ssim_sums(x, k1, k2, int(window), float(sigma))
        else:
            total += _correlation_sums(x, centered=metric == "pearson")
        counted += len(x)
    return total, counted


def layer_range(maps: torch.Tensor) -> torch.Tensor:
    """L per image [N]: max - min over all channels and pixels."""
    flat = maps.flatten(1)
    return flat.amax(1) - flat.amin(1)


def _correlation_sums(x: torch.Tensor, *, centered: bool) -> torch.Tensor:
    """Sum over images of the cosine (or, centred, Pearson) matrix; 0 for a zero (constant) map."""
    flat = x.flatten(2)
    if centered:
        valid = flat.amax(2) != flat.amin(2)
        flat = flat - flat.mean(2, keepdim=True)
    else:
        valid = (flat != 0).any(2)
    gram = torch.bmm(flat, flat.transpose(1, 2))
    norm = gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()
    denom = norm.unsqueeze(2) * norm.unsqueeze(1)
    both = valid.unsqueeze(2) & valid.unsqueeze(1)
    sim = torch.where(both, gram / torch.where(both, denom, torch.ones_like(denom)), torch.zeros_like(gram))
    sim.diagonal(dim1=1, dim2=2).copy_(valid.to(sim.dtype))
    return _mirror_upper(sim.sum(0, dtype=torch.float64))


def _ssim_sums(x: torch.Tensor, k1: float, k2: float, window: int, sigma: float) -> torch.Tensor:
    """Sum over images (all with L > 0) of the SSIM matrix."""
    b, c, h, w = x.shape
    span = layer_range(x).view(b, 1, 1, 1)
    c1, c2 = (k1 * span) ** 2, (k2 * span) ** 2
    if h < window or w < window:
        sums = _global_ssim(x, c1, c2)
    else:
        sums = _windowed_ssim(x, c1, c2, _band(h, window, sigma, x.dtype, x.device),
                              _band(w, window, sigma, x.dtype, x.device))
    sums.diagonal().fill_(float(b))
    return sums


def _global_ssim(x: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
    """One uniform window per map: global means, variances and covariance (from a Gram product)."""
    b, c = x.shape[:2]
    flat = x.flatten(2)
    mu = flat.mean(2)
    centered = flat - mu.unsqueeze(2)
    cov = torch.bmm(centered, centered.transpose(1, 2)) / flat.shape[2]
    var = cov.diagonal(dim1=1, dim2=2)
    c1, c2 = c1.view(b, 1, 1), c2.view(b, 1, 1)
    num = (2 * mu.unsqueeze(2) * mu.unsqueeze(1) + c1) * (2 * cov + c2)
    den = (mu.square().unsqueeze(2) + mu.square().unsqueeze(1) + c1) * (var.unsqueeze(2) + var.unsqueeze(1) + c2)
    return _mirror_upper((num / den).sum(0, dtype=torch.float64))


def _mirror_upper(m: torch.Tensor) -> torch.Tensor:
    """Exactly symmetric: the upper triangle mirrored (a Gram product's rounding need not be)."""
    return m.triu() + m.triu(1).T


def _windowed_ssim(x: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, band_h: torch.Tensor,
                   band_w: torch.Tensor) -> torch.Tensor:
    """Gaussian windows at the valid positions, all channel pairs and images at once.

    Maps are laid out [H, W, C, images]: each pass of the separable filter is then one matrix product with
    a small band matrix on the left and all images and channels as columns (the shape that runs fastest),
    and the elementwise work runs over long contiguous rows of channels x images. Pairs are enumerated by
    channel offset: offset d pairs channel i with channel (i + d) mod C, read as a slice of the per-channel
    tensors stored twice along the channel axis (no gather); offsets 1 .. C // 2 cover every unordered
    pair, each offset all C pairs of every image in one go. Local (co)variances use maps shifted by their
    global mean: the same values (window weights sum to 1) with far less cancellation in float32.
    """
    b, c, h, w = x.shape
    sums = torch.zeros(c, c, dtype=torch.float64, device=x.device)
    if c < 2:
        return sums
    band_h_t, band_w_t = band_h.T.contiguous(), band_w.T.contiguous()
    blocks = _band_blocks(band_h_t)

    def blur(t: torch.Tensor) -> torch.Tensor:
        """[H, W, C, B] -> [H', W', C, B]."""
        flat = t.reshape(h, -1)
        rows = flat.new_empty(band_h_t.shape[0], flat.shape[1])
        for (r0, r1, k0, k1), block in blocks:
            torch.mm(block, flat[k0:k1], out=rows[r0:r1])
        rows = rows.view(-1, w, c * b)
        return torch.bmm(band_w_t.expand(len(rows), -1, -1), rows).view(len(rows), -1, c, b)

    # one 2-D transpose: far faster than a 4-D permute
    pixels = x.transpose(0, 1).reshape(c * b, h * w).T.contiguous().view(h, w, c, b)
    # Per-channel terms, pre-scaled so that each pair needs few passes over memory (s = shifted map):
    #   num = (2 mu_i mu_j + C1) (2 cov_ij + C2),  2 cov_ij + C2 = blur(2 s_i s_j + C2) - 2 m_i m_j
    #   den = (mu_i^2 + C1/2 + mu_j^2 + C1/2) (var_i + C2/2 + var_j + C2/2)
    root2 = 2 ** 0.5
    shifted = (pixels - pixels.mean((0, 1))) * root2
    mu = blur(pixels) * root2
    mu_shift = blur(shifted)
    c1, c2 = c1.view(b), c2.view(b)
    here = {"shifted": shifted, "mu": mu, "mu_shift": mu_shift, "lum": (mu.square() + c1) / 2,
            "con": (blur(shifted.square()) - mu_shift.square() + c2) / 2}
    twice = {name: torch.cat([t, t], 2) for name, t in here.items()}
    channel = torch.arange(c, device=x.device)
    for offset in range(1, c // 2 + 1):
        other = {name: t[:, :, offset:offset + c] for name, t in twice.items()}
        ratio = blur(torch.addcmul(c2, here["shifted"], other["shifted"]))
        ratio.addcmul_(here["mu_shift"], other["mu_shift"], value=-1)
        ratio.mul_(torch.addcmul(c1, here["mu"], other["mu"]))
        ratio.div_((here["lum"] + other["lum"]).mul_(here["con"] + other["con"]))
        pair_sums = ratio.mean((0, 1)).sum(1, dtype=torch.float64)      # [C]: pair (i, i + offset)
        partner = (channel + offset) % c
        sums[channel, partner] = pair_sums
        sums[partner, channel] = pair_sums
    return sums


def _band_blocks(band_t: torch.Tensor) -> list:
    """Split a [n', n] band matrix into row blocks of about the window's height, each with only the input
    columns it touches: the products skip most of the band's zeros (about a third fewer operations for
    32-pixel maps)."""
    positions, n = band_t.shape
    window = n - positions + 1
    blocks = []
    for r0 in range(0, positions, window):
        r1 = min(r0 + window, positions)
        blocks.append(((r0, r1, r0, r1 + window - 1), band_t[r0:r1, r0:r1 + window - 1].contiguous()))
    return blocks


@lru_cache(maxsize=64)
def _band(n: int, window: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[n, n - window + 1]: column k holds the normalized 1-D Gaussian at rows k .. k + window - 1, so
    ``t @ band`` filters the last axis of ``t`` at the valid positions."""
    offsets = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-offsets.square() / (2 * sigma ** 2))
    g = g / g.sum()
    positions = n - window + 1
    band = torch.zeros(n, positions, dtype=torch.float64)
    for k in range(window):
        band[torch.arange(positions) + k, torch.arange(positions)] = g[k]
    return band.to(dtype=dtype, device=device)

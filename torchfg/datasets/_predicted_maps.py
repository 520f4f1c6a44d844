"""Seeded errors that turn the exact rendered semantic map into a plausible *predicted* one.

In practice the map fed to a semantic-guided classifier comes from a human-parsing or segmentation
model, not from the renderer. Such maps are soft at the edges, slightly misaligned with the image,
miss parts of the garment (occlusions, unusual colours) and fire on other garment-like regions of
the background. :func:`predict_semantic_maps` applies those four errors, with per-sample strengths
drawn by :func:`sample_map_errors` from a generator seeded by the sample alone, so a sample's
predicted map never depends on the batch it is rendered in.

The error sizes are fixed by what a parser's output commonly looks like (a pixel or two of blur and
offset at 64 x 64, a missed region in most images, a false blob in about half of them); they were
set before any experiment was run on them and are not tuned toward any method.

Coordinates as in :mod:`torchfg.datasets._render`: ``x`` and ``y`` span ``[-1, 1]`` over the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Ranges of the per-sample errors, in image units (the image spans 2.0) unless noted.
SHIFT_MAX = 0.08  # map offset along x and y: up to ~2.5 px at 64 x 64
BLUR_SIGMA = (0.02, 0.06)  # Gaussian blur: ~0.6 to ~1.9 px at 64 x 64
MISS_SLOTS = 2  # missed regions per image, each present with probability MISS_PROB
MISS_PROB = 0.6
MISS_RADIUS = (0.25, 0.5)  # times the product's scale (the garment spans about +-1 scale)
MISS_STRENGTH = (0.6, 1.0)  # fraction of the product probability removed at the centre of a miss
BLOB_SLOTS = 2  # false detections on the background, each present with probability BLOB_PROB
BLOB_PROB = 0.4
BLOB_RADIUS = (0.08, 0.2)
BLOB_STRENGTH = (0.4, 0.9)  # product probability at a blob's centre


@dataclass
class MapErrors:
    """Per-sample map errors of a batch of B samples (CPU float32 tensors).

    Attributes:
        shift: ``(B, 2)`` offset (x, y) of the predicted map relative to the image.
        sigma: ``(B,)`` standard deviation of the Gaussian blur.
        miss: ``(B, MISS_SLOTS, 4)`` rows (centre x, centre y, radius, strength); strength 0 = unused.
        blob: ``(B, BLOB_SLOTS, 4)`` rows (centre x, centre y, radius, strength); strength 0 = unused.
    """

    shift: torch.Tensor
    sigma: torch.Tensor
    miss: torch.Tensor
    blob: torch.Tensor


def sample_map_errors(
    rngs: list[np.random.Generator], product_centre: torch.Tensor, product_scale: torch.Tensor
) -> MapErrors:
    """Draw the errors of B samples, one generator per sample.

    Args:
        rngs: B NumPy generators, each seeded by its sample alone.
        product_centre: ``(B, 2)`` product centre in image units (misses fall on the product).
        product_scale: ``(B,)`` image units per garment unit.
    """
    lerp = lambda lo, hi, t: lo + (hi - lo) * t  # noqa: E731
    rows = []
    for i, rng in enumerate(rngs):
        # A fixed number of draws per sample: every slot is drawn, used or not.
        q = rng.random(3 + 5 * MISS_SLOTS + 5 * BLOB_SLOTS)
        cx, cy = (float(v) for v in product_centre[i])
        scale = float(product_scale[i])
        row = [lerp(-SHIFT_MAX, SHIFT_MAX, q[0]), lerp(-SHIFT_MAX, SHIFT_MAX, q[1]), lerp(*BLUR_SIGMA, q[2])]
        k = 3
        for _ in range(MISS_SLOTS):
            used = q[k] < MISS_PROB
            angle, reach = 2.0 * math.pi * q[k + 1], 0.7 * scale * q[k + 2]
            row += [
                cx + reach * math.cos(angle),
                cy + reach * math.sin(angle),
                lerp(*MISS_RADIUS, q[k + 3]) * scale,
                lerp(*MISS_STRENGTH, q[k + 4]) if used else 0.0,
            ]
            k += 5
        for _ in range(BLOB_SLOTS):
            used = q[k] < BLOB_PROB
            row += [
                lerp(-0.9, 0.9, q[k + 1]),
                lerp(-0.9, 0.9, q[k + 2]),
                lerp(*BLOB_RADIUS, q[k + 3]),
                lerp(*BLOB_STRENGTH, q[k + 4]) if used else 0.0,
            ]
            k += 5
        rows.append(row)
    table = torch.tensor(rows, dtype=torch.float32).view(len(rngs), -1)
    miss_end = 3 + 4 * MISS_SLOTS
    return MapErrors(
        shift=table[:, 0:2],
        sigma=table[:, 2],
        miss=table[:, 3:miss_end].reshape(-1, MISS_SLOTS, 4),
        blob=table[:, miss_end:].reshape(-1, BLOB_SLOTS, 4),
    )


def _discs(params: torch.Tensor, size: int, *, gaussian: bool) -> torch.Tensor:
    """Sum over slots of strength-weighted soft discs (or Gaussians), ``(B, size, size)`` in [0, 1]."""
    grid = (torch.arange(size, device=params.device, dtype=torch.float32) + 0.5) * (2.0 / size) - 1.0
    x, y = grid.view(1, 1, 1, size), grid.view(1, 1, size, 1)
    cx, cy, radius, strength = (params[..., j].unsqueeze(-1).unsqueeze(-1) for j in range(4))
    d2 = (x - cx) ** 2 + (y - cy) ** 2
    if gaussian:
        shape = torch.exp(-d2 / (2.0 * radius**2))
    else:  # flat inside, fading to 0 over the outer half of the radius
        shape = ((radius - d2.sqrt()) / (0.5 * radius)).clamp(0.0, 1.0)
    # Overlapping slots combine like independent events, so the result stays in [0, 1].
    return 1.0 - torch.prod(1.0 - strength * shape, dim=1)


def _blur(maps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample separable Gaussian blur of ``(B, C, H, W)`` maps, ``sigma`` ``(B,)`` in image units."""
    b, c, h, w = maps.shape
    sigma_px = (sigma * (w / 2.0)).clamp_min(1e-3)
    # One kernel width for every batch (not the batch's largest sigma): a sample's map must not depend
    # on which other samples share its batch.
    radius = max(1, int(math.ceil(3.0 * BLUR_SIGMA[1] * (w / 2.0))))
    taps = torch.arange(-radius, radius + 1, device=maps.device, dtype=torch.float32)
    kernel = torch.exp(-(taps.view(1, -1) ** 2) / (2.0 * sigma_px.view(-1, 1) ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B*C, k)
    flat = maps.reshape(1, b * c, h, w)
    flat = F.conv2d(flat, kernel.view(b * c, 1, -1, 1), padding=(radius, 0), groups=b * c)
    flat = F.conv2d(flat, kernel.view(b * c, 1, 1, -1), padding=(0, radius), groups=b * c)
    return flat.view(b, c, h, w)


def predict_semantic_maps(exact: torch.Tensor, errors: MapErrors) -> torch.Tensor:
    """The predicted maps of B samples from their exact ones.

    Args:
        exact: ``(B, 3, S, S)`` exact maps (background, body, trim), summing to 1 per pixel.
        errors: the samples' :class:`MapErrors`.

    Returns:
        ``(B, 3, S, S)`` maps with the same channels, still in [0, 1] and summing to 1 per pixel:
        the product region (body + trim) offset by ``shift``, blurred by ``sigma``, faded inside the
        missed regions, and with false product probability (as body) added at the blobs.
    """
    b, _, size, _ = exact.shape
    device = exact.device
    product = exact[:, 1:].sum(dim=1, keepdim=True)
    layers = torch.cat((product, exact[:, 2:3]), dim=1)  # (B, 2, S, S): product, trim
    theta = torch.zeros(b, 2, 3, device=device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = -errors.shift.to(device)  # sampling at p - shift moves the content by +shift
    grid = F.affine_grid(theta, [b, 2, size, size], align_corners=False)
    layers = F.grid_sample(layers, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    layers = _blur(layers, errors.sigma.to(device))
    keep = 1.0 - _discs(errors.miss.to(device), size, gaussian=False)
    layers = layers * keep.unsqueeze(1)
    blobs = _discs(errors.blob.to(device), size, gaussian=True)
    product = layers[:, 0] + (1.0 - layers[:, 0]) * blobs
    product = product.clamp(0.0, 1.0)
    trim = torch.minimum(layers[:, 1].clamp(0.0, 1.0), product)
    return torch.stack((1.0 - product, product - trim, trim), dim=1)

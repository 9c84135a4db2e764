"""SLIC superpixel pooling: maps averaged within the superpixels of their image (refine method ``superpixel``).

Superpixels are the cheap boundary prior SSR chose over SAM: a CAM is coarse (one value per ViT token, upsampled
bilinearly), so its edges cross object boundaries; averaging it within SLIC superpixels (Achanta et al. 2012,
``skimage.segmentation.slic``) of the image makes it constant on regions of one colour, whose edges follow the
image's. The size is a target *area* in pixels at the working resolution (n_segments = pixels / area), not a
count, so that one setting gives superpixels of the same size on images of any size.

The pooling is a linear operator whose rows sum to 1 (each output pixel is the mean of its segment), so it keeps
a constant map, keeps every run's probabilities summing to 1, and is idempotent (a map constant on every segment
is unchanged).
"""

from __future__ import annotations

import numpy as np
import torch


def slic_segments(rgb: np.ndarray, area: int, compactness: float, sigma: float) -> np.ndarray:
    """(h, w) int64 superpixel ids 0..S-1 of an (h, w, 3) uint8 image, superpixels of about ``area`` px."""
    from skimage.segmentation import slic

    h, w = rgb.shape[:2]
    n_segments = max(1, round(h * w / area))
    segments = slic(rgb, n_segments=n_segments, compactness=compactness, sigma=sigma, start_label=0,
                    channel_axis=-1)
    return np.ascontiguousarray(segments, dtype=np.int64)


def segment_mean(maps: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """maps (C, h, w) averaged within each segment of ``segments`` (h, w) long ids: same shape, fp32."""
    c, h, w = maps.shape
    if segments.shape != (h, w):
        raise ValueError(f"segments of shape {tuple(segments.shape)} do not match maps of size {(h, w)}")
    ids = segments.reshape(-1).to(maps.device)
    flat = maps.float().reshape(c, h * w)  # (C, N)
    count = int(ids.max()) + 1
    sums = torch.zeros(c, count, device=maps.device).index_add_(1, ids, flat)  # (C, S)
    sizes = torch.bincount(ids, minlength=count).clamp(min=1).float()  # (S,)
    return (sums / sizes)[:, ids].reshape(c, h, w)


def pool_stacks(stacks: torch.Tensor, sizes: list[tuple[int, int]], segments: list[np.ndarray]) -> torch.Tensor:
    """Every image's maps averaged within its superpixels, on its own pixels: (B, C, H, W) → same (padding kept)."""
    out = stacks.clone()
    for b, ((h, w), seg) in enumerate(zip(sizes, segments)):
        out[b, :, :h, :w] = segment_mean(stacks[b, :, :h, :w], torch.from_numpy(seg))
    return out

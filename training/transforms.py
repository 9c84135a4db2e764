"""The one pair transform: an image and its mask, augmented together (classifier crops, segmenter crops, the package
reader's ``TrainTransform``).

``augment_pair`` resizes the long side to ``base_size``, rescales by U(``scale_range``), flips, jitters colours,
pads to at least ``crop_size`` at a random offset (image black, mask ``IGNORE_INDEX``) and crops ``crop_size`` at a
random offset: the reference's random crop (METHODS.md §1). Masks are resized nearest (class ids never blend). The
classifier passes a mask of ones and reads ``valid = mask != IGNORE_INDEX`` (padding is ignored by every loss).
Random draws come from the caller's ``numpy`` generator in a fixed order, so a crop is a function of the image,
the params and the generator's seed. ``random_resized_box`` draws the box of the classifier's second global view
(torchvision's ``RandomResizedCrop`` rule) on the original image.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from config.schema import AugmentConfig
from shards.images import long_side_size
from shards.records import IGNORE_INDEX


def resize_pair(rgb: np.ndarray, mask: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Image bilinear, mask nearest (class ids must not blend) to ``size`` = (W, H)."""
    if size == (rgb.shape[1], rgb.shape[0]):
        return rgb, mask
    return (np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR)),
            np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST)))


def jitter_colours(rgb: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation, each scaled by U(1 - strength, 1 + strength)."""
    x = rgb.astype(np.float32)
    x *= rng.uniform(1 - strength, 1 + strength)  # brightness
    mean = x.mean()
    x = (x - mean) * rng.uniform(1 - strength, 1 + strength) + mean  # contrast
    grey = x.mean(axis=2, keepdims=True)
    x = (x - grey) * rng.uniform(1 - strength, 1 + strength) + grey  # saturation
    return np.clip(x, 0, 255).astype(np.uint8)


def augment_pair(rgb: np.ndarray, mask: np.ndarray, cfg: AugmentConfig,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 image + (H, W) uint8 mask -> (S, S, 3) crop + (S, S) mask (``IGNORE_INDEX`` where padded)."""
    if rgb.shape[:2] != mask.shape:
        raise ValueError(f"image {rgb.shape[:2]} and mask {mask.shape} differ in size")
    h, w = mask.shape
    if cfg.base_size > 0:
        rgb, mask = resize_pair(rgb, mask, long_side_size(h, w, cfg.base_size)[::-1])
        h, w = mask.shape
    scale = rng.uniform(*cfg.scale_range)
    rgb, mask = resize_pair(rgb, mask, (max(1, round(w * scale)), max(1, round(h * scale))))
    if cfg.flip and rng.random() < 0.5:
        rgb, mask = rgb[:, ::-1], mask[:, ::-1]
    if cfg.jitter > 0:
        rgb = jitter_colours(rgb, cfg.jitter, rng)
    s = cfg.crop_size
    h, w = mask.shape
    # Pad to at least S x S at a random offset, then crop S x S at a random offset.
    canvas = np.zeros((max(h, s), max(w, s), 3), dtype=np.uint8)
    labels = np.full(canvas.shape[:2], IGNORE_INDEX, dtype=np.uint8)
    oy = int(rng.integers(0, canvas.shape[0] - h + 1))
    ox = int(rng.integers(0, canvas.shape[1] - w + 1))
    canvas[oy:oy + h, ox:ox + w] = rgb
    labels[oy:oy + h, ox:ox + w] = mask
    cy = int(rng.integers(0, canvas.shape[0] - s + 1))
    cx = int(rng.integers(0, canvas.shape[1] - s + 1))
    return canvas[cy:cy + s, cx:cx + s], labels[cy:cy + s, cx:cx + s]


def random_resized_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                       rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of torchvision's ``RandomResizedCrop`` box: area fraction U(scale), log-uniform aspect
    ratio, 10 tries, else the whole image clipped to the ratio range, centred. For the loader (numpy)."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w

"""Torch datasets over manifest shards: training crops for the classifier, and evaluation images.

Augmentation follows METHODS.md §1 (rescale by U(lo, hi), flip, random crop with padding, colour jitter); pixels
outside the valid box are marked in ``valid`` so every loss can ignore them. Each sample's randomness comes from
``np.random.default_rng([seed, epoch, row])``: the result is independent of worker count and order, and a resumed
run reproduces the interrupted one without saving any RNG state for the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from models.stem import IMAGENET_MEAN, IMAGENET_STD
from shards.images import decode_mask_png, decode_rgb, resize_long
from shards.sampling import RowIndex, RowReader


@dataclass(frozen=True)
class AugmentConfig:
    crop_size: int
    base_size: int  # resize the long side to this first (0 = keep the original size)
    scale_range: tuple[float, float]
    jitter: float  # brightness/contrast/saturation strength


def multi_hot(tags: list[int] | None, num_classes: int) -> np.ndarray:
    labels = np.zeros(num_classes, dtype=np.float32)
    for tag in tags or []:
        labels[tag - 1] = 1.0
    return labels


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float normalised with ImageNet mean/std."""
    x = torch.from_numpy(np.array(rgb, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_tensor`'s normalisation: (B, 3, H, W) -> values in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


def resize_to_multiple(rgb: np.ndarray, long_side: int, multiple: int) -> np.ndarray:
    """Long side to ``long_side``, then each side rounded to a multiple of ``multiple`` (>= one multiple).

    Hybrid (conv-stem) ViTs need inputs whose sides divide their stride; the slight change of aspect ratio is
    harmless where the output is resized back to the original image (CAM metrics).
    """
    rgb = resize_long(rgb, long_side)
    h, w = rgb.shape[:2]
    size = (max(multiple, round(w / multiple) * multiple), max(multiple, round(h / multiple) * multiple))
    if size == (w, h):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))


def augment(rgb: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rescale, flip, colour-jitter and pad-crop; returns (crop (S, S, 3) uint8, valid (S, S) bool)."""
    rgb = resize_long(rgb, cfg.base_size)
    scale = rng.uniform(*cfg.scale_range)
    h, w = rgb.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))
    if rng.random() < 0.5:
        rgb = rgb[:, ::-1]
    if cfg.jitter > 0:
        rgb = jitter_colours(rgb, cfg.jitter, rng)
    return pad_crop(rgb, np.ones(rgb.shape[:2], dtype=bool), cfg.crop_size, False, rng)


def jitter_colours(rgb: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation, each scaled by U(1 - strength, 1 + strength), in that order."""
    x = rgb.astype(np.float32)
    x *= rng.uniform(1 - strength, 1 + strength)  # brightness
    mean = x.mean()
    x = (x - mean) * rng.uniform(1 - strength, 1 + strength) + mean  # contrast
    grey = x.mean(axis=2, keepdims=True)
    x = (x - grey) * rng.uniform(1 - strength, 1 + strength) + grey  # saturation
    return np.clip(x, 0, 255).astype(np.uint8)


def pad_crop(rgb: np.ndarray, labels: np.ndarray, size: int, fill, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) image and (H, W) ``labels`` padded (image 0, labels ``fill``) to at least size x size at a random
    offset, then cropped size x size at a random offset, both the same way (the reference's random crop)."""
    h, w = labels.shape
    canvas = np.zeros((max(h, size), max(w, size), 3), dtype=np.uint8)
    padded = np.full(canvas.shape[:2], fill, dtype=labels.dtype)
    oy = int(rng.integers(0, canvas.shape[0] - h + 1))
    ox = int(rng.integers(0, canvas.shape[1] - w + 1))
    canvas[oy:oy + h, ox:ox + w] = rgb
    padded[oy:oy + h, ox:ox + w] = labels
    cy = int(rng.integers(0, canvas.shape[0] - size + 1))
    cx = int(rng.integers(0, canvas.shape[1] - size + 1))
    return canvas[cy:cy + size, cx:cx + size], padded[cy:cy + size, cx:cx + size]


class TrainCrops(Dataset):
    """Augmented training crops of the tagged rows of some manifest shards; set ``epoch`` before each epoch."""

    def __init__(self, index: RowIndex, num_classes: int, cfg: AugmentConfig, seed: int):
        self.reader = RowReader(index, columns=["image", "tags"], cache_groups=8)
        self.num_classes, self.cfg, self.seed = num_classes, cfg, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.reader.index)

    def __getitem__(self, number: int) -> dict[str, Any]:
        row = self.reader.row(number)
        rng = np.random.default_rng([self.seed, self.epoch, number])
        crop, valid = augment(decode_rgb(row["image"]["bytes"]), self.cfg, rng)
        return {
            "image": to_tensor(crop),  # (3, S, S)
            "valid": torch.from_numpy(np.ascontiguousarray(valid)),  # (S, S)
            "labels": torch.from_numpy(multi_hot(row["tags"], self.num_classes)),  # (K,)
        }


class EvalImages(Dataset):
    """Whole images (long side resized to ``size``), their tags and ground truth at the original size."""

    def __init__(self, index: RowIndex, num_classes: int, size: int, rows: list[int] | None = None,
                 multiple: int = 32):
        self.reader = RowReader(index, columns=["image_id", "image", "tags", "mask"], cache_groups=2)
        self.num_classes, self.size, self.multiple = num_classes, size, multiple
        self.rows = list(range(len(index))) if rows is None else list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.reader.row(self.rows[i])
        rgb = decode_rgb(row["image"]["bytes"])
        mask = row["mask"]
        return {
            "image_id": row["image_id"],
            "image": to_tensor(resize_to_multiple(rgb, self.size, self.multiple)),
            "labels": torch.from_numpy(multi_hot(row["tags"], self.num_classes)),
            "gt": decode_mask_png(mask["bytes"]) if mask and mask.get("bytes") else None,
        }

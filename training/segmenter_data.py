"""Training crops of image + pseudo mask pairs for ``train_segmenter``, streamed from pseudo-label shards.

Paired augmentation (DeepLab's): optional resize of the long side, random rescale by U(lo, hi) (image bilinear,
mask nearest), horizontal flip, colour jitter of the image only, then a random crop after padding to the crop size
(image with 0, mask with 255 = ignore, so padding never trains). Each sample's randomness comes from
``np.random.default_rng([seed, epoch, row])``, as in training/data.py: independent of worker count and order, and a
resumed run reproduces the interrupted one without saving any data RNG state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import Dataset

from shards.images import decode_mask_png, decode_rgb, long_side_size
from shards.records import IGNORE_INDEX
from shards.sampling import RowIndex, RowReader
from training.data import jitter_colours, pad_crop, to_tensor


@dataclass(frozen=True)
class PairAugmentConfig:
    crop_size: int
    base_size: int  # resize the long side to this first (0 = keep the original size)
    scale_range: tuple[float, float]
    jitter: float  # brightness/contrast/saturation strength; 0 = off


def resize_pair(rgb: np.ndarray, mask: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Image bilinear, mask nearest (class ids must not blend) to ``size`` = (W, H)."""
    if size == (rgb.shape[1], rgb.shape[0]):
        return rgb, mask
    return (np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR)),
            np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST)))


def augment_pair(rgb: np.ndarray, mask: np.ndarray, cfg: PairAugmentConfig,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 image + (H, W) uint8 mask -> (S, S, 3) crop + (S, S) mask (255 where padded)."""
    if rgb.shape[:2] != mask.shape:
        raise ValueError(f"image {rgb.shape[:2]} and mask {mask.shape} differ in size")
    h, w = mask.shape
    if cfg.base_size > 0:
        rgb, mask = resize_pair(rgb, mask, long_side_size(h, w, cfg.base_size)[::-1])
        h, w = mask.shape
    scale = rng.uniform(*cfg.scale_range)
    rgb, mask = resize_pair(rgb, mask, (max(1, round(w * scale)), max(1, round(h * scale))))
    if rng.random() < 0.5:
        rgb, mask = rgb[:, ::-1], mask[:, ::-1]
    if cfg.jitter > 0:
        rgb = jitter_colours(rgb, cfg.jitter, rng)
    return pad_crop(rgb, mask.astype(np.uint8, copy=False), cfg.crop_size, IGNORE_INDEX, rng)


class PseudoLabelCrops(Dataset):
    """Augmented (image, pseudo mask) crops, indexed by (epoch, row) so workers need no shared epoch counter."""

    def __init__(self, index: RowIndex, cfg: PairAugmentConfig, seed: int):
        self.reader = RowReader(index, columns=["image", "mask"], cache_groups=8)
        self.cfg, self.seed = cfg, seed

    def __len__(self) -> int:
        return len(self.reader.index)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, number = key
        row = self.reader.row(number)
        rng = np.random.default_rng([self.seed, epoch, number])
        crop, mask = augment_pair(decode_rgb(row["image"]["bytes"]), decode_mask_png(row["mask"]["bytes"]),
                                  self.cfg, rng)
        return {
            "image": to_tensor(crop),  # (3, S, S)
            "mask": torch.from_numpy(mask.astype(np.int64)),  # (S, S), 255 = ignore
        }


def rows_with_masks(paths: list) -> list[int]:
    """Row numbers (over ``paths`` in order, as RowIndex counts them) of the manifest rows that carry ground truth."""
    masks = [m for path in paths for m in pq.read_table(path, columns=["mask"]).column("mask").to_pylist()]
    return [i for i, m in enumerate(masks) if m is not None and m.get("bytes")]


class GroundTruthImages(Dataset):
    """Whole images with their ground truth, rows ``rows`` of some manifest shards (see rows_with_masks)."""

    def __init__(self, index: RowIndex, rows: list[int]):
        self.reader = RowReader(index, columns=["image_id", "image", "mask"], cache_groups=2)
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.reader.row(self.rows[i])
        return {"image_id": row["image_id"], "rgb": decode_rgb(row["image"]["bytes"]),  # (H, W, 3) uint8
                "gt": decode_mask_png(row["mask"]["bytes"])}  # (H, W) uint8, 255 = ignore

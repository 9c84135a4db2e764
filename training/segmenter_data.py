"""Training crops of image + pseudo mask pairs for ``train_segmenter``, streamed from pseudo-label shards.

Paired augmentation (DeepLab's; the one pair transform of training/transforms.py): optional resize of the long
side, random rescale by U(lo, hi) (image bilinear, mask nearest), horizontal flip, colour jitter of the image only,
then a random crop after padding to the crop size (image with 0, mask with 255 = ignore, so padding never trains).
Each sample's randomness comes from ``np.random.default_rng([seed, epoch, row])`` (training/data.py: PairCrops).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from shards.images import decode_mask_png, decode_rgb
from shards.sampling import RowIndex, RowReader
from training.data import PairCrops


class PseudoLabelCrops(PairCrops):
    """The segmenter's crops: image and pseudo mask, augmented together (255 = ignore, padding included)."""

    columns = ("image", "mask")

    def mask(self, row: dict[str, Any], rgb: np.ndarray) -> np.ndarray:
        return decode_mask_png(row["mask"]["bytes"])

    def sample(self, row: dict[str, Any], mask: np.ndarray) -> dict[str, torch.Tensor]:
        return {"mask": torch.from_numpy(mask.astype(np.int64))}  # (S, S), 255 = ignore


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

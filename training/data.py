"""Torch datasets over manifest shards: training crops for the classifier, and evaluation images.

Augmentation follows METHODS.md §1 (rescale by U(lo, hi), flip, random crop with padding, colour jitter); pixels
outside the valid box are marked in ``valid`` so every loss can ignore them. With ``augment.second_view: original``
a classifier sample also holds CTC's second global view, a random-resized crop of the original image; the rest of
ToCo's views is made on the training device (training/views.py). Each sample's randomness comes from
``np.random.default_rng([seed, epoch, row])``: the result is independent of worker count and order, and a resumed
run reproduces the interrupted one without saving any RNG state for the data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from config.schema import AugmentConfig, ClassifierAugmentConfig
from models.stem import IMAGENET_MEAN, IMAGENET_STD
from shards.images import decode_mask_png, decode_rgb, resize_long
from shards.records import IGNORE_INDEX
from shards.sampling import RowIndex, RowReader
from training.transforms import augment_pair, random_resized_box


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


class PairCrops(Dataset):
    """Augmented crops of the rows of some shards (training/transforms.py: ``augment_pair``), indexed by
    (epoch, row) so that loader workers need no shared epoch counter. A sample's randomness is
    ``default_rng([seed, epoch, row])``: independent of worker count and order, so a resumed run reproduces the
    interrupted one without saving any data RNG state. Subclasses say which mask goes with the image and what a
    sample holds."""

    columns: tuple[str, ...] = ("image",)

    def __init__(self, index: RowIndex, cfg: AugmentConfig, seed: int):
        self.reader = RowReader(index, columns=list(self.columns), cache_groups=8)
        self.cfg, self.seed = cfg, seed

    def __len__(self) -> int:
        return len(self.reader.index)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, number = key
        row = self.reader.row(number)
        rng = np.random.default_rng([self.seed, epoch, number])
        rgb = decode_rgb(row["image"]["bytes"])
        crop, mask = augment_pair(rgb, self.mask(row, rgb), self.cfg, rng)
        return {"image": to_tensor(crop), **self.sample(row, mask), **self.views(rgb, key)}  # image (3, S, S)

    def views(self, rgb: np.ndarray, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        """More views of the decoded image, from their own generator (the crop's draws stay as they are)."""
        return {}

    def mask(self, row: dict[str, Any], rgb: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def sample(self, row: dict[str, Any], mask: np.ndarray) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class TrainCrops(PairCrops):
    """The classifier's crops of tagged manifest rows: ``valid`` marks the image inside the crop's padding."""

    columns = ("image", "tags")

    def __init__(self, index: RowIndex, num_classes: int, cfg: AugmentConfig | ClassifierAugmentConfig, seed: int):
        super().__init__(index, cfg, seed)
        self.num_classes = num_classes

    def mask(self, row: dict[str, Any], rgb: np.ndarray) -> np.ndarray:
        return np.ones(rgb.shape[:2], np.uint8)  # padding turns it to IGNORE_INDEX

    def sample(self, row: dict[str, Any], mask: np.ndarray) -> dict[str, torch.Tensor]:
        return {"valid": torch.from_numpy(np.ascontiguousarray(mask != IGNORE_INDEX)),  # (S, S)
                "labels": torch.from_numpy(multi_hot(row["tags"], self.num_classes))}  # (K,)

    def views(self, rgb: np.ndarray, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        """With ``second_view: original``, CTC's second global view: a random-resized crop of the original image
        (bicubic, as the reference's ``RandomResizedCrop``), drawn from ``default_rng([seed, epoch, row, 1])``; its
        flip and photometric parts run on the training device (training/views.py)."""
        if getattr(self.cfg, "second_view", "crop") != "original":
            return {}
        rng = np.random.default_rng([self.seed, *key, 1])
        top, left, h, w = random_resized_box(*rgb.shape[:2], self.cfg.second_scale, self.cfg.second_ratio, rng)
        s = self.cfg.crop_size
        crop = Image.fromarray(np.ascontiguousarray(rgb[top:top + h, left:left + w])).resize((s, s), Image.BICUBIC)
        return {"second": to_tensor(np.asarray(crop))}  # (3, S, S)


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

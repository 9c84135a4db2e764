"""A ``torch.utils.data.Dataset`` over an exported pseudo-label package (``export``; layout in shards/package.py).

For people who train their own segmenter on the package with PyTorch::

    dataset = PseudoLabelDataset("data/export", split="train", transform=TrainTransform(crop_size=321))
    loader = DataLoader(dataset, batch_size=8, sampler=RowGroupSampler(dataset, seed=0), drop_last=True)
    for image, mask in loader:     # (B, 3, S, S) float normalised; (B, S, S) uint8, 255 = ignore
        loss = F.cross_entropy(model(image), mask.long(), ignore_index=dataset.ignore_index)

Opening checks the package (``shards.package.open_package``): the version, the split's shards against
``SHA256SUMS`` (a tampered or truncated file is refused, naming it) and each shard's schema version. Rows are read
lazily, one Parquet row group at a time (the last one is kept), so memory is one row group whatever the size of
the package; :class:`RowGroupSampler` shuffles row groups and rows within them, so a shuffled epoch still reads
each row group once. Transforms take and return the pair ``(image, mask)`` so that crops and flips stay aligned;
masks keep dtype uint8 and the value 255.
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from models.stem import IMAGENET_MEAN, IMAGENET_STD
from shards.images import decode_mask_png, decode_rgb
from shards.package import open_package
from shards.records import IGNORE_INDEX

PairTransform = Callable[[np.ndarray, np.ndarray], tuple[torch.Tensor, torch.Tensor]]


def to_tensors(image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W, 3) uint8 RGB, (H, W) uint8 ids -> (3, H, W) float in [0, 1], (H, W) uint8."""
    # np.array copies: decoded PIL buffers are read-only, which torch.from_numpy warns about
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0, \
        torch.from_numpy(np.array(mask, dtype=np.uint8))


class TrainTransform:
    """Random rescale, pad (image 0 after normalising, mask ``ignore_index``), random crop, random h-flip."""

    def __init__(self, crop_size: int, scale_range: tuple[float, float] = (0.5, 2.0), flip: bool = True,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 ignore_index: int = IGNORE_INDEX):
        self.crop_size, self.scale_range, self.flip, self.ignore_index = crop_size, scale_range, flip, ignore_index
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = to_tensors(image, mask)
        scale = float(torch.empty(()).uniform_(*self.scale_range))
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[2] * scale)))
        if size != tuple(image.shape[1:]):
            image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]  # (3, h, w)
            mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].to(torch.uint8)
        image = (image - self.mean) / self.std
        pad_h, pad_w = max(0, self.crop_size - size[0]), max(0, self.crop_size - size[1])
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            mask = F.pad(mask, (0, pad_w, 0, pad_h), value=self.ignore_index)
        top = int(torch.randint(0, image.shape[1] - self.crop_size + 1, ()))
        left = int(torch.randint(0, image.shape[2] - self.crop_size + 1, ()))
        image = image[:, top: top + self.crop_size, left: left + self.crop_size]
        mask = mask[top: top + self.crop_size, left: left + self.crop_size]
        if self.flip and bool(torch.rand(()) < 0.5):
            image, mask = image.flip(-1), mask.flip(-1)
        return image.contiguous(), mask.contiguous()


class PseudoLabelDataset(Dataset):
    """Rows of one split of a package: ``transform(image, mask)`` (default :func:`to_tensors`)."""

    def __init__(self, root: str | Path, split: str = "train", transform: PairTransform | None = None,
                 verify: bool = True):
        self.info, self.files = open_package(root, split, verify=verify)
        self.class_names: list[str] = list(self.info["class_names"])
        self.ignore_index: int = int(self.info["ignore_index"])
        self.transform = transform or to_tensors
        self.groups: list[tuple[int, int]] = []  # (file index, row group)
        self.starts: list[int] = []  # first dataset index of each row group
        total = 0
        for file_index, path in enumerate(self.files):
            meta = pq.ParquetFile(path).metadata
            for group in range(meta.num_row_groups):
                self.groups.append((file_index, group))
                self.starts.append(total)
                total += meta.row_group(group).num_rows
        self.length = total
        self._cached: tuple[int, list[dict]] | None = None  # (group, rows): one row group in memory

    def __len__(self) -> int:
        return self.length

    def group_rows(self, group: int) -> list[dict]:
        if self._cached is None or self._cached[0] != group:
            file_index, row_group = self.groups[group]
            table = pq.ParquetFile(self.files[file_index]).read_row_group(row_group, columns=["image_id", "image",
                                                                                             "mask"])
            self._cached = (group, table.to_pylist())
        return self._cached[1]

    def row(self, index: int) -> tuple[str, np.ndarray, np.ndarray]:
        """``(image_id, (H, W, 3) uint8 RGB, (H, W) uint8 mask)`` of dataset row ``index``, untransformed."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} rows")
        group = bisect.bisect_right(self.starts, index) - 1
        row = self.group_rows(group)[index - self.starts[group]]
        return row["image_id"], decode_rgb(row["image"]["bytes"]), decode_mask_png(row["mask"]["bytes"])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        _, image, mask = self.row(index)
        return self.transform(image, mask)


class RowGroupSampler(Sampler[int]):
    """A shuffle that reads each row group once per epoch: row groups in random order, rows shuffled within."""

    def __init__(self, dataset: PseudoLabelDataset, seed: int = 0):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        ends = [*self.dataset.starts[1:], len(self.dataset)]
        for group in torch.randperm(len(self.dataset.starts), generator=generator).tolist():
            start, end = self.dataset.starts[group], ends[group]
            yield from (start + i for i in torch.randperm(end - start, generator=generator).tolist())

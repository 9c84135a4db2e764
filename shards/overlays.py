"""Overlay PNGs of the ``refine`` stage: image | CAM heat map | pseudo mask | ground truth, one file per image.

Written to ``metrics/overlays/`` (a ``dvc plots`` image folder) for a fixed sample of images: evenly spaced over the
rows of the pseudo-label shards, so the same images are shown run after run and ``dvc plots diff`` compares like
with like. The heat map is the max over the present classes of the stored CAM, in a jet-like colour scale, blended
over the image; masks use the dataset palette (255 = ignore in the palette's ignore colour). numpy + PIL only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from shards.cams import decode_cams
from shards.images import decode_mask_png, decode_rgb, long_side_size
from shards.pseudo_labels import read_mask

GAP = 4  # px of white between panels


def jet(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8, blue (0) through green to red (1)."""
    v = np.clip(values, 0.0, 1.0)[..., None] * 4.0
    centres = np.array([3.0, 2.0, 1.0])  # red, green and blue peak at 3/4, 1/2 and 1/4
    return (np.clip(1.5 - np.abs(v - centres), 0.0, 1.0) * 255).astype(np.uint8)


def colorize(mask: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """(H, W) uint8 ids -> (H, W, 3) uint8 through the palette (missing entries are black)."""
    table = np.zeros((256, 3), np.uint8)
    entries = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)[:256]
    table[: len(entries)] = entries
    return table[mask]


def cam_heat(cams: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Max over classes of (P, h, w) CAMs, resized (bilinear) to ``size`` = (H, W); zeros when P = 0."""
    if cams.shape[0] == 0:
        return np.zeros(size, np.float32)
    top = Image.fromarray(cams.max(axis=0).astype(np.float32), mode="F")
    return np.asarray(top.resize((size[1], size[0]), Image.BILINEAR))


def side_by_side(images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None], palette: Sequence[Sequence[int]],
                 *, long_side: int = 256) -> np.ndarray:
    """RGB ``images`` (bilinear) then ``masks`` in palette colours (nearest; None: a grey panel), left to right,
    each scaled so its long side is ``long_side``, ``GAP`` px of white between them."""
    h, w = long_side_size(*images[0].shape[:2], long_side)
    panels = [np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR)) for image in images]
    panels += [np.asarray(Image.fromarray(colorize(mask, palette)).resize((w, h), Image.NEAREST)) if mask is not None
               else np.full((h, w, 3), 128, np.uint8) for mask in masks]
    canvas = np.full((h, len(panels) * (w + GAP) - GAP, 3), 255, np.uint8)
    for i, panel in enumerate(panels):
        canvas[:, i * (w + GAP): i * (w + GAP) + w] = panel
    return canvas


def overlay_panel(image: np.ndarray, heat: np.ndarray, mask: np.ndarray, gt: np.ndarray | None,
                  palette: Sequence[Sequence[int]], *, long_side: int = 256) -> np.ndarray:
    """Image | CAM heat blended over it | pseudo mask | ground truth (grey when there is none)."""
    blend = (0.5 * image + 0.5 * jet(heat)).astype(np.uint8)
    return side_by_side([image, blend], [mask, gt], palette, long_side=long_side)


def sample_rows(paths: Sequence[Path], count: int) -> list[tuple[Path, int]]:
    """``count`` (shard, row) pairs evenly spaced over the rows of ``paths`` (footers only)."""
    refs = [(path, row) for path in paths for row in range(pq.ParquetFile(path).metadata.num_rows)]
    if not refs or count <= 0:
        return []
    picks = sorted(set(np.linspace(0, len(refs) - 1, min(count, len(refs))).round().astype(int).tolist()))
    return [refs[i] for i in picks]


def write_overlays(pseudo_paths: Sequence[Path], cams_dir: Path, manifest_dir: Path, out_dir: Path, count: int,
                   palette: Sequence[Sequence[int]]) -> list[Path]:
    """Write ``count`` overlay PNGs (``<image_id>.png``) to ``out_dir``, replacing the PNGs there."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):
        old.unlink()
    written = []
    by_shard: dict[Path, list[int]] = {}
    for path, row in sample_rows(pseudo_paths, count):
        by_shard.setdefault(path, []).append(row)
    for path, rows in by_shard.items():
        pseudo = pq.ParquetFile(path).read(columns=["image_id", "image", "mask"]).take(rows).to_pylist()
        cams = pq.ParquetFile(Path(cams_dir) / path.name).read().take(rows).to_pylist()
        truth = pq.ParquetFile(Path(manifest_dir) / path.name).read(columns=["image_id", "mask"]).take(rows)
        for row, cam_row, gt_row in zip(pseudo, cams, truth.to_pylist()):
            assert row["image_id"] == cam_row["image_id"] == gt_row["image_id"], "shards out of order"
            image = decode_rgb(row["image"]["bytes"])
            gt = decode_mask_png(gt_row["mask"]["bytes"]) if gt_row["mask"] and gt_row["mask"]["bytes"] else None
            panel = overlay_panel(image, cam_heat(decode_cams(cam_row), image.shape[:2]), read_mask(row), gt,
                                  palette)
            target = out_dir / f"{row['image_id']}.png"
            Image.fromarray(panel).save(target, optimize=True)
            written.append(target)
    return written

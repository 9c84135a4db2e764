"""Synthetic pseudo-label shards for the export tests: written by the project's own writer, no classifier needed.

``write_inputs(root)`` makes ``root/pseudo_labels`` (refine's layout: ``<split>-NNNNN.parquet`` + ``index.json``
with confusion matrices), ``root/manifest/classes.json`` and ``root/metrics/pseudo_labels.json``. Images are a
mix of PNG and JPEG, 40-64 px; masks hold boxes of classes 1..3, a 255 band on their outlines and scattered 255s;
the ``boxes`` column is refine's: ``mask_boxes`` of the mask with ``BOX_MIN_PIXELS``, recorded with the
connectivity in the shards' ``boxes`` metadata as refine records it. ``write_mask_inputs(root, masks)`` writes the
same layout from hand-drawn masks.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from config.schema import ExportParams, Params
from shards.boxes import mask_boxes
from shards.images import encode_mask
from shards.io import ShardSet, atomic_write_json
from shards.metrics import ConfusionMatrix
from shards.pseudo_labels import label_score, mask_stats, pseudo_label_metrics, pseudo_label_schema
from shards.records import voc_palette

CLASS_NAMES = ["background", "disc", "box", "bar"]
PRODUCER = {"stage": "refine", "code_version": "c0de", "params_fingerprint": "f00d",
            "model_fingerprint": "classifier-fp-1234"}
SPLITS = {"train": 7, "val": 3}
BOX_MIN_PIXELS = 4  # refine's default is 16; these masks are small (40-64 px)


def synthetic_row(rng: np.random.Generator, image_id: str, split: str, index: int) -> tuple[dict, np.ndarray]:
    height, width = (int(v) for v in rng.integers(40, 65, size=2))
    truth = np.zeros((height, width), dtype=np.uint8)
    for _ in range(int(rng.integers(1, 3))):
        cls = int(rng.integers(1, len(CLASS_NAMES)))
        top, left = int(rng.integers(0, height - 12)), int(rng.integers(0, width - 12))
        truth[top: top + int(rng.integers(8, 20)), left: left + int(rng.integers(8, 20))] = cls
    mask = truth.copy()
    edges = np.zeros_like(truth, dtype=bool)
    edges[1:, :] |= truth[1:, :] != truth[:-1, :]
    edges[:, 1:] |= truth[:, 1:] != truth[:, :-1]
    mask[edges | (rng.random(truth.shape) < 0.03)] = 255  # the ignore band and scattered unsure pixels
    return mask_row(rng, image_id, split, index, mask, truth), truth


def mask_row(rng: np.random.Generator, image_id: str, split: str, index: int, mask: np.ndarray,
             truth: np.ndarray | None = None, connectivity: int = 8) -> dict:
    """A pseudo-label row of ``mask`` as refine writes it, with a random image (PNG for even ``index``, else JPEG)."""
    truth = np.where(mask == 255, 0, mask) if truth is None else truth
    height, width = mask.shape
    rgb = (rng.random((height, width, 3)) * 60 + truth[..., None] * 50).astype(np.uint8)
    buffer = io.BytesIO()
    fmt = "PNG" if index % 2 == 0 else "JPEG"
    Image.fromarray(rgb).save(buffer, format=fmt)
    ignore_fraction, pixels = mask_stats(mask, len(CLASS_NAMES))
    labels = sorted(int(v) for v in np.unique(mask) if v not in (0, 255))
    row = {"image_id": image_id, "split": split,
           "image": {"bytes": buffer.getvalue(), "path": f"{image_id}.{'png' if fmt == 'PNG' else 'jpg'}"},
           "mask": {"bytes": encode_mask(mask, voc_palette()), "path": f"{image_id}.png"},
           "labels": labels, "tag_source": "given" if index % 3 else "predicted", "provenance": "pseudo",
           "height": height, "width": width, "ignore_fraction": ignore_fraction, "pixels": pixels,
           "boxes": mask_boxes(mask, len(CLASS_NAMES), min_pixels=BOX_MIN_PIXELS, connectivity=connectivity)}
    row["confidence"] = float(rng.uniform(0.5, 1.0))
    row["label_score"] = label_score(row["confidence"], ignore_fraction)
    return row


def write_classes(manifest: Path) -> None:
    atomic_write_json(manifest / "classes.json", {"class_names": CLASS_NAMES, "palette": [list(c) for c in
                      voc_palette()], "ignore_index": 255, "source": "shapes"})


def write_mask_inputs(root: Path, masks: dict[str, list[np.ndarray]], *, connectivity: int | None = 8,
                      seed: int = 0) -> dict[str, Path]:
    """Pseudo-label shards (one per split) of hand-drawn masks, named ``<split>_NN``; ``connectivity`` None
    writes shards without the ``boxes`` metadata (as refine did before it recorded it)."""
    rng = np.random.default_rng(seed)
    pseudo, manifest = root / "pseudo_labels", root / "manifest"
    boxes = None if connectivity is None else {"min_pixels": BOX_MIN_PIXELS, "connectivity": connectivity}
    schema = pseudo_label_schema(CLASS_NAMES, voc_palette(), PRODUCER, methods=[], boxes=boxes)
    for split, split_masks in masks.items():
        rows = [mask_row(rng, f"{split}_{i:02d}", split, i, mask, connectivity=connectivity or 8)
                for i, mask in enumerate(split_masks)]
        ShardSet(pseudo).write(f"{split}-00000.parquet", pa.Table.from_pylist(rows, schema=schema),
                               fingerprint="hand-drawn", split=split, gt_images=0,
                               confusion=np.zeros((len(CLASS_NAMES),) * 2, dtype=np.int64).tolist())
    write_classes(manifest)
    return {"pseudo": pseudo, "manifest": manifest, "metrics": root / "metrics" / "pseudo_labels.json"}


def write_inputs(root: Path, rows_per_shard: int = 3, seed: int = 0) -> dict[str, Path]:
    rng = np.random.default_rng(seed)
    pseudo, manifest, metrics = root / "pseudo_labels", root / "manifest", root / "metrics" / "pseudo_labels.json"
    schema = pseudo_label_schema(CLASS_NAMES, voc_palette(), PRODUCER, methods=["par", "crf"],
                                 boxes={"min_pixels": BOX_MIN_PIXELS, "connectivity": 8})
    shards = ShardSet(pseudo)
    number = 0
    for split, count in SPLITS.items():
        for shard, start in enumerate(range(0, count, rows_per_shard)):
            rows, confusion = [], ConfusionMatrix(len(CLASS_NAMES))
            for _ in range(start, min(count, start + rows_per_shard)):
                row, truth = synthetic_row(rng, f"img_{number:03d}", split, number)
                confusion.update(truth, np.asarray(Image.open(io.BytesIO(row["mask"]["bytes"]))))
                rows.append(row)
                number += 1
            shards.write(f"{split}-{shard:05d}.parquet", pa.Table.from_pylist(rows, schema=schema),
                         fingerprint="synthetic", split=split, gt_images=len(rows),
                         confusion=confusion.matrix.tolist())
    write_classes(manifest)
    atomic_write_json(metrics, pseudo_label_metrics(pseudo, CLASS_NAMES, ["train"], ["par", "crf"]))
    return {"pseudo": pseudo, "manifest": manifest, "metrics": metrics}


def export_params(**overrides) -> Params:
    """Small shards and row groups, so that output shards and row groups cross the source shards' boundaries."""
    return Params(export=ExportParams(**{"splits": ("train", "val"), "rows_per_shard": 4, "row_group_size": 2, **overrides}))

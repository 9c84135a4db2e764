"""Pseudo-label shards (written by ``refine``; read by ``train_segmenter``, ``export`` and ``load_dataset``).

One row per image (DESIGN.md §4): ``image_id``, ``split``, ``image`` (the manifest's stored bytes, struct
bytes/path as a Hugging Face ``Image``), ``mask`` (palette PNG of class ids at the image's size: 0 background,
1..K classes, 255 ignore), ``labels`` (the class ids the mask holds), ``tag_source`` ("given" | "predicted" |
"unknown": an untagged image on which no class cleared ``dump_cams.predict_threshold``; with ``refine.no_known_class:
ignore`` its mask is all 255, with ``exclude`` it has no row), ``provenance`` ("pseudo": refined from the CAMs;
"corrected": a human correction imported with ``python -m pipeline corrections``, shards/corrections.py, which
replaces the pseudo mask), ``height``, ``width``, ``ignore_fraction`` (share of 255 pixels), ``confidence`` (see
``refine``: mean, over non-ignored pixels, of the deciding probability map's maximum), ``object_confidence`` (the
same mean over the pixels labelled with a class only; null when there is none), ``label_score`` (the per-image trust
score reviewers sort by, worst first: :func:`label_score`; 1 for a corrected mask), ``pixels`` (pixel count of every
class 0..K; 255 pixels are not counted) and ``boxes`` (per-instance boxes for detection: one per connected component
of each class in the mask, ``{label, x0, y0, x1, y1, pixels}``, 0-based with exclusive ``x1``/``y1``; see
``shards/boxes.py``).

The ``huggingface`` schema-metadata entry makes ``datasets.load_dataset("parquet", ...)`` decode ``image`` and
``mask`` as images, and ``labels`` and each box's ``label`` as class names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shards.images import decode_mask_png
from shards.io import ShardSet, dataset_metadata, with_metadata
from shards.manifest import IMAGE_TYPE, huggingface_features
from shards.metrics import ConfusionMatrix
from shards.records import IGNORE_INDEX

PSEUDO_LABEL_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("split", pa.string()),
    ("image", IMAGE_TYPE),
    ("mask", IMAGE_TYPE),
    ("labels", pa.list_(pa.int64())),  # int64: what a Hugging Face ClassLabel reads as class names
    ("tag_source", pa.string()),
    ("provenance", pa.string()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("ignore_fraction", pa.float32()),
    ("confidence", pa.float32()),
    ("object_confidence", pa.float32()),
    ("label_score", pa.float32()),
    ("pixels", pa.list_(pa.int64())),
    ("boxes", pa.list_(pa.struct([  # label int64 as in `labels`; coordinates int32 as height/width
        ("label", pa.int64()), ("x0", pa.int32()), ("y0", pa.int32()), ("x1", pa.int32()), ("y1", pa.int32()),
        ("pixels", pa.int64())]))),
])


def pseudo_label_schema(class_names: Sequence[str], palette: Sequence[Sequence[int]], producer: Mapping[str, Any],
                        *, methods: Sequence[str], ignore_index: int = IGNORE_INDEX,
                        boxes: Mapping[str, Any] | None = None) -> pa.Schema:
    """PSEUDO_LABEL_SCHEMA with our metadata; ``class_names`` includes background (index 0); ``boxes`` the params
    behind the ``boxes`` column (``min_pixels``, ``connectivity``), recorded so that ``export`` cuts its COCO regions
    the same way."""
    extra = {"boxes": dict(boxes)} if boxes is not None else {}
    meta = dataset_metadata("pseudo_labels", class_names, palette, producer, ignore_index, methods=list(methods),
                            **extra)
    value = {"dtype": "string", "_type": "Value"}
    hf = huggingface_features({
        "image_id": value,
        "split": value,
        "image": {"_type": "Image"},
        "mask": {"_type": "Image"},
        # ids 1..K index the full name list (0 = background), so ClassLabel names include background
        "labels": {"feature": {"names": list(class_names), "_type": "ClassLabel"}, "_type": "Sequence"},
        "tag_source": value,
        "provenance": value,
        "height": {"dtype": "int32", "_type": "Value"},
        "width": {"dtype": "int32", "_type": "Value"},
        "ignore_fraction": {"dtype": "float32", "_type": "Value"},
        "confidence": {"dtype": "float32", "_type": "Value"},
        "object_confidence": {"dtype": "float32", "_type": "Value"},
        "label_score": {"dtype": "float32", "_type": "Value"},
        "pixels": {"feature": {"dtype": "int64", "_type": "Value"}, "_type": "Sequence"},
        # a list of dicts is a one-element JSON list, which `datasets` (old versions and 5.x alike) reads as
        # list<struct>, the column's type; {"_type": "Sequence"} of a dict would mean a struct of lists, and
        # `datasets` drops features whose Arrow type differs from the column's (the class names would be lost)
        "boxes": [{"label": {"names": list(class_names), "_type": "ClassLabel"},
                   **{key: {"dtype": "int32", "_type": "Value"} for key in ("x0", "y0", "x1", "y1")},
                   "pixels": {"dtype": "int64", "_type": "Value"}}],
    })
    return with_metadata(PSEUDO_LABEL_SCHEMA, meta, hf)


def label_score(confidence: float, ignore_fraction: float) -> float:
    """How far a pseudo mask can be trusted, in [0, 1]: the mean max-class probability over its labelled pixels
    (``confidence``) times the labelled share of the image (``1 - ignore_fraction``). A mask is doubtful when the
    refiners were unsure where they labelled, or left much of the image unlabelled; its Spearman correlation with
    the true per-image IoU is measured by ``bench/bench_label_score.py`` (bench/RESULTS.md)."""
    return round(float(confidence) * (1.0 - float(ignore_fraction)), 4)


def mask_stats(mask: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX) -> tuple[float, list[int]]:
    """(ignore_fraction, per-class pixel counts of classes 0..num_classes-1) of a (H, W) uint8 mask."""
    counts = np.bincount(mask.ravel(), minlength=256)
    return float(counts[ignore_index] / max(mask.size, 1)), [int(v) for v in counts[:num_classes]]


def read_mask(row: Mapping[str, Any]) -> np.ndarray:
    """A row's pseudo mask as (H, W) uint8 class ids."""
    return decode_mask_png(row["mask"]["bytes"])


def pseudo_label_metrics(folder: str | Path, class_names: Sequence[str], splits: Sequence[str],
                         methods: Sequence[str] = ()) -> dict[str, Any]:
    """metrics/pseudo_labels.json over ``splits``: mIoU, coverage, precision, recall, per class (+ means).

    ``refine`` records each shard's confusion matrix against the ground truth (``confusion``, ``gt_images``)
    in the shard index, so this reads only the index and two small columns, never a mask.
    """
    folder = Path(folder)
    confusion, gt_images, stats = ConfusionMatrix(len(class_names)), 0, []
    uncorrected, gt_uncorrected, corrected, unknown = ConfusionMatrix(len(class_names)), 0, 0, 0
    for name, entry in sorted(ShardSet(folder).index().items()):
        if entry.get("split") not in splits:
            continue
        confusion.matrix += np.asarray(entry["confusion"], dtype=np.int64)
        gt_images += entry["gt_images"]
        uncorrected.matrix += np.asarray(entry.get("confusion_uncorrected", entry["confusion"]), dtype=np.int64)
        gt_uncorrected += entry.get("gt_uncorrected", entry["gt_images"])
        corrected += entry.get("corrected", 0)
        unknown += entry.get("no_known_class", 0)
        shard = pq.ParquetFile(folder / name)
        stats.append(shard.read(columns=["ignore_fraction", "confidence"] +
                                (["object_confidence"] if "object_confidence" in shard.schema_arrow.names else [])))
    table = pa.concat_tables(stats, promote_options="default") if stats else None

    def mean(column: str) -> float | None:
        if table is None or column not in table.column_names:
            return None
        values = [v for v in table[column].to_pylist() if v is not None]
        return round(float(np.mean(values)), 4) if values else None

    result = {**confusion.summary(class_names), "images": table.num_rows if table is not None else 0,
              "gt_images": gt_images, "splits": list(splits), "methods": list(methods),
              "mean_ignore_fraction": mean("ignore_fraction"), "mean_confidence": mean("confidence"),
              "mean_object_confidence": mean("object_confidence"), "no_known_class": unknown,
              "corrected_images": corrected}
    if corrected:  # the pseudo labels' own quality: over the images no human corrected
        summary = uncorrected.summary(class_names)
        result["uncorrected"] = {"miou": summary["miou"], "coverage": summary.get("coverage"),
                                 "gt_images": gt_uncorrected}
    return result

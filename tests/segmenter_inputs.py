"""Inputs of the segmenter tests: a tiny shapes manifest and pseudo-label shards in refine's format, made from its
ground truth (no classifier needed). The tiny DeepLab preset is in conftest.TINY."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from config.schema import PrepareConfig, ShapesConfig
from shards.images import decode_mask_png, encode_mask
from shards.io import ShardSet
from shards.manifest import manifest_files, read_classes
from shards.pseudo_labels import mask_stats, pseudo_label_schema
from stages import prepare, shapes


def write_manifest(root: Path, num_train: int = 16, num_val: int = 6, rows_per_shard: int = 8) -> Path:
    shapes.run(ShapesConfig(num_train=num_train, num_val=num_val, min_side=64, max_side=96), root / "shapes",
               progress=False)
    prepare.run(PrepareConfig(root=str(root / "shapes"), rows_per_shard=rows_per_shard), root / "manifest",
                progress=False)
    return root / "manifest"


def write_pseudo_labels(manifest: Path, out: Path, split: str = "train") -> Path:
    """One pseudo-label shard per manifest shard of ``split``, whose masks are the ground truth."""
    classes = read_classes(manifest)
    names, palette = classes["class_names"], classes["palette"]
    schema = pseudo_label_schema(names, palette, {"stage": "test"}, methods=[])
    for path in manifest_files(manifest, split):
        rows = []
        for row in pq.read_table(path).to_pylist():
            mask = decode_mask_png(row["mask"]["bytes"])
            ignore_fraction, pixels = mask_stats(mask, len(names))
            rows.append({"image_id": row["image_id"], "split": split, "image": row["image"],
                         "mask": {"bytes": encode_mask(mask, palette), "path": f"{row['image_id']}.png"},
                         "labels": sorted(int(v) for v in np.unique(mask) if v not in (0, 255)),
                         "tag_source": "given", "height": row["height"], "width": row["width"],
                         "ignore_fraction": ignore_fraction, "confidence": 1.0, "pixels": pixels})
        ShardSet(out).write(path.name, pa.Table.from_pylist(rows, schema=schema), fingerprint="truth", split=split)
    return out

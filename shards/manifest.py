"""The manifest: one Parquet row per accepted input image, written by ``prepare`` and read by every later stage.

Columns (DESIGN.md §4): ``image_id``, ``image`` (struct bytes/path, Hugging Face ``Image``-compatible), ``sha256``
of the stored image bytes, ``width``, ``height``, ``tags`` (foreground class ids 1..K; null = untagged),
``tag_source``, ``split``, ``mask`` (palette PNG of class ids, 255 = ignore; null = no ground truth),
``source_path`` and ``notes`` (conversions applied on the way in). The rejects table has one row per input that
could not be taken, with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa

from shards.io import dataset_metadata, read_metadata, with_metadata
from shards.records import IGNORE_INDEX

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

MANIFEST_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("image", IMAGE_TYPE),
    ("sha256", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("tags", pa.list_(pa.int16())),
    ("tag_source", pa.string()),
    ("split", pa.string()),
    ("mask", IMAGE_TYPE),
    ("source_path", pa.string()),
    ("notes", pa.string()),
])

REJECTS_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("split", pa.string()),
    ("path", pa.string()),
    ("reason", pa.string()),
])


def huggingface_features(columns: dict[str, Any]) -> dict[bytes, bytes]:
    """The ``huggingface`` schema-metadata entry that makes ``datasets`` decode image columns as images."""
    return {b"huggingface": json.dumps({"info": {"features": columns}}).encode()}


def manifest_schema(class_names: Sequence[str], palette: Sequence[Sequence[int]], producer: dict[str, Any],
                    ignore_index: int = IGNORE_INDEX) -> pa.Schema:
    meta = dataset_metadata("manifest", ["background", *class_names], palette, producer, ignore_index)
    hf = huggingface_features({
        "image_id": {"dtype": "string", "_type": "Value"},
        "image": {"_type": "Image"},
        "sha256": {"dtype": "string", "_type": "Value"},
        "width": {"dtype": "int32", "_type": "Value"},
        "height": {"dtype": "int32", "_type": "Value"},
        "tags": {"feature": {"dtype": "int16", "_type": "Value"}, "_type": "Sequence"},
        "tag_source": {"dtype": "string", "_type": "Value"},
        "split": {"dtype": "string", "_type": "Value"},
        "mask": {"_type": "Image"},
        "source_path": {"dtype": "string", "_type": "Value"},
        "notes": {"dtype": "string", "_type": "Value"},
    })
    return with_metadata(MANIFEST_SCHEMA, meta, hf)


def rejects_schema(producer: dict[str, Any]) -> pa.Schema:
    return with_metadata(REJECTS_SCHEMA, {"kind": "rejects", "producer": producer})


def manifest_files(folder: str | Path, split: str) -> list[Path]:
    """The manifest shards of one split, in order."""
    return sorted(Path(folder).glob(f"{split}-[0-9][0-9][0-9][0-9][0-9].parquet"))


def read_classes(folder: str | Path) -> dict[str, Any]:
    """``classes.json`` of a manifest folder: class names (background first), palette, ignore index."""
    path = Path(folder) / "classes.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; run the prepare stage first")
    return json.loads(path.read_text())


def shard_classes(path: str | Path) -> list[str]:
    """Class names (background first) recorded in one shard's metadata."""
    return list(read_metadata(path)["class_names"])

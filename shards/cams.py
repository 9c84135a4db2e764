"""CAM shards (written by ``dump_cams``, read by ``refine``); their threshold sweep is shards/metrics.py: ``ThresholdSweep``.

One row per image, in manifest order: ``image_id``, ``split``, ``height``/``width`` of the original image,
``cam_height``/``cam_width`` of the stored maps, ``classes`` (the P present class ids 1..K, ascending),
``scores`` (the classifier's sigmoid score of each stored class), ``tag_source`` ("given": the manifest's tags;
"predicted": an untagged row whose classes the classifier chose; "unknown": an untagged row where no class
cleared ``predict_threshold``, stored with no class), ``all_scores`` (the sigmoid score of every class 1..K),
``ood_score`` (how unlike the classifier's training images the image is, 1 = the held-out quantile; null for a
classifier without feature statistics: training/feature_stats.py), ``cams`` and ``aux_cams`` (nullable), and two
optional seed-method columns (null unless the classifier has the head):
- ``fg``: TRT's class-agnostic foreground map, fp16 (1, cam_height, cam_width) in [0, 1], multi-scale + flip as
  the CAMs (``refine`` method ``fg_prior``);
- ``affinity`` with ``aff_height``/``aff_width``: AFA's predicted affinity between the aff_height × aff_width
  tokens that cover the image at ``image_size`` (scale 1), uint8 (N, N) C-order, value = round(255·a), N =
  aff_height·aff_width (``refine`` method ``random_walk``). 1/255 steps are far finer than the walk needs and a
  quarter of fp32's bytes: ~150 kB per image at 384 px, i.e. several times a row's CAMs.

A CAM cell is the raw bytes of a C-order little-endian float16 array (P, cam_height, cam_width) holding the
normalised multi-scale CAM in [0, 1] of the present classes only: ~8 kB per class at 64 px instead of the
reference's full-resolution float32 stack of every class (~15 MB per VOC image). fp16 keeps 11 significant
bits, i.e. an absolute error below 2.5e-4 on [0, 1], far under any threshold step that matters.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

from shards.io import dataset_metadata, with_metadata
from shards.records import IGNORE_INDEX

CAM_DTYPE = np.dtype("<f2")
UNKNOWN = "unknown"  # the tag source of an untagged row on which no class clears dump_cams.predict_threshold
UNLIKE_TRAINING = 1.0  # an ood_score above this: unlike the classifier's training images (training/feature_stats.py)


def best_scores(all_scores: Sequence[float] | None, class_names: Sequence[str], count: int = 3
                ) -> list[tuple[str, float]]:
    """The ``count`` best (class name, score) pairs of a row's ``all_scores`` (classes 1..K; names include
    background at 0), best first."""
    scores = list(all_scores or [])
    order = sorted(range(len(scores)), key=lambda k: -scores[k])[:count]
    return [(class_names[k + 1], float(scores[k])) for k in order]

CAM_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("split", pa.string()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("cam_height", pa.int32()),
    ("cam_width", pa.int32()),
    ("classes", pa.list_(pa.int16())),
    ("scores", pa.list_(pa.float32())),
    ("tag_source", pa.string()),
    ("all_scores", pa.list_(pa.float32())),
    ("ood_score", pa.float32()),
    ("cams", pa.binary()),
    ("aux_cams", pa.binary()),
    ("fg", pa.binary()),
    ("affinity", pa.binary()),
    ("aff_height", pa.int32()),
    ("aff_width", pa.int32()),
])
AFFINITY_DTYPE = np.dtype("u1")


def cam_schema(class_names: Sequence[str], palette: Sequence[Sequence[int]], producer: Mapping[str, Any],
               *, scales: Sequence[float], ignore_index: int = IGNORE_INDEX) -> pa.Schema:
    """CAM_SCHEMA with our metadata; ``class_names`` includes background (index 0)."""
    meta = dataset_metadata("cams", class_names, palette, producer, ignore_index, cam_dtype="float16-le",
                            scales=list(scales))
    return with_metadata(CAM_SCHEMA, meta)


def encode_cams(cams: np.ndarray) -> bytes:
    """(P, h, w) floats in [0, 1] -> little-endian fp16 C-order bytes (values clipped to [0, 1])."""
    cams = np.asarray(cams)
    if cams.ndim != 3:
        raise ValueError(f"CAMs must be (P, h, w), got shape {cams.shape}")
    return np.ascontiguousarray(np.clip(cams, 0.0, 1.0), dtype=CAM_DTYPE).tobytes()


def decode_cams(row: Mapping[str, Any], column: str = "cams") -> np.ndarray:
    """A row's CAMs as float32 (P, cam_height, cam_width); P = len(row["classes"])."""
    data = row[column]
    if data is None:
        raise ValueError(f"{row.get('image_id')}: column {column!r} is empty (dump_cams ran with aux: false?)")
    shape = (len(row["classes"]), int(row["cam_height"]), int(row["cam_width"]))
    flat = np.frombuffer(data, dtype=CAM_DTYPE)
    if flat.size != shape[0] * shape[1] * shape[2]:
        raise ValueError(f"{row.get('image_id')}: {column} holds {flat.size} values, expected {shape}")
    return flat.reshape(shape).astype(np.float32)


def decode_fg(row: Mapping[str, Any]) -> np.ndarray | None:
    """A row's TRT foreground map as float32 (cam_height, cam_width), or None when the column is empty."""
    if row.get("fg") is None:
        return None
    flat = np.frombuffer(row["fg"], dtype=CAM_DTYPE)
    shape = (int(row["cam_height"]), int(row["cam_width"]))
    if flat.size != shape[0] * shape[1]:
        raise ValueError(f"{row.get('image_id')}: fg holds {flat.size} values, expected {shape}")
    return flat.reshape(shape).astype(np.float32)


def encode_affinity(affinity: np.ndarray) -> bytes:
    """(N, N) affinity in [0, 1] -> uint8 C-order bytes (round(255·a), clipped)."""
    affinity = np.asarray(affinity, dtype=np.float32)
    if affinity.ndim != 2 or affinity.shape[0] != affinity.shape[1]:
        raise ValueError(f"affinity must be square (N, N), got shape {affinity.shape}")
    return np.ascontiguousarray(np.rint(np.clip(affinity, 0.0, 1.0) * 255), dtype=AFFINITY_DTYPE).tobytes()


def decode_affinity(row: Mapping[str, Any]) -> tuple[np.ndarray, tuple[int, int]] | None:
    """A row's AFA affinity as float32 (N, N) in [0, 1] and its token grid, or None when the column is empty."""
    if row.get("affinity") is None:
        return None
    grid = (int(row["aff_height"]), int(row["aff_width"]))
    n = grid[0] * grid[1]
    flat = np.frombuffer(row["affinity"], dtype=AFFINITY_DTYPE)
    if flat.size != n * n:
        raise ValueError(f"{row.get('image_id')}: affinity holds {flat.size} values, expected {n}x{n} for {grid}")
    return flat.reshape(n, n).astype(np.float32) / 255.0, grid

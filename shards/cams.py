"""CAM shards (written by ``dump_cams``, read by ``refine``) and the CAM threshold sweep of their evaluation.

One row per image, in manifest order: ``image_id``, ``split``, ``height``/``width`` of the original image,
``cam_height``/``cam_width`` of the stored maps, ``classes`` (the P present class ids 1..K, ascending),
``scores`` (the classifier's sigmoid score of each stored class), ``tag_source`` ("given": the manifest's tags;
"predicted": an untagged row whose classes the classifier chose), ``cams`` and ``aux_cams`` (nullable).

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
from shards.metrics import ConfusionMatrix

CAM_DTYPE = np.dtype("<f2")

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
    ("cams", pa.binary()),
    ("aux_cams", pa.binary()),
])


def cam_schema(class_names: Sequence[str], palette: Sequence[Sequence[int]], producer: Mapping[str, Any],
               *, scales: Sequence[float], ignore_index: int = 255) -> pa.Schema:
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


class ThresholdSweep:
    """Confusion matrices of the plain rule (class if max CAM > t else background) for many t at once.

    Per pixel, with v the max CAM over present classes and c its class: the prediction is c when v > t, else 0.
    One bincount per image over (ground truth, c, number of thresholds below v) gives every threshold's matrix
    by a cumulative sum, instead of one labelling and one bincount per threshold.
    """

    def __init__(self, num_classes: int, thresholds: Sequence[float], ignore_index: int = 255):
        self.num_classes = num_classes  # background included
        self.thresholds = np.asarray(sorted(thresholds), dtype=np.float64)
        self.ignore_index = ignore_index
        self.counts = np.zeros((num_classes, num_classes, len(self.thresholds) + 1), dtype=np.int64)
        self.images = 0

    def update(self, gt: np.ndarray, value: np.ndarray, label: np.ndarray) -> None:
        """gt, value, label: (H, W); ``label`` in 0..K is the arg-max class (0 where no class is present)."""
        keep = gt != self.ignore_index
        g = gt[keep].astype(np.int64)
        c = label[keep].astype(np.int64)
        # bins[j] = how many thresholds are < v, so "v > t_j" is "bins > j"
        bins = np.searchsorted(self.thresholds, value[keep].astype(np.float64), side="left")
        n, m = self.num_classes, len(self.thresholds) + 1
        self.counts += np.bincount((g * n + c) * m + bins, minlength=n * n * m).reshape(n, n, m)
        self.images += 1

    def matrix(self, threshold: float) -> np.ndarray:
        """The (K+1, K+2) matrix of shards.metrics.ConfusionMatrix at ``threshold`` (one of the sweep's)."""
        j = int(np.flatnonzero(np.isclose(self.thresholds, threshold))[0])
        above = self.counts[:, :, j + 1:].sum(axis=2)  # (K+1, K+1): predicted c
        below = self.counts[:, :, : j + 1].sum(axis=(1, 2))  # (K+1,): predicted background
        out = np.zeros((self.num_classes, self.num_classes + 1), dtype=np.int64)
        out[:, : self.num_classes] = above
        out[:, 0] += below
        return out

    def report(self, class_names: Sequence[str], threshold: float, sweep: Sequence[float]
               ) -> tuple[dict[str, Any], list[dict[str, float]]]:
        """metrics/cams.json at ``threshold`` (+ the best of ``sweep``) and the mIoU curve over ``sweep``."""
        if self.images == 0:
            return {"miou": None, "threshold": threshold, "best_miou": None, "best_threshold": None,
                    "per_class": {}, "images": 0}, []

        def confusion(t: float) -> ConfusionMatrix:
            matrix = ConfusionMatrix(self.num_classes, self.ignore_index)
            matrix.matrix = self.matrix(t)
            return matrix

        curve = [{"threshold": float(t), "miou": round(100 * confusion(t).miou(), 2)} for t in sweep]
        best = max(curve, key=lambda point: point["miou"])
        chosen = confusion(threshold).summary(class_names)
        return {"miou": chosen["miou"], "threshold": threshold, "best_miou": best["miou"],
                "best_threshold": best["threshold"], "per_class": chosen["per_class"], "images": self.images}, curve

"""The mIoU of the field (DESIGN.md §4, METHODS.md §4), from a dataset-level confusion matrix.

Pixels whose ground truth is the ignore index (255) are left out. IoU = TP / (TP + FP + FN) per class; the mean
runs over the classes present in the ground truth (a class that never occurs in the ground truth has no IoU, even
if it is predicted; its false positives still lower the IoU of the true classes of those pixels). Predictions equal
to 255 (pseudo labels' ignore band) count as "no prediction": they are false negatives of the true class, and
``coverage`` reports the share of non-ignored ground-truth pixels that received a prediction.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from shards.records import IGNORE_INDEX


class ConfusionMatrix:
    """Accumulates ``matrix[gt, pred]`` over images; pred 255 goes into an extra "ignored" column."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes = num_classes  # background included: classes 0..num_classes-1
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes + 1), dtype=np.int64)

    def update(self, gt: np.ndarray, pred: np.ndarray) -> None:
        gt = np.asarray(gt)
        pred = np.asarray(pred)
        if gt.shape != pred.shape:
            raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
        keep = gt != self.ignore_index
        gt = gt[keep].astype(np.int64)
        pred = pred[keep].astype(np.int64)
        if gt.size and (gt.min() < 0 or gt.max() >= self.num_classes):
            raise ValueError(f"ground-truth value {int(gt.max())} outside 0..{self.num_classes - 1}")
        pred = np.where(pred == self.ignore_index, self.num_classes, pred)
        if pred.size and (pred.min() < 0 or pred.max() > self.num_classes):
            raise ValueError(f"predicted value outside 0..{self.num_classes - 1} and {self.ignore_index}")
        n = self.num_classes + 1
        self.matrix += np.bincount(gt * n + pred, minlength=self.num_classes * n).reshape(self.num_classes, n)

    def merge(self, other: "ConfusionMatrix") -> None:
        self.matrix += other.matrix

    def iou(self) -> np.ndarray:
        """Per-class IoU (NaN for classes absent from the ground truth)."""
        square = self.matrix[:, : self.num_classes]
        tp = np.diag(square).astype(np.float64)
        gt_total = self.matrix.sum(axis=1)  # includes ignored predictions: they are misses
        pred_total = square.sum(axis=0)
        union = gt_total + pred_total - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = tp / union
        iou[gt_total == 0] = np.nan
        return iou

    def miou(self) -> float:
        iou = self.iou()
        return float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan")

    def coverage(self) -> float:
        total = self.matrix.sum()
        return float(1.0 - self.matrix[:, self.num_classes].sum() / total) if total else float("nan")

    def precision_recall(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-class precision over predicted (non-ignored) pixels and recall over ground-truth pixels."""
        square = self.matrix[:, : self.num_classes]
        tp = np.diag(square).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = tp / square.sum(axis=0)
            recall = tp / self.matrix.sum(axis=1)
        return precision, recall

    def summary(self, class_names: Sequence[str]) -> dict[str, Any]:
        """Metrics in the project's JSON convention: mIoU in percent, coverage as a fraction."""
        iou = self.iou()
        precision, recall = self.precision_recall()
        names = list(class_names)
        present = ~np.isnan(iou)

        def pct(x: float) -> float | None:
            return None if np.isnan(x) else round(100.0 * float(x), 2)

        def mean(values: np.ndarray) -> float | None:  # None, not a RuntimeWarning, when every value is NaN
            values = values[present & ~np.isnan(values)]
            return pct(float(values.mean())) if values.size else None

        return {
            "miou": pct(self.miou()),
            "coverage": None if np.isnan(self.coverage()) else round(self.coverage(), 4),
            "precision": mean(precision),
            "recall": mean(recall),
            "per_class": {
                names[k]: {"iou": pct(iou[k]), "precision": pct(precision[k]), "recall": pct(recall[k])}
                for k in range(self.num_classes)
            },
        }

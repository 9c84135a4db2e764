"""The mIoU of the field (DESIGN.md §4, METHODS.md §4), from a dataset-level confusion matrix.

Pixels whose ground truth is the ignore index (255) are left out. IoU = TP / (TP + FP + FN) per class; the mean
runs over the classes present in the ground truth (a class that never occurs in the ground truth has no IoU, even
if it is predicted; its false positives still lower the IoU of the true classes of those pixels). Predictions equal
to 255 (pseudo labels' ignore band) count as "no prediction": they are false negatives of the true class, and
``coverage`` reports the share of non-ignored ground-truth pixels that received a prediction.

:class:`ThresholdSweep` is the CAM mIoU over a sweep of background thresholds, one implementation for the classifier's
periodic evaluation (training/cam_eval.py) and for the stored CAMs (``dump_cams``: metrics/cams.json).
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


# The background thresholds CAM mIoU is reported at (METHODS.md §4: the best threshold of a sweep).
SWEEP = tuple(round(t, 2) for t in np.arange(0.05, 0.96, 0.05))


class ThresholdSweep:
    """Confusion matrices of the plain rule (class if max CAM > t else background) for many t at once.

    Per pixel, with v the max CAM over present classes and c its class: the prediction is c when v > t, else 0.
    One bincount per image over (ground truth, c, number of thresholds below v) gives every threshold's matrix
    by a cumulative sum, instead of one labelling and one bincount per threshold. ``v > t`` is decided in the
    precision of ``value``, as torch's ``value > t`` (``models.pseudo.label_plain``) does: a float32 CAM is compared
    with t rounded to float32.
    """

    def __init__(self, num_classes: int, thresholds: Sequence[float], ignore_index: int = IGNORE_INDEX):
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
        v = value[keep]
        # bins[j] = how many thresholds are < v, so "v > t_j" is "bins > j"
        bins = np.searchsorted(self.thresholds.astype(v.dtype), v, side="left")
        n, m = self.num_classes, len(self.thresholds) + 1
        self.counts += np.bincount((g * n + c) * m + bins, minlength=n * n * m).reshape(n, n, m)
        self.images += 1

    def matrix(self, threshold: float) -> np.ndarray:
        """The (K+1, K+2) matrix of :class:`ConfusionMatrix` at ``threshold`` (one of the sweep's)."""
        j = int(np.flatnonzero(np.isclose(self.thresholds, threshold))[0])
        above = self.counts[:, :, j + 1:].sum(axis=2)  # (K+1, K+1): predicted c
        below = self.counts[:, :, : j + 1].sum(axis=(1, 2))  # (K+1,): predicted background
        out = np.zeros((self.num_classes, self.num_classes + 1), dtype=np.int64)
        out[:, : self.num_classes] = above
        out[:, 0] += below
        return out

    def confusion(self, threshold: float) -> ConfusionMatrix:
        matrix = ConfusionMatrix(self.num_classes, self.ignore_index)
        matrix.matrix = self.matrix(threshold)
        return matrix

    def curve(self, sweep: Sequence[float]) -> list[dict[str, float]]:
        """mIoU (percent) at each threshold of ``sweep``, in its order."""
        return [{"threshold": float(t), "miou": round(100 * self.confusion(t).miou(), 2)} for t in sweep]

    def report(self, class_names: Sequence[str], threshold: float, sweep: Sequence[float]
               ) -> tuple[dict[str, Any], list[dict[str, float]]]:
        """metrics/cams.json at ``threshold`` (+ the best of ``sweep``) and the mIoU curve over ``sweep``."""
        if self.images == 0:
            return {"miou": None, "threshold": threshold, "best_miou": None, "best_threshold": None,
                    "per_class": {}, "images": 0}, []
        curve = self.curve(sweep)
        best = max(curve, key=lambda point: point["miou"])
        chosen = self.confusion(threshold).summary(class_names)
        return {"miou": chosen["miou"], "threshold": threshold, "best_miou": best["miou"],
                "best_threshold": best["threshold"], "per_class": chosen["per_class"], "images": self.images}, curve

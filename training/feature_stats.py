"""What the classifier's training data looks like to it, and how unlike it a new image is (out-of-distribution).

When ``train_classifier`` ends it runs the trained classifier over (up to ``feature_stats.images``) training images
and stores, beside the weights, the mean and a shrunk covariance of their **pooled feature**: the mean of the final
tokens over the image's own tokens (not padding). The mean separates other kinds of pictures from the training data
more than the global max pooling the classification layer reads: real photos against a 300-image shapes training
set at 128 px gave OOD scores 1.26-2.09 with the mean and 1.14-1.58 with the max, 1 of 100 held-out shapes above 1
with either (bench/RESULTS.md §16).
A new image's distance to that distribution is the Mahalanobis distance

    d(f) = sqrt((f - mean)^T  S^-1  (f - mean)),   S = (1 - a) Cov + a (tr Cov / C) I + 1e-6 I   (a = shrinkage)

and its **OOD score** is d / t, where t is the ``feature_stats.quantile`` quantile of d over held-out images (the
val split when there is one, else the training images themselves): about ``1 - quantile`` of images like the
training data score above 1; images of classes or kinds of pictures the classifier never saw score far above it.
The shrinkage keeps S invertible and the distance stable when there are fewer images than feature dimensions.

``dump_cams`` (and so ``relabel``) stores each image's score in the CAM shards' ``ood_score`` column; a classifier
trained before this file existed has no statistics and its rows get null. The file is safetensors (tensors and
string metadata only: loading it cannot run code).

Only torch, numpy and safetensors: the GPU path imports this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file
from tqdm import tqdm

from shards.io import atomic_path

STATS_FILE = "feature_stats.safetensors"
EPS = 1e-6


def pooled_features(tokens: torch.Tensor, inside: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C) mean of a token map (B, C, h, w) over the ``inside`` (B, h, w) tokens (all when None or when an image
    has none inside)."""
    tokens = tokens.float()
    if inside is None:
        return tokens.mean(dim=(-2, -1))
    weight = (inside | ~inside.flatten(1).any(dim=1)[:, None, None]).float()[:, None]  # (B, 1, h, w)
    return (tokens * weight).sum(dim=(-2, -1)) / weight.sum(dim=(-2, -1))


@dataclass(frozen=True)
class FeatureStats:
    mean: np.ndarray  # (C,) float64
    precision: np.ndarray  # (C, C) float64: the inverse of the shrunk covariance
    threshold: float  # the held-out quantile of the distance: the OOD score's unit
    quantile: float
    images: int  # images behind mean and covariance
    held_out: int  # images behind the threshold (0: the training images themselves)
    shrinkage: float

    def distances(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """Mahalanobis distances (B,) of pooled features (B, C)."""
        f = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(features,
                                                                                                        np.float64)
        if f.ndim != 2 or f.shape[1] != self.mean.shape[0]:
            raise ValueError(f"features of shape {tuple(f.shape)} do not match the statistics' {self.mean.shape[0]} "
                             "dimensions")
        centred = f - self.mean
        return np.sqrt(np.maximum(np.einsum("bi,ij,bj->b", centred, self.precision, centred), 0.0))

    def scores(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """OOD scores (B,): distance / threshold; above 1 = unlike the training data."""
        return self.distances(features) / self.threshold


def fit_stats(train: np.ndarray, held_out: np.ndarray | None, *, quantile: float, shrinkage: float) -> FeatureStats:
    """Statistics of training features (N, C); the threshold from ``held_out`` (M, C) when given (M >= 2)."""
    x = np.asarray(train, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"feature statistics need at least 2 training images, got {len(x)}")
    mean = x.mean(axis=0)
    centred = x - mean
    cov = centred.T @ centred / (len(x) - 1)
    dims = cov.shape[0]
    cov = (1 - shrinkage) * cov + shrinkage * (np.trace(cov) / dims) * np.eye(dims) + EPS * np.eye(dims)
    precision = np.linalg.inv(cov)
    precision = (precision + precision.T) / 2
    stats = FeatureStats(mean, precision, 1.0, quantile, len(x), 0, shrinkage)
    reference = x if held_out is None or len(held_out) < 2 else np.asarray(held_out, np.float64)
    threshold = float(np.quantile(stats.distances(reference), quantile))
    if not math.isfinite(threshold) or threshold <= 0:
        raise ValueError(f"feature statistics: degenerate distance quantile {threshold} (constant features?)")
    return FeatureStats(mean, precision, threshold, quantile, len(x), 0 if reference is x else len(reference),
                        shrinkage)


def save_stats(stats: FeatureStats, folder: str | Path) -> Path:
    """``folder/feature_stats.safetensors``, written atomically."""
    path = Path(folder) / STATS_FILE
    meta = {"threshold": repr(stats.threshold), "quantile": repr(stats.quantile), "images": str(stats.images),
            "held_out": str(stats.held_out), "shrinkage": repr(stats.shrinkage),
            "feature": "mean of the final tokens over the image's tokens"}
    with atomic_path(path) as tmp:
        save_file({"mean": stats.mean, "precision": stats.precision}, tmp, metadata=meta)
    return path


def load_stats(folder: str | Path) -> FeatureStats | None:
    """The classifier's statistics, or None when it was trained without them; a damaged file is an error naming it."""
    path = Path(folder) / STATS_FILE
    if not path.is_file():
        return None
    try:
        tensors = load_file(path)
        with safe_open(path, framework="numpy") as handle:
            meta: dict[str, Any] = handle.metadata() or {}
        mean, precision = tensors["mean"].astype(np.float64), tensors["precision"].astype(np.float64)
        stats = FeatureStats(mean, precision, float(meta["threshold"]), float(meta["quantile"]), int(meta["images"]),
                             int(meta["held_out"]), float(meta["shrinkage"]))
    except (SafetensorError, KeyError, ValueError, OSError) as exc:
        raise ValueError(f"{path}: unreadable feature statistics ({exc}); train the classifier again") from exc
    if mean.ndim != 1 or precision.shape != (mean.shape[0], mean.shape[0]) or not stats.threshold > 0:
        raise ValueError(f"{path}: feature statistics of inconsistent shapes {mean.shape} / {precision.shape}")
    return stats


def collect_features(feature: Callable[[np.ndarray], np.ndarray], images: Iterable[np.ndarray], count: int,
                     progress: bool = False, desc: str = "features") -> np.ndarray:
    """Features (N, C) of ``images`` (RGB arrays), one ``feature`` call each (``labelling.cams.image_features``:
    the dump's own path, so that training and new images are measured alike)."""
    out = [feature(rgb) for rgb in tqdm(images, total=count, desc=desc, unit="img", disable=not progress,
                                        leave=False)]
    return np.stack(out).astype(np.float64) if out else np.zeros((0, 0))

"""Dense CRF refinement on CPU through `pydensecrf` (METHODS.md §2 "Dense CRF").

Used by the `refine` stage (pseudo labels from CAMs, two background thresholds) and by `evaluate` (refining a
segmenter's full probability stack). numpy + pydensecrf only, one image per call; parallelism belongs to the
caller (a process pool over shards), because each call is single-threaded C++.

Fully connected CRF of Krähenbühl & Koltun (2011): unary = -log(probability), a Gaussian (position) kernel and a
bilateral (position + colour) kernel, both with Potts compatibility, mean-field inference.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pydensecrf.densecrf as dcrf

from config.schema import CrfConfig
from shards.records import IGNORE_INDEX

PROB_FLOOR = 1e-8  # -log(0) is inf; probabilities are clipped here before the log


def _check_image(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8, C-contiguous (pydensecrf reads the raw buffer)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image must be (H, W, 3) with H, W >= 1, got {image.shape}")
    if image.dtype != np.uint8:
        # no silent rescaling: a [0, 1] float image cast to uint8 would be black and switch colour off
        raise TypeError(f"image must be uint8 RGB, got {image.dtype}")
    return np.require(image, requirements=["C", "W"])  # pydensecrf needs a writable C buffer


def _check_planes(planes: np.ndarray, image: np.ndarray, name: str) -> np.ndarray:
    planes = np.asarray(planes)
    if planes.ndim != 3 or planes.shape[1:] != image.shape[:2]:
        raise ValueError(f"{name} must be (C, H, W) with (H, W) = {image.shape[:2]}, got {planes.shape}")
    return planes


def _pairwise_crf(image: np.ndarray, num_labels: int, cfg: CrfConfig) -> dcrf.DenseCRF2D:
    """A DenseCRF2D with both pairwise kernels set up and no unary yet.

    The kernels (their permutohedral lattices) depend on the image only, and building them costs about as much
    as one 10-iteration, 3-label inference at 500x375 (bench/bench_crf.py), so callers that run several unaries
    on one image build this once.
    `inference` restarts from the current unary every call, so reuse gives bit-identical results (tested).
    """
    height, width = image.shape[:2]
    crf = dcrf.DenseCRF2D(width, height, num_labels)
    crf.addPairwiseGaussian(sxy=cfg.gauss_sxy, compat=cfg.gauss_compat)
    crf.addPairwiseBilateral(sxy=cfg.bilateral_sxy, srgb=cfg.bilateral_srgb, rgbim=image,
                             compat=cfg.bilateral_compat)
    return crf


def _infer(crf: dcrf.DenseCRF2D, probs: np.ndarray, iterations: int) -> np.ndarray:
    """Mean-field marginals (C, H, W) float32 for the unary -log(probs)."""
    num_labels, height, width = probs.shape
    unary = -np.log(np.clip(probs.reshape(num_labels, -1), PROB_FLOOR, None))  # (C, H*W)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    q = np.asarray(crf.inference(iterations), dtype=np.float32)  # (C, H*W)
    return q.reshape(num_labels, height, width)


def crf_inference(image: np.ndarray, probs: np.ndarray, cfg: CrfConfig = CrfConfig()) -> np.ndarray:
    """Refine ``probs`` (C, H, W), softmax probabilities summing to 1 over C, on ``image`` (H, W, 3) uint8.

    Returns the CRF marginals, (C, H, W) float32, summing to 1 over C.
    """
    image = _check_image(image)
    probs = _check_planes(probs, image, "probs").astype(np.float32, copy=False)
    if probs.shape[0] == 1:
        return np.ones_like(probs)  # one label: nothing to decide
    return _infer(_pairwise_crf(image, probs.shape[0], cfg), probs, cfg.iterations)


def crf_inference_runs(image: np.ndarray, runs: Sequence[np.ndarray], cfg: CrfConfig = CrfConfig()
                       ) -> list[np.ndarray]:
    """:func:`crf_inference` of several probability stacks of one image, each (C, H, W) with the same C (the
    refine chain's high and low runs): the pairwise kernels are built once and shared, which gives the same
    marginals as separate calls (``inference`` restarts from each unary) for about half the set-up cost."""
    image = _check_image(image)
    runs = [_check_planes(probs, image, "probs").astype(np.float32, copy=False) for probs in runs]
    if not runs:
        return []
    if len({probs.shape[0] for probs in runs}) != 1:
        raise ValueError(f"runs must have the same number of labels, got {[probs.shape[0] for probs in runs]}")
    if runs[0].shape[0] == 1:
        return [np.ones_like(probs) for probs in runs]  # one label: nothing to decide
    crf = _pairwise_crf(image, runs[0].shape[0], cfg)
    return [_infer(crf, probs, cfg.iterations) for probs in runs]


def crf_refine_probs(image: np.ndarray, probs: np.ndarray, cfg: CrfConfig) -> np.ndarray:
    """Plain refinement of a segmenter's full (K+1, H, W) probability stack (``evaluate.crf``'s kernels).

    Same as :func:`crf_inference`, but renormalises the input over C first
    (fp16 storage or resizing leaves sums slightly off 1). Returns (K+1, H, W) float32.
    """
    probs = np.asarray(probs, dtype=np.float32)
    probs = probs / np.maximum(probs.sum(axis=0, keepdims=True), PROB_FLOOR)  # (K+1, H, W)
    return crf_inference(image, probs, cfg)


def _softmax_with_background(cams: np.ndarray, bkg_value: float) -> np.ndarray:
    """Softmax over [constant background plane, CAMs]: (P+1, H, W) float32."""
    logits = np.concatenate([np.full((1, *cams.shape[1:]), bkg_value, np.float32), cams])  # (P+1, H, W)
    logits -= logits.max(axis=0, keepdims=True)
    expd = np.exp(logits)
    return expd / expd.sum(axis=0, keepdims=True)


def crf_two_thresholds(image: np.ndarray, cams: np.ndarray, class_ids: Sequence[int] | np.ndarray,
                       cfg: CrfConfig = CrfConfig(), high: float = 0.7, low: float = 0.25,
                       ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Pseudo labels (H, W) uint8 from the CAMs of the present classes, by two CRF runs (METHODS.md §2).

    image: (H, W, 3) uint8; cams: (P, H, W) normalised CAMs in [0, 1] of the P present classes, at image size;
    class_ids: (P,) label of each CAM plane, in 1..254. Returns labels in {0, class_ids, ignore_index}.

    Each run turns [background plane at `high` (resp. `low`), CAMs] into probabilities by a softmax over the
    planes, as the reference does (AFA/ToCo `crf_proc`: constant background score, softmax, `unary_from_softmax`)
    and as our PAR pseudo labels do. (Dividing the raw stack by its sum instead would forbid a class outright,
    unary -log(1e-8), wherever its CAM is 0, so the CRF could never grow a region past the CAM's support.)
    Softmax unaries of values in [0, 1] are weak (at most 1 nat apart), so the pairwise terms do much of the work.
    Combination as for PAR: the high run's class; where the high run says background, ignore; where both say
    background, 0. The two runs share one set of pairwise kernels (the lattices depend on the image only); one
    CRF over 2(P+1) labels would not be equivalent, since the labels of both runs would compete.
    """
    image = _check_image(image)
    cams = _check_planes(cams, image, "cams").astype(np.float32, copy=False)
    class_ids = np.asarray(class_ids, dtype=np.int64).reshape(-1)
    if class_ids.shape[0] != cams.shape[0]:
        raise ValueError(f"{cams.shape[0]} CAM planes but {class_ids.shape[0]} class ids")
    if class_ids.size and (class_ids.min() < 1 or class_ids.max() > 254 or (class_ids == ignore_index).any()):
        raise ValueError(f"class ids must lie in 1..254 and differ from ignore_index, got {class_ids.tolist()}")
    if not 0 <= low <= high <= 1:
        raise ValueError(f"need 0 <= low <= high <= 1, got low={low}, high={high}")
    height, width = image.shape[:2]
    if cams.shape[0] == 0:
        return np.zeros((height, width), np.uint8)  # no class present: both runs say background everywhere

    slot_to_label = np.concatenate([[0], class_ids]).astype(np.uint8)  # slot 0 is background
    crf = _pairwise_crf(image, cams.shape[0] + 1, cfg)
    label_high, label_low = (
        slot_to_label[_infer(crf, _softmax_with_background(cams, bkg), cfg.iterations).argmax(axis=0)]
        for bkg in (high, low))  # (H, W) each; the generator runs the two inferences one after the other
    out = np.where(label_high == 0, np.uint8(ignore_index), label_high)
    out[(label_high == 0) & (label_low == 0)] = 0
    return out

"""Per-instance boxes of a pseudo mask: the connected components of each class, for people who train detectors.

A semantic mask has no instances; the closest thing it offers is a connected region of one class, so every
component of ``mask == c`` becomes one box. Two touching objects of one class merge into one box and one object
split by the ignore band becomes two: these are pseudo boxes, as good as the mask they come from. Background (0)
and ignore (255) are never boxed; ``min_pixels`` drops the specks that thresholding CAMs leaves behind.

Boxes are 0-based pixel coordinates with exclusive ends (``x0 <= x < x1``, ``y0 <= y < y1``), so
``mask[y0:y1, x0:x1]`` is the box and ``x1 - x0`` its width; a VOC ``bndbox`` (1-based, inclusive) is
``(x0 + 1, y0 + 1, x1, y1)`` (shards/voc_xml.py writes and reads them). Pure numpy + OpenCV (``cv2.connectedComponentsWithStats``), no torch.
"""

from __future__ import annotations

from typing import Iterator

import cv2
import numpy as np

from shards.records import IGNORE_INDEX

CONNECTIVITIES = (4, 8)
BOX_KEYS = ("label", "x0", "y0", "x1", "y1", "pixels")


def class_components(mask: np.ndarray, num_classes: int, *, connectivity: int = 8,
                     ignore_index: int = IGNORE_INDEX) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """The connected components of each class 1..num_classes-1 present in a (H, W) uint8 mask, class by class.

    An iterator of ``(label, components, stats)``: ``components`` (H, W) int32, 0 outside the class and 1..n on
    its n components; ``stats`` (n, 5) int32, one row ``(x, y, width, height, pixels)`` per component. The one
    definition of "an instance" that ``boxes`` (:func:`mask_boxes`) and the COCO export (shards/coco.py) share.
    ``connectivity`` 8 joins diagonal neighbours, 4 only edge neighbours. A value that is neither a class id nor
    ``ignore_index`` is an error (raised here, not on iteration): it means the mask and the class list disagree.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"mask: expected a (H, W) uint8 array of class ids, got {mask.dtype} of shape {mask.shape}")
    if connectivity not in CONNECTIVITIES:
        raise ValueError(f"connectivity: {connectivity!r} is not one of {list(CONNECTIVITIES)}")
    counts = np.bincount(mask.ravel(), minlength=256)
    stray = [v for v in np.flatnonzero(counts).tolist() if v >= num_classes and v != ignore_index]
    if stray:
        raise ValueError(f"mask holds value(s) {stray}, neither a class id below {num_classes} nor ignore "
                         f"{ignore_index}")
    # counts[1:] starts at class 1; an ignore index inside the class range never names a class
    labels = [v + 1 for v in np.flatnonzero(counts[1:num_classes]).tolist() if v + 1 != ignore_index]
    return _components(mask, labels, connectivity)  # checked above, computed lazily, one class at a time


def _components(mask: np.ndarray, labels: list[int], connectivity: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    for label in labels:
        binary = (mask == label).astype(np.uint8)
        count, components, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=connectivity,
                                                                       ltype=cv2.CV_32S)
        yield label, components, stats[1:count, :5]  # row 0 is the binary image's background


def mask_boxes(mask: np.ndarray, num_classes: int, *, min_pixels: int = 1, connectivity: int = 8,
               ignore_index: int = IGNORE_INDEX) -> list[dict[str, int]]:
    """One box per connected component of each class 1..num_classes-1 in a (H, W) uint8 mask.

    Returns dicts ``{"label", "x0", "y0", "x1", "y1", "pixels"}`` (``x1``/``y1`` exclusive; ``pixels`` the
    component's area, not the box's), sorted by ``(label, y0, x0)``; components with fewer than ``min_pixels``
    pixels are dropped. Components and errors: :func:`class_components`.
    """
    if min_pixels < 1:
        raise ValueError(f"min_pixels: {min_pixels} is below the minimum 1")
    boxes = []
    for label, _, stats in class_components(mask, num_classes, connectivity=connectivity, ignore_index=ignore_index):
        for x, y, w, h, area in stats.tolist():
            if area >= min_pixels:
                boxes.append({"label": label, "x0": x, "y0": y, "x1": x + w, "y1": y + h, "pixels": area})
    # y1, x1, pixels only break ties: two components can share a bounding box's top-left corner
    boxes.sort(key=lambda b: (b["label"], b["y0"], b["x0"], b["y1"], b["x1"], b["pixels"]))
    return boxes

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

import cv2
import numpy as np

from shards.records import IGNORE_INDEX

CONNECTIVITIES = (4, 8)
BOX_KEYS = ("label", "x0", "y0", "x1", "y1", "pixels")


def mask_boxes(mask: np.ndarray, num_classes: int, *, min_pixels: int = 1, connectivity: int = 8,
               ignore_index: int = IGNORE_INDEX) -> list[dict[str, int]]:
    """One box per connected component of each class 1..num_classes-1 in a (H, W) uint8 mask.

    Returns dicts ``{"label", "x0", "y0", "x1", "y1", "pixels"}`` (``x1``/``y1`` exclusive; ``pixels`` the
    component's area, not the box's), sorted by ``(label, y0, x0)``; components with fewer than ``min_pixels``
    pixels are dropped. ``connectivity`` 8 joins diagonal neighbours, 4 only edge neighbours. A value that is
    neither a class id nor ``ignore_index`` is an error: it means the mask and the class list disagree.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"mask: expected a (H, W) uint8 array of class ids, got {mask.dtype} of shape {mask.shape}")
    if connectivity not in CONNECTIVITIES:
        raise ValueError(f"connectivity: {connectivity!r} is not one of {list(CONNECTIVITIES)}")
    if min_pixels < 1:
        raise ValueError(f"min_pixels: {min_pixels} is below the minimum 1")
    counts = np.bincount(mask.ravel(), minlength=256)
    stray = [v for v in np.flatnonzero(counts).tolist() if v >= num_classes and v != ignore_index]
    if stray:
        raise ValueError(f"mask holds value(s) {stray}, neither a class id below {num_classes} nor ignore "
                         f"{ignore_index}")
    boxes = []
    for label in np.flatnonzero(counts[1:num_classes]).tolist():
        label += 1  # counts[1:] starts at class 1
        if label == ignore_index:  # an ignore index inside the class range never names a class
            continue
        binary = (mask == label).astype(np.uint8)
        count, _, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=connectivity, ltype=cv2.CV_32S)
        for x, y, w, h, area in stats[1:count].tolist():  # row 0 is the binary image's background
            if area >= min_pixels:
                boxes.append({"label": label, "x0": x, "y0": y, "x1": x + w, "y1": y + h, "pixels": area})
    # y1, x1, pixels only break ties: two components can share a bounding box's top-left corner
    boxes.sort(key=lambda b: (b["label"], b["y0"], b["x0"], b["y1"], b["x1"], b["pixels"]))
    return boxes

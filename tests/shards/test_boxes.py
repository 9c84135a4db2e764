"""Per-instance boxes of a mask (shards/boxes.py) on a hand-drawn 8x10 mask whose boxes are worked out by hand."""

import numpy as np
import pytest

from shards.boxes import mask_boxes

# y\x  0    1    2    3    4    5    6    7    8    9
HAND = np.array([
    [1,   1,   0,   0,   0,   0,   0,   0,   0,   0],
    [1,   1,   0,   0,   0,   0,   2,   2,   0,   0],
    [0,   0,   1,   0,   0,   0,   2,   2,   0,   0],  # (2, 2) meets the 1-square only at a corner
    [0,   0,   0,   0,   0,   0,   1,   1,   1,   0],  # class 1 under the class-2 blob: touching, not merged
    [255, 255, 255, 255, 255, 255, 255, 255, 255, 255],  # the ignore band
    [0,   0,   0,   0,   0,   0,   0,   0,   0,   0],
    [0,   2,   0,   0,   0,   0,   0,   1,   1,   0],  # (6, 1): a 1-pixel component of class 2
    [0,   0,   0,   0,   0,   0,   0,   1,   1,   0],
], dtype=np.uint8)


def box(label, x0, y0, x1, y1, pixels):
    return {"label": label, "x0": x0, "y0": y0, "x1": x1, "y1": y1, "pixels": pixels}


SQUARE_AND_CORNER = box(1, 0, 0, 3, 3, 5)  # connectivity 8: the 2x2 square and its diagonal neighbour
SQUARE, CORNER = box(1, 0, 0, 2, 2, 4), box(1, 2, 2, 3, 3, 1)  # connectivity 4: apart
UNDER_CLASS_2 = box(1, 6, 3, 9, 4, 3)
BELOW_BAND = box(1, 7, 6, 9, 8, 4)
CLASS_2_BLOB = box(2, 6, 1, 8, 3, 4)
SPECK = box(2, 1, 6, 2, 7, 1)


def test_connectivity_8_joins_the_diagonal_and_sorts_by_label_then_position():
    boxes = mask_boxes(HAND, 3)
    assert boxes == [SQUARE_AND_CORNER, UNDER_CLASS_2, BELOW_BAND, CLASS_2_BLOB, SPECK]
    assert all(type(v) is int for b in boxes for v in b.values())  # plain ints, as pyarrow and JSON want
    for label in (1, 2):  # every pixel of a class lies in exactly one component
        assert sum(b["pixels"] for b in boxes if b["label"] == label) == int((HAND == label).sum())


def test_connectivity_4_splits_the_diagonal():
    assert mask_boxes(HAND, 3, connectivity=4) == [SQUARE, CORNER, UNDER_CLASS_2, BELOW_BAND, CLASS_2_BLOB, SPECK]


def test_min_pixels_drops_small_components_and_keeps_those_at_the_limit():
    assert mask_boxes(HAND, 3, min_pixels=2) == [SQUARE_AND_CORNER, UNDER_CLASS_2, BELOW_BAND, CLASS_2_BLOB]
    assert mask_boxes(HAND, 3, min_pixels=2, connectivity=4) == [SQUARE, UNDER_CLASS_2, BELOW_BAND, CLASS_2_BLOB]
    assert mask_boxes(HAND, 3, min_pixels=5) == [SQUARE_AND_CORNER]  # 5 pixels: kept; 4: dropped


def test_background_and_ignore_are_never_boxed():
    band_only = np.where(HAND == 255, 255, 0).astype(np.uint8)
    assert mask_boxes(band_only, 3) == []
    assert mask_boxes(np.zeros((8, 10), np.uint8), 3) == []
    assert mask_boxes(np.full((8, 10), 255, np.uint8), 3) == []
    assert mask_boxes(np.zeros((0, 0), np.uint8), 3) == []
    assert mask_boxes(np.where(HAND == 255, 7, HAND).astype(np.uint8), 3, ignore_index=7) == mask_boxes(HAND, 3)


@pytest.mark.parametrize("mask, kw, needle", [
    (HAND, {"num_classes": 2}, r"value\(s\) \[2\]"),  # class 2 is not in a 2-class (background + 1) list
    (HAND.astype(np.int64), {"num_classes": 3}, "uint8"),
    (HAND[None], {"num_classes": 3}, r"\(H, W\)"),
    (HAND, {"num_classes": 3, "connectivity": 6}, "connectivity"),
    (HAND, {"num_classes": 3, "min_pixels": 0}, "min_pixels"),
])
def test_bad_input_is_refused_with_a_clear_message(mask, kw, needle):
    with pytest.raises(ValueError, match=needle):
        mask_boxes(mask, **kw)

"""COCO RLE and annotations of pseudo masks (shards/coco.py), checked against pycocotools, the reference."""

import json

import numpy as np
import pycocotools.mask as mask_utils  # a dependency (requirements.txt): the reference our files must satisfy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shards.boxes import mask_boxes
from shards.coco import CocoWriter, counts_string, encode_rle, mask_annotations, run_lengths

# pycocotools 2.0.11 decodes through a numpy-1 style __array__; harmless, and not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def reference_rle(binary: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(binary.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


EDGE_CASES = {
    "empty": np.zeros((5, 7), bool),
    "full": np.ones((5, 7), bool),
    "first pixel only": np.pad(np.ones((1, 1), bool), ((0, 4), (0, 6))),
    "last pixel only": np.pad(np.ones((1, 1), bool), ((4, 0), (6, 0))),
    "one row": np.array([[1, 0, 1, 1, 0, 0, 1]], bool),
    "one column": np.array([[1], [1], [0], [1]], bool),
    # runs far longer than 31 and shrinking ones: multi-group numbers and negative deltas
    "long then short runs": np.pad(np.ones((300, 200), bool), ((100, 600), (7, 93))),
}


@pytest.mark.parametrize("name", sorted(EDGE_CASES))
def test_rle_matches_pycocotools_on_edge_cases(name):
    binary = EDGE_CASES[name]
    assert encode_rle(binary) == reference_rle(binary)
    np.testing.assert_array_equal(mask_utils.decode(encode_rle(binary)), binary.astype(np.uint8))


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.floats(0.0, 1.0), st.integers(0, 2**32 - 1))
def test_rle_matches_pycocotools_on_random_masks(height, width, density, seed):
    binary = np.random.default_rng(seed).random((height, width)) < density
    assert encode_rle(binary) == reference_rle(binary)


def test_run_lengths_are_column_major_zeros_first():
    binary = np.array([[1, 0], [1, 1]], bool)  # column-major: 1, 1, 0, 1
    assert run_lengths(np.flatnonzero(binary.ravel(order="F")), binary.size) == [0, 2, 1, 1]
    assert run_lengths(np.array([], np.int64), 6) == [6]
    assert counts_string([6]) == reference_rle(np.zeros((2, 3), bool))["counts"]


# y\x  0    1    2    3    4    5    6    7
HAND = np.array([
    [1,   1,   0,   0,   0,   0,   2,   2],
    [1,   1,   0,   255, 255, 0,   2,   2],
    [0,   0,   1,   0,   0,   0,   0,   0],  # (2, 2) touches the 1-square at a corner only
    [255, 255, 255, 255, 255, 255, 255, 255],  # the ignore band splits class 2 below from class 2 above
    [0,   0,   0,   0,   0,   0,   2,   0],
    [3,   0,   0,   0,   0,   0,   2,   0],
], dtype=np.uint8)


def painted(annotations: list[dict], shape: tuple[int, int]) -> np.ndarray:
    """Every annotation's decoded RLE painted with its category id (an overlap would be an error)."""
    canvas = np.zeros(shape, np.int64)
    covered = np.zeros(shape, np.int64)
    for annotation in annotations:
        region = mask_utils.decode(annotation["segmentation"]).astype(bool)
        canvas[region] = annotation["category_id"]
        covered += region
    assert covered.max() <= 1, "two annotations share a pixel"
    return canvas


@pytest.mark.parametrize("connectivity, regions", [(8, {1: 1, 2: 2, 3: 1}), (4, {1: 2, 2: 2, 3: 1})])
def test_annotations_are_the_connected_regions_and_paint_the_mask_back(connectivity, regions):
    annotations = mask_annotations(HAND, 4, connectivity=connectivity)
    counted = {}
    for annotation in annotations:
        counted[annotation["category_id"]] = counted.get(annotation["category_id"], 0) + 1
    assert counted == regions
    np.testing.assert_array_equal(painted(annotations, HAND.shape), np.where(HAND == 255, 0, HAND))
    for annotation in annotations:
        rle = {**annotation["segmentation"], "counts": annotation["segmentation"]["counts"].encode()}
        assert annotation["area"] == int(mask_utils.area(rle))
        assert annotation["bbox"] == mask_utils.toBbox(rle).astype(int).tolist()
        assert annotation["iscrowd"] == 0
    # the same regions as the boxes column, which refine cuts with the same connectivity
    boxes = [{"label": a["category_id"], "x0": a["bbox"][0], "y0": a["bbox"][1], "x1": a["bbox"][0] + a["bbox"][2],
              "y1": a["bbox"][1] + a["bbox"][3], "pixels": a["area"]} for a in annotations]
    assert boxes == mask_boxes(HAND, 4, connectivity=connectivity)


def test_no_foreground_gives_no_annotation_and_stray_values_are_refused():
    assert mask_annotations(np.where(HAND == 255, 255, 0).astype(np.uint8), 4) == []
    with pytest.raises(ValueError, match=r"value\(s\) \[3\]"):
        mask_annotations(HAND, 3)


def test_writer_numbers_entries_and_an_error_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "annotations" / "instances_train.json"
    names = ["background", "disc", "box", "bar"]
    with CocoWriter(path, names, info={"description": "test"}) as writer:
        assert writer.add_image("a.png", HAND) == 4
        assert writer.add_image("b.jpg", np.zeros((3, 2), np.uint8)) == 0
        assert writer.add_image("c.png", HAND[::-1].copy()) == 4
        writer.write()
    data = json.loads(path.read_text())
    assert [c["id"] for c in data["categories"]] == [1, 2, 3] and data["categories"][0]["name"] == "disc"
    assert [(i["id"], i["file_name"], i["width"], i["height"]) for i in data["images"]] == [
        (1, "a.png", 8, 6), (2, "b.jpg", 2, 3), (3, "c.png", 8, 6)]
    assert [a["id"] for a in data["annotations"]] == list(range(1, 9))
    assert [a["image_id"] for a in data["annotations"]] == [1] * 4 + [3] * 4
    assert data["info"]["connectivity"] == 8 and data["info"]["ignore_index"] == 255
    before = path.read_bytes()
    with pytest.raises(ValueError, match="value"), CocoWriter(path, names[:2]) as writer:
        writer.add_image("a.png", np.zeros((2, 2), np.uint8))
        writer.add_image("b.png", HAND)  # classes 2 and 3 are not in a 2-class list
        writer.write()
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match="JSON compliant"), CocoWriter(path, names) as writer:
        writer.add_image("a.png", HAND, annotation_extra={"confidence": float("nan")})  # NaN is not JSON
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left behind

"""shards/voc_xml.py: our boxes (0-based, exclusive ends) written as VOC bndboxes (1-based, inclusive) and read back."""

import xml.etree.ElementTree as ET

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from shards.boxes import mask_boxes
from shards.voc_xml import VocObject, annotation_xml, from_bndbox, read_annotation, to_bndbox


def bndbox(xml: bytes) -> list[list[int]]:
    root = ET.fromstring(xml)
    return [[int(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")] for o in root.findall("object")]


def test_the_convention_on_a_single_pixel_and_a_full_width_box():
    corner = (0, 0, 1, 1)  # the top-left pixel: mask[0:1, 0:1]
    across = (0, 2, 8, 4)  # every column of an 8-wide image, rows 2 and 3
    xml = annotation_xml("a.jpg", 6, 8, [("cat", corner), ("dog", across)])
    assert bndbox(xml) == [[1, 1, 1, 1], [1, 3, 8, 4]]
    assert to_bndbox(across) == (1, 3, 8, 4) and from_bndbox((1, 3, 8, 4)) == across
    assert [o.truncated for o in read_annotation(xml)] == [True, True]


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.data())
def test_boxes_round_trip_through_the_xml(height, width, data):
    boxes = []
    for _ in range(data.draw(st.integers(0, 4))):
        x0 = data.draw(st.integers(0, width - 1))
        y0 = data.draw(st.integers(0, height - 1))
        boxes.append((data.draw(st.sampled_from(["cat", "dog"])),
                      (x0, y0, data.draw(st.integers(x0 + 1, width)), data.draw(st.integers(y0 + 1, height)))))
    objects = read_annotation(annotation_xml("x.png", height, width, boxes))
    assert [(o.name, o.box) for o in objects] == boxes
    for o in objects:
        x0, y0, x1, y1 = o.box
        assert o.truncated == (x0 == 0 or y0 == 0 or x1 == width or y1 == height) and not o.difficult


def test_mask_boxes_survive_the_round_trip_as_the_same_pixels():
    mask = np.zeros((6, 9), np.uint8)
    mask[1:3, 2:5] = 1
    mask[4:6, 8] = 2
    mask[0, 0] = 255
    boxes = mask_boxes(mask, 3)
    xml = annotation_xml("m.png", *mask.shape, [(str(b["label"]), (b["x0"], b["y0"], b["x1"], b["y1"])) for b in boxes])
    for obj in read_annotation(xml):
        x0, y0, x1, y1 = obj.box
        region = mask[y0:y1, x0:x1]
        assert (region == int(obj.name)).all() and region.size == (mask == int(obj.name)).sum()
    assert bndbox(xml) == [[3, 2, 5, 3], [9, 5, 9, 6]]


def test_a_foreign_annotation_reads_leniently(tmp_path):
    path = tmp_path / "a.xml"
    path.write_text("<annotation><object><name> cat </name><difficult>1</difficult><part><name>head</name></part>"
                    "<bndbox><xmin>10.0</xmin><ymin>5</ymin><xmax>20</xmax><ymax>15.4</ymax></bndbox></object>"
                    "<object><name>dog</name></object>"
                    "<object><name>bird</name><bndbox><xmin>x</xmin></bndbox></object></annotation>")
    assert read_annotation(path) == [VocObject("cat", (9, 4, 20, 15), difficult=True), VocObject("dog", None),
                                     VocObject("bird", None)]

"""VOC detection annotations (``Annotations/<id>.xml``): the one writer and the one reader, one box convention.

Boxes inside the pipeline are 0-based pixel coordinates with exclusive ends, ``(x0, y0, x1, y1)`` with
``x0 <= x < x1`` and ``y0 <= y < y1``: ``mask[y0:y1, x0:x1]`` is the box and ``x1 - x0`` its width (shards/boxes.py,
synth/shapes.py). VOC's ``bndbox`` counts pixels from 1 and includes both ends: the box covers columns
``xmin..xmax`` and rows ``ymin..ymax``. So::

    xmin = x0 + 1    ymin = y0 + 1    xmax = x1    ymax = y1        (and back: x0 = xmin - 1, x1 = xmax)

A single pixel at the top-left corner is ``(0, 0, 1, 1)`` here and ``xmin = ymin = xmax = ymax = 1`` in the XML; a
box spanning an image of width W has ``x0 = 0, x1 = W`` here and ``xmin = 1, xmax = W`` there. ``truncated`` marks
boxes that touch the image border, as VOC does for objects cut by the frame. The synthetic dataset (``shapes``) and
the export package (``export``'s ``voc/``) write their annotations here; the VOC reader (shards/readers/voc.py)
reads them here.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1): 0-based, exclusive ends
BNDBOX_KEYS = ("xmin", "ymin", "xmax", "ymax")


def to_bndbox(box: Box) -> Box:
    """Our ``(x0, y0, x1, y1)`` as VOC's ``(xmin, ymin, xmax, ymax)`` (1-based, inclusive)."""
    x0, y0, x1, y1 = box
    return x0 + 1, y0 + 1, x1, y1


def from_bndbox(bndbox: Box) -> Box:
    """VOC's ``(xmin, ymin, xmax, ymax)`` (1-based, inclusive) as our ``(x0, y0, x1, y1)``."""
    xmin, ymin, xmax, ymax = bndbox
    return xmin - 1, ymin - 1, xmax, ymax


@dataclass(frozen=True)
class VocObject:
    """One ``object`` of an annotation; ``box`` is None where it has no complete numeric ``bndbox``."""

    name: str
    box: Box | None
    truncated: bool = False
    difficult: bool = False


def annotation_xml(image_file: str, height: int, width: int, objects: Iterable[tuple[str, Box]], *,
                   folder: str = "JPEGImages", segmented: bool = True) -> bytes:
    """The annotation of one image: an ``object`` per ``(class name, box)``, boxes in our convention."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = folder
    ET.SubElement(root, "filename").text = image_file
    size = ET.SubElement(root, "size")
    for key, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, key).text = str(value)
    ET.SubElement(root, "segmented").text = str(int(segmented))  # SegmentationClass/ holds the mask
    for name, box in objects:
        x0, y0, x1, y1 = box
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = name
        ET.SubElement(node, "pose").text = "Unspecified"
        ET.SubElement(node, "truncated").text = str(int(x0 == 0 or y0 == 0 or x1 == width or y1 == height))
        ET.SubElement(node, "difficult").text = "0"
        bndbox = ET.SubElement(node, "bndbox")
        for key, value in zip(BNDBOX_KEYS, to_bndbox(box)):
            ET.SubElement(bndbox, key).text = str(value)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8")


def read_annotation(source: str | os.PathLike | bytes) -> list[VocObject]:
    """The objects of an annotation file (or its bytes), boxes in our convention, in file order.

    Raises ``ET.ParseError`` / ``OSError`` for a file that cannot be read. Names are stripped ("" where missing);
    coordinates written as decimals (some exports do) are rounded; a missing or non-numeric ``bndbox`` gives
    ``box=None`` rather than an error, since tags need only the names.
    """
    root = ET.fromstring(source) if isinstance(source, bytes) else ET.parse(source).getroot()
    return [VocObject(name=(obj.findtext("name") or "").strip(), box=_box(obj.find("bndbox")),
                      truncated=_flag(obj, "truncated"), difficult=_flag(obj, "difficult"))
            for obj in root.findall("object")]


def _box(node: ET.Element | None) -> Box | None:
    if node is None:
        return None
    try:
        xmin, ymin, xmax, ymax = (round(float(node.findtext(key) or "")) for key in BNDBOX_KEYS)
    except (ValueError, OverflowError):  # not a number, nan, inf
        return None
    return from_bndbox((xmin, ymin, xmax, ymax))


def _flag(node: ET.Element, key: str) -> bool:
    return (node.findtext(key) or "0").strip() in ("1", "true", "True")

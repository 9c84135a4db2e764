"""Reader for a PASCAL VOC style tree (also the generated "shapes" dataset).

Layout under ``root``::

    JPEGImages/<id>.jpg            images (.jpg, else .jpeg / .png / .JPG / .JPEG / .PNG)
    SegmentationClass/<id>.png     ground truth, palette PNG of class ids, 255 = ignore (optional)
    ImageSets/Segmentation/<split>.txt   ids of a split (else ImageSets/Main/<split>.txt)
    Annotations/<id>.xml           object annotations, source of tags (optional; shards/voc_xml.py reads them)
    classes.txt                    class list, when it is not the 20 VOC classes (optional)

Tags (``tags_from``): ``"xml"`` object names of the XML (``difficult`` objects included); ``"file"`` a
tags CSV (``image,tags``, see :func:`shards.classes.read_tags_csv`; ``image`` is the id or a file name);
``"mask"`` the classes present in the ground truth; ``"none"`` no tags; ``"auto"`` per image: the tags
file row if there is one, else the XML if it exists, else the mask if it exists, else untagged
(``tags=None``). An explicit source missing for an image also gives ``tags=None``.

Whole-source errors (missing split list, unknown class in the tags file or in an XML) raise
:class:`DataError` when :func:`read_voc` is called, before any record is produced. Per-image problems
(missing image, unreadable XML, unsafe or duplicate id, bad mask values) become :class:`Reject` rows.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from shards.classes import VOC_CLASSES, names_to_ids, read_class_list, read_tags_csv
from shards.files import read_source_file
from shards.images import decode_mask
from shards.records import (
    IGNORE_INDEX,
    DataError,
    Reject,
    RejectError,
    SourceRecord,
    check_image_id,
    voc_palette,
)
from shards.voc_xml import read_annotation

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")  # order = preference
TAG_SOURCES = ("auto", "xml", "file", "mask", "none")
MAX_XML_BYTES = 16 * 2**20  # an annotation XML is a few kB


def voc_class_names(root: str | os.PathLike, classes_file: str | os.PathLike | None = None) -> tuple[str, ...]:
    """The class list of a VOC tree: ``classes_file`` if given, else ``root/classes.txt``, else VOC's 20."""
    if classes_file is not None:
        return read_class_list(classes_file)
    local = Path(root) / "classes.txt"
    return read_class_list(local) if local.is_file() else VOC_CLASSES


def _list_dir(folder: Path) -> dict[str, list[str]]:
    """``{stem: [file names]}`` of a folder, listed once (17k ``exists`` calls are slower on network disks)."""
    found: dict[str, list[str]] = {}
    if folder.is_dir():
        with os.scandir(folder) as entries:
            for entry in entries:
                stem = os.path.splitext(entry.name)[0]
                found.setdefault(stem, []).append(entry.name)
    return found


def _split_list(root: Path, split: str) -> tuple[Path, list[tuple[str, int]]]:
    """The ids of a split with their line numbers; Segmentation lists win over Main lists."""
    candidates = [root / "ImageSets" / "Segmentation" / f"{split}.txt", root / "ImageSets" / "Main" / f"{split}.txt"]
    for path in candidates:
        if path.is_file():
            lines = path.read_text(encoding="utf-8-sig").splitlines()
            ids = [(line.split()[0], number) for number, line in enumerate(lines, start=1) if line.strip()]
            return path, ids
    raise DataError(f"split {split!r}: no id list at {candidates[0]} (nor {candidates[1]})")


def _tags_file_ids(path: str | os.PathLike, class_names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Tags file rows keyed by image id (a file name cell like ``JPEGImages/a.jpg`` counts as id ``a``)."""
    by_id: dict[str, tuple[tuple[int, ...], int]] = {}
    for cell, (tags, line) in read_tags_csv(path, class_names).items():
        base = cell.replace("\\", "/").rsplit("/", 1)[-1]
        stem, ext = os.path.splitext(base)
        image_id = stem if ext.lower() in {e.lower() for e in IMAGE_EXTENSIONS} else base
        if image_id in by_id:
            raise DataError(f"{path}:{line}: second row for image {image_id!r} (first at line {by_id[image_id][1]})")
        by_id[image_id] = (tags, line)
    return {image_id: tags for image_id, (tags, _) in by_id.items()}


def _xml_tags(path: Path, class_names: Sequence[str]) -> tuple[int, ...] | str:
    """Class ids of an annotation XML, or the reason it cannot be read; unknown classes are a DataError."""
    try:
        objects = read_annotation(read_source_file(path, max_bytes=MAX_XML_BYTES, what="annotation XML"))
    except RejectError as exc:
        return f"{path}: {exc}"
    except (ET.ParseError, OSError, UnicodeDecodeError, ValueError) as exc:
        return f"unreadable annotation XML {path} ({exc})"
    if any(not obj.name for obj in objects):
        return f"annotation XML {path} has an object without a name"
    return names_to_ids([obj.name for obj in objects], class_names, where=str(path))


def _mask_tags(path: Path, num_classes: int) -> tuple[int, ...]:
    mask = decode_mask(path, name=str(path), size=None, num_classes=num_classes, palette=voc_palette())
    return tuple(int(v) for v in np.unique(mask) if v not in (0, IGNORE_INDEX))


def read_voc(root: str | os.PathLike, *, splits: Sequence[str] = ("train", "val"), class_names: Sequence[str],
             tags_from: str = "auto", tags_file: str | os.PathLike | None = None,
             ) -> Iterator[SourceRecord | Reject]:
    """Records of a VOC tree, split by split in list order. Validates the whole source before returning."""
    root = Path(root)
    class_names = tuple(class_names)
    if tags_from not in TAG_SOURCES:
        raise DataError(f"tags_from={tags_from!r} is not one of {list(TAG_SOURCES)}")
    if tags_from == "file" and tags_file is None:
        raise DataError("tags_from='file' needs a tags file")
    if not (root / "JPEGImages").is_dir():
        raise DataError(f"{root / 'JPEGImages'}: no such folder (not a VOC tree?)")
    lists = {split: _split_list(root, split) for split in splits}
    file_tags = _tags_file_ids(tags_file, class_names) if tags_file is not None and tags_from in ("auto", "file") \
        else {}
    images = _list_dir(root / "JPEGImages")
    masks = _list_dir(root / "SegmentationClass")
    xmls = _list_dir(root / "Annotations")

    # Decide every id's fate now, so that an XML with an unknown class stops the source before any record.
    entries: list[tuple[str, str, Reject | str]] = []  # (split, id, a Reject or the image's file name)
    seen: set[str] = set()
    xml_tags: dict[str, tuple[int, ...] | str] = {}
    for split, (list_path, ids) in lists.items():
        for image_id, line in ids:
            where = f"{list_path}:{line}"
            try:
                check_image_id(image_id)
            except RejectError as exc:
                entries.append((split, image_id, Reject(image_id, split, where, str(exc))))
                continue
            if image_id in seen:
                entries.append((split, image_id, Reject(image_id, split, where, "duplicate id")))
                continue
            seen.add(image_id)
            names = images.get(image_id, [])
            chosen = next((image_id + ext for ext in IMAGE_EXTENSIONS if image_id + ext in names), None)
            if chosen is None:
                missing = str(root / "JPEGImages" / f"{image_id}.jpg")
                entries.append((split, image_id, Reject(image_id, split, missing, "image file not found")))
                continue
            wants_xml = tags_from == "xml" or (tags_from == "auto" and image_id not in file_tags)
            if wants_xml and f"{image_id}.xml" in xmls.get(image_id, []):
                xml_tags[image_id] = _xml_tags(root / "Annotations" / f"{image_id}.xml", class_names)
            entries.append((split, image_id, chosen))
    return _records(root, entries, tags_from, file_tags, xml_tags, masks, xmls, len(class_names))


def _records(root: Path, entries, tags_from: str, file_tags, xml_tags, masks, xmls, num_classes: int,
             ) -> Iterator[SourceRecord | Reject]:
    for split, image_id, outcome in entries:
        if isinstance(outcome, Reject):
            yield outcome
            continue
        image_path = str(root / "JPEGImages" / outcome)
        mask_path = root / "SegmentationClass" / f"{image_id}.png"
        has_mask = f"{image_id}.png" in masks.get(image_id, [])
        tags, tag_source = None, "none"
        if tags_from in ("auto", "file") and image_id in file_tags:
            tags, tag_source = file_tags[image_id], "file"
        elif tags_from in ("auto", "xml") and image_id in xml_tags:
            tags, tag_source = xml_tags[image_id], "xml"
        elif tags_from in ("auto", "mask") and has_mask:
            try:
                tags, tag_source = _mask_tags(mask_path, num_classes), "mask"
            except RejectError as exc:
                yield Reject(image_id, split, str(mask_path), str(exc))
                continue
        if isinstance(tags, str):  # the XML could not be read
            yield Reject(image_id, split, str(root / "Annotations" / f"{image_id}.xml"), tags)
            continue
        xml = root / "Annotations" / f"{image_id}.xml"
        yield SourceRecord(image_id=image_id, split=split, image_path=image_path, tags=tags,
                           tag_source=tag_source, mask=str(mask_path) if has_mask else None,
                           inputs=(str(xml),) if f"{image_id}.xml" in xmls.get(image_id, []) else ())

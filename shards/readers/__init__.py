"""Dataset readers: a source name and a root in, the class list and records (or rejects) out.

``prepare.source`` picks the reader: ``voc`` and ``shapes`` (a generated VOC tree) -> :mod:`.voc`,
``coco`` -> :mod:`.coco`, ``folder`` -> :mod:`.folder`. Each reader checks the whole source (split lists,
tags files, annotation files) when it is opened, so a configuration error raises :class:`DataError`
before any image is decoded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

from shards.classes import read_class_list
from shards.readers.coco import _read_coco, coco_class_names, read_coco
from shards.readers.folder import read_folder
from shards.readers.voc import TAG_SOURCES, read_voc, voc_class_names
from shards.records import DataError, Reject, SourceRecord

SOURCES = ("shapes", "voc", "coco", "folder")
FOLDER_TAGS_FILE = "tags.csv"

__all__ = ["SOURCES", "open_source", "read_voc", "read_coco", "read_folder", "voc_class_names",
           "coco_class_names"]


def open_source(source: str, root: str | os.PathLike, *, classes_file: str | os.PathLike | None = None,
                splits: Sequence[str] = ("train", "val"), tags_from: str = "auto",
                tags_file: str | os.PathLike | None = None, max_file_bytes: int = 256 * 2**20,
                links_outside_root: bool = False,
                ) -> tuple[tuple[str, ...], Iterator[SourceRecord | Reject]]:
    """Open a dataset source: ``(class names, records)``; class ids are 1..K in that order.

    - ``voc`` / ``shapes``: classes from ``classes_file``, else ``root/classes.txt``, else the VOC 20;
      ``splits``, ``tags_from`` and ``tags_file`` as in :func:`read_voc`.
    - ``coco``: classes from ``classes_file``, else the first split's categories; default layout
      (:func:`shards.readers.coco.coco_layout`); ``tags_from`` / ``tags_file`` are not used.
    - ``folder``: one split, ``splits[0]``; classes from ``classes_file``, else ``root/classes.txt``, else
      none (``()``: untagged images, to be labelled by a classifier); tags from ``tags_file``, else
      ``root/tags.csv`` if present (``tags_from="none"`` ignores both); every other file under ``root`` is an
      image or a Reject (``max_file_bytes``, ``links_outside_root``: :func:`shards.readers.folder.read_folder`).
    """
    if tags_from not in TAG_SOURCES:
        raise DataError(f"tags_from={tags_from!r} is not one of {list(TAG_SOURCES)}")
    root = Path(root)
    if source in ("voc", "shapes"):
        class_names = voc_class_names(root, classes_file)
        return class_names, read_voc(root, splits=splits, class_names=class_names, tags_from=tags_from,
                                     tags_file=tags_file)
    if source == "coco":
        class_names = read_class_list(classes_file) if classes_file is not None else None
        return _read_coco(root, class_names=class_names, splits=splits)
    if source == "folder":
        if tags_from in ("xml", "mask"):
            raise DataError(f"tags_from={tags_from!r} is not available for a folder source (use a tags CSV)")
        local_classes = root / "classes.txt"
        class_names = read_class_list(classes_file) if classes_file is not None \
            else read_class_list(local_classes) if local_classes.is_file() else ()
        tags_csv = tags_file
        if tags_csv is None and (root / FOLDER_TAGS_FILE).is_file():
            tags_csv = root / FOLDER_TAGS_FILE
        if tags_from == "none":
            tags_csv = None
        if tags_from == "file" and tags_csv is None:
            raise DataError(f"tags_from='file' but no tags file given and no {root / FOLDER_TAGS_FILE}")
        split = splits[0] if splits else "train"
        return class_names, read_folder(root, tags_csv=tags_csv, class_names=class_names or None, split=split,
                                        max_file_bytes=max_file_bytes, links_outside_root=links_outside_root)
    raise DataError(f"prepare.source={source!r} is not one of {list(SOURCES)}")

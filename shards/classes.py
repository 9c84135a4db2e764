"""Class lists and image-level tags: reading them strictly, with errors that name the file and line.

Class id 0 is background and 255 is ignore; foreground classes are 1..K in the order of the class list.
A class name may contain spaces ("traffic light") but not ``;`` or ``|``, which separate tags.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Iterable, Sequence

from shards.records import DataError

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

BACKGROUND_NAMES = ("background", "_background_", "__background__")
# labelme's class_names.txt starts with "__ignore__" then "_background_": both are dropped when leading.
_LEADING_SKIPPED = ("__ignore__",)
_TAG_SEPARATORS = (";", "|")
_KNOWN_SHOWN = 25  # how many known class names an "unknown class" message lists


def read_class_list(path: str | os.PathLike) -> tuple[str, ...]:
    """One class name per line; blank lines and ``#`` comments skipped; a leading background line dropped.

    Raises :class:`DataError` naming ``file:line`` for a duplicate or badly formed name, and for an empty list.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read class list ({exc})") from None
    names: list[str] = []
    first_line: dict[str, int] = {}
    for number, raw in enumerate(lines, start=1):
        name = raw.split("#", 1)[0].strip()
        if not name:
            continue
        if not names and (name in _LEADING_SKIPPED or name.lower() in BACKGROUND_NAMES):
            continue
        if name.lower() in BACKGROUND_NAMES:
            raise DataError(f"{path}:{number}: background {name!r} must be the first line (it is class 0)")
        if any(sep in name for sep in _TAG_SEPARATORS):
            raise DataError(f"{path}:{number}: class name {name!r} contains a tag separator ; or |")
        if name in first_line:
            raise DataError(f"{path}:{number}: duplicate class {name!r} (first at line {first_line[name]})")
        first_line[name] = number
        names.append(name)
    if not names:
        raise DataError(f"{path}: class list is empty")
    return tuple(names)


def names_to_ids(names: Iterable[str], class_names: Sequence[str], *, where: str) -> tuple[int, ...]:
    """Class names to sorted unique ids 1..K; background names are skipped (it is implied).

    ``where`` locates the names for the error message, e.g. ``"tags.csv:17"`` or an XML path.
    """
    index = {name: number for number, name in enumerate(class_names, start=1)}
    ids = set()
    for name in names:
        if name in index:
            ids.add(index[name])
        elif name.lower() not in BACKGROUND_NAMES:
            known = ", ".join(class_names[:_KNOWN_SHOWN]) + (", ..." if len(class_names) > _KNOWN_SHOWN else "")
            raise DataError(f"{where}: unknown class {name!r} (known: {known})")
    return tuple(sorted(ids))


def split_tags(text: str) -> list[str]:
    """Split a tags cell: on ``;`` or ``|`` when present (names may then hold spaces), else on whitespace."""
    text = text.strip()
    if not text:
        return []
    for sep in _TAG_SEPARATORS:
        text = text.replace(sep, _TAG_SEPARATORS[0])
    if _TAG_SEPARATORS[0] in text:
        return [part.strip() for part in text.split(_TAG_SEPARATORS[0]) if part.strip()]
    return text.split()


_HEADER_IMAGE = ("image", "image_id", "id", "file", "filename", "file_name", "path")
_HEADER_TAGS = ("tags", "labels", "classes")


def read_tags_csv(path: str | os.PathLike, class_names: Sequence[str]) -> dict[str, tuple[tuple[int, ...], int]]:
    """Read a tags CSV (``image,tags``; the header row is optional) completely and validate it.

    Returns ``{image cell: (class ids, line number)}``. An empty tags cell means "no foreground class".
    Raises :class:`DataError` naming ``file:line`` for an unknown class, a malformed row or a duplicate image.
    """
    path = Path(path)
    rows: dict[str, tuple[tuple[int, ...], int]] = {}
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            first = True
            for row in reader:
                line = reader.line_num
                if not row or all(not cell.strip() for cell in row):
                    continue
                if first and row[0].strip().lower() in _HEADER_IMAGE and len(row) > 1 \
                        and row[1].strip().lower() in _HEADER_TAGS:
                    first = False
                    continue
                first = False
                if len(row) != 2:
                    raise DataError(f"{path}:{line}: expected 2 columns (image,tags), got {len(row)}; "
                                    "separate tags with spaces, ';' or '|', or quote the cell")
                image = row[0].strip()
                if not image:
                    raise DataError(f"{path}:{line}: empty image column")
                if image in rows:
                    raise DataError(f"{path}:{line}: duplicate row for {image!r} (first at line {rows[image][1]})")
                rows[image] = (names_to_ids(split_tags(row[1]), class_names, where=f"{path}:{line}"), line)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read tags file ({exc})") from None
    return rows

"""The common currency of the dataset readers: one record per input image, or one reject.

A reader (``shards/readers/*.py``) turns a dataset source into an iterator of :class:`SourceRecord` and
:class:`Reject`. ``prepare`` decodes each record's files; whatever cannot be taken becomes a row of the
rejects table, so every input image ends in exactly one of the manifest and the rejects table.

Errors that make the whole source unusable (an unknown class name in a tags file, a missing split list)
raise :class:`DataError` before any work, naming the file and line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

# The label of pixels no class is claimed for (VOC's convention): ground-truth outlines, the pseudo labels' uncertain
# band, crop padding. The one definition: everything else imports it (models/ takes it as an argument).
IGNORE_INDEX = 255

# An id becomes part of file names downstream: no separators, no "..", no control characters.
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}$")


class DataError(ValueError):
    """The source as a whole cannot be read; the message names the file (and line, where there is one)."""


class RejectError(ValueError):
    """One input cannot be taken; the message is the reason recorded in the rejects table."""


@dataclass(frozen=True)
class SourceRecord:
    """One input image as a reader found it, before decoding.

    ``tags`` are foreground class ids (1..K); ``None`` means the source has no tags for this image (it will
    be relabelled with predicted tags later), an empty tuple means "tagged, no foreground class".
    ``mask`` is a path to a label image (palette/grey PNG of class ids, 255 = ignore), a callable that
    returns a ``(H, W) uint8`` array of class ids (COCO renders its masks; called with ``size=(width, height)`` of
    the decoded image, which it checks before drawing), or ``None`` (no ground truth).
    """

    image_id: str
    split: str
    image_path: str
    tags: tuple[int, ...] | None
    tag_source: str  # "xml" | "file" | "mask" | "csv" | "coco" | "generated" | "none"
    mask: str | Callable[..., np.ndarray] | None = None
    inputs: tuple[str, ...] = ()  # other source files the row is made from (a VOC XML): part of its fingerprint


@dataclass(frozen=True)
class Reject:
    """An input that a reader could not take (missing file, unreadable XML, bad id...)."""

    image_id: str
    split: str
    path: str
    reason: str


def check_image_id(image_id: str) -> str:
    """Return ``image_id`` if it is safe to use in file names, else raise :class:`RejectError`."""
    if not isinstance(image_id, str) or not image_id:
        raise RejectError("empty image id")
    if "/" in image_id or "\\" in image_id:
        raise RejectError(f"image id {image_id!r} contains a path separator")
    if ".." in image_id:
        raise RejectError(f"image id {image_id!r} contains '..'")
    if not _SAFE_ID.match(image_id):
        raise RejectError(f"image id {image_id!r} has characters outside [A-Za-z0-9_.-] or is too long")
    return image_id


def voc_palette(num_entries: int = 256) -> list[tuple[int, int, int]]:
    """The PASCAL VOC colour map (bit-interleaved class index), used for every palette PNG we write.

    Entry 255 (ignore) is the VOC cream colour (224, 224, 192).
    """
    palette = []
    for index in range(num_entries):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette.append((r, g, b))
    return palette

"""COCO instance annotations of pseudo masks: ``coco/annotations/instances_<split>.json`` of the export package.

A semantic pseudo mask has no instances; as for ``boxes`` (shards/boxes.py, the same connected components and
connectivity), every connected region of one class becomes one annotation: ``segmentation`` a COCO RLE of that
region, ``bbox`` ``[x, y, width, height]`` of it, ``area`` its pixel count, ``iscrowd`` 0. Background (0) is not a
category and the ignore band (255) is in no annotation, so painting every annotation with its ``category_id`` gives
the mask back with its ignored pixels as background: read the ignored pixels from the PNG mask, not from here.
Unlike ``boxes``, no region is dropped for being small: the annotations cover every class pixel.

RLE as pycocotools writes it (``pycocotools.mask.encode``; the format is the COCO dataset's): the mask is read in
column-major order (down the first column, then the next) as alternating run lengths, zeros first (so a mask whose
first pixel is set starts with a 0 run); the runs are stored as a compact string: each run, minus the run two before
it from the third on, in 5-bit groups, least significant first, as characters 48 + group (+ 32 when another group of
the same number follows). Pure numpy, no pycocotools needed to write (tests check the bytes against it).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from shards.boxes import class_components
from shards.io import atomic_path
from shards.records import IGNORE_INDEX

COCO_DIR = "coco"
SPOOL_BYTES = 16 << 20  # entries past this many bytes per list are spooled to a temporary file, not held in memory


def coco_name(split: str) -> str:
    """The package path of a split's annotation file (the layout pycocotools' and Detectron2's examples use)."""
    return f"{COCO_DIR}/annotations/instances_{split}.json"


def run_lengths(positions: np.ndarray, size: int) -> list[int]:
    """COCO RLE counts of a binary mask of ``size`` pixels whose set pixels have the ascending column-major
    indices ``positions``: zeros, ones, zeros, ...; the trailing zero run only when it is not empty."""
    positions = np.asarray(positions, dtype=np.int64)
    if positions.size == 0:
        return [int(size)]
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1  # where a new run of ones begins
    starts = positions[np.concatenate(([0], breaks))]
    ends = positions[np.concatenate((breaks - 1, [positions.size - 1]))] + 1  # exclusive
    counts = np.empty(2 * starts.size + 1, dtype=np.int64)  # z0, o0, z1, o1, ..., o_last, z_trailing
    counts[0] = starts[0]
    counts[1::2] = ends - starts
    counts[2:-1:2] = starts[1:] - ends[:-1]
    counts[-1] = size - ends[-1]
    return counts.tolist() if counts[-1] else counts[:-1].tolist()


def counts_string(counts: Sequence[int]) -> str:
    """The compressed string form of RLE counts (see the module docstring)."""
    out = bytearray()
    for i, value in enumerate(counts):
        value = int(value) - (int(counts[i - 2]) if i > 2 else 0)  # runs two apart have similar lengths
        while True:
            group, value = value & 0x1F, value >> 5  # arithmetic shift: a negative delta ends at -1
            last = value == (-1 if group & 0x10 else 0)  # bit 4 of the last group carries the sign
            out.append(48 + group + (0 if last else 0x20))
            if last:
                break
    return out.decode("ascii")


def encode_rle(binary: np.ndarray) -> dict[str, Any]:
    """``{"size": [H, W], "counts": str}`` of a (H, W) binary mask, as ``pycocotools.mask.encode`` + ``.decode()``."""
    binary = np.asarray(binary)
    if binary.ndim != 2:
        raise ValueError(f"binary mask: expected (H, W), got shape {binary.shape}")
    positions = np.flatnonzero(binary.ravel(order="F"))  # column-major: COCO's runs go down the columns
    counts = run_lengths(positions, binary.size)
    return {"size": [int(binary.shape[0]), int(binary.shape[1])], "counts": counts_string(counts)}


def mask_annotations(mask: np.ndarray, num_classes: int, *, connectivity: int = 8,
                     ignore_index: int = IGNORE_INDEX) -> list[dict[str, Any]]:
    """One annotation per connected region of each class 1..num_classes-1 of a (H, W) uint8 mask, without ids:
    ``{"category_id", "segmentation" (RLE), "area", "bbox" [x, y, w, h], "iscrowd": 0}``, sorted by class, then
    by the region's box ``(y, x, bottom, right)``, area and first pixel (a stable order, whatever order the
    labelling algorithm numbers regions in). Mask errors: shards/boxes.py ``class_components``."""
    height, width = np.asarray(mask).shape[:2]
    keyed = []
    for label, components, stats in class_components(mask, num_classes, connectivity=connectivity,
                                                     ignore_index=ignore_index):
        flat = components.ravel(order="F")  # (H * W,) component ids in column-major order
        positions = np.flatnonzero(flat)
        ids = flat[positions]
        order = np.argsort(ids, kind="stable")  # grouped by component; ascending positions within each
        positions, ids = positions[order], ids[order]
        bounds = np.searchsorted(ids, np.arange(1, len(stats) + 2))  # component k: positions[bounds[k-1]:bounds[k]]
        for k, (x, y, w, h, area) in enumerate(stats.tolist()):
            region = positions[bounds[k]:bounds[k + 1]]
            annotation = {"category_id": label,
                          "segmentation": {"size": [height, width],
                                           "counts": counts_string(run_lengths(region, height * width))},
                          "area": area, "bbox": [x, y, w, h], "iscrowd": 0}
            keyed.append(((label, y, x, y + h, x + w, area, int(region[0])), annotation))
    keyed.sort(key=lambda item: item[0])
    return [annotation for _, annotation in keyed]


def coco_categories(class_names: Sequence[str]) -> list[dict[str, Any]]:
    """Categories 1..K from a class list whose entry 0 is background (not a category): ids are mask values."""
    return [{"id": k, "name": name, "supercategory": ""} for k, name in enumerate(class_names) if k > 0]


class CocoWriter:
    """One split's COCO instances file, streamed: :meth:`add_image` per image in order, :meth:`write` at the end
    assembles the JSON atomically. Images and annotations are numbered 1, 2, ... in the order added; they are kept
    as JSON text, in memory up to ``SPOOL_BYTES`` each and in a temporary file beyond (the folder of ``path``), so
    memory does not grow with the split. One entry per line: the file diffs and greps well."""

    def __init__(self, path: str | Path, class_names: Sequence[str], *, connectivity: int = 8,
                 ignore_index: int = IGNORE_INDEX, info: Mapping[str, Any] | None = None):
        self.path = Path(path)
        self.class_names, self.connectivity, self.ignore_index = list(class_names), connectivity, ignore_index
        self.info = {**(info or {}), "connectivity": connectivity, "ignore_index": ignore_index}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._spools = {key: tempfile.SpooledTemporaryFile(SPOOL_BYTES, mode="w+", encoding="utf-8",
                                                           dir=self.path.parent) for key in ("images", "annotations")}
        self.images = self.annotations = 0

    def __enter__(self) -> "CocoWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for spool in self._spools.values():
            spool.close()

    def _append(self, key: str, entry: Mapping[str, Any]) -> None:
        spool = self._spools[key]
        # allow_nan=False: strict JSON (NaN is not JSON, and strict readers refuse the whole file)
        spool.write((",\n" if spool.tell() else "") + json.dumps(entry, allow_nan=False))

    def add_image(self, file_name: str, mask: np.ndarray, *, image_extra: Mapping[str, Any] | None = None,
                  annotation_extra: Mapping[str, Any] | None = None) -> int:
        """Add one image and the annotations of its (H, W) uint8 pseudo mask; ``image_extra`` and
        ``annotation_extra`` are keys added to its image entry and to each of its annotations (provenance).
        Returns the number of annotations."""
        mask = np.asarray(mask)
        annotations = mask_annotations(mask, len(self.class_names), connectivity=self.connectivity,
                                       ignore_index=self.ignore_index)
        self.images += 1
        self._append("images", {"id": self.images, "file_name": file_name, "width": int(mask.shape[1]),
                                "height": int(mask.shape[0]), **(image_extra or {})})
        for annotation in annotations:
            self.annotations += 1
            self._append("annotations", {"id": self.annotations, "image_id": self.images, **annotation,
                                         **(annotation_extra or {})})
        return len(annotations)

    def write(self) -> None:
        """Write ``path`` atomically: ``info``, ``licenses``, ``categories``, ``images``, ``annotations``."""
        categories = ",\n".join(json.dumps(c) for c in coco_categories(self.class_names))
        with atomic_path(self.path) as tmp, open(tmp, "w", encoding="utf-8") as out:
            out.write(f'{{"info": {json.dumps(self.info)},\n"licenses": [],\n"categories": [\n{categories}\n],\n'
                      '"images": [\n')
            for key, tail in (("images", '\n],\n"annotations": [\n'), ("annotations", "\n]}\n")):
                self._spools[key].seek(0)
                shutil.copyfileobj(self._spools[key], out)
                out.write(tail)

"""Human corrections of pseudo masks: imported once, validated, stored as a versioned input that wins from then on.

People fix the doubtful masks in CVAT or Label Studio (from the package's VOC folder or COCO JSON) and export them
again. :func:`import_corrections` takes such an export and stores it as a correction set::

    data/corrections/<target>/            target: "dataset" (the training DAG) or a collection name
        masks/<image id>.png              the corrected mask: palette PNG of class ids, 255 = ignore
        index.json                        class names, and per image: sha256 of the mask, size, source file
        rejects.csv                       the files of the last import that were refused, with the reason

``python -m pipeline corrections`` runs it and ``dvc add``-s the folder, so a correction set is versioned like
any input. ``refine`` (and ``relabel``) replace the pseudo mask of each corrected image with it, with
``provenance: corrected``; its shards' fingerprints include the corrections of their images, so only the shards
holding a corrected image are computed again.

Accepted exports (``source``):

- **VOC PNG** ("Segmentation mask 1.1" in CVAT, or any tool writing index or colour PNGs): ``<id>.png`` files, in
  ``SegmentationClass/`` or at the top. Palette and grey PNGs are class ids; RGB PNGs are mapped through the colours
  of ``labelmap.txt`` (CVAT writes it; its names must be the class list's) or else the package palette.
- **COCO JSON** (CVAT "COCO 1.0", Label Studio "COCO"): ``annotations/*.json`` or ``*.json`` at the top;
  categories are matched by name to the class list, polygons and RLE are drawn (``shards/readers/coco.py``), and an
  image's pixels outside every annotation are background.

Refused before any work (:class:`CorrectionError`, exit 2): a class name that is not in the target's class list, a
label map of another class list, no mask file at all. Rejected per file (``rejects.csv``): an image id the target
does not have, a mask of another size than its image, a value that is no class id, an unreadable file. A later
import replaces the corrections of the images it carries and keeps the others.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from shards.files import read_source_file
from shards.images import decode_mask, decode_mask_png, encode_mask
from shards.io import atomic_write_bytes, atomic_write_json
from shards.readers.coco import CocoMask, load_coco_json, plan_split, sorted_categories
from shards.records import IGNORE_INDEX, DataError, RejectError, check_image_id

CORRECTIONS_DIR = "data/corrections"
DATASET_TARGET = "dataset"  # the training DAG's correction set
INDEX_FILE = "index.json"
REJECTS_FILE = "rejects.csv"
MASKS_DIR = "masks"
LABELMAP = "labelmap.txt"
MAX_MASK_BYTES = 256 * 2**20


class CorrectionError(DataError):
    """A correction export that cannot be taken at all; the message names the file."""


@dataclass(frozen=True)
class Target:
    """What corrections apply to: its class names (background first), palette and image sizes by id."""

    name: str
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    sizes: Mapping[str, tuple[int, int]]  # image id -> (width, height)


def set_folder(root: str | os.PathLike, target: str) -> Path:
    return Path(root) / CORRECTIONS_DIR / target


def read_index(folder: str | os.PathLike) -> dict[str, Any]:
    """A correction set's ``index.json`` (an empty one when the set does not exist)."""
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        return {"class_names": [], "images": {}}
    return json.loads(path.read_text())


def corrections_of(folder: str | os.PathLike | None, class_names: Sequence[str]) -> dict[str, str]:
    """``{image id: sha256}`` of a correction set, checked against ``class_names`` (``{}`` for none)."""
    if folder is None:
        return {}
    index = read_index(folder)
    if index["images"] and list(index["class_names"]) != list(class_names):
        raise CorrectionError(f"{Path(folder) / INDEX_FILE}: corrections of classes {index['class_names']}, the "
                              f"pseudo labels have {list(class_names)}")
    return {image_id: entry["sha256"] for image_id, entry in index["images"].items()}


def load_correction(folder: str | os.PathLike, image_id: str) -> np.ndarray:
    """The corrected mask of one image, ``(H, W) uint8`` class ids."""
    return decode_mask_png((Path(folder) / MASKS_DIR / f"{check_image_id(image_id)}.png").read_bytes())


# ------------------------------------------------------------------------------------------------ import


def _labelmap_palette(path: Path, class_names: Sequence[str]) -> list[tuple[int, int, int]]:
    """Colours by class id from a CVAT ``labelmap.txt`` (``name:r,g,b:parts:actions``); names must be ours."""
    colours: dict[str, tuple[int, int, int]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, rest = line.partition(":")
        try:
            colours[name.strip()] = tuple(int(v) for v in rest.split(":", 1)[0].split(","))  # type: ignore[assignment]
        except ValueError:
            raise CorrectionError(f"{path}:{number}: not 'name:r,g,b::'") from None
    unknown = sorted(set(colours) - set(class_names))
    if unknown:
        raise CorrectionError(f"{path}: classes {unknown} are not in the class list {list(class_names)}")
    palette = [(0, 0, 0)] * 256
    for class_id, name in enumerate(class_names):
        if name in colours:
            palette[class_id] = colours[name]
    palette[IGNORE_INDEX] = (224, 224, 192)
    return palette


def _png_files(source: Path) -> list[Path]:
    folder = source / "SegmentationClass" if (source / "SegmentationClass").is_dir() else source
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png" and not p.name.startswith("."))


def _json_files(source: Path) -> list[Path]:
    folder = source / "annotations" if (source / "annotations").is_dir() else source
    return sorted(p for p in folder.glob("*.json") if not p.name.startswith("."))


def _voc_masks(source: Path, target: Target) -> tuple[dict[str, tuple[Any, str]], list[tuple[str, str]]]:
    labelmap = next((p for p in (source / LABELMAP, source.parent / LABELMAP) if p.is_file()), None)
    palette = _labelmap_palette(labelmap, target.class_names) if labelmap else list(target.palette)
    found, rejects = {}, []
    for path in _png_files(source):
        try:
            data = read_source_file(path, max_bytes=MAX_MASK_BYTES, what="mask file")
        except RejectError as exc:
            rejects.append((str(path), str(exc)))
            continue
        found[path.stem] = ((data, palette), str(path))
    return found, rejects


def _coco_masks(files: list[Path], target: Target) -> tuple[dict[str, tuple[Any, str]], list[tuple[str, str]]]:
    index = {name: number for number, name in enumerate(target.class_names) if number}
    found, rejects = {}, []
    for path in files:
        data = load_coco_json(path)
        class_map = {}
        for category in sorted_categories(data, path):
            name = str(category.get("name"))
            if name not in index:
                raise CorrectionError(f"{path}: category {name!r} is not in the class list "
                                      f"{list(target.class_names[1:])}")
            class_map[int(category["id"])] = index[name]
        _, _, _, rows, _ = plan_split("corrections", path, data, class_map, path.parent, crowd_ignore=True)
        for image, shapes, problem in rows:
            image_id = os.path.splitext(os.path.basename(image["file_name"].replace("\\", "/")))[0]
            if problem is not None:
                rejects.append((f"{path}:{image_id}", problem))
                continue
            found[image_id] = (CocoMask(image["height"], image["width"], shapes or (), True, str(path)), str(path))
    return found, rejects


def import_corrections(source: str | os.PathLike, folder: str | os.PathLike, target: Target) -> dict[str, Any]:
    """Validate the masks of an export in ``source`` against ``target`` and store them in the set ``folder``.

    Returns ``{"imported": [...ids], "rejects": [(file, reason), ...], "total": corrected images in the set}``.
    """
    source, folder = Path(source), Path(folder)
    if not source.is_dir():
        raise CorrectionError(f"{source}: no such folder")
    json_files = _json_files(source)
    found, rejects = _coco_masks(json_files, target) if json_files else _voc_masks(source, target)
    if not found and not rejects:
        raise CorrectionError(f"{source}: no corrected masks (<id>.png in SegmentationClass/ or at the top, or a "
                              "COCO annotations/*.json)")
    index = read_index(folder)
    if index["images"] and list(index["class_names"]) != list(target.class_names):
        raise CorrectionError(f"{folder / INDEX_FILE}: an earlier import has classes {index['class_names']}, this "
                              f"target has {list(target.class_names)}")
    accepted: dict[str, tuple[bytes, str]] = {}
    for image_id, (mask_source, where) in sorted(found.items()):
        try:
            check_image_id(image_id)
            if image_id not in target.sizes:
                raise RejectError(f"image {image_id!r} is not in {target.name}")
            width, height = target.sizes[image_id]
            if callable(mask_source):
                mask = decode_mask(mask_source(size=(width, height)), name=where, size=(width, height),
                                   num_classes=len(target.class_names) - 1, palette=target.palette)
            else:
                data, palette = mask_source
                mask = decode_mask(data, name=where, size=(width, height),
                                   num_classes=len(target.class_names) - 1, palette=palette)
        except RejectError as exc:
            rejects.append((where, str(exc)))
            continue
        accepted[image_id] = (encode_mask(mask, target.palette), where)
    for image_id, (png, where) in accepted.items():  # every check passed: now write
        atomic_write_bytes(folder / MASKS_DIR / f"{image_id}.png", png)
        index["images"][image_id] = {"sha256": hashlib.sha256(png).hexdigest(), "source": os.path.basename(where),
                                     "width": target.sizes[image_id][0], "height": target.sizes[image_id][1]}
    index["class_names"] = list(target.class_names)
    index["target"] = target.name
    index["images"] = dict(sorted(index["images"].items()))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", "reason"])
    writer.writerows(rejects)
    atomic_write_bytes(folder / REJECTS_FILE, buffer.getvalue().encode())
    atomic_write_json(folder / INDEX_FILE, index)
    return {"imported": sorted(accepted), "rejects": rejects, "total": len(index["images"])}

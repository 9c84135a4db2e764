"""Reader for COCO instance annotations (``instances_*.json``), with semantic masks rendered on demand.

Default layout under ``root`` (COCO 2014 and 2017 both fit)::

    annotations/instances_<split>.json   or the one file matching annotations/instances_<split>*.json
    <name>/                              images, where <name> is the json name without "instances_"
                                         (instances_train2014.json -> train2014/), or images/<name>/

Explicit ``annotation_files`` / ``image_dirs`` (per split; relative paths are relative to ``root``)
override it.

- Classes: the ``categories`` in category-id order (category ids 1, 2, 3, 5, ... become class ids 1..K),
  unless ``class_names`` is given; then categories are matched by name.
- Image id: the file name without extension, ``/`` replaced by ``__`` (COCO_train2014_000000000009).
- Tags: the classes of all annotations of the image, crowd ones included; an image without annotations is
  tagged "background only" (``()``); a file without an ``annotations`` list (test image info) is untagged.
- Mask: a :class:`CocoMask` callable (picklable), rendered when called with the decoded image's size (a
  declared size that differs is a Reject before anything is drawn): polygons through PIL, RLE (counts list or
  COCO's compressed string) decoded here. Overlaps: the larger class id wins. Crowd regions are
  255 (ignore, the VOC convention for regions whose pixels are not reliably labelled) unless a non-crowd
  instance covers them; ``crowd_ignore=False`` paints them with their class instead.

Whole-file problems (unreadable JSON, an entry that is not an object, a missing or non-integer id / size, an
annotation for an unknown image or category) raise :class:`DataError` before any record, naming the file, the
entry (``annotations[12]``) and the key; per-image ones (missing file, unsafe or duplicate id, a segmentation
that is not polygons of numbers or a well-formed RLE) are Rejects naming the annotation; an RLE string that
decodes to runs not covering the image makes the mask callable raise :class:`RejectError`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from shards.records import IGNORE_INDEX, DataError, Reject, RejectError, SourceRecord, check_image_id

_RLE_BITS = 5  # compressed RLE: 5 data bits per character, then a continuation bit (0x20), offset 48
_RLE_OFFSET = 48


def decode_rle_string(counts: str) -> list[int]:
    """COCO's compressed RLE string to the run lengths (LEB128-like, 5 bits a character, sign bit 0x10).

    From the fourth run on, each value is stored as the difference to the run two before (same colour).
    """
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(counts):
                raise RejectError("compressed RLE ends in the middle of a number")
            char = ord(counts[position]) - _RLE_OFFSET
            value |= (char & 0x1F) << shift
            more = bool(char & 0x20)
            position += 1
            shift += _RLE_BITS
            if not more and char & 0x10:
                value -= 1 << shift  # sign-extend the last group
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def rle_to_mask(counts: Sequence[int], height: int, width: int) -> np.ndarray:
    """Run lengths (first run = zeros, column-major order) to a ``(H, W)`` bool array."""
    runs = np.asarray(counts, dtype=np.int64)
    if runs.size and runs.min() < 0:
        raise RejectError("RLE has a negative run length")
    if runs.size and runs.max() > height * width:  # also keeps the sum below from overflowing
        raise RejectError(f"RLE has a run of {int(runs.max())} pixels, the image has {height}x{width}")
    if int(runs.sum()) != height * width:
        raise RejectError(f"RLE covers {int(runs.sum())} pixels, the image has {height}x{width}")
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True
    return np.repeat(values, runs).reshape(width, height).T  # column-major: (W, H) -> (H, W)


def _region(segmentation, height: int, width: int) -> np.ndarray:
    """One annotation's segmentation (polygons or RLE) as a ``(H, W)`` bool array (empty for none)."""
    if segmentation is None:  # a box-only annotation: it tags the image but paints nothing
        return np.zeros((height, width), dtype=bool)
    if isinstance(segmentation, list):
        canvas = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(canvas)
        for polygon in segmentation:
            if len(polygon) >= 6:
                # COCO vertices are continuous coordinates (pixel i spans [i, i+1]); PIL's are pixel centres.
                points = [(float(x) - 0.5, float(y) - 0.5) for x, y in zip(polygon[0::2], polygon[1::2])]
                draw.polygon(points, fill=1)
        return np.asarray(canvas, dtype=bool)
    if isinstance(segmentation, dict) and "counts" in segmentation:
        rle_height, rle_width = (int(v) for v in segmentation.get("size", (height, width)))
        if (rle_height, rle_width) != (height, width):
            raise RejectError(f"RLE size {rle_width}x{rle_height} differs from image {width}x{height}")
        counts = segmentation["counts"]
        runs = decode_rle_string(counts.decode() if isinstance(counts, bytes) else counts) \
            if isinstance(counts, (str, bytes)) else counts
        return rle_to_mask(runs, height, width)
    raise RejectError(f"unsupported segmentation of type {type(segmentation).__name__}")


@dataclass(frozen=True, eq=False)
class CocoMask:
    """Renders the semantic mask of one COCO image when called: ``(H, W) uint8`` class ids."""

    height: int
    width: int
    shapes: tuple  # ((class id, iscrowd, segmentation, annotation index), ...) in annotation order
    crowd_ignore: bool = True
    where: str = ""  # the annotation file, for messages

    def __call__(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """The mask; ``size`` (the decoded image's ``(width, height)``) is checked before anything is drawn."""
        if size is not None and tuple(size) != (self.width, self.height):
            raise RejectError(f"{self.where}: the image entry declares {self.width}x{self.height}, the image file "
                              f"is {size[0]}x{size[1]}")
        mask = np.zeros((self.height, self.width), dtype=np.uint8)
        crowd = [s for s in self.shapes if s[1]] if self.crowd_ignore else []
        ordered = sorted((s for s in self.shapes if not (self.crowd_ignore and s[1])), key=lambda s: s[0])
        # Crowds are painted first: any single instance wins over a crowd. Then by class id (a stable sort):
        # larger class ids are painted last, so they win.
        for class_id, crowd_flag, segmentation, index in [*crowd, *ordered]:
            try:
                region = _region(segmentation, self.height, self.width)
            except RejectError as exc:
                raise RejectError(f"{self.where}: annotations[{index}].segmentation: {exc}") from None
            except (ValueError, TypeError, OverflowError) as exc:
                raise RejectError(f"{self.where}: annotations[{index}].segmentation is malformed "
                                  f"({type(exc).__name__}: {exc})") from None
            mask[region] = IGNORE_INDEX if self.crowd_ignore and crowd_flag else class_id
        return mask


def segmentation_problem(segmentation) -> str | None:
    """Why a COCO ``segmentation`` value cannot be drawn (checked when the file is read), or ``None``."""
    if segmentation is None:
        return None
    if isinstance(segmentation, list):
        for number, polygon in enumerate(segmentation):
            if not isinstance(polygon, list):
                return f"polygon {number} is a {type(polygon).__name__}, not a list of coordinates"
            bad = next((v for v in polygon if isinstance(v, bool) or not isinstance(v, (int, float))
                        or not math.isfinite(v)), _NONE)
            if bad is not _NONE:
                return f"polygon {number} has a non-numeric or infinite coordinate {bad!r}"
            if len(polygon) % 2:
                return f"polygon {number} has an odd number of coordinates ({len(polygon)})"
        return None
    if isinstance(segmentation, dict) and "counts" in segmentation:
        size, counts = segmentation.get("size"), segmentation["counts"]
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
            return f"RLE 'size' must be [height, width] of positive integers, not {size!r}"
        if isinstance(counts, list):
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
                return "RLE 'counts' list must hold non-negative integers"
        elif not isinstance(counts, str):
            return f"RLE 'counts' is a {type(counts).__name__}, not a string or a list"
        return None
    return f"unsupported segmentation of type {type(segmentation).__name__}"


_NONE = object()


def load_coco_json(path: Path) -> dict:
    try:
        with path.open(encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read COCO annotations ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: not a COCO annotation file (no 'images' list)")
    return data


def sorted_categories(data: dict, path: Path) -> list[dict]:
    categories = data.get("categories")
    if not isinstance(categories, list) or not categories:
        raise DataError(f"{path}: no 'categories' list")
    try:
        return sorted(categories, key=lambda c: int(c["id"]))
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{path}: a category without an integer 'id'") from None


def coco_class_names(annotation_file: str | os.PathLike) -> tuple[str, ...]:
    """Class names of a COCO annotation file, in category-id order."""
    path = Path(annotation_file)
    return tuple(str(c["name"]) for c in sorted_categories(load_coco_json(path), path))


def coco_layout(root: str | os.PathLike, splits: Sequence[str]) -> tuple[dict[str, Path], dict[str, Path]]:
    """The default annotation file and image folder of each split (see the module docstring)."""
    root = Path(root)
    annotation_files, image_dirs = {}, {}
    for split in splits:
        exact = root / "annotations" / f"instances_{split}.json"
        matches = [exact] if exact.is_file() else sorted((root / "annotations").glob(f"instances_{split}*.json"))
        if len(matches) != 1:
            found = ", ".join(m.name for m in matches) or "none"
            raise DataError(f"split {split!r}: expected one {root / 'annotations'}/instances_{split}*.json, "
                            f"found {found}; pass annotation_files explicitly")
        annotation_files[split] = matches[0]
        image_dirs[split] = _default_image_dir(root, matches[0])
    return annotation_files, image_dirs


def _default_image_dir(root: Path, annotation_file: Path) -> Path:
    name = annotation_file.stem.removeprefix("instances_")
    for candidate in (root / name, root / "images" / name):
        if candidate.is_dir():
            return candidate
    raise DataError(f"{annotation_file}: no image folder {root / name} (nor {root / 'images' / name})")


def _class_map(data: dict, path: Path, class_names: tuple[str, ...]) -> dict[int, int]:
    """Category id -> class id 1..K, by name into ``class_names``."""
    index = {name: number for number, name in enumerate(class_names, start=1)}
    mapping = {}
    for category in sorted_categories(data, path):
        name = str(category.get("name"))
        if name not in index:
            raise DataError(f"{path}: category {name!r} (id {category['id']}) is not in the class list")
        mapping[int(category["id"])] = index[name]
    return mapping


def _read_coco(root: str | os.PathLike, *, annotation_files: Mapping[str, str | os.PathLike] | None = None,
               image_dirs: Mapping[str, str | os.PathLike] | None = None, class_names: Sequence[str] | None = None,
               splits: Sequence[str] = ("train", "val"), crowd_ignore: bool = True,
               ) -> tuple[tuple[str, ...], Iterator[SourceRecord | Reject]]:
    root = Path(root)
    if annotation_files is None:
        annotation_files, default_dirs = coco_layout(root, splits)
        image_dirs = image_dirs or default_dirs
    files = {split: root / path for split, path in annotation_files.items()}
    dirs = {split: root / path for split, path in (image_dirs or {}).items()}
    loaded = {}
    for split, path in files.items():  # everything is loaded and checked before the first record
        data = load_coco_json(path)
        if class_names is None:
            class_names = tuple(str(c["name"]) for c in sorted_categories(data, path))
        loaded[split] = (path, data, _class_map(data, path, tuple(class_names)),
                         dirs[split] if split in dirs else _default_image_dir(root, path))
    plans = [plan_split(split, *loaded[split], crowd_ignore=crowd_ignore) for split in loaded]
    return tuple(class_names or ()), _records(plans)


def read_coco(root: str | os.PathLike, *, annotation_files: Mapping[str, str | os.PathLike] | None = None,
              image_dirs: Mapping[str, str | os.PathLike] | None = None, class_names: Sequence[str] | None = None,
              splits: Sequence[str] = ("train", "val"), crowd_ignore: bool = True,
              ) -> Iterator[SourceRecord | Reject]:
    """Records of COCO instance files; ``annotation_files=None`` takes :func:`coco_layout` for ``splits``."""
    return _read_coco(root, annotation_files=annotation_files, image_dirs=image_dirs, class_names=class_names,
                      splits=splits, crowd_ignore=crowd_ignore)[1]


def plan_split(split: str, path: Path, data: dict, class_map: dict[int, int], image_dir: Path, *,
                crowd_ignore: bool) -> tuple:
    """Validate one file and group its annotations by image: ``(split, image_dir, [(image, shapes, problem)])``.

    A structural error (an entry that is not an object, a missing or non-integer id, an unknown image or category)
    is a :class:`DataError` naming the file, the entry and the key; a segmentation that cannot be drawn makes its
    image a Reject (``problem``).
    """
    images: dict[int, dict] = {}
    for number, image in enumerate(data["images"]):
        if not isinstance(image, dict):
            raise DataError(f"{path}: images[{number}] is a {type(image).__name__}, not an object")
        for key in ("id", "height", "width"):
            value = image.get(key)
            if key != "id" and isinstance(value, float) and value.is_integer():
                image = {**image, key: int(value)}  # some exporters write 480.0
            elif not _is_int(value):
                raise DataError(f"{path}: images[{number}].{key} is {value!r}, not an integer")
        if not isinstance(image.get("file_name"), str) or not image["file_name"]:
            raise DataError(f"{path}: images[{number}].file_name is {image.get('file_name')!r}, not a file name")
        if image["id"] in images:
            raise DataError(f"{path}: images[{number}]: image id {image['id']} appears twice")
        images[image["id"]] = image
    annotations = data.get("annotations")
    if annotations is not None and not isinstance(annotations, list):
        raise DataError(f"{path}: 'annotations' is a {type(annotations).__name__}, not a list")
    shapes: dict[int, list] | None = None if annotations is None else {key: [] for key in images}
    problems: dict[int, str] = {}
    for number, annotation in enumerate(annotations or []):
        if not isinstance(annotation, dict):
            raise DataError(f"{path}: annotations[{number}] is a {type(annotation).__name__}, not an object")
        image_key, category = annotation.get("image_id"), annotation.get("category_id")
        if not _is_int(image_key) or image_key not in images:
            raise DataError(f"{path}: annotations[{number}].image_id refers to unknown image id {image_key!r}")
        if not _is_int(category) or category not in class_map:
            raise DataError(f"{path}: annotations[{number}].category_id refers to unknown category id {category!r}")
        segmentation = annotation.get("segmentation")
        problem = segmentation_problem(segmentation)
        if problem is not None:
            problems.setdefault(image_key, f"{path}: annotations[{number}].segmentation: {problem}")
        shapes[image_key].append((class_map[category], bool(annotation.get("iscrowd", 0)), segmentation, number))
    rows = [(image, None if shapes is None else tuple(shapes[key]), problems.get(key)) for key, image in images.items()]
    return split, path, image_dir, rows, crowd_ignore


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _records(plans: list[tuple]) -> Iterator[SourceRecord | Reject]:
    seen: set[str] = set()
    for split, annotation_file, image_dir, rows, crowd_ignore in plans:
        listed = set(os.listdir(image_dir)) if image_dir.is_dir() else set()
        for image, shapes, problem in rows:
            file_name = image["file_name"].replace("\\", "/")
            image_path = image_dir / file_name
            image_id = os.path.splitext(file_name)[0].replace("/", "__")
            try:
                check_image_id(image_id)
            except RejectError as exc:
                yield Reject(image_id, split, str(image_path), str(exc))
                continue
            if image_id in seen:
                yield Reject(image_id, split, str(image_path), "duplicate id")
                continue
            seen.add(image_id)
            if not (file_name in listed or ("/" in file_name and image_path.is_file())):
                yield Reject(image_id, split, str(image_path), "image file not found")
                continue
            if problem is not None:
                yield Reject(image_id, split, str(image_path), problem)
                continue
            if shapes is None:
                yield SourceRecord(image_id, split, str(image_path), None, "none", None)
                continue
            tags = tuple(sorted({class_id for class_id, _, _, _ in shapes}))
            mask = CocoMask(image["height"], image["width"], shapes, crowd_ignore, str(annotation_file))
            yield SourceRecord(image_id, split, str(image_path), tags, "coco", mask)

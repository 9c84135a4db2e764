"""Reader for a plain folder of images, optionally with a tags CSV and label masks.

- Images: every file under ``root`` (recursively; hidden folders and ``root/masks/`` skipped) whose
  extension is one of jpg, jpeg, png, bmp, webp, tif, tiff (any case), sorted by relative path.
- Id: the relative path without extension, separators replaced by ``__`` (``cats/a.jpg`` -> ``cats__a``);
  an id failing :func:`shards.records.check_image_id` (spaces, non-ASCII...) or seen before
  (``a.jpg`` and ``a.png``) is a Reject.
- Tags: from a CSV (``image,tags``; ``image`` is the relative path or the id); an image without a row is
  untagged (``None``); a row naming no image is a Reject (path ``file:line``). Without a CSV every image
  is untagged. An unknown class in the CSV is a :class:`DataError` naming ``file:line``.
- Ground truth, where present: ``root/masks/<relative path without extension>.png`` (class ids, 255 =
  ignore).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

from shards.classes import read_tags_csv
from shards.records import DataError, Reject, RejectError, SourceRecord, check_image_id

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
MASKS_DIR = "masks"


def _image_paths(root: Path) -> list[str]:
    """Relative POSIX paths of the image files under ``root``, sorted."""
    found = []
    for folder, subfolders, files in os.walk(root):
        relative_folder = Path(folder).relative_to(root)
        subfolders[:] = [d for d in subfolders if not d.startswith(".")
                         and not (relative_folder == Path(".") and d == MASKS_DIR)]
        for name in files:
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and not name.startswith("."):
                found.append((relative_folder / name).as_posix())
    return sorted(found)


def folder_image_id(relative_path: str) -> str:
    """``cats/a.jpg`` -> ``cats__a`` (not yet checked for safety)."""
    return os.path.splitext(relative_path)[0].replace("/", "__")


def read_folder(root: str | os.PathLike, *, tags_csv: str | os.PathLike | None = None,
                class_names: Sequence[str] | None = None, split: str = "train",
                ) -> Iterator[SourceRecord | Reject]:
    """Records of a folder of images; the tags CSV is read and validated completely before returning."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    if tags_csv is not None and class_names is None:
        raise DataError(f"{tags_csv}: a tags CSV needs a class list (prepare.classes)")
    relative_paths = _image_paths(root)
    by_path = {path: folder_image_id(path) for path in relative_paths}
    known_ids = set(by_path.values())

    tags: dict[str, tuple[int, ...]] = {}  # image id -> class ids
    orphans: list[Reject] = []
    if tags_csv is not None:
        first_line: dict[str, int] = {}
        for cell, (ids, line) in read_tags_csv(tags_csv, tuple(class_names)).items():
            key = cell.replace("\\", "/").removeprefix("./")
            image_id = by_path.get(key, key if key in known_ids else None)
            if image_id is None:
                orphans.append(Reject(folder_image_id(key), split, f"{tags_csv}:{line}",
                                      f"tags row for a missing image {cell!r}"))
                continue
            if image_id in first_line:
                raise DataError(f"{tags_csv}:{line}: second row for image {image_id!r} "
                                f"(first at line {first_line[image_id]})")
            first_line[image_id] = line
            tags[image_id] = ids
    return _records(root, relative_paths, by_path, tags, orphans, split)


def _records(root: Path, relative_paths, by_path, tags, orphans, split: str) -> Iterator[SourceRecord | Reject]:
    seen: set[str] = set()
    for relative_path in relative_paths:
        image_id, image_path = by_path[relative_path], str(root / relative_path)
        try:
            check_image_id(image_id)
        except RejectError as exc:
            yield Reject(image_id, split, image_path, str(exc))
            continue
        if image_id in seen:
            yield Reject(image_id, split, image_path, "duplicate id")
            continue
        seen.add(image_id)
        mask_path = root / MASKS_DIR / (os.path.splitext(relative_path)[0] + ".png")
        image_tags = tags.get(image_id)
        yield SourceRecord(image_id=image_id, split=split, image_path=image_path, tags=image_tags,
                           tag_source="csv" if image_tags is not None else "none",
                           mask=str(mask_path) if mask_path.is_file() else None)
    yield from orphans

"""Reader for a plain folder of images, optionally with a tags CSV and label masks.

- Every entry under ``root`` (recursively) is accounted for, except the source's own files (``root/masks/``,
  ``root/tags.csv``, ``root/classes.txt``, the tags CSV): a regular file whose extension is one of jpg, jpeg,
  png, bmp, webp, tif, tiff (any case) is an image, sorted by relative path; anything else is a Reject with the
  reason: ``unsupported format .heic``, ``not a regular file (fifo)``, ``broken link``, ``hidden file``,
  ``hidden folder, not read``, ``link leaves the dataset root`` (unless ``links_outside_root``: then the link is
  followed), ``link to a folder inside the dataset root, not followed`` (its files are read where they are),
  a file over ``max_file_bytes``.
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
from shards.files import classify, inside
from shards.records import DataError, Reject, RejectError, SourceRecord, check_image_id

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
MASKS_DIR = "masks"
SOURCE_FILES = (MASKS_DIR, "tags.csv", "classes.txt")  # the source's own files at the top of root: not inputs


def _scan(root: Path, skip: set[str], *, max_bytes: int, allow_outside: bool,
          ) -> tuple[list[str], list[tuple[str, str]]]:
    """``(image paths, [(path, reason), ...])`` relative to ``root`` (POSIX, sorted): every entry, one of the two."""
    images: list[str] = []
    refused: list[tuple[str, str]] = []
    seen_folders = {os.path.realpath(root)}
    stack = [""]
    while stack:
        relative_folder = stack.pop()
        try:
            with os.scandir(root / relative_folder) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as exc:
            refused.append((relative_folder + "/", f"cannot list the folder: {exc.strerror or exc}"))
            continue
        for entry in entries:
            relative = f"{relative_folder}/{entry.name}" if relative_folder else entry.name
            if not relative_folder and entry.name in skip:
                continue
            is_link, is_dir = entry.is_symlink(), _is_dir(entry)
            if entry.name.startswith("."):
                refused.append((relative, "hidden folder, not read" if is_dir else "hidden file"))
                continue
            if is_dir:
                real = os.path.realpath(entry.path)
                if is_link and inside(real, root):
                    refused.append((relative, "link to a folder inside the dataset root, not followed"))
                elif is_link and not allow_outside:
                    refused.append((relative, "link leaves the dataset root"))
                elif real in seen_folders:
                    refused.append((relative, "link to a folder already read"))
                else:
                    seen_folders.add(real)
                    stack.append(relative)
                continue
            reason = classify(Path(entry.path), root, max_bytes=max_bytes, allow_outside=allow_outside)
            extension = os.path.splitext(entry.name)[1].lower()
            if reason is None and extension not in IMAGE_EXTENSIONS:
                reason = f"unsupported format {extension}" if extension else "unsupported format (no extension)"
            if reason is None:
                images.append(relative)
            else:
                refused.append((relative, reason))
    return sorted(images), sorted(refused)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links
    except OSError:
        return False


def folder_image_id(relative_path: str) -> str:
    """``cats/a.jpg`` -> ``cats__a`` (not yet checked for safety)."""
    return os.path.splitext(relative_path)[0].replace("/", "__")


def read_folder(root: str | os.PathLike, *, tags_csv: str | os.PathLike | None = None,
                class_names: Sequence[str] | None = None, split: str = "train", max_file_bytes: int = 256 * 2**20,
                links_outside_root: bool = False) -> Iterator[SourceRecord | Reject]:
    """Records of a folder of images; the tags CSV is read and validated completely before returning."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    if tags_csv is not None and class_names is None:
        raise DataError(f"{tags_csv}: a tags CSV needs a class list (prepare.classes)")
    skip = set(SOURCE_FILES)
    if tags_csv is not None and os.path.realpath(Path(tags_csv).parent) == os.path.realpath(root):
        skip.add(Path(tags_csv).name)
    relative_paths, refused = _scan(root, skip, max_bytes=max_file_bytes, allow_outside=links_outside_root)
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
    orphans += [Reject(folder_image_id(path), split, str(root / path), reason) for path, reason in refused]
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

"""Ingest a dataset source into manifest shards: the work of the ``prepare`` stage (``relabel`` runs it too).

What it consumes and produces, and how it resumes: the docstring of ``stages/prepare.py``.
"""


from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
from tqdm import tqdm

from config.schema import PrepareConfig
from shards.files import read_source_file
from shards.fingerprint import code_version, fingerprint
from shards.images import decode_image, decode_mask, encode_mask
from shards.io import ShardSet, atomic_write_json, write_table_atomic
from shards.manifest import manifest_schema, rejects_schema
from shards.readers import open_source
from shards.records import IGNORE_INDEX, DataError, Reject, RejectError, SourceRecord, check_image_id, voc_palette

log = logging.getLogger("prepare")


def _read(path: str, cfg: PrepareConfig, what: str) -> bytes:
    return read_source_file(path, max_bytes=cfg.max_file_bytes, root=cfg.root,
                            allow_outside=cfg.links_outside_root, what=what)


def _decode(record: SourceRecord, cfg: PrepareConfig, num_classes: int, palette: list, note: str = "",
            ) -> dict[str, Any]:
    """One record -> one manifest row; raises RejectError with the reason."""
    check_image_id(record.image_id)
    data = _read(record.image_path, cfg, "image file")
    image = decode_image(data, name=record.image_path, max_pixels=cfg.max_pixels, min_side=cfg.min_side)
    height, width = image.rgb.shape[:2]
    mask_bytes = None
    if record.mask is not None:
        if callable(record.mask):  # checks the size it declares against the image's before drawing
            source: Any = record.mask(size=(width, height))
        else:
            source = _read(record.mask, cfg, f"mask file {record.mask}")
        mask = decode_mask(source, name=str(record.mask if not callable(record.mask) else record.image_path),
                           size=(width, height), num_classes=num_classes, palette=palette)
        mask_bytes = encode_mask(mask, palette)
    return {
        "image_id": record.image_id,
        "image": {"bytes": image.data, "path": f"{record.image_id}.{'jpg' if image.format == 'jpeg' else 'png'}"},
        "sha256": hashlib.sha256(image.data).hexdigest(),
        "width": width,
        "height": height,
        "tags": list(record.tags) if record.tags is not None else None,
        "tag_source": record.tag_source,
        "split": record.split,
        "mask": {"bytes": mask_bytes, "path": f"{record.image_id}.png"} if mask_bytes is not None else None,
        "source_path": record.image_path,
        "notes": "; ".join(n for n in (image.notes, note) if n),
    }


def _digest(path: str, cfg: PrepareConfig) -> str | None:
    """sha256 of a source file's bytes (``None`` if it cannot be read: decoding will say why)."""
    try:
        return hashlib.sha256(_read(path, cfg, "file")).hexdigest()
    except RejectError:
        return None


def _mask_digest(mask: Any, cfg: PrepareConfig) -> str | None:
    if mask is None:
        return None
    if callable(mask):  # a COCO mask: its declared size and segmentations
        fields = dataclasses.asdict(mask) if dataclasses.is_dataclass(mask) else repr(mask)
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=repr).encode()).hexdigest()
    return _digest(mask, cfg)


def _screen(grouped: dict[str, list], cfg: PrepareConfig, progress: bool,
            ) -> tuple[dict[str, list], dict[str, list], dict[str, str]]:
    """Read every record's files once, before any decoding.

    Returns the items again (a record whose image cannot be read, or whose bytes repeat an earlier image's when
    ``duplicates: reject``, becomes a Reject), the content key of each record (digests of its image, mask and
    other input files: what its manifest row is made of) and the notes of kept duplicates.
    """
    first_by_digest: dict[str, str] = {}
    content: dict[str, list] = {}
    notes: dict[str, str] = {}
    screened: dict[str, list] = {}
    total = sum(len(items) for items in grouped.values())
    with tqdm(total=total, desc="prepare: reading", unit="file", disable=not progress) as bar:
        for split, items in grouped.items():
            out = screened[split] = []
            for item in items:
                bar.update(1)
                if isinstance(item, Reject):
                    out.append(item)
                    continue
                try:
                    image_digest = hashlib.sha256(_read(item.image_path, cfg, "image file")).hexdigest()
                except RejectError as exc:
                    out.append(Reject(item.image_id, split, item.image_path, str(exc)))
                    continue
                first = first_by_digest.setdefault(image_digest, item.image_id)
                if first != item.image_id:
                    if cfg.duplicates == "reject":
                        out.append(Reject(item.image_id, split, item.image_path, f"duplicate of {first}"))
                        continue
                    notes[item.image_id] = f"same bytes as {first}"
                content[item.image_id] = [image_digest, _mask_digest(item.mask, cfg),
                                          [_digest(path, cfg) for path in item.inputs]]
                out.append(item)
    return screened, content, notes


def _chunk_key(items: list[SourceRecord | Reject], content: dict[str, list]) -> list[Any]:
    """What decides a chunk's output besides params and code: its inputs' identity and content."""
    key = []
    for item in items:
        if isinstance(item, Reject):
            key.append([item.image_id, item.path, item.reason])
        else:
            key.append([item.image_id, item.image_path, item.tags, item.tag_source, content[item.image_id]])
    return key


def _by_split(items: Iterable[SourceRecord | Reject], splits: tuple[str, ...]) -> dict[str, list]:
    grouped: dict[str, list] = {split: [] for split in splits}
    for item in items:
        grouped.setdefault(item.split, []).append(item)
    return grouped


def build_manifest(cfg: PrepareConfig, out_dir: Path, *, progress: bool = True) -> dict[str, Any]:
    """Ingest ``cfg.source`` into manifest shards under ``out_dir``; returns counts per split and rejects."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    root = Path(cfg.root)
    if not root.exists():
        raise DataError(f"{root}: dataset root does not exist (prepare.root in params.yaml)")
    class_names, items = open_source(
        cfg.source, root, classes_file=cfg.classes or None, splits=cfg.splits,
        tags_from=cfg.tags_from, tags_file=cfg.tags_file or None, max_file_bytes=cfg.max_file_bytes,
        links_outside_root=cfg.links_outside_root,
    )
    # Reading the whole listing first makes source-level errors (unknown class names...) stop before any work.
    grouped, content, notes = _screen(_by_split(items, cfg.splits), cfg, progress)
    palette = voc_palette()
    code = code_version("labelling.ingest")
    producer = {"stage": "prepare", "code_version": code, "params_fingerprint": fingerprint(cfg, code=code)}
    schema = manifest_schema(class_names, palette, producer)
    shards = ShardSet(out_dir)
    keep, counts, rejects = [], {}, []
    total = sum(len(v) for v in grouped.values())
    bar = tqdm(total=total, desc="prepare", unit="img", disable=not progress)
    for split, split_items in grouped.items():
        counts[split] = 0
        for number, start in enumerate(range(0, max(len(split_items), 1), cfg.rows_per_shard)):
            chunk = split_items[start:start + cfg.rows_per_shard]
            name = f"{split}-{number:05d}.parquet"
            keep.append(name)
            key = fingerprint(cfg, code=code, extra=_chunk_key(chunk, content))
            if shards.is_done(name, key):
                entry = shards.index()[name]
                counts[split] += entry["rows"]
                rejects.extend(entry.get("rejects", []))
                bar.update(len(chunk))
                continue
            rows, chunk_rejects = [], []
            for item in chunk:
                if isinstance(item, Reject):
                    chunk_rejects.append({"image_id": item.image_id, "split": split, "path": item.path,
                                          "reason": item.reason})
                else:
                    try:
                        rows.append(_decode(item, cfg, len(class_names), palette, notes.get(item.image_id, "")))
                    except RejectError as exc:
                        chunk_rejects.append({"image_id": item.image_id, "split": split,
                                              "path": item.image_path, "reason": str(exc)})
                bar.update(1)
            table = pa.Table.from_pylist(rows, schema=schema)
            shards.write(name, table, fingerprint=key, split=split, rejects=chunk_rejects)
            counts[split] += len(rows)
            rejects.extend(chunk_rejects)
    bar.close()
    shards.prune(keep)
    for reject in rejects:
        log.warning("rejected %s (%s): %s", reject["image_id"], reject["path"], reject["reason"])
    write_table_atomic(pa.Table.from_pylist(rejects, schema=rejects_schema(producer)), out_dir / "rejects.parquet")
    atomic_write_json(out_dir / "classes.json", {
        "class_names": ["background", *class_names],
        "palette": [list(c) for c in palette],
        "ignore_index": IGNORE_INDEX,
        "source": cfg.source,
    })
    elapsed = time.perf_counter() - started
    summary = {"images": counts, "rejects": len(rejects), "inputs": total, "classes": len(class_names),
               "seconds": round(elapsed, 2)}
    log.info("prepare: %d inputs -> %s accepted, %d rejected in %.1f s (%.0f img/s)", total, counts,
             len(rejects), elapsed, total / max(elapsed, 1e-9))
    return summary

"""Ingest a dataset source into manifest shards: the work of the ``prepare`` stage (``relabel`` runs it too).

What it consumes and produces, and how it resumes: the docstring of ``stages/prepare.py``.
"""


from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
from tqdm import tqdm

from config.schema import PrepareConfig
from shards.fingerprint import code_version, fingerprint
from shards.images import decode_image, decode_mask, encode_mask
from shards.io import ShardSet, atomic_write_json, write_table_atomic
from shards.manifest import manifest_schema, rejects_schema
from shards.readers import open_source
from shards.records import IGNORE_INDEX, DataError, Reject, RejectError, SourceRecord, check_image_id, voc_palette

log = logging.getLogger("prepare")


def _decode(record: SourceRecord, cfg: PrepareConfig, num_classes: int, palette: list) -> dict[str, Any]:
    """One record -> one manifest row; raises RejectError with the reason."""
    check_image_id(record.image_id)
    try:
        data = Path(record.image_path).read_bytes()
    except OSError as exc:
        raise RejectError(f"cannot read image file: {exc.strerror or exc}") from None
    image = decode_image(data, name=record.image_path, max_pixels=cfg.max_pixels, min_side=cfg.min_side)
    height, width = image.rgb.shape[:2]
    mask_bytes = None
    if record.mask is not None:
        if callable(record.mask):
            source: Any = record.mask()
        else:
            try:
                source = Path(record.mask).read_bytes()
            except OSError as exc:
                raise RejectError(f"cannot read mask file {record.mask}: {exc.strerror or exc}") from None
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
        "notes": image.notes,
    }


def _chunk_key(items: list[SourceRecord | Reject]) -> list[Any]:
    """What decides a chunk's output besides params and code: its inputs' identity and file stats."""
    key = []
    for item in items:
        path = item.image_path if isinstance(item, SourceRecord) else item.path
        try:
            stat = os.stat(path)
            key.append([item.image_id, path, stat.st_size, stat.st_mtime_ns, getattr(item, "tags", None)])
        except OSError:
            key.append([item.image_id, path, None, None, getattr(item, "tags", None)])
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
        tags_from=cfg.tags_from, tags_file=cfg.tags_file or None,
    )
    # Reading the whole listing first makes source-level errors (unknown class names...) stop before any work.
    grouped = _by_split(items, cfg.splits)
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
            key = fingerprint(cfg, code=code, extra=_chunk_key(chunk))
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
                        rows.append(_decode(item, cfg, len(class_names), palette))
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

"""DVC stage ``export``: pseudo-label shards -> a dataset package that other segmenters download (DESIGN.md §1, 3).

Consumes ``data/pseudo_labels`` (``refine``; its ``index.json`` sha256s are checked first, so a damaged shard is
never published), ``data/manifest/classes.json`` (classes, palette) and, when present,
``metrics/pseudo_labels.json`` (the quality against ground truth, for the card). Produces ``data/export`` in the
layout of ``shards/package.py``: ``data/<split>-NNNNN-of-NNNNN.parquet`` re-sharded to ``export.rows_per_shard``
rows with ``export.row_group_size``-row groups (the columns and schema metadata of the pseudo-label shards, so
``datasets.load_dataset("parquet", data_dir=...)`` decodes images, masks and class names), the dataset card
``README.md``, ``package.json``, an optional VOC-style ``voc/`` folder (``export.voc``, with CVAT's
``labelmap.txt``), optional COCO instances ``coco/annotations/instances_<split>.json`` (``export.coco``: one RLE
annotation per connected region of a class, shards/coco.py), the review page ``review.html`` (the
``export.review_rows`` lowest-label-score images with thumbnails, shards/review.py) and ``SHA256SUMS`` over everything.

Every file is written to a temporary name and ``os.replace``-d into place; files of an earlier package that the
new one does not have are removed; the result is a pure function of inputs and params (same bytes every run), so a
killed export is simply run again. The stage copies bytes and, for COCO only, decodes the masks: no torch.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from config.cli import stage_arguments
from config.loader import to_dict
from config.schema import ExportParams, Params, load_params_or_exit
from shards.dataset_card import render_card
from shards.io import ShardSet, atomic_write_bytes, read_metadata
from shards.manifest import read_classes
from shards.package import (
    CARD_NAME,
    CHECKSUMS_NAME,
    INFO_NAME,
    VOC_DIR,
    VOC_IMAGES,
    is_package,
    remove_stale,
    score_summary,
    source_files,
    write_checksums,
    write_info,
    write_split,
    write_voc_lists,
)
from shards.review import REVIEW_NAME, worst_rows, write_review

log = logging.getLogger("export")


def read_quality(metrics_path: Path | None) -> dict[str, Any] | None:
    """``metrics/pseudo_labels.json`` when it measured something (ground truth existed), else None."""
    if metrics_path is None or not Path(metrics_path).is_file():
        return None
    metrics = json.loads(Path(metrics_path).read_text())
    if not metrics.get("gt_images") or metrics.get("miou") is None:
        return None
    keys = ("miou", "coverage", "precision", "recall", "gt_images", "splits", "methods", "per_class")
    return {key: metrics.get(key) for key in keys}


def provenance(params: Params, meta: dict[str, Any]) -> dict[str, Any]:
    """Where the labels come from: the source, the classifier and refine fingerprints, and the params."""
    producer = meta.get("producer", {})
    prepare = params.prepare
    return {
        "source": {"source": prepare.source, "root": prepare.root, "classes": prepare.classes},
        "classifier_fingerprint": producer.get("model_fingerprint", ""),
        "stage": producer.get("stage", ""),
        "code_version": producer.get("code_version", ""),
        "params_fingerprint": producer.get("params_fingerprint", ""),
        "params": {name: to_dict(getattr(params, name)) for name in ("train_classifier", "dump_cams", "refine")},
    }


def split_info(summary: dict[str, Any], class_names: list[str]) -> dict[str, Any]:
    total = sum(summary["pixels"]) + summary["ignored_pixels"]
    return {"images": summary["images"], "shards": summary["shards"],
            "pixel_share": {n: round(c / max(total, 1), 6) for n, c in zip(class_names, summary["pixels"])},
            "ignored_pixel_share": round(summary["ignored_pixels"] / max(total, 1), 6),
            "pixels": summary["pixels"], "ignored_pixels": summary["ignored_pixels"]}


def write_package_review(out_dir: Path, sources: list[Path], info: dict[str, Any], palette: list[list[int]],
                         rows: int) -> dict[str, Any]:
    """``review.html``: the ``rows`` lowest-label-score images of the package (no CAM column: CAMs are not part of
    the package)."""
    chosen, total = worst_rows(sources, rows)
    prov = info["provenance"]
    quality = info["quality"] or {}
    facts = [("package", info["name"]),
             ("splits", ", ".join(f"{s} {v['images']} images" for s, v in info["splits"].items())),
             ("refiners", " + ".join(info["methods"]) or "thresholds only"),
             ("classifier", prov["classifier_fingerprint"]),
             ("refine code / params", f"{prov['code_version']} / {prov['params_fingerprint']}"),
             ("quality", f"mIoU {quality['miou']} %, coverage {quality['coverage']} on {quality['gt_images']} "
                         "images with ground truth" if quality else "unknown (no ground truth)")]
    return write_review(out_dir / REVIEW_NAME, chosen, info["class_names"], palette, title=f"Review: {info['name']}",
                        max_rows=rows, total=total, facts=facts, rows_param="export.review_rows",
                        ignore_index=info["ignore_index"])
def coco_info(summaries: dict[str, Any], voc: bool) -> dict[str, Any] | None:
    """package.json's ``coco``: the image root, and per split the annotation file, its annotation count and the
    connectivity that made its regions."""
    splits = {split: {"annotations": s["coco"]["path"], "count": s["coco"]["annotations"],
                      "connectivity": s["coco"]["connectivity"]} for split, s in summaries.items() if s["coco"]}
    return {"image_root": VOC_IMAGES if voc else None, "splits": splits} if splits else None


def run(params: Params, pseudo_dir: Path, manifest_dir: Path, out_dir: Path, metrics_path: Path | None = None,
        progress: bool = True) -> dict[str, Any]:
    """Write the package; returns {images, splits, files, bytes, removed, seconds}."""
    cfg: ExportParams = params.export
    pseudo_dir, out_dir = Path(pseudo_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not is_package(out_dir):
        raise ValueError(f"{out_dir}: not empty and not an export package; refusing to overwrite it")
    ShardSet(pseudo_dir).verify()
    sources = {split: source_files(pseudo_dir, split) for split in cfg.splits}
    missing = [split for split, files in sources.items() if not files]
    if missing:
        raise ValueError(f"{pseudo_dir}: no pseudo-label shards of split(s) {missing}; run refine on them, "
                         "or change export.splits")
    classes = read_classes(manifest_dir)
    meta = read_metadata(sources[cfg.splits[0]][0])
    if meta["class_names"] != classes["class_names"]:
        raise ValueError(f"{pseudo_dir}: classes {meta['class_names']} differ from {manifest_dir}'s "
                         f"{classes['class_names']}; run refine again")
    names = list(meta["class_names"])
    bar = tqdm(total=sum(ShardSet(pseudo_dir).index().get(p.name, {}).get("rows", 0)
                         for files in sources.values() for p in files), desc="export", unit="img",
               disable=not progress)
    started = time.perf_counter()
    summaries = {split: write_split(files, split, out_dir, rows_per_shard=cfg.rows_per_shard,
                                    row_group_size=cfg.row_group_size, voc=cfg.voc, coco=cfg.coco,
                                    on_rows=bar.update)
                 for split, files in sources.items()}
    bar.close()
    ignore = meta["ignore_index"]
    palette = [list(c) for c in meta["palette"][:len(names)]]
    ignore_colour = list(meta["palette"][ignore]) if len(meta["palette"]) > ignore else [255] * 3
    written = [rel for s in summaries.values() for rel in s["files"]]
    if cfg.voc:
        written += write_voc_lists(out_dir, names, {split: s["ids"] for split, s in summaries.items()},
                                   palette=palette, ignore_colour=ignore_colour)
    info = {
        "name": cfg.name or f"{params.prepare.source} pseudo labels",
        "license": cfg.license,
        "class_names": names,
        "palette": palette,
        "ignore_index": ignore,
        "ignore_colour": ignore_colour,
        "methods": list(meta.get("methods", [])),
        "row_group_size": cfg.row_group_size,
        "splits": {split: split_info(s, names) for split, s in summaries.items()},
        "label_scores": {split: score_summary(out_dir, s["shards"]) for split, s in summaries.items()},
        "voc": VOC_DIR if cfg.voc else None,
        "review": REVIEW_NAME if cfg.review_rows else None,
        "coco": coco_info(summaries, cfg.voc),
        "quality": read_quality(metrics_path),
        "provenance": provenance(params, meta),
    }
    write_info(out_dir, info)
    info = json.loads((out_dir / INFO_NAME).read_text())  # the card renders exactly what package.json says
    atomic_write_bytes(out_dir / CARD_NAME, render_card(info).encode())
    if cfg.review_rows:
        page = write_package_review(out_dir, [p for files in sources.values() for p in files], info, meta["palette"],
                                    cfg.review_rows)
        written.append(REVIEW_NAME)
        log.info("export: %s shows the %d lowest-label-score of %d images (%.1f kB)", REVIEW_NAME, page["rows"],
                 page["total"], page["bytes"] / 1e3)
    removed = remove_stale(out_dir, [*written, INFO_NAME, CARD_NAME, CHECKSUMS_NAME])
    sums = write_checksums(out_dir)
    seconds = time.perf_counter() - started
    images = sum(s["images"] for s in summaries.values())
    size = sum((out_dir / rel).stat().st_size for rel in sums)
    log.info("export: %d images, %d files, %.1f MB in %.1f s: %.1f images/s, %.1f MB/s (%d stale files removed)",
             images, len(sums) + 1, size / 1e6, seconds, images / max(seconds, 1e-9), size / 1e6 / max(seconds, 1e-9),
             len(removed))
    return {"images": images, "splits": {s: v["images"] for s, v in summaries.items()}, "files": sorted(sums),
            "bytes": size, "removed": removed, "seconds": round(seconds, 3)}


def main(argv: list[str] | None = None) -> int:
    args = stage_arguments(__doc__, argv, pseudo_labels="data/pseudo_labels", manifest="data/manifest",
                           metrics=("metrics/pseudo_labels.json", "quality for the card, if present"), out="data/export")
    params = load_params_or_exit(args.params)
    try:
        run(params, Path(args.pseudo_labels), Path(args.manifest), Path(args.out), Path(args.metrics))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

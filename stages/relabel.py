"""DVC stage ``relabel@<collection>``: a new image collection -> a versioned pseudo-label dataset.

Consumes a collection folder (``data/inbox/<name>/``: images, an optional ``tags.csv`` ``image,tags``, optional
``masks/`` ground truth) and the current classifier (``data/classifier``). Runs, into one version folder, the
steps the training DAG runs on its own data (the same functions, from ``labelling/``): ``prepare`` (source ``folder``,
the classifier's class list, one split ``train``), ``dump_cams`` (untagged images get the classes the classifier
predicts, ``tag_source: predicted``, with scores; where no class clears ``predict_threshold`` none is forced:
``tag_source: unknown``, and ``refine.no_known_class`` keeps the image all-ignore or leaves it out; every image gets
an OOD score against the classifier's training images, training/feature_stats.py) and ``refine`` (METHODS.md §2).
Produces::

    data/collections/<name>/
        <classifier fp>-<params fp>/      one version per classifier and labelling params, never overwritten
            manifest/  cams/  pseudo_labels/   shard sets (pseudo_labels: Parquet + palette-PNG masks, HF-loadable)
            overlays/*.png                 image | CAM | pseudo mask | ground truth
            review.html                    review page: the ``orchestration.review_rows`` lowest-label-score images
                                           (image | pseudo mask | CAM thumbnails, tags, scores; shards/review.py)
            tags.csv                       the tags used, given or predicted (the folder reader's format)
            summary.json                   counts, rejects, per-class and per-image figures (tags, labels, scores,
                                           object confidence, OOD score), images with no known class, warnings,
                                           timings, classifier and params
            metrics.json                   pseudo-label metrics (mIoU only where the collection has masks/)
        current.json                       the version the last run produced

Resumable as its three parts are (per shard); a new classifier or new params start a new version folder.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from config.cli import stage_arguments
from config.loader import to_dict
from config.schema import Params, load_params_or_exit
from labelling import cams as cam_dump
from labelling import pseudo_labels
from labelling.ingest import build_manifest
from parallel import shard_map
from shards.cams import UNKNOWN, UNLIKE_TRAINING, best_scores
from shards.collections import CURRENT_FILE, SUMMARY_FILE, check_name, version_name
from shards.corrections import CORRECTIONS_DIR
from shards.fingerprint import classifier_fingerprint, hash_params
from shards.io import atomic_write_bytes, atomic_write_json, read_metadata
from shards.records import DataError
from shards.review import REVIEW_NAME, cam_rows, worst_rows, write_review

log = logging.getLogger("relabel")
SPLIT = "train"  # a collection is one split: pseudo labels are for training


def collection_params(params: Params, images_dir: Path, classes_file: Path) -> Params:
    """The training DAG's params, pointed at one collection folder."""
    tags = images_dir / "tags.csv"
    return dataclasses.replace(
        params,
        prepare=dataclasses.replace(params.prepare, source="folder", root=str(images_dir), classes=str(classes_file),
                                    splits=(SPLIT,), tags_from="auto", tags_file=str(tags) if tags.is_file() else ""),
        dump_cams=dataclasses.replace(params.dump_cams, splits=(SPLIT,), eval_split=SPLIT),
        refine=dataclasses.replace(params.refine, eval_splits=(SPLIT,)),
    )


def labelling_fingerprint(params: Params) -> str:
    """What decides a version's bytes besides the classifier and the images (speed-only params are left out)."""
    decisive = {
        "prepare": {k: to_dict(getattr(params.prepare, k)) for k in ("max_pixels", "min_side", "rows_per_shard")},
        "dump_cams": {k: v for k, v in to_dict(params.dump_cams).items()
                      if k not in (*cam_dump.REPORT_ONLY, "splits")},
        "refine": {k: v for k, v in to_dict(params.refine).items() if k not in pseudo_labels.REPORT_ONLY},
    }
    return hash_params(decisive)[:32]


def _columns(path: Path, wanted: list[str]) -> list[dict[str, Any]]:
    """Rows of the ``wanted`` columns a shard has (shards written before a column existed lack it)."""
    names = pq.read_schema(path).names
    return pq.read_table(path, columns=[c for c in wanted if c in names]).to_pylist()


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(sum(known) / len(known), 4) if known else None


def summarize(work: Path, class_names: list[str], no_known_class: str = "ignore") -> dict[str, Any]:
    """Counts, rejects, per-class and per-image figures, read from the shards' small columns (never a mask).

    Per image: ``tags`` (the classes given or predicted), ``labels`` (the classes its mask holds), the classifier's
    scores, ``object_confidence`` (the refined probability over the pixels labelled with a class: not a pixel mean
    dominated by background) and ``ood_score`` (above 1: unlike the classifier's training images). Untagged images
    on which no class cleared ``predict_threshold`` are ``no_known_class``, listed with their best scores whether
    their row was kept all-ignore or excluded. ``warnings`` says, in words, what a reader should not miss."""
    rows = [row for path in sorted((work / "pseudo_labels").glob("*.parquet"))
            for row in _columns(path, ["image_id", "labels", "tag_source", "provenance", "confidence",
                                       "object_confidence", "label_score", "ignore_fraction", "pixels"])]
    cams = {row["image_id"]: row for path in sorted((work / "cams").glob("*.parquet"))
            for row in _columns(path, ["image_id", "classes", "scores", "tag_source", "all_scores", "ood_score"])}
    rejects = pq.read_table(work / "manifest" / "rejects.parquet").to_pylist()
    per_class = []
    for k, name in enumerate(class_names):
        having = [r for r in rows if k in r["labels"]] if k else rows
        per_class.append({
            "class": name, "images": len(having),
            "predicted": sum(r["tag_source"] == "predicted" for r in having) if k else 0,
            "pixels": sum(r["pixels"][k] for r in rows),
            "mean_object_confidence": _mean([r.get("object_confidence") for r in having]),
        })
    total_pixels = max(1, sum(sum(r["pixels"]) for r in rows))
    for entry in per_class:
        entry["pixel_share"] = round(entry["pixels"] / total_pixels, 4)

    def best(cam: dict[str, Any]) -> list[list[Any]]:
        return [[name, round(score, 4)] for name, score in best_scores(cam.get("all_scores"), class_names)]

    images = []
    for r in sorted(rows, key=lambda r: (r["label_score"], r["image_id"])):  # the most doubtful first
        cam = cams.get(r["image_id"], {})
        tags = list(cam.get("classes") or [])
        score_of = dict(zip(tags, cam.get("scores") or []))
        ood = cam.get("ood_score")
        images.append({
            "image_id": r["image_id"], "tags": [class_names[k] for k in tags],
            "labels": [class_names[k] for k in r["labels"]], "tag_source": r["tag_source"],
            "scores": [_rounded(score_of.get(k)) for k in tags], "best_scores": best(cam),
            "object_confidence": _rounded(r.get("object_confidence")), "confidence": round(r["confidence"], 4),
            "ignore_fraction": round(r["ignore_fraction"], 4), "label_score": round(r["label_score"], 4),
            "ood_score": _rounded(ood), "unlike_training": None if ood is None else ood > UNLIKE_TRAINING,
            "provenance": r["provenance"]})
    kept = {r["image_id"] for r in rows}
    unknown = [{"image_id": i, "best_scores": best(c), "ood_score": _rounded(c.get("ood_score")),
                "row": "all ignore" if i in kept else "excluded"}
               for i, c in sorted(cams.items()) if c.get("tag_source") == UNKNOWN]
    ood = [c.get("ood_score") for c in cams.values()]
    scored = [v for v in ood if v is not None]
    unlike = sum(v > UNLIKE_TRAINING for v in scored)
    summary = {
        "images": len(rows), "rejects": len(rejects), "dumped": len(cams),
        "predicted": sum(r["tag_source"] == "predicted" for r in rows),
        "given": sum(r["tag_source"] == "given" for r in rows),
        "no_known_class": len(unknown), "no_known_class_rows": unknown, "no_known_class_param": no_known_class,
        "ood_scored": len(scored), "unlike_training": unlike,
        "mean_object_confidence": _mean([r.get("object_confidence") for r in rows]),
        "without_objects": sum(r.get("object_confidence") is None for r in rows),
        "reject_rows": [{k: r[k] for k in ("image_id", "path", "reason")} for r in rejects],
        "per_class": per_class, "per_image": images,
    }
    summary["warnings"] = collection_warnings(summary)
    return summary


def collection_warnings(summary: dict[str, Any]) -> list[str]:
    """What a reader of a collection's summary should not miss, in plain words."""
    out = []
    dumped, scored, unlike = summary["dumped"], summary["ood_scored"], summary["unlike_training"]
    if scored and unlike * 2 > scored:
        out.append(f"Most of this collection ({unlike} of {scored} images) is unlike the images the classifier was "
                   "trained on: their classes are probably not among its classes, and their pseudo labels should not "
                   "be trusted. Check the review page before training on them.")
    elif unlike:
        out.append(f"{unlike} of {scored} images look unlike the classifier's training images (OOD score above 1).")
    if summary["no_known_class"]:
        fate = ("kept with an all-ignore mask" if summary["no_known_class_param"] == "ignore"
                else "left out of the pseudo labels")
        out.append(f"{summary['no_known_class']} of {dumped} images have no known class (no class scored above "
                   f"dump_cams.predict_threshold); they are {fate} (refine.no_known_class).")
    if dumped and not scored:
        out.append("No OOD scores: the classifier was trained without feature statistics "
                   "(train_classifier.feature_stats); train it again to have them.")
    return out


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def write_tags_csv(path: Path, per_image: list[dict[str, Any]]) -> None:
    """The tags behind the pseudo labels, in the folder reader's ``image,tags`` format (plus source and scores).
    Images with no known class are left out: an empty ``tags`` cell would say "background only" to the reader."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "tags", "tag_source", "scores"])
    for row in per_image:
        if row["tag_source"] == UNKNOWN:
            continue
        writer.writerow([row["image_id"], " ".join(row["tags"]), row["tag_source"],
                         " ".join("" if s is None else f"{s:.4f}" for s in row["scores"])])
    atomic_write_bytes(path, buffer.getvalue().encode())


def write_version_review(work: Path, summary: dict[str, Any], rows: int) -> dict[str, Any]:
    """``review.html`` of one version: the ``rows`` lowest-label-score images, with their CAMs and the classifier's
    scores beside the tags."""
    shards = sorted((work / "pseudo_labels").glob("*.parquet"))
    meta = read_metadata(shards[0])
    chosen, total = worst_rows(shards, rows)
    cams = cam_rows(sorted((work / "cams").glob("*.parquet")), [r["image_id"] for r in chosen])
    metrics = summary["metrics"]
    facts = [("collection", summary["collection"]), ("version", summary["version"]),
             ("classifier", summary["classifier"]), ("labelling params", summary["params_fingerprint"]),
             ("images", f"{summary['images']} labelled of {summary['inputs']} inputs, {summary['rejects']} rejected"),
             ("tags", f"{summary['predicted']} predicted by the classifier, {summary['given']} given"),
             ("no known class", f"{summary['no_known_class']} (refine.no_known_class: {summary['no_known_class_param']})"),
             ("unlike the training images", f"{summary['unlike_training']} of {summary['ood_scored']} scored"),
             ("object confidence / ignored",
              f"{summary['mean_object_confidence']} / {metrics.get('mean_ignore_fraction')}")]
    return write_review(work / REVIEW_NAME, chosen, meta["class_names"], meta["palette"],
                        title=f"Review: collection {summary['collection']}, version {summary['version']}",
                        max_rows=rows, total=total, cams=cams, facts=facts, rows_param="orchestration.review_rows",
                        ignore_index=meta["ignore_index"])


def run(params: Params, name: str, images_dir: Path, classifier_dir: Path, out_dir: Path,
        progress: bool = True, corrections_dir: Path | None = None) -> dict[str, Any]:
    """Relabel one collection into ``out_dir/<version>/``; returns its summary.

    ``corrections_dir``: the collection's correction set (``python -m pipeline corrections <name> <folder>``), whose
    masks replace the pseudo masks of their images in every version (shards/corrections.py)."""
    started = time.perf_counter()
    check_name(name)
    images_dir, classifier_dir, out_dir = Path(images_dir), Path(classifier_dir), Path(out_dir)
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: collection folder does not exist")
    config = json.loads((classifier_dir / "config.json").read_text())
    classifier = classifier_fingerprint(classifier_dir)
    labelling = labelling_fingerprint(params)
    version = version_name(classifier, labelling)
    work = out_dir / version
    classes_file = work / "classes.txt"
    atomic_write_bytes(classes_file, ("\n".join(config["class_names"]) + "\n").encode())
    cfg = collection_params(params, images_dir, classes_file)
    log.info("relabel %s: version %s (classifier %s, params %s)", name, version, classifier[:12], labelling[:12])

    timings = {}
    tick = time.perf_counter()
    prepared = build_manifest(cfg.prepare, work / "manifest", progress=progress)
    timings["prepare"] = round(time.perf_counter() - tick, 2)
    chunks = math.ceil(sum(prepared["images"].values()) / cfg.refine.batch_size)  # refine's pieces (split_tasks)
    if cfg.dump_cams.workers <= 1 and shard_map.will_pool(chunks, cfg.runtime):
        # refine will fork a pool: its server imports torch during the dump
        shard_map.prestart(pseudo_labels.REFINE_TARGET)
    tick = time.perf_counter()
    cams = cam_dump.dump_cams(cfg, work / "manifest", classifier_dir, work / "cams", None, progress=progress)
    timings["dump_cams"] = round(time.perf_counter() - tick, 2)
    tick = time.perf_counter()
    refined = pseudo_labels.refine_cams(cfg, work / "cams", work / "manifest", work / "pseudo_labels",
                                        work / "metrics.json", work / "overlays", progress=progress,
                                        corrections_dir=corrections_dir)
    timings["refine"] = round(time.perf_counter() - tick, 2)

    summary = {
        "collection": name, "version": version, "classifier": classifier, "params_fingerprint": labelling,
        "source": str(images_dir), "inputs": prepared["inputs"],
        **summarize(work, list(config["class_names"]), cfg.refine.no_known_class),
        "computed_shards": {"dump_cams": len(cams["computed"]), "refine": len(refined["computed"])},
        "metrics": {k: refined["metrics"].get(k) for k in ("miou", "coverage", "gt_images", "mean_ignore_fraction",
                                                           "mean_confidence", "mean_object_confidence",
                                                           "corrected_images", "uncorrected")},
        "overlays": sorted(p.name for p in (work / "overlays").glob("*.png")),
        "params": {"dump_cams": to_dict(cfg.dump_cams), "refine": to_dict(cfg.refine),
                   "prepare": {k: to_dict(getattr(cfg.prepare, k)) for k in ("max_pixels", "min_side")}},
        "timings": {**timings, "total": round(time.perf_counter() - started, 2)},
    }
    summary["review"] = None
    if params.orchestration.review_rows and summary["images"]:
        tick = time.perf_counter()
        page = write_version_review(work, summary, params.orchestration.review_rows)
        summary["review"] = {"file": REVIEW_NAME, "rows": page["rows"], "bytes": page["bytes"]}
        summary["timings"]["review"] = round(time.perf_counter() - tick, 2)
    else:
        (work / REVIEW_NAME).unlink(missing_ok=True)  # no stale page of an earlier run with other settings
    write_tags_csv(work / "tags.csv", summary["per_image"])
    atomic_write_json(work / SUMMARY_FILE, summary)
    atomic_write_json(out_dir / CURRENT_FILE, {"version": version, "classifier": classifier,
                                               "params_fingerprint": labelling})
    log.info("relabel %s: %d images (%d predicted tags, %d no known class, %d unlike the training images), %d rejected,"
             " in %.1f s -> %s", name, summary["images"], summary["predicted"], summary["no_known_class"],
             summary["unlike_training"], summary["rejects"], summary["timings"]["total"], work)
    for warning in summary["warnings"]:
        log.warning("relabel %s: %s", name, warning)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = stage_arguments(__doc__, argv, name=(None, "collection name (collections.yaml)"),
                           images=(None, "the collection's folder"), classifier="data/classifier",
                           out=(None, "data/collections/<name>"),
                           corrections=("", "the collection's correction set (default: data/corrections/<name>; "
                                            "absent: none)"))
    params = load_params_or_exit(args.params)
    corrections = Path(args.corrections or f"{CORRECTIONS_DIR}/{args.name}")
    try:
        run(params, args.name, Path(args.images), Path(args.classifier), Path(args.out),
            corrections_dir=corrections if corrections.is_dir() else None)
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

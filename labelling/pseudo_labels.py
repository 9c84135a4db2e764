"""CAM shards -> pseudo-label shards (the work of the ``refine`` stage; ``relabel`` runs it on a collection).

What it consumes and produces, and how it resumes: the docstring of ``stages/refine.py``.
"""


from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from config.loader import to_dict
from config.schema import RefineParams
from parallel import shard_map
from refinement.chain import check_methods, refine_chunk
from shards.boxes import mask_boxes
from shards.cams import UNKNOWN, decode_affinity, decode_cams, decode_fg
from shards.corrections import CorrectionError, corrections_of, load_correction
from shards.fingerprint import code_version, fingerprint, hash_params
from shards.images import decode_mask_png, decode_rgb, encode_mask, long_side_size, resize_long
from shards.io import ShardSet, atomic_write_json, read_metadata
from shards.manifest import read_classes
from shards.metrics import ConfusionMatrix
from shards.overlays import write_overlays
from shards.records import IGNORE_INDEX
from shards.pseudo_labels import label_score, mask_stats, pseudo_label_metrics, pseudo_label_schema

log = logging.getLogger("refine")
REPORT_ONLY = ("eval_splits", "overlays")  # decide metrics and plots, not shard bytes: not in the fingerprint
PIECES_PER_WORKER = 2  # pieces of a split shard per worker (split_tasks): balance against re-reading the shard
REFINE_TARGET = "labelling.pseudo_labels:refine_rows"  # the pool target of pieces of shards (run_tasks)


@dataclasses.dataclass(frozen=True)
class ShardTask:
    name: str
    cams_path: str
    manifest_path: str
    out_dir: str
    key: str
    params: RefineParams
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, ...], ...]
    producer: tuple[tuple[str, str], ...]
    device: str
    corrections_dir: str | None = None  # a correction set (shards/corrections.py)
    corrected: tuple[str, ...] = ()  # the ids of this shard it corrects
    chunks: tuple[int, int] | None = None  # a piece of the shard: PAR chunks [start, stop) of chunk_order; None = all


def chunk_order(cams: list[dict[str, Any]], p: RefineParams) -> tuple[list[tuple[int, int]], list[list[int]]]:
    """Working size of every CAM row and the PAR chunks: row indices sorted by working size (similar sizes share a
    padded batch), ``batch_size`` at a time. A function of the rows and params alone, so every piece of a split
    shard (``ShardTask.chunks``) computes exactly the chunks the whole shard would."""
    # the working size: the long side capped at max_side, never enlarged
    work = [long_side_size(r["height"], r["width"], min(p.max_side, max(r["height"], r["width"]))) for r in cams]
    order = sorted(range(len(cams)), key=lambda i: (work[i], i))
    return work, [order[start: start + p.batch_size] for start in range(0, len(order), p.batch_size)]


def refine_rows(task: ShardTask) -> dict[str, Any]:
    """Pseudo-label rows of one CAM shard's chunks ``task.chunks`` (all when None), not written: {rows: {row index:
    row}, confusion, gt_images, uncorrected, gt_uncorrected} (the confusion matrices as nested lists)."""
    p, num_classes = task.params, len(task.class_names)
    cams = pq.ParquetFile(task.cams_path).read().to_pylist()
    manifest = pq.ParquetFile(task.manifest_path).read(columns=["image_id", "image", "mask"]).to_pylist()
    if [r["image_id"] for r in cams] != [r["image_id"] for r in manifest]:
        raise ValueError(f"{task.cams_path}: rows differ from {task.manifest_path}; run dump_cams again")
    work, chunks = chunk_order(cams, p)
    if task.chunks is not None:
        chunks = chunks[task.chunks[0]: task.chunks[1]]
    confusion, gt_images, rows = ConfusionMatrix(num_classes), 0, {}
    uncorrected, gt_uncorrected = ConfusionMatrix(num_classes), 0
    unknown = {i for i, row in enumerate(cams)  # no known class (dump_cams): nothing to refine
               if row["tag_source"] == UNKNOWN and row["image_id"] not in task.corrected}
    excluded = []  # rows of unknown images left out (no_known_class: exclude)
    for chunk in chunks:
        known = [i for i in chunk if i not in unknown]
        results = {}
        if known:
            # a writeable copy: torch and pydensecrf refuse PIL's read-only buffers
            rgbs = [np.array(resize_long(decode_rgb(manifest[i]["image"]["bytes"]), max(work[i]))) for i in known]
            extras = [{"fg": decode_fg(cams[i]), "affinity": decode_affinity(cams[i])} for i in known]
            results = dict(zip(known, refine_chunk(rgbs, [decode_cams(cams[i]) for i in known],
                                                   [cams[i]["classes"] for i in known], p, torch.device(task.device),
                                                   extras, [(cams[i]["height"], cams[i]["width"]) for i in known])))
        for i in chunk:
            if i in unknown:
                if p.no_known_class == "exclude":
                    excluded.append(i)
                    continue
                results[i] = (np.full((cams[i]["height"], cams[i]["width"]), IGNORE_INDEX, np.uint8), 0.0, None)
            mask, confidence, object_confidence = results[i]  # at the image's size (refine_chunk's out_sizes)
            row, height, width = cams[i], cams[i]["height"], cams[i]["width"]
            provenance = "pseudo"
            if row["image_id"] in task.corrected:  # a human's mask wins over the pseudo label
                mask, confidence, provenance = load_correction(task.corrections_dir, row["image_id"]), 1.0, "corrected"
                object_confidence = 1.0
                if mask.shape != (height, width):
                    raise ValueError(f"{task.corrections_dir}: correction of {row['image_id']} is "
                                     f"{mask.shape[1]}x{mask.shape[0]}, the image {width}x{height}")
            labels = sorted(int(v) for v in np.unique(mask) if 0 < v < num_classes)  # the classes the mask holds
            ignore_fraction, pixels = mask_stats(mask, num_classes)
            truth = manifest[i]["mask"]
            if truth and truth.get("bytes"):
                truth_mask = decode_mask_png(truth["bytes"])
                confusion.update(truth_mask, mask)
                gt_images += 1
                if provenance == "pseudo":
                    uncorrected.update(truth_mask, mask)
                    gt_uncorrected += 1
            rows[i] = {"image_id": row["image_id"], "split": row["split"], "image": manifest[i]["image"],
                       "mask": {"bytes": encode_mask(mask, task.palette), "path": f"{row['image_id']}.png"},
                       "labels": labels, "tag_source": row["tag_source"], "provenance": provenance,
                       "height": height, "width": width,
                       "ignore_fraction": ignore_fraction, "confidence": confidence,
                       "object_confidence": object_confidence,
                       "label_score": 1.0 if provenance == "corrected" else label_score(confidence, ignore_fraction),
                       "pixels": pixels,
                       "boxes": mask_boxes(mask, num_classes, min_pixels=p.boxes.min_pixels,
                                           connectivity=p.boxes.connectivity)}
    return {"rows": rows, "excluded": excluded, "unknown": sum(1 for c in chunks for i in c if i in unknown),
            "confusion": confusion.matrix.tolist(), "gt_images": gt_images,
            "uncorrected": uncorrected.matrix.tolist(), "gt_uncorrected": gt_uncorrected}


def write_shard(task: ShardTask, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The pieces of one shard (``refine_rows`` results covering every row, written or excluded) as its pseudo-label
    shard."""
    rows = {i: row for part in parts for i, row in part["rows"].items()}
    covered = sorted([*rows, *(i for part in parts for i in part["excluded"])])
    if covered != list(range(len(covered))):
        raise ValueError(f"{task.name}: pieces cover rows {covered[:10]}..., not every row")
    confusion, uncorrected = (np.sum([np.asarray(part[k], np.int64) for part in parts], axis=0)
                              for k in ("confusion", "uncorrected"))
    p = task.params
    schema = pseudo_label_schema(task.class_names, task.palette, dict(task.producer), methods=p.methods,
                                 boxes=to_dict(p.boxes))
    table = pa.Table.from_pylist([rows[i] for i in sorted(rows)], schema=schema)
    return ShardSet(task.out_dir).write(task.name, table, fingerprint=task.key,
                                        split=task.name.rsplit("-", 1)[0],
                                        gt_images=sum(part["gt_images"] for part in parts),
                                        confusion=confusion.tolist(),
                                        no_known_class=sum(part["unknown"] for part in parts),
                                        **({"corrected": len(task.corrected),
                                            "gt_uncorrected": sum(part["gt_uncorrected"] for part in parts),
                                            "confusion_uncorrected": uncorrected.tolist()}
                                           if task.corrected else {}))


def refine_shard(task: ShardTask) -> dict[str, Any]:
    """Pseudo labels of one CAM shard, written into the output ShardSet; runs in a pool worker or in-process."""
    return write_shard(task, [refine_rows(task)])


def split_tasks(tasks: list[ShardTask], rows: dict[str, int], workers: int) -> list[ShardTask]:
    """Fewer shards than workers (a small collection is one shard): each shard as pieces of whole PAR chunks, about
    ``PIECES_PER_WORKER`` per worker, so that every core refines (the CRF is single-threaded) and a slow piece does
    not hold the others up. Pieces cut at chunk boundaries compute what the whole shard would: the same bytes."""
    if workers <= 1 or len(tasks) >= workers:
        return tasks
    pieces = []
    for task in tasks:
        chunks = math.ceil(rows[task.name] / task.params.batch_size)
        count = max(1, min(chunks, math.ceil(PIECES_PER_WORKER * workers / len(tasks))))
        bounds = [round(k * chunks / count) for k in range(count + 1)]
        pieces += [dataclasses.replace(task, chunks=(a, b)) for a, b in zip(bounds, bounds[1:]) if b > a]
    return pieces


def first_cam_row(cams_dir: Path) -> dict[str, Any] | None:
    """The seed-method columns of the first row of the first CAM shard (None when there is none), to refuse a
    chain whose methods need columns the shards lack before any work."""
    names = sorted(ShardSet(cams_dir).index()) if Path(cams_dir).exists() else []
    for name in names:
        shard = pq.ParquetFile(Path(cams_dir) / name)
        columns = [c for c in ("image_id", "fg", "affinity") if c in shard.schema_arrow.names]
        for batch in shard.iter_batches(batch_size=1, columns=columns):  # one row, not the shard's affinities
            row = batch.to_pylist()[0]
            return {k: row.get(k) for k in ("image_id", "fg", "affinity")}
    return None


def run_tasks(tasks: list[ShardTask], bar: tqdm, runtime, rows: dict[str, int]) -> None:
    """Shard tasks on the one parallel map (parallel/shard_map.py: in-process, pool or Dask, per ``runtime``); with
    fewer shards than workers, pieces of shards (``split_tasks``), each shard written once all its pieces are in."""
    pieces = split_tasks(tasks, rows, runtime.num_workers)
    if pieces is tasks:
        for _, entry in shard_map.map_tasks("labelling.pseudo_labels:refine_shard", tasks, runtime):
            bar.update(entry["rows"])
        return
    waiting = {task.name: sum(piece.name == task.name for piece in pieces) for task in tasks}
    parts: dict[str, list[dict[str, Any]]] = {task.name: [] for task in tasks}
    for i, part in shard_map.map_tasks(REFINE_TARGET, pieces, runtime):
        name = pieces[i].name
        parts[name].append(part)
        bar.update(len(part["rows"]))
        if len(parts[name]) == waiting[name]:
            write_shard(dataclasses.replace(pieces[i], chunks=None), parts.pop(name))


def refine_cams(params, cams_dir: Path, manifest_dir: Path, out_dir: Path, metrics_path: Path | None = None,
                overlays_dir: Path | None = None, progress: bool = True,
                corrections_dir: Path | None = None) -> dict[str, Any]:
    """Refine every CAM shard; returns {computed, skipped, removed, images, seconds, metrics}.

    ``corrections_dir``: a correction set (shards/corrections.py) whose masks replace the pseudo masks of their
    images; a shard's fingerprint includes the corrections of its images, so only shards holding one rerun.
    """
    p: RefineParams = params.refine
    check_methods(p.methods, first_cam_row(cams_dir), str(cams_dir))
    device = params.runtime.device
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if params.runtime.num_threads > 0:
        torch.set_num_threads(params.runtime.num_threads)
    cams_dir, manifest_dir, out_dir = Path(cams_dir), Path(manifest_dir), Path(out_dir)
    classes = read_classes(manifest_dir)
    shard_params = {k: v for k, v in to_dict(p).items() if k not in REPORT_ONLY}
    code = code_version("labelling.pseudo_labels")
    cam_index, manifest_index = ShardSet(cams_dir).index(), ShardSet(manifest_dir).index()
    missing = sorted(set(cam_index) - set(manifest_index))
    if missing:
        raise ValueError(f"{cams_dir}: CAM shards {missing} have no manifest shard in {manifest_dir}")
    model = read_metadata(cams_dir / min(cam_index))["producer"]["model_fingerprint"] if cam_index else ""
    producer = {"stage": "refine", "code_version": code, "params_fingerprint": hash_params(shard_params)[:32],
                "model_fingerprint": model}  # the classifier behind the CAMs
    corrections = corrections_of(corrections_dir, classes["class_names"])
    shard_ids = {name: pq.ParquetFile(cams_dir / name).read(columns=["image_id"]).column("image_id").to_pylist()
                 for name in sorted(cam_index)} if corrections else {}
    unknown = sorted(set(corrections) - {i for ids in shard_ids.values() for i in ids})
    if unknown:  # before any work: a correction of an image that is not (or no longer) in the data
        raise CorrectionError(f"{corrections_dir}: corrections of {len(unknown)} image(s) that are not in "
                              f"{cams_dir}: {unknown[:5]}; remove them from the set or restore the images")
    shards = ShardSet(out_dir)
    tasks, skipped = [], []
    for name in sorted(cam_index):
        extra = {"cams": cam_index[name]["sha256"], "device": device, "manifest": manifest_index[name]["sha256"]}
        corrected = {}
        if corrections:
            corrected = {image_id: corrections[image_id] for image_id in shard_ids[name] if image_id in corrections}
        if corrected:  # only then: the key of a shard without corrections stays what it was
            extra["corrections"] = corrected
        key = fingerprint(shard_params, code=code, extra=extra)
        if shards.is_done(name, key):
            skipped.append(name)
            continue
        tasks.append(ShardTask(name, str(cams_dir / name), str(manifest_dir / name), str(out_dir), key, p,
                               tuple(classes["class_names"]), tuple(map(tuple, classes["palette"])),
                               tuple(sorted(producer.items())), device,
                               str(corrections_dir) if corrected else None, tuple(sorted(corrected))))
    images = sum(cam_index[t.name]["rows"] for t in tasks)
    bar = tqdm(total=images, desc="refine", unit="img", disable=not progress)
    started = time.perf_counter()
    run_tasks(tasks, bar, params.runtime, {t.name: cam_index[t.name]["rows"] for t in tasks})
    seconds = time.perf_counter() - started
    bar.close()
    removed = shards.prune(cam_index)
    log.info("refine %s: %d images in %d shards (%d reused) in %.1f s: %.2f images/s with %d process(es)",
             list(p.methods), images, len(tasks), len(skipped), seconds, images / max(seconds, 1e-9),
             params.runtime.num_workers)
    result = {"computed": [t.name for t in tasks], "skipped": skipped, "removed": removed, "images": images,
              "seconds": round(seconds, 3),
              "metrics": pseudo_label_metrics(out_dir, classes["class_names"], p.eval_splits, p.methods)}
    if metrics_path is not None:
        atomic_write_json(metrics_path, result["metrics"])
    if overlays_dir is not None:
        paths = [out_dir / n for n in sorted(cam_index) if n.rsplit("-", 1)[0] in p.eval_splits] or shards.files()
        write_overlays(paths, cams_dir, manifest_dir, overlays_dir, p.overlays, classes["palette"])
    return result

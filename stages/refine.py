"""DVC stage ``refine``: CAM shards -> pseudo-label shards (METHODS.md §2 "Refinement", §1 "Online pseudo labels").

Consumes ``data/cams`` (``dump_cams``) and the manifest (images for PAR/CRF colours, ground truth for metrics).
Produces ``data/pseudo_labels/``: one shard per CAM shard, same name and row order (schema in
``shards/pseudo_labels.py``), ``metrics/pseudo_labels.json`` {miou, coverage, precision, recall, per_class} over
``eval_splits`` and overlay PNGs in ``metrics/overlays/``.

The chain (``stages/refine_chain.py``): CAMs upsampled to the working size (the original size, long side
capped at ``max_side``), background planes at ``high`` and ``low`` (softmax stacks), the refiners of
``methods`` in order (any of ``par``, ``crf``; ``[]`` = thresholds only), arg-max, ToCo's combination (0 /
class / 255). Masks are stored at the original size, with their per-instance boxes (``boxes``: connected
components of each class, ``shards/boxes.py``; ``box_min_pixels``, ``box_connectivity``) for detection users.

Parallel and resumable: one task per shard in a process pool (``runtime.num_workers``; "forkserver", as forking a
process that runs torch is unsafe); every shard is computed by the same function whatever the pool size, so 1 and
N processes write identical bytes. Shard fingerprint = the shard-deciding params + the CAM and manifest shards'
sha256 + code version + device type; each shard's confusion matrix is kept in the index, so a resumed run still
reports metrics over every shard.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import logging
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm import tqdm

from shards.boxes import mask_boxes
from shards.cams import decode_affinity, decode_cams, decode_fg
from shards.fingerprint import code_version, fingerprint, hash_params
from shards.images import decode_mask_png, encode_mask
from shards.io import ShardSet, atomic_write_json, read_metadata
from shards.manifest import read_classes
from shards.metrics import ConfusionMatrix
from shards.params import to_dict
from shards.pseudo_labels import mask_stats, pseudo_label_metrics, pseudo_label_schema
from stages import shard_dask
from stages.data import decode_rgb, resize_long
from stages.overlays import write_overlays
from stages.params import RefineParams, load_params_or_exit
from stages.refine_chain import check_methods, refine_chunk

log = logging.getLogger("refine")
REPORT_ONLY = ("eval_splits", "overlays")  # decide metrics and plots, not shard bytes: not in the fingerprint


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


def refine_shard(task: ShardTask) -> dict[str, Any]:
    """Pseudo labels of one CAM shard, written into the output ShardSet; runs in a pool worker or in-process."""
    p, num_classes = task.params, len(task.class_names)
    cams = pq.ParquetFile(task.cams_path).read().to_pylist()
    manifest = pq.ParquetFile(task.manifest_path).read(columns=["image_id", "image", "mask"]).to_pylist()
    if [r["image_id"] for r in cams] != [r["image_id"] for r in manifest]:
        raise ValueError(f"{task.cams_path}: rows differ from {task.manifest_path}; run dump_cams again")
    work = [resized(r["height"], r["width"], p.max_side) for r in cams]
    order = sorted(range(len(cams)), key=lambda i: (work[i], i))  # similar sizes share a PAR batch
    confusion, gt_images, rows = ConfusionMatrix(num_classes), 0, [None] * len(cams)
    for start in range(0, len(order), p.batch_size):
        chunk = order[start: start + p.batch_size]
        # a writeable copy: torch and pydensecrf refuse PIL's read-only buffers
        rgbs = [np.array(resize_long(decode_rgb(manifest[i]["image"]["bytes"]), max(work[i]))) for i in chunk]
        extras = [{"fg": decode_fg(cams[i]), "affinity": decode_affinity(cams[i])} for i in chunk]
        results = refine_chunk(rgbs, [decode_cams(cams[i]) for i in chunk], [cams[i]["classes"] for i in chunk],
                               p, torch.device(task.device), extras)
        for i, (mask, confidence) in zip(chunk, results):
            row, height, width = cams[i], cams[i]["height"], cams[i]["width"]
            if mask.shape != (height, width):
                mask = np.asarray(Image.fromarray(mask).resize((width, height), Image.NEAREST))
            ignore_fraction, pixels = mask_stats(mask, num_classes)
            truth = manifest[i]["mask"]
            if truth and truth.get("bytes"):
                confusion.update(decode_mask_png(truth["bytes"]), mask)
                gt_images += 1
            rows[i] = {"image_id": row["image_id"], "split": row["split"], "image": manifest[i]["image"],
                       "mask": {"bytes": encode_mask(mask, task.palette), "path": f"{row['image_id']}.png"},
                       "labels": row["classes"], "tag_source": row["tag_source"], "height": height, "width": width,
                       "ignore_fraction": ignore_fraction, "confidence": confidence, "pixels": pixels,
                       "boxes": mask_boxes(mask, num_classes, min_pixels=p.box_min_pixels,
                                           connectivity=p.box_connectivity)}
    schema = pseudo_label_schema(task.class_names, task.palette, dict(task.producer), methods=p.methods)
    return ShardSet(task.out_dir).write(task.name, pa.Table.from_pylist(rows, schema=schema), fingerprint=task.key,
                                        split=task.name.rsplit("-", 1)[0], gt_images=gt_images,
                                        confusion=confusion.matrix.tolist())


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


def resized(height: int, width: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def run_tasks(tasks: list[ShardTask], workers: int, threads: int, bar: tqdm, runtime=None) -> None:
    """Shard tasks in-process (1 worker), in a pool, or on Dask (``runtime``: stages/shard_dask.py); ``threads``
    torch threads per worker (0 = cores / workers)."""
    if runtime is not None and len(tasks) > 1 and shard_dask.use_dask(runtime):
        for _, entry in shard_dask.map_shards("stages.refine:refine_shard", tasks, runtime):
            bar.update(entry["rows"])
        return
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            bar.update(refine_shard(task)["rows"])
        return
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["stages.refine"])  # the server imports torch once; workers fork from it
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    with cf.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(threads,)) as pool:
        for future in cf.as_completed([pool.submit(refine_shard, task) for task in tasks]):
            bar.update(future.result()["rows"])


def run(params, cams_dir: Path, manifest_dir: Path, out_dir: Path, metrics_path: Path | None = None,
        overlays_dir: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Refine every CAM shard; returns {computed, skipped, removed, images, seconds, metrics}."""
    p: RefineParams = params.refine
    check_methods(p.methods, first_cam_row(cams_dir), str(cams_dir))
    device = params.runtime.device
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if params.runtime.num_threads > 0:
        torch.set_num_threads(params.runtime.num_threads)
    cams_dir, manifest_dir, out_dir = Path(cams_dir), Path(manifest_dir), Path(out_dir)
    classes = read_classes(manifest_dir)
    shard_params = {k: v for k, v in to_dict(p).items() if k not in REPORT_ONLY}
    code = code_version()
    cam_index, manifest_index = ShardSet(cams_dir).index(), ShardSet(manifest_dir).index()
    missing = sorted(set(cam_index) - set(manifest_index))
    if missing:
        raise ValueError(f"{cams_dir}: CAM shards {missing} have no manifest shard in {manifest_dir}")
    model = read_metadata(cams_dir / min(cam_index))["producer"]["model_fingerprint"] if cam_index else ""
    producer = {"stage": "refine", "code_version": code, "params_fingerprint": hash_params(shard_params)[:32],
                "model_fingerprint": model}  # the classifier behind the CAMs
    shards = ShardSet(out_dir)
    tasks, skipped = [], []
    for name in sorted(cam_index):
        key = fingerprint(shard_params, code=code, extra={"cams": cam_index[name]["sha256"], "device": device,
                                                          "manifest": manifest_index[name]["sha256"]})
        if shards.is_done(name, key):
            skipped.append(name)
            continue
        tasks.append(ShardTask(name, str(cams_dir / name), str(manifest_dir / name), str(out_dir), key, p,
                               tuple(classes["class_names"]), tuple(map(tuple, classes["palette"])),
                               tuple(sorted(producer.items())), device))
    images = sum(cam_index[t.name]["rows"] for t in tasks)
    bar = tqdm(total=images, desc="refine", unit="img", disable=not progress)
    started = time.perf_counter()
    run_tasks(tasks, params.runtime.num_workers, params.runtime.num_threads, bar, params.runtime)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--cams", default="data/cams")
    parser.add_argument("--manifest", default="data/manifest")
    parser.add_argument("--out", default="data/pseudo_labels")
    parser.add_argument("--metrics", default="metrics/pseudo_labels.json")
    parser.add_argument("--overlays", default="metrics/overlays")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = load_params_or_exit(args.params)
    try:
        check_methods(params.refine.methods, first_cam_row(Path(args.cams)), args.cams)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run(params, Path(args.cams), Path(args.manifest), Path(args.out), Path(args.metrics), Path(args.overlays))
    return 0


if __name__ == "__main__":
    sys.exit(main())

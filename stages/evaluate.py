"""DVC stage ``evaluate``: the trained segmenter on ground truth (METHODS.md §4).

Consumes ``data/segmenter`` (``train_segmenter``) and the manifest rows of ``evaluate.split`` that carry a ground-truth
mask. Scores three predictions of every image against it, each from one dataset-level confusion matrix
(shards/metrics.py): single scale; multi-scale + flip (softmax averaged over ``evaluate.scales`` and their horizontal
flips); multi-scale + flip + dense CRF (the segmenter-evaluation kernels of METHODS.md §2). Produces
``metrics/segmenter.json`` {miou (single scale), miou_ms_flip, miou_ms_flip_crf, per_class (single scale),
per_class_ms_flip_crf, ...} with mIoU in percent, a confusion file for ``dvc plots``
(rows of actual,predicted class names whose counts are the pixel confusion matrix of the best variant, quantised to
``confusion_rows`` rows) and overlay PNGs (image | single scale | multi-scale + flip + CRF | ground truth).

Chunks of images go to a process pool of ``runtime.num_workers`` (one in-process loop when it is 1); each worker
holds the network and runs the CRFs (single-threaded C++, ~0.1 s per image at 9 labels) of its images. The CRF refines
the multi-scale prediction only: on the single-scale one too it would double the cost. Confusion counts are integer
sums, so the result does not depend on the pool size (at equal torch threads per process).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from config.cli import stage_arguments
from config.schema import EvaluateParams, load_params_or_exit
from parallel import shard_map
from refinement.crf import crf_refine_probs
from shards.io import atomic_write_bytes, atomic_write_json
from shards.manifest import manifest_files
from shards.metrics import ConfusionMatrix
from shards.overlays import side_by_side
from shards.sampling import RowIndex
from training import runtime as rt
from training.segmenter_data import GroundTruthImages, rows_with_masks
from training.segmenter_model import load_segmenter, predict_views

log = logging.getLogger("evaluate")
VARIANTS = ("single", "ms_flip", "ms_flip_crf")
CHUNK = 10  # images per task of a worker


def confusion_rows(matrix: np.ndarray, class_names: list[str], rows: int) -> str:
    """CSV ``actual,predicted``: each (gt, pred) cell repeated in proportion to its pixel count (``rows`` in all).

    DVC's confusion templates count rows; one row per pixel would be millions. Cells with pixels get at least one row.
    """
    square = matrix[:, : len(class_names)]
    total = max(int(square.sum()), 1)
    lines = ["actual,predicted"]
    for gt, pred in zip(*np.nonzero(square)):
        lines += [f"{class_names[gt]},{class_names[pred]}"] * max(1, round(square[gt, pred] * rows / total))
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ChunkTask:
    """Some manifest rows to score; ``shown`` (a subset of ``rows``) come back with their predictions."""

    files: tuple[str, ...]
    rows: tuple[int, ...]
    shown: tuple[int, ...]
    params: EvaluateParams
    num_classes: int


_WORKER: dict[str, Any] = {}  # the model of this process, loaded once per worker (parallel/shard_map.py init)


def load_worker_model(segmenter_dir: str, device: str) -> None:
    _WORKER["device"] = torch.device(device)
    _WORKER["model"] = load_segmenter(segmenter_dir, _WORKER["device"])[0]


def evaluate_chunk(task: ChunkTask) -> dict[str, Any]:
    """Confusion matrices of the three variants over the chunk's images, and the shown images' predictions."""
    model, device = _WORKER["model"], _WORKER["device"]
    p = task.params
    autocast = rt.autocast_for(device, p.bf16)
    images = GroundTruthImages(RowIndex(task.files), task.rows)
    matrices = {v: ConfusionMatrix(task.num_classes) for v in (VARIANTS if p.use_crf else VARIANTS[:2])}
    panels = []
    for i, row in enumerate(task.rows):
        item = images[i]
        rgb, gt = np.ascontiguousarray(item["rgb"]), item["gt"]
        ms, single = predict_views(model, rgb, size=p.size, scales=p.scales, flip=p.flip, device=device,
                                   autocast=autocast)  # (K+1, H, W) each
        labels = {"single": single.argmax(0).numpy().astype(np.uint8),
                  "ms_flip": ms.argmax(0).numpy().astype(np.uint8)}
        if p.use_crf:  # on the multi-scale prediction only: ~0.1 s per image at 9 labels, as much as the network
            labels["ms_flip_crf"] = crf_refine_probs(rgb, ms.numpy(), p.crf).argmax(axis=0).astype(np.uint8)
        for variant, label in labels.items():
            matrices[variant].update(gt, label)
        if row in task.shown:
            panels.append({"image_id": item["image_id"], "rgb": rgb, "gt": gt, **labels})
    return {"matrices": {v: m.matrix for v, m in matrices.items()}, "panels": panels}


def run(params, segmenter_dir: Path, manifest_dir: Path, metrics_path: Path | None = None,
        confusion_path: Path | None = None, overlays_dir: Path | None = None, progress: bool = True) -> dict[str, Any]:
    p: EvaluateParams = params.evaluate
    env = rt.setup_runtime(params.runtime.device, params.runtime.num_threads)
    config = json.loads((Path(segmenter_dir) / "config.json").read_text())
    class_names, palette = list(config["class_names"]), config["palette"]
    files = manifest_files(manifest_dir, p.split)
    rows = rows_with_masks(files)
    if not rows:
        raise ValueError(f"{manifest_dir}: no {p.split!r} rows with a ground-truth mask to evaluate on")
    shown = tuple(rows[i] for i in sorted(set(np.linspace(0, len(rows) - 1, min(p.overlays, len(rows)))
                                              .round().astype(int).tolist()))) if p.overlays else ()
    tasks = [ChunkTask(tuple(map(str, files)), tuple(rows[i: i + CHUNK]), shown, p, len(class_names))
             for i in range(0, len(rows), CHUNK)]
    matrices = {v: ConfusionMatrix(len(class_names)) for v in (VARIANTS if p.use_crf else VARIANTS[:2])}
    panels: list[dict[str, Any]] = []  # in row order: tasks are merged in order
    started = time.perf_counter()
    bar = tqdm(total=len(rows), desc="evaluate", unit="img", disable=not progress)
    # One process per core (runtime.num_workers), each with the network and its CRFs: torch's intra-op threads
    # scale poorly on these small images, and a CRF is single-threaded C++. Merged in task order.
    results: dict[int, dict[str, Any]] = {}
    for i, result in shard_map.map_tasks("stages.evaluate:evaluate_chunk", tasks, params.runtime,
                                         init="stages.evaluate:load_worker_model",
                                         init_args=(str(segmenter_dir), str(env.device))):
        results[i] = result
        bar.update(len(tasks[i].rows))
    for i in range(len(tasks)):
        _merge(matrices, panels, results.pop(i))
    bar.close()
    seconds = time.perf_counter() - started
    log.info("evaluate: %d images in %.1f s (%.2f images/s; scales %s, flip %s, crf %s, %d process(es))", len(rows),
             seconds, len(rows) / max(seconds, 1e-9), list(p.scales), p.flip, p.use_crf, params.runtime.num_workers)

    summaries = {v: m.summary(class_names) for v, m in matrices.items()}
    result: dict[str, Any] = {
        "miou": summaries["single"]["miou"],
        "miou_ms_flip": summaries["ms_flip"]["miou"],
        "miou_ms_flip_crf": summaries["ms_flip_crf"]["miou"] if p.use_crf else None,
        "per_class": summaries["single"]["per_class"],
        "per_class_ms_flip_crf": summaries["ms_flip_crf"]["per_class"] if p.use_crf else None,
        "accuracy": round(100 * float(np.trace(matrices["single"].matrix)) / max(matrices["single"].matrix.sum(), 1),
                          2),
        "images": len(rows), "split": p.split, "size": p.size, "scales": list(p.scales), "flip": p.flip,
    }
    if metrics_path is not None:
        atomic_write_json(metrics_path, result)
    if confusion_path is not None:
        best = matrices["ms_flip_crf" if p.use_crf else "ms_flip"].matrix
        atomic_write_bytes(confusion_path, confusion_rows(best, class_names, p.confusion_rows).encode())
    if overlays_dir is not None:
        write_overlays(panels, Path(overlays_dir), palette, p.use_crf)
    return result


def _merge(matrices: dict[str, ConfusionMatrix], panels: list, result: dict[str, Any]) -> None:
    for variant, matrix in result["matrices"].items():
        matrices[variant].matrix += matrix
    panels.extend(result["panels"])


def write_overlays(panels: list[dict[str, Any]], out_dir: Path, palette, crf: bool) -> None:
    """``<image_id>.png``: image | single scale | MS + flip (+ CRF) | ground truth; replaces the PNGs there."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):
        old.unlink()
    for panel in panels:
        best = panel["ms_flip_crf"] if crf else panel["ms_flip"]
        image = side_by_side([panel["rgb"]], [panel["single"], best, panel["gt"]], palette)
        Image.fromarray(image).save(out_dir / f"{panel['image_id']}.png", optimize=True)


def main(argv: list[str] | None = None) -> int:
    args = stage_arguments(__doc__, argv, segmenter="data/segmenter", manifest="data/manifest",
                           metrics="metrics/segmenter.json", confusion="metrics/segmenter_confusion.csv",
                           overlays="metrics/segmenter_overlays")
    params = load_params_or_exit(args.params)
    started = time.perf_counter()
    result = run(params, Path(args.segmenter), Path(args.manifest), Path(args.metrics), Path(args.confusion),
                 Path(args.overlays))
    log.info("evaluate done in %.1f s: %s", time.perf_counter() - started,
             json.dumps({k: result[k] for k in ("miou", "miou_ms_flip", "miou_ms_flip_crf")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CAM shards of the manifest (the work of the ``dump_cams`` stage; ``relabel`` runs it on a collection).

What it consumes and produces, and how it resumes: the docstring of ``stages/dump_cams.py``.
"""


from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from tqdm import tqdm

from config.loader import to_dict
from config.schema import DumpCamsParams
from models.backbone import patch_stride
from models.cam import multiscale_cam, valid_at_tokens
from models.fold import fold_batchnorm
from parallel import shard_map
from shards.cams import UNKNOWN, UNLIKE_TRAINING, cam_schema, decode_cams, encode_affinity, encode_cams
from shards.fingerprint import classifier_fingerprint, code_version, fingerprint, hash_params, sha256_file
from shards.images import decode_mask_png, decode_rgb, long_side_size, resize_long
from shards.io import ShardSet, atomic_write_json
from shards.manifest import manifest_files, read_classes
from shards.metrics import SWEEP, ThresholdSweep
from training import runtime as rt
from training.classifier_model import load_classifier
from training.data import to_tensor
from training.feature_stats import pooled_features

log = logging.getLogger("dump_cams")
# decide metrics or speed, not what a shard holds: kept out of the fingerprint (workers, like runtime.num_threads,
# changes CAMs by float rounding only)
REPORT_ONLY = ("eval_split", "bkg_threshold", "workers")
PIECES_PER_WORKER = 2  # pieces of a split shard per worker (split_pieces): balance against one model per worker


def padded_size(height: int, width: int, p: DumpCamsParams) -> tuple[int, int]:
    h, w = long_side_size(height, width, p.image_size)
    return math.ceil(h / p.pad_multiple) * p.pad_multiple, math.ceil(w / p.pad_multiple) * p.pad_multiple


class _SlotCams:
    """A ToCo seen by ``multiscale_cam`` as a model with P class "slots" per image instead of K classes.

    Gathering the P present classes at the token grid keeps every upsampled map (2B, P, H, W) instead of
    (2B, K, H, W): on COCO, ~3 planes instead of 80. ``multiscale_cam`` feeds [images, flipped images].
    ``first`` holds the full-K token-grid maps (and AFA affinity) of the scale-1 pass that already gave the class
    scores, so that pass is not run twice (the shape of its input identifies it). TRT's "fg" map has one plane
    and is passed through. ``affinity``: the AFA affinity (B, N, N) of the scale-1 pass, once it has run.
    """

    def __init__(self, model: torch.nn.Module, class_index: torch.Tensor, scale1: torch.Size,
                 first: tuple[tuple[torch.Tensor, ...], torch.Tensor | None] | None = None):
        self.model, self.index, self.scale1, self.first = model, class_index, scale1, first  # index: (B, P)
        self.affinity = first[1] if first is not None else None

    def cams(self, x: torch.Tensor, heads: tuple[str, ...], relu: bool = False) -> tuple[torch.Tensor, ...]:
        if self.first is not None and x.shape == self.scale1:
            maps = self.first[0]
        else:
            enc = self.model.encode(x)
            maps = self.model.head_maps(enc, heads)
            if x.shape == self.scale1 and self.affinity is None:
                self.affinity = scale1_affinity(enc, self.index.shape[0])
        if relu:
            maps = tuple(F.relu(m) for m in maps)
        index = self.index.repeat(x.shape[0] // self.index.shape[0], 1)  # (2B, P) with the flip, else (B, P)
        return tuple(m if name == "fg" else m.gather(1, index[:, :, None, None].expand(-1, -1, *m.shape[-2:]))
                     for name, m in zip(heads, maps))


def scale1_affinity(enc: dict[str, Any], batch: int) -> torch.Tensor | None:
    """AFA affinity (B, N, N) in [0, 1] of the first ``batch`` images of an encoding (not their flips)."""
    logits = enc.get("affinity_logits")
    return None if logits is None else logits[:batch].float().sigmoid()


def class_scores(model: torch.nn.Module, images: torch.Tensor, valid: torch.Tensor, heads: tuple[str, ...] = (),
                 flip: bool = True,
                 ) -> tuple[torch.Tensor, tuple[tuple[torch.Tensor, ...], torch.Tensor | None] | None, torch.Tensor]:
    """Sigmoid scores (B, K) from the classifier's pooling (``ToCo.pooled_logits``) over the image's tokens only,
    and the mean final-token features (B, C) (the OOD score's input, training/feature_stats.py).

    With ``heads`` the pass runs on [images, flipped images] (the images alone without ``flip``), which is scale 1
    of the multi-scale CAM, and also returns that pass's raw maps per head (full K), each (2B or B, ., h, w), and
    its AFA affinity, for ``_SlotCams``.
    """
    B = images.shape[0]
    enc = model.encode(torch.cat([images, images.flip(-1)]) if heads and flip else images)
    tokens = enc["tokens"][:B].float()  # (B, C, h, w)
    inside = valid_at_tokens(valid, tokens.shape[-2:])  # (B, h, w)
    scores = model.pooled_logits(tokens, "final", inside).float().sigmoid()  # (B, K)
    features = pooled_features(tokens, inside)  # (B, C)
    return scores, ((model.head_maps(enc, heads), scale1_affinity(enc, B)) if heads else None), features


def predict_view(images: torch.Tensor, valid: torch.Tensor, p: DumpCamsParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The padded batch at ``predict_size`` (sides kept multiples of ``pad_multiple``) and its valid mask."""
    scale = p.predict_size / p.image_size
    size = [max(p.pad_multiple, round(s * scale / p.pad_multiple) * p.pad_multiple) for s in images.shape[-2:]]
    small = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)
    small_valid = F.interpolate(valid[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0] > 0.5
    return small, small_valid  # (B, 3, h, w), (B, h, w)


def choose_classes(tags: list[int] | None, scores: np.ndarray, threshold: float) -> tuple[list[int], str]:
    """Class ids 1..K of a row and its tag source: "given" (the row's tags), "predicted" (an untagged row: every
    class whose score clears ``threshold``) or "unknown" (an untagged row where no class does: no known class, no
    class is forced on it; ``refine.no_known_class`` decides what its pseudo label is)."""
    if tags is not None:
        return sorted(set(int(t) for t in tags)), "given"
    picked = [k + 1 for k in np.flatnonzero(scores > threshold)]
    return (picked, "predicted") if picked else ([], UNKNOWN)


def padded_batch(rgbs: list[np.ndarray], p: DumpCamsParams) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Images of one padded shape (``padded_size``) as the network's batch (B, 3, Hp, Wp), their valid masks
    (B, Hp, Wp) and their sizes at ``image_size``."""
    hp, wp = padded_size(*rgbs[0].shape[:2], p)
    images = torch.zeros(len(rgbs), 3, hp, wp)
    valid = torch.zeros(len(rgbs), hp, wp, dtype=torch.bool)
    black = to_tensor(np.zeros((1, 1, 3), np.uint8))  # (3, 1, 1): the training crops' padding colour
    sizes = []
    for b, rgb in enumerate(rgbs):
        x = to_tensor(resize_long(rgb, p.image_size))  # (3, h, w)
        h, w = x.shape[-2:]
        images[b] = black
        images[b, :, :h, :w] = x
        valid[b, :h, :w] = True
        sizes.append((h, w))
    return images, valid, sizes


def reuses_scale1(p: DumpCamsParams) -> bool:
    """Tags are predicted at predict_size, the classifier's own scale (train_classifier.eval_size); when it is the
    CAM size, that pass doubles as scale 1 of the multi-scale CAM."""
    return 1.0 in p.scales and p.predict_size in (0, p.image_size)


@torch.no_grad()
def image_features(model: torch.nn.Module, rgb: np.ndarray, p: DumpCamsParams, env: rt.Runtime) -> np.ndarray:
    """The pooled feature (C,) of one image exactly as ``dump_cams`` computes it for the OOD score (same resize,
    padding and predict view), for the training-feature statistics (training/feature_stats.py)."""
    images, valid, _ = padded_batch([rgb], p)
    images, valid = images.to(env.device), valid.to(env.device)
    with env.autocast(p.bf16):
        _, _, features = class_scores(model, images, valid) if reuses_scale1(p) else \
            class_scores(model, *predict_view(images, valid, p))
    return features[0].double().cpu().numpy()


@torch.no_grad()
def cams_for_batch(model: torch.nn.Module, rows: list[dict[str, Any]], p: DumpCamsParams, env: rt.Runtime
                   ) -> list[dict[str, Any]]:
    """CAM-shard rows of manifest rows that share one padded shape."""
    images, valid, sizes = padded_batch([decode_rgb(row["image"]["bytes"]) for row in rows], p)
    hp, wp = images.shape[-2:]
    images, valid = images.to(env.device), valid.to(env.device)
    heads = ("final", "aux") if p.aux else ("final",)
    if getattr(model, "reattention", None) is not None:
        heads += ("fg",)  # TRT: the class-agnostic foreground map, stored in column fg
    reuse = reuses_scale1(p)
    with env.autocast(p.bf16):
        if reuse:
            scores, first, features = class_scores(model, images, valid, heads, p.flip)
        else:
            scores, first, features = class_scores(model, *predict_view(images, valid, p))
    scores = scores.cpu().numpy()  # (B, K)
    stats = getattr(model, "feature_stats", None)
    ood = stats.scores(features) if stats is not None else [None] * len(rows)
    chosen = [choose_classes(row["tags"], scores[b], p.predict_threshold) for b, row in enumerate(rows)]
    slots = max(1, max(len(c) for c, _ in chosen))
    class_index = torch.zeros(len(rows), slots, dtype=torch.long)
    slot_valid = torch.zeros(len(rows), slots)
    for b, (classes, _) in enumerate(chosen):
        class_index[b, : len(classes)] = torch.tensor(classes, dtype=torch.long) - 1
        slot_valid[b, : len(classes)] = 1.0
    passes = 2 if p.flip else 1  # images per image in one scale's batch
    slot_cams = _SlotCams(model, class_index.to(env.device), torch.Size((passes * len(rows), *images.shape[1:])),
                          first if reuse else None)
    with env.autocast(p.bf16):
        maps = multiscale_cam(slot_cams, images, p.scales, head=heads, labels=slot_valid.to(env.device),
                              valid=valid, flip=p.flip)  # each (B, P, Hp, Wp); fg (B, 1, Hp, Wp)
        affinity = slot_cams.affinity
        if affinity is None and getattr(model, "affinity_head", None) is not None:  # scale 1 not among scales
            affinity = scale1_affinity(model.encode(images), len(rows))
    out = []
    long_side = p.cam_size or p.image_size
    grid = model.token_grid(hp, wp)  # the padded batch's tokens: the affinity is (grid product)²
    for b, (row, (classes, source)) in enumerate(zip(rows, chosen)):
        ch, cw = long_side_size(row["height"], row["width"], long_side)
        h, w = sizes[b]
        stored = {}
        for name, cam in zip(heads, maps):
            planes = 1 if name == "fg" else len(classes)
            cam = cam[b: b + 1, :planes, :h, :w].float()  # (1, P_b, h, w): crop the padding away
            if not planes:  # a tagged image with no foreground class: an empty (0, ch, cw) stack
                cam = cam.new_zeros(1, 0, ch, cw)
            elif (ch, cw) != (h, w):
                cam = F.interpolate(cam, size=(ch, cw), mode="bilinear", align_corners=False,
                                    antialias=ch < h or cw < w)
            stored[name] = encode_cams(cam[0].cpu().numpy())
        row_out = {
            "image_id": row["image_id"], "split": row["split"], "height": row["height"], "width": row["width"],
            "cam_height": ch, "cam_width": cw, "classes": classes,
            "scores": [float(scores[b, c - 1]) for c in classes], "tag_source": source,
            "all_scores": [float(s) for s in scores[b]], "ood_score": None if ood[b] is None else float(ood[b]),
            "cams": stored["final"], "aux_cams": stored.get("aux"), "fg": stored.get("fg"),
            "affinity": None, "aff_height": None, "aff_width": None,
        }
        if affinity is not None:
            stride = patch_stride(model.backbone)
            th, tw = math.ceil(h / stride), math.ceil(w / stride)  # the tokens that cover the image, not padding
            a = affinity[b].view(*grid, *grid)[:th, :tw, :th, :tw].reshape(th * tw, th * tw)
            row_out.update(affinity=encode_affinity(a.cpu().numpy()), aff_height=th, aff_width=tw)
        out.append(row_out)
    return out


def shard_batches(rows: list[dict[str, Any]], p: DumpCamsParams) -> list[list[int]]:
    """Row indices of the network batches of one shard: rows of one padded shape, in row order, split into the
    fewest batches of at most ``batch_size``, of near-equal sizes (24 rows at 16: 12 + 12, not 16 + 8, so that
    the pieces of a split shard weigh the same). A function of the rows and params alone (``CamShardTask.batches``)."""
    shapes = [padded_size(row["height"], row["width"], p) for row in rows]
    groups: dict[tuple[int, int], list[int]] = {}
    for i in sorted(range(len(rows)), key=lambda i: (shapes[i], i)):
        groups.setdefault(shapes[i], []).append(i)
    batches = []
    for members in groups.values():
        count = math.ceil(len(members) / p.batch_size)
        bounds = [len(members) * k // count for k in range(count + 1)]
        batches += [members[a:b] for a, b in zip(bounds, bounds[1:])]
    return batches


def read_manifest_rows(path: Path) -> list[dict[str, Any]]:
    return pq.ParquetFile(path).read(columns=["image_id", "split", "image", "tags", "height", "width"]).to_pylist()


def dump_rows(model: torch.nn.Module, path: Path, p: DumpCamsParams, env: rt.Runtime, bar: tqdm,
              batches: tuple[int, int] | None = None) -> dict[int, dict[str, Any]]:
    """CAM rows of one manifest shard's batches ``batches`` [start, stop) of ``shard_batches`` (all when None), by
    row index."""
    rows = read_manifest_rows(path)
    chosen = shard_batches(rows, p)
    if batches is not None:
        chosen = chosen[batches[0]: batches[1]]
    out: dict[int, dict[str, Any]] = {}
    for batch in chosen:
        for i, result in zip(batch, cams_for_batch(model, [rows[i] for i in batch], p, env)):
            out[i] = result
        bar.update(len(batch))
    return out


def dump_shard(model: torch.nn.Module, path: Path, p: DumpCamsParams, env: rt.Runtime, bar: tqdm) -> list[dict]:
    """CAM rows of one manifest shard, in its row order; batches group equal padded shapes."""
    out = dump_rows(model, path, p, env, bar)
    return [out[i] for i in range(len(out))]


def cam_metrics(cams_dir: Path, manifest_dir: Path, split: str, class_names: list[str],
                bkg_threshold: float) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Plain-rule CAM mIoU of the stored CAMs (upsampled to the original size) against the split's ground truth."""
    thresholds = sorted(set(SWEEP) | {round(bkg_threshold, 4)})
    sweep = ThresholdSweep(len(class_names), thresholds)
    for manifest_path in manifest_files(manifest_dir, split):
        truth = pq.ParquetFile(manifest_path).read(columns=["image_id", "mask"]).to_pylist()
        cams = pq.ParquetFile(cams_dir / manifest_path.name).read().to_pylist()
        for row, gt_row in zip(cams, truth):
            assert row["image_id"] == gt_row["image_id"], "CAM shard rows out of manifest order"
            if not gt_row["mask"] or not gt_row["mask"].get("bytes"):
                continue
            gt = decode_mask_png(gt_row["mask"]["bytes"])
            cam = torch.from_numpy(decode_cams(row))[None]  # (1, P, h, w)
            if cam.shape[1] == 0:
                value, label = np.zeros(gt.shape, np.float32), np.zeros(gt.shape, np.int64)
            else:
                cam = F.interpolate(cam, size=gt.shape, mode="bilinear", align_corners=False)[0]  # (P, H, W)
                top, arg = cam.max(dim=0)
                # float64: t is compared unrounded here (the sweep compares in the precision of the values)
                value, label = top.double().numpy(), np.asarray(row["classes"], np.int64)[arg.numpy()]
            sweep.update(gt, value, label)
    metrics, curve = sweep.report(class_names, bkg_threshold, SWEEP)
    return {**metrics, "split": split}, curve


def ood_counts(paths: list[Path]) -> dict[str, Any]:
    """How many rows of CAM shards have an OOD score, and how many of those are above 1 (unlike the training data)."""
    scores = [v for path in paths if "ood_score" in pq.read_schema(path).names
              for v in pq.read_table(path, columns=["ood_score"]).column("ood_score").to_pylist() if v is not None]
    return {"ood_scored": len(scores), "unlike_training": sum(v > UNLIKE_TRAINING for v in scores),
            "median_ood_score": round(float(np.median(scores)), 4) if scores else None}


@dataclass(frozen=True)
class CamShardTask:
    path: str
    params: DumpCamsParams
    device: str
    batches: tuple[int, int] | None = None  # a piece of the shard: batches [start, stop) of shard_batches; None = all


_WORKER: dict[str, Any] = {}  # a worker's classifier, loaded once per worker (parallel/shard_map.py init)
FOLD_EXAMPLE_SIDE = 64  # side of the random image that traces and checks the BatchNorm folding (models/fold.py)


def inference_classifier(classifier_dir: str | Path, device: torch.device) -> tuple[torch.nn.Module, list[str]]:
    """The classifier for CAMs: on CPU with its convolutions' BatchNorms folded in (models/fold.py; float
    rounding only, ~25% of a CPU dump saved). Not on CUDA, where the cuDNN path fuses them anyway."""
    model, classes = load_classifier(classifier_dir, device)
    if device.type == "cpu":
        example = torch.rand(1, 3, FOLD_EXAMPLE_SIDE, FOLD_EXAMPLE_SIDE, generator=torch.Generator().manual_seed(0))
        if fold_batchnorm(model, example, run=lambda module, x: module.encode(x)["tokens"]) < 0:
            log.warning("%s: folding BatchNorm into convolutions changed the classifier's output; left unfolded",
                        classifier_dir)
    return model, classes


def load_worker_model(classifier_dir: str, model_fp: str, device: str) -> None:
    """``model_fp`` is part of the init key, so a worker that outlives a run reloads a retrained classifier."""
    env = rt.setup_runtime(device)
    _WORKER.update(env=env, model=inference_classifier(classifier_dir, env.device)[0], model_fp=model_fp)


def dump_cam_shard(task: CamShardTask) -> dict[int, dict[str, Any]]:
    """CAM rows of one manifest shard (or of its piece ``task.batches``), by row index, computed on a worker (the
    stage writes the shards itself)."""
    return dump_rows(_WORKER["model"], Path(task.path), task.params, _WORKER["env"], tqdm(disable=True),
                     task.batches)


def split_pieces(tasks: list[CamShardTask], workers: int) -> list[CamShardTask]:
    """Fewer shards than workers (a small collection is one shard): each shard as pieces of whole batches, about
    ``PIECES_PER_WORKER`` per worker. Pieces cut at batch boundaries compute the batches the whole shard would."""
    if len(tasks) >= workers:
        return tasks
    pieces = []
    for task in tasks:
        batches = len(shard_batches(read_manifest_rows_light(Path(task.path)), task.params))
        count = max(1, min(batches, math.ceil(PIECES_PER_WORKER * workers / len(tasks))))
        bounds = [round(k * batches / count) for k in range(count + 1)]
        pieces += [dataclasses.replace(task, batches=(a, b)) for a, b in zip(bounds, bounds[1:]) if b > a]
    return pieces


def read_manifest_rows_light(path: Path) -> list[dict[str, Any]]:
    """The sizes of a manifest shard's rows (what ``shard_batches`` reads), without the image bytes."""
    return pq.ParquetFile(path).read(columns=["height", "width"]).to_pylist()


def use_pool(params, env: rt.Runtime, pending: int) -> bool:
    """CAMs in worker processes: on Dask when asked (``runtime``), or on a CPU with ``dump_cams.workers`` > 1 (a
    process per core with one torch thread each dumped ~1.5x the images of one process on a loaded machine, but
    0.66-0.77x on an idle one, where the pool's start-up dominates a small collection: bench/RESULTS.md §15)."""
    if not pending:
        return False
    if shard_map.use_dask(params.runtime):
        return True
    return env.device.type == "cpu" and params.dump_cams.workers > 1


def classifier_classes(classifier_dir: str | Path) -> list[str]:
    """The class names of a classifier folder, from its config (without building the model)."""
    return list(json.loads((Path(classifier_dir) / "config.json").read_text())["class_names"])


def _whole_shards(parts, pieces: list[CamShardTask], bar: tqdm):
    """(shard path, rows in row order) of every shard, once all its pieces are in (pieces arrive in any order)."""
    expected = {task.path: sum(piece.path == task.path for piece in pieces) for task in pieces}
    received: dict[str, list[dict[int, dict[str, Any]]]] = {}
    for i, rows in parts:
        path = pieces[i].path
        received.setdefault(path, []).append(rows)
        bar.update(len(rows))
        if len(received[path]) == expected[path]:
            merged = {k: row for part in received.pop(path) for k, row in part.items()}
            yield path, [merged[k] for k in range(len(merged))]


def dump_cams(params, manifest_dir: Path, classifier_dir: Path, out_dir: Path, metrics_path: Path | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Dump the CAM shards; returns {computed, skipped, removed, images, seconds, metrics}."""
    p: DumpCamsParams = params.dump_cams
    env = rt.setup_runtime(params.runtime.device, params.runtime.num_threads)
    manifest_dir, out_dir = Path(manifest_dir), Path(out_dir)
    classes = read_classes(manifest_dir)
    model_classes = classifier_classes(classifier_dir)
    if list(model_classes) != list(classes["class_names"]):
        raise ValueError(f"{classifier_dir}: classifier classes {model_classes} differ from the manifest's")
    shard_params = {k: v for k, v in to_dict(p).items() if k not in REPORT_ONLY}
    code, model_fp = code_version("labelling.cams"), classifier_fingerprint(classifier_dir)
    producer = {"stage": "dump_cams", "code_version": code, "params_fingerprint": hash_params(shard_params)[:32],
                "model_fingerprint": model_fp}
    schema = cam_schema(classes["class_names"], classes["palette"], producer, scales=p.scales)
    manifest_index = ShardSet(manifest_dir).index()
    shards = ShardSet(out_dir)
    paths = [path for split in p.splits for path in manifest_files(manifest_dir, split)]
    missing = [split for split in p.splits if not manifest_files(manifest_dir, split)]
    if missing:
        raise ValueError(f"{manifest_dir}: no manifest shards for split(s) {missing} (dump_cams.splits)")
    total = sum(pq.ParquetFile(path).metadata.num_rows for path in paths)
    computed, skipped, images, busy = [], [], 0, 0.0
    bar = tqdm(total=total, desc="dump_cams", unit="img", disable=not progress)
    pending = []  # (manifest shard, its sha256, fingerprint) of the shards to compute
    for path in paths:
        sha = manifest_index.get(path.name, {}).get("sha256") or sha256_file(path)
        key = fingerprint(shard_params, code=code, extra={"model": model_fp, "manifest": sha,
                                                          "device": env.device.type,
                                                          "precision": env.precision(p.bf16)})
        if shards.is_done(path.name, key):
            skipped.append(path.name)
            bar.update(shards.index()[path.name]["rows"])
            continue
        pending.append((path, sha, key))
    tick = time.perf_counter()
    pooled = use_pool(params, env, len(pending))  # the same rows either way; this stage writes the shards
    if pooled:
        tasks = [CamShardTask(str(path.resolve()), p, params.runtime.device) for path, _, _ in pending]
        on_dask = shard_map.use_dask(params.runtime)
        pieces = tasks if on_dask else split_pieces(tasks, p.workers)
        runtime = params.runtime if on_dask else dataclasses.replace(params.runtime, num_threads=0)  # cores / workers
        parts = shard_map.map_tasks("labelling.cams:dump_cam_shard", pieces, runtime,
                                    workers=min(p.workers, len(pieces)), init="labelling.cams:load_worker_model",
                                    init_args=(str(Path(classifier_dir).resolve()), model_fp, params.runtime.device))
        results = _whole_shards(parts, pieces, bar)
    elif pending:
        model = inference_classifier(classifier_dir, env.device)[0]
        results = ((str(path.resolve()), dump_shard(model, path, p, env, bar)) for path, _, _ in pending)
    else:
        results = iter(())
    index = {str(path.resolve()): n for n, (path, _, _) in enumerate(pending)}
    for source, rows in results:
        path, sha, key = pending[index[source]]
        shards.write(path.name, pa.Table.from_pylist(rows, schema=schema), fingerprint=key,
                     split=path.name.rsplit("-", 1)[0], manifest_sha256=sha)
        images += len(rows)
        computed.append(path.name)
    busy = time.perf_counter() - tick
    bar.close()
    removed = shards.prune([path.name for path in paths])
    log.info("dump_cams: %d images in %d shards computed (%d shards reused) in %.1f s: %.1f images/s on %s",
             images, len(computed), len(skipped), busy, images / max(busy, 1e-9), env.device)
    result: dict[str, Any] = {"computed": computed, "skipped": skipped, "removed": removed, "images": images,
                              "seconds": round(busy, 3)}
    if metrics_path is not None and p.eval_split in p.splits:
        metrics, curve = cam_metrics(out_dir, manifest_dir, p.eval_split, classes["class_names"], p.bkg_threshold)
        metrics.update(scales=list(p.scales), image_size=p.image_size, cam_size=p.cam_size or p.image_size,
                       **ood_counts(shards.files()))
        atomic_write_json(metrics_path, metrics)
        atomic_write_json(Path(metrics_path).with_name("cams_curve.json"), {"curve": curve})
        result["metrics"] = metrics
    return result

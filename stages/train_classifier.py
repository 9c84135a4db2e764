"""DVC stage ``train_classifier``: the ToCo classifier (METHODS.md §1) on the train manifest.

Consumes the manifest shards of ``prepare`` (tagged train rows; val rows with ground truth for metrics). Produces
``model.safetensors`` + ``config.json`` (the final weights, a DVC out) + ``feature_stats.safetensors`` (the training
images' pooled-feature statistics, behind the out-of-distribution score of new images: training/feature_stats.py),
dvclive curves (losses, lr, images/s, CAM
mIoU), and ``metrics/classifier.json`` {f1, cam_miou, cam_threshold, ...}.

The loop is written out: AdamW with a backbone and a 10x head learning rate, linear warm-up then poly decay,
bf16 autocast on CUDA (fp32 on CPU), gradient accumulation, ``torchrun`` DDP. Every ``checkpoint_every`` steps an
atomic checkpoint goes to ``<ckpt_dir>/<fingerprint>/last.pt`` (a ``persist: true`` folder); a killed run, started
again, resumes from it and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset
from tqdm import tqdm

from config.cli import stage_arguments
from config.loader import to_dict
from config.schema import ClassifierParams, load_params_or_exit
from models.toco import param_groups
from shards.fingerprint import code_version, fingerprint
from shards.io import atomic_write_json
from shards.manifest import manifest_files, read_classes
from shards.images import decode_rgb
from shards.sampling import RowIndex, RowReader
from training import runtime as rt
from training.cam_eval import evaluate_classifier
from training.checkpoint import resume, save_weights
from training.classifier_model import build_classifier, config_to_json, toco_config
from training.data import EvalImages, TrainCrops
from labelling.cams import image_features
from training.feature_stats import STATS_FILE, collect_features, fit_stats, save_stats
from training.loop import (Throughput, accumulate, batch_stream, log_losses, lr_factor, make_optimizer, open_live,
                           save_resume_state, step_optimizer)
from training.toco_step import ToCoTrainer

log = logging.getLogger("train_classifier")


def write_feature_stats(model: torch.nn.Module, params, train_index: RowIndex, val_files: list[Path],
                        out_dir: Path, env: rt.Runtime, progress: bool) -> dict[str, Any]:
    """The training images' pooled-feature statistics beside the weights (training/feature_stats.py): up to
    ``feature_stats.images`` evenly spaced training rows, the threshold from as many val rows (the training rows
    themselves without a val split), each image seen as ``dump_cams`` sees it (its image_size, padding and
    predict_size: those params are deps of this stage)."""
    cfg = params.train_classifier.feature_stats
    if not cfg.images:
        (Path(out_dir) / STATS_FILE).unlink(missing_ok=True)  # no stale statistics of an earlier run
        return {"images": 0}

    def images(index: RowIndex) -> tuple[Iterator[np.ndarray], int]:
        rows = np.unique(np.linspace(0, len(index) - 1, min(cfg.images, len(index))).round().astype(int))
        reader = RowReader(index, columns=["image"])
        return (decode_rgb(reader.row(int(i))["image"]["bytes"]) for i in rows), len(rows)

    model.eval()

    def feature(rgb: np.ndarray) -> np.ndarray:
        return image_features(model, rgb, params.dump_cams, env)

    train = collect_features(feature, *images(train_index), progress, desc="feature stats (train)")
    held = collect_features(feature, *images(RowIndex(val_files)), progress, desc="feature stats (val)") \
        if val_files else None
    model.train()
    stats = fit_stats(train, held, quantile=cfg.quantile, shrinkage=cfg.shrinkage)
    save_stats(stats, out_dir)
    return {"images": stats.images, "held_out": stats.held_out, "threshold": round(stats.threshold, 4)}


def run(params, manifest_dir: Path, out_dir: Path, ckpt_dir: Path, metrics_path: Path | None = None,
        live_dir: Path | None = None, progress: bool = True) -> dict[str, Any]:
    p: ClassifierParams = params.train_classifier
    env = rt.setup_runtime(params.runtime.device, params.runtime.num_threads)
    torch.manual_seed(params.runtime.seed)
    classes = read_classes(manifest_dir)["class_names"]
    num_classes = len(classes) - 1
    train_index = RowIndex(manifest_files(manifest_dir, "train"))
    tags = [t for f in train_index.paths for t in pq.read_table(f, columns=["tags"]).column("tags").to_pylist()]
    rows = np.array([i for i, t in enumerate(tags) if t is not None], dtype=np.int64)  # untagged rows can't train
    if len(rows) == 0:
        raise ValueError(f"{manifest_dir}: no tagged training images")
    train_set = TrainCrops(train_index, num_classes, p.augment, params.runtime.seed)
    val_files = manifest_files(manifest_dir, "val")
    val_set = EvalImages(RowIndex(val_files), num_classes, p.eval_size) if val_files else None

    model = build_classifier(toco_config(p, num_classes)).to(env.device)
    trainer = ToCoTrainer(model, p.loss, p.augment)
    optimizer = make_optimizer(*param_groups(model), p.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, p.optim))
    generator = torch.Generator(device=env.device).manual_seed(params.runtime.seed * 1000 + env.rank)
    # the statistics are computed after training: their params do not make a new training run
    key = fingerprint({k: v for k, v in to_dict(p).items() if k != "feature_stats"}, code=code_version("stages.train_classifier"),
                      inputs=[manifest_dir], extra=[params.runtime.seed, env.world_size])
    ckpt, step = resume(ckpt_dir, key, model, optimizer, scheduler, is_main=env.is_main, generator=generator,
                        rank=env.rank)
    wrapped = DistributedDataParallel(trainer, find_unused_parameters=True) if env.distributed else trainer

    live = open_live(live_dir, env, resumed=step > 0)
    data = batch_stream(train_set, rows, train_index, seed=params.runtime.seed, p=p.optim, step=step, env=env,
                        num_workers=p.loop.num_workers)
    bar = tqdm(total=p.optim.iterations, initial=step, desc="train_classifier", unit="step",
               disable=not (progress and env.is_main))
    throughput = Throughput()
    step_seconds, steps_timed = 0.0, 0  # optimizer steps only (no evaluation, no checkpoint): metrics' s/step
    model.train()

    def losses_of(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        second = batch["second"].to(env.device) if "second" in batch else None  # augment.second_view: original
        return wrapped(batch["image"].to(env.device), batch["valid"].to(env.device),
                       batch["labels"].to(env.device), step, generator, second)

    while step < p.optim.iterations:
        started = time.perf_counter()
        losses, seen = accumulate(wrapped, data, p.optim, env, p.loop.bf16, losses_of)
        step_optimizer(optimizer, scheduler)
        model.update_teacher()
        step += 1
        throughput.seen += seen
        step_seconds += time.perf_counter() - started
        steps_timed += 1
        bar.update(1)
        if step % p.loop.log_every == 0:
            log_losses(live, bar, losses, scheduler.get_last_lr()[0], throughput.report())
        if p.loop.eval_every and step % p.loop.eval_every == 0 and env.is_main and val_set is not None \
                and step < p.optim.iterations:
            subset = Subset(val_set, range(min(p.loop.eval_images, len(val_set))))
            result = evaluate_classifier(model, subset, classes, scales=(1.0,), device=env.device,
                                         autocast=env.autocast(p.loop.bf16))
            if live is not None:
                live.log_metric("val/f1", result["f1"])
                if "cam_miou" in result:
                    live.log_metric("val/cam_miou", result["cam_miou"])
        if step % p.loop.checkpoint_every == 0 and step < p.optim.iterations:
            save_resume_state(ckpt, env, step, model, optimizer, scheduler, generator)
    bar.close()
    result: dict[str, Any] = {}
    if env.is_main:
        save_weights(model, out_dir, {**config_to_json(model.cfg, classes), "fingerprint": key,
                                      "params": to_dict(p)})
        result["feature_stats"] = write_feature_stats(model, params, train_index, val_files, out_dir, env, progress)
        if val_set is not None:
            result.update(evaluate_classifier(model, val_set, classes, scales=p.eval_cam_scales, device=env.device,
                                         autocast=env.autocast(p.loop.bf16), progress=progress))
        result["iterations"] = p.optim.iterations
        if steps_timed:
            result["seconds_per_step"] = round(step_seconds / steps_timed, 4)
        if metrics_path is not None:
            curve = result.pop("curve", [])
            atomic_write_json(metrics_path, result)
            atomic_write_json(Path(metrics_path).with_name("classifier_cam_curve.json"), {"curve": curve})
        if live is not None:
            live.end()
    rt.barrier(env)
    rt.teardown(env)
    return result


def main(argv: list[str] | None = None) -> int:
    args = stage_arguments(__doc__, argv, manifest="data/manifest", out="data/classifier",
                           checkpoints="checkpoints/classifier", metrics="metrics/classifier.json",
                           live="dvclive/train_classifier")
    params = load_params_or_exit(args.params)
    started = time.perf_counter()
    result = run(params, Path(args.manifest), Path(args.out), Path(args.checkpoints), Path(args.metrics),
                 Path(args.live) if args.live else None)
    log.info("train_classifier done in %.1f s: %s", time.perf_counter() - started,
             json.dumps({k: result.get(k) for k in ("f1", "cam_miou", "cam_threshold")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

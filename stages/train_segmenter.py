"""DVC stage ``train_segmenter``: DeepLab (models/deeplab.py) trained on the pseudo labels of ``refine``.

Consumes the ``train`` pseudo-label shards of ``data/pseudo_labels`` (image + palette mask, 255 = ignore), streamed
from Parquet in a block-shuffled order (shards/sampling.py), and optionally the manifest's val ground truth for a
periodic single-scale mIoU curve. Produces ``model.safetensors`` + ``config.json`` (the final weights, a DVC out) and
dvclive curves (loss, lr, images/s, val mIoU). The last step of the WSSS protocol (DESIGN.md §1).

The loop is written out as in ``train_classifier``: SGD (DeepLab) or AdamW with a 10x head learning rate, optional
linear warm-up then poly decay, cross-entropy over non-ignored pixels (plus an auxiliary head's), paired
scale/crop/flip augmentation, bf16 autocast on CUDA, ``torchrun`` DDP. Every ``checkpoint_every`` steps an atomic
checkpoint goes to ``<ckpt_dir>/<fingerprint>/last.pt`` (a ``persist: true`` folder); a killed run, started
again, resumes from it and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from config.cli import stage_arguments
from config.loader import to_dict
from config.schema import SegmenterParams, load_params_or_exit
from models.deeplab import param_groups
from shards.fingerprint import code_version, fingerprint
from shards.io import read_metadata
from shards.manifest import manifest_files
from shards.metrics import ConfusionMatrix
from shards.records import IGNORE_INDEX
from shards.sampling import RowIndex
from training import runtime as rt
from training.checkpoint import resume, save_weights
from training.loop import (Throughput, accumulate, batch_stream, log_losses, lr_factor, make_optimizer, open_live,
                           save_resume_state, step_optimizer)
from training.segmenter_data import GroundTruthImages, PseudoLabelCrops, rows_with_masks
from training.segmenter_model import build_segmenter, config_to_json, deeplab_config, predict_probs

log = logging.getLogger("train_segmenter")


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean CE over pixels whose target is not 255; 0 (not NaN) when a batch has none."""
    total = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (target != IGNORE_INDEX).sum().clamp(min=1)


def val_miou(model: torch.nn.Module, images: GroundTruthImages, num_classes: int, device, autocast) -> float:
    """Single-scale mIoU (percent) on ``images``; the model is left in training mode."""
    model.eval()
    confusion = ConfusionMatrix(num_classes)
    for i in range(len(images)):
        item = images[i]
        probs = predict_probs(model, item["rgb"], device=device, autocast=autocast)  # (K+1, H, W)
        confusion.update(item["gt"], probs.argmax(0).numpy())
    model.train()
    return round(100 * confusion.miou(), 2)


def val_images(manifest_dir: Path | None, limit: int) -> GroundTruthImages | None:
    files = manifest_files(manifest_dir, "val") if manifest_dir is not None else []
    rows = rows_with_masks(files)[:limit]
    return GroundTruthImages(RowIndex(files), rows) if rows else None


def run(params, pseudo_dir: Path, out_dir: Path, ckpt_dir: Path, manifest_dir: Path | None = None,
        live_dir: Path | None = None, progress: bool = True) -> dict[str, Any]:
    p: SegmenterParams = params.train_segmenter
    env = rt.setup_runtime(params.runtime.device, params.runtime.num_threads)
    torch.manual_seed(params.runtime.seed)
    files = manifest_files(pseudo_dir, "train")
    if not files:
        raise FileNotFoundError(f"{pseudo_dir}: no train-*.parquet pseudo-label shards; run refine first")
    meta = read_metadata(files[0])
    class_names, palette = meta["class_names"], meta["palette"]
    index = RowIndex(files)
    ignored = np.concatenate([pq.read_table(f, columns=["ignore_fraction"]).column(0).to_numpy() for f in files])
    rows = np.flatnonzero(ignored < 1.0)  # a mask that is all 255 teaches nothing
    if len(rows) == 0:
        raise ValueError(f"{pseudo_dir}: every training pseudo mask is entirely ignored")
    # steps from epochs over the data when train_segmenter.epochs is set (the schedule scales with the dataset)
    p = dataclasses.replace(p, optim=dataclasses.replace(p.optim, iterations=p.iterations(len(rows), env.world_size)))
    crops = PseudoLabelCrops(index, p.augment, params.runtime.seed)
    evals = val_images(manifest_dir, p.loop.eval_images) if env.is_main and p.loop.eval_every > 0 else None

    model = build_segmenter(deeplab_config(p, len(class_names))).to(env.device)
    optimizer = make_optimizer(*param_groups(model), p.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, p.optim))
    key = fingerprint(to_dict(p), code=code_version("stages.train_segmenter"), inputs=[pseudo_dir],
                      extra=[params.runtime.seed, env.world_size])
    ckpt, step = resume(ckpt_dir, key, model, optimizer, scheduler, is_main=env.is_main)
    first_step = step
    synced = env.distributed and env.device.type == "cuda"
    if synced:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # statistics over the global batch
    wrapped = DistributedDataParallel(model) if env.distributed else model

    live = open_live(live_dir, env, resumed=step > 0)
    data = batch_stream(crops, rows, index, seed=params.runtime.seed, p=p.optim, step=step, env=env,
                        num_workers=p.loop.num_workers)
    bar = tqdm(total=p.optim.iterations, initial=step, desc="train_segmenter", unit="step",
               disable=not (progress and env.is_main))
    throughput, started = Throughput(), time.perf_counter()
    model.train()

    def losses_of(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images, target = batch["image"].to(env.device), batch["mask"].to(env.device)  # (B, 3, S, S), (B, S, S)
        out = wrapped(images)
        loss = masked_cross_entropy(out["out"], target)
        if "aux" in out:
            loss = loss + p.aux_weight * masked_cross_entropy(out["aux"], target)
        return {"total": loss}

    while step < p.optim.iterations:
        losses, seen = accumulate(wrapped, data, p.optim, env, p.loop.bf16, losses_of)
        step_optimizer(optimizer, scheduler)
        step += 1
        throughput.seen += seen
        bar.update(1)
        if step % p.loop.log_every == 0:
            log_losses(live, bar, losses, scheduler.get_last_lr()[0], throughput.report())
        if p.loop.eval_every and step % p.loop.eval_every == 0 and evals is not None:
            miou = val_miou(model, evals, len(class_names), env.device, env.autocast(p.loop.bf16))
            bar.write(f"step {step}: val mIoU {miou:.2f} ({len(evals)} images, single scale)")
            if live is not None:
                live.log_metric("val/miou", miou)
        if step % p.loop.checkpoint_every == 0 and step < p.optim.iterations:
            save_resume_state(ckpt, env, step, model, optimizer, scheduler)
    bar.close()
    seconds = time.perf_counter() - started
    result: dict[str, Any] = {"iterations": p.optim.iterations, "train_images": int(len(rows)), "fingerprint": key}
    if env.is_main:
        if synced:
            model = _plain_batchnorm(model)
        save_weights(model, out_dir, {**config_to_json(model.cfg, class_names, palette), "fingerprint": key,
                                      "params": to_dict(p)})
        if live is not None:
            live.end()
        crops_done = (p.optim.iterations - first_step) * p.optim.batch_size * p.optim.grad_accum * env.world_size
        log.info("train_segmenter: %d steps in %.1f s (%.1f crops/s)", p.optim.iterations - first_step, seconds,
                 crops_done / max(seconds, 1e-9))
    rt.barrier(env)
    rt.teardown(env)
    return result


def _plain_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """SyncBatchNorm layers back to BatchNorm2d, so the saved weights load anywhere (same state keys)."""
    for name, child in model.named_children():
        if isinstance(child, torch.nn.SyncBatchNorm):
            plain = torch.nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                         child.track_running_stats).to(child.weight.device)
            plain.load_state_dict(child.state_dict())
            setattr(model, name, plain)
        else:
            _plain_batchnorm(child)
    return model


def main(argv: list[str] | None = None) -> int:
    args = stage_arguments(__doc__, argv, pseudo_labels="data/pseudo_labels",
                           manifest=("data/manifest", "val ground truth for the periodic mIoU; ''"),
                           out="data/segmenter", checkpoints="checkpoints/segmenter", live="dvclive/train_segmenter")
    params = load_params_or_exit(args.params)
    started = time.perf_counter()
    result = run(params, Path(args.pseudo_labels), Path(args.out), Path(args.checkpoints),
                 Path(args.manifest) if args.manifest else None, Path(args.live) if args.live else None)
    log.info("train_segmenter done in %.1f s: %s", time.perf_counter() - started, json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

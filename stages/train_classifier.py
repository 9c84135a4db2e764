"""DVC stage ``train_classifier``: the ToCo classifier (METHODS.md §1) on the train manifest.

Consumes the manifest shards of ``prepare`` (tagged train rows; val rows with ground truth for metrics). Produces
``model.safetensors`` + ``config.json`` (the final weights, a DVC out), dvclive curves (losses, lr, images/s, CAM
mIoU), and ``metrics/classifier.json`` {f1, cam_miou, cam_threshold, ...}.

The loop is written out: AdamW with a backbone and a 10x head learning rate, linear warm-up then poly decay,
bf16 autocast on CUDA (fp32 on CPU), gradient accumulation, ``torchrun`` DDP. Every ``checkpoint_every`` steps an
atomic checkpoint goes to ``<ckpt_dir>/<fingerprint>/last.pt`` (a ``persist: true`` folder); a killed run, started
again, resumes from it and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from config.cli import stage_arguments
from config.loader import to_dict
from config.schema import ClassifierParams, load_params_or_exit
from models.par import ParConfig
from models.pseudo import ThresholdConfig
from models.toco import param_groups
from shards.fingerprint import code_version, fingerprint
from shards.io import atomic_write_json
from shards.manifest import manifest_files, read_classes
from shards.sampling import RowIndex
from training import runtime as rt
from training.cam_eval import evaluate_classifier
from training.checkpoint import resume, save_checkpoint, save_weights
from training.classifier_model import build_classifier, config_to_json, toco_config
from training.data import AugmentConfig, EvalImages, TrainCrops
from training.loop import batches, lr_factor
from training.toco_step import StepConfig, ToCoTrainer

log = logging.getLogger("train_classifier")


def step_config(p: ClassifierParams) -> StepConfig:
    return StepConfig(
        use_aux=p.use_aux, use_ptc=p.use_ptc, use_ctc=p.use_ctc, use_seg=p.use_seg, aux_weight=p.aux_weight,
        ptc_weight=p.ptc_weight, ctc_weight=p.ctc_weight, seg_weight=p.seg_weight,
        seg_start_iter=p.seg_start_iter, ctc_temperature=p.ctc_temperature,
        thresholds=ThresholdConfig(p.bkg_threshold, p.high_threshold, p.low_threshold), par=ParConfig(),
        cam_scales=p.cam_scales, local_crops=p.local_crops, local_crop_size=p.local_crop_size,
        use_pcl=p.use_pcl, pcl_weight=p.pcl_weight, use_afa=p.use_afa, afa_weight=p.afa_weight,
        afa_radius=p.afa_radius, use_trt=p.use_trt, trt_weight=p.trt_weight)


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
    aug = AugmentConfig(p.crop_size, p.base_size, p.scale_range, p.jitter)
    train_set = TrainCrops(train_index, num_classes, aug, params.runtime.seed)
    val_files = manifest_files(manifest_dir, "val")
    val_set = EvalImages(RowIndex(val_files), num_classes, p.eval_size) if val_files else None

    model = build_classifier(toco_config(p, num_classes)).to(env.device)
    trainer = ToCoTrainer(model, step_config(p))
    backbone, heads = param_groups(model)
    optimizer = torch.optim.AdamW([{"params": backbone, "lr": p.lr}, {"params": heads, "lr": p.lr * p.head_lr_mult}],
                                  lr=p.lr, weight_decay=p.weight_decay, betas=p.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, p))
    generator = torch.Generator(device=env.device).manual_seed(params.runtime.seed * 1000 + env.rank)
    key = fingerprint(to_dict(p), code=code_version("stages.train_classifier"),
                      inputs=[manifest_dir], extra=[params.runtime.seed, env.world_size])
    ckpt, step = resume(ckpt_dir, key, model, optimizer, scheduler, is_main=env.is_main, generator=generator,
                        rank=env.rank)
    wrapped = DistributedDataParallel(trainer, find_unused_parameters=True) if env.distributed else trainer

    live = None
    if env.is_main and live_dir is not None:
        from dvclive import Live
        live = Live(str(live_dir), dvcyaml=False, save_dvc_exp=False, resume=step > 0)
    stream = batches(rows, train_index, seed=params.runtime.seed, batch=p.batch_size,
                     start=step * p.grad_accum, rank=env.rank, world=env.world_size)
    # Its own generator: creating the loader must not draw from the global RNG (resume equality).
    loader = DataLoader(_EpochRows(train_set), batch_sampler=stream, num_workers=p.num_workers,
                        generator=torch.Generator().manual_seed(0), persistent_workers=p.num_workers > 0)
    data = iter(loader)
    bar = tqdm(total=p.iterations, initial=step, desc="train_classifier", unit="step",
               disable=not (progress and env.is_main))
    seen, tick = 0, time.perf_counter()
    step_seconds, steps_timed = 0.0, 0  # optimizer steps only (no evaluation, no checkpoint): metrics' s/step
    model.train()
    while step < p.iterations:
        started = time.perf_counter()
        for micro in range(p.grad_accum):
            batch = next(data)
            last = micro == p.grad_accum - 1
            with contextlib.nullcontext() if (last or not env.distributed) else wrapped.no_sync():
                with env.autocast(p.bf16):
                    losses = wrapped(batch["image"].to(env.device), batch["valid"].to(env.device),
                                     batch["labels"].to(env.device), step, generator)
                (losses["total"] / p.grad_accum).backward()
            seen += batch["image"].shape[0] * env.world_size
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_teacher()
        step += 1
        step_seconds += time.perf_counter() - started
        steps_timed += 1
        bar.update(1)
        if step % p.log_every == 0 and live is not None:
            elapsed = time.perf_counter() - tick
            for name, value in losses.items():
                live.log_metric(f"train/loss_{name}", float(value.detach()))
            live.log_metric("train/lr", scheduler.get_last_lr()[0])
            live.log_metric("train/images_per_s", seen / max(elapsed, 1e-9))
            live.next_step()
            bar.set_postfix(loss=f"{float(losses['total'].detach()):.3f}", ips=f"{seen / max(elapsed, 1e-9):.0f}")
            seen, tick = 0, time.perf_counter()
        if step % p.eval_every == 0 and env.is_main and val_set is not None and step < p.iterations:
            subset = Subset(val_set, range(min(p.eval_images, len(val_set))))
            result = evaluate_classifier(model, subset, classes, scales=(1.0,), device=env.device,
                                         autocast=env.autocast(p.bf16))
            if live is not None:
                live.log_metric("val/f1", result["f1"])
                if "cam_miou" in result:
                    live.log_metric("val/cam_miou", result["cam_miou"])
        if step % p.checkpoint_every == 0 and step < p.iterations:
            generators = [torch.empty(0)] * env.world_size
            if env.distributed:
                torch.distributed.all_gather_object(generators, generator.get_state())
            else:
                generators = [generator.get_state()]
            if env.is_main:
                save_checkpoint(ckpt, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                       "scheduler": scheduler.state_dict(), "generator": generators,
                                       "torch_rng": torch.get_rng_state(), "step": step})
            rt.barrier(env)
    bar.close()
    result: dict[str, Any] = {}
    if env.is_main:
        save_weights(model, out_dir, {**config_to_json(model.cfg, classes), "fingerprint": key,
                                      "params": to_dict(p)})
        if val_set is not None:
            result = evaluate_classifier(model, val_set, classes, scales=p.eval_cam_scales, device=env.device,
                                         autocast=env.autocast(p.bf16), progress=progress)
        result["iterations"] = p.iterations
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


class _EpochRows(torch.utils.data.Dataset):
    """Indexes TrainCrops by (epoch, row) so that workers need no shared epoch counter."""

    def __init__(self, crops: TrainCrops):
        self.crops = crops

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, row = key
        self.crops.epoch = epoch
        return self.crops[row]


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

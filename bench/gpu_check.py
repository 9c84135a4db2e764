"""GPU readiness check of the paper preset (config/presets/voc-vitb16.yaml): one run, one results file.

    bash bench/gpu_check.sh                                  # on a GPU machine: the full check, < 8 minutes
    bash bench/gpu_check.sh --out /some/folder/gpu.json      # results elsewhere (default bench/gpu_check_results.json)
    bash bench/gpu_check.sh --device cpu --quick             # tiny sizes on a CPU (the test suite runs this)

Parts, each in its own time box; a part that fails or runs out of time records its traceback and what it had
measured, and the next part runs:

- ``toco_fp32_eager``, ``toco_bf16_sdpa``, ``toco_bf16_compile``: ToCo training steps of the paper preset (every
  loss on, multi-scale online CAMs, PAR labels, the reference CTC) on random weights (``pretrained: none``), at
  batch 4 and at the largest batch that fits (doubling until out of memory or the time box ends), images/s and
  peak memory. fp32 eager = no autocast, timm's explicit attention; bf16 + SDPA = autocast bf16 and fused
  attention (what ``train_classifier`` runs); bf16 + compile = that with every ViT block ``torch.compile``d.
- ``toco_train_steps``: 300 real training steps (the real data loader over a Parquet set of generated VOC-size
  images, the real optimizer, schedule and loop pieces; the preset's schedule compressed to 300 steps so that
  warm-up, decay and the seg loss all happen): the loss falls, nothing is NaN, CAMs are not degenerate.
- ``cam_dump``: ``dump_cams``'s batch function (decode, resize, multi-scale + flip CAMs, encode) at the preset's
  dump params (448 px, scales 1, 0.5, 1.5).
- ``deeplab_train``: DeepLabV2-ResNet-101 training steps at 448 px (fp32 and bf16), the preset's batch.

Imports torch, timm, numpy, pillow, pyarrow (and pyyaml, tqdm, which timm itself needs) and the project's
torch-side modules only: no dvc, dvclive, prefect, pydensecrf or datasets (tests/bench/test_gpu_check.py runs it
with those blocked). ``--device cpu`` forces CPU bf16 autocast (WSSS_CPU_BF16) so the bf16 parts run the bf16 path.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import io
import itertools
import multiprocessing
import os
import platform
import resource
import signal
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from config.schema import PRESETS_DIR, ClassifierParams, Params, SegmenterParams, ShapesConfig, load_params  # noqa: E402
from labelling.cams import cams_for_batch, padded_size  # noqa: E402
from models.cam import multiscale_cam  # noqa: E402
from models.deeplab import param_groups as deeplab_param_groups  # noqa: E402
from models.toco import param_groups  # noqa: E402
from shards.cams import decode_cams  # noqa: E402
from shards.io import atomic_write_json  # noqa: E402
from shards.records import IGNORE_INDEX  # noqa: E402
from shards.sampling import RowIndex  # noqa: E402
from synth.shapes import CLASS_NAMES, generate_image  # noqa: E402
from training import runtime as rt  # noqa: E402
from training.classifier_model import build_classifier, toco_config  # noqa: E402
from training.data import TrainCrops, to_tensor  # noqa: E402
from training.loop import accumulate, batch_stream, lr_factor, make_optimizer, step_optimizer  # noqa: E402
from training.segmenter_model import build_segmenter, deeplab_config  # noqa: E402
from training.toco_step import ToCoTrainer  # noqa: E402

GOALS = {"toco_train_images_per_s": 45.0, "cam_dump_images_per_s": 150.0}  # issue 15, one H100
K = len(CLASS_NAMES)
# Seconds per part on a GPU: together under 8 minutes with start-up; --quick parts take seconds on a CPU.
BUDGETS = {"toco_fp32_eager": 50, "toco_bf16_sdpa": 60, "toco_bf16_compile": 130, "toco_train_steps": 115,
           "cam_dump": 35, "deeplab_train": 40}
SECTIONS = ("environment", *BUDGETS)


class PartTimeout(Exception):
    """A part's time box ran out (SIGALRM)."""


@contextmanager
def time_box(seconds: float):
    def expire(signum, frame):
        raise PartTimeout(f"time box of {seconds:.0f} s ran out")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    """Peak allocated GPU memory since the last reset; on a CPU the process's peak resident memory so far."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


# ----------------------------------------------------------------------------------------------- set-up


@dataclasses.dataclass
class Setup:
    """What every part reads: the device, the (possibly shrunk) paper params, and the sizes of this run."""

    device: torch.device
    params: Params
    quick: bool
    compile_backend: str
    steps: int  # timed steps per throughput measurement
    warmup: int
    max_batch: int  # the largest-batch search stops here
    train_steps: int
    train_batch: int
    images: int  # generated images (the training set and the CAM dump's input)
    image_sides: tuple[int, int]
    workers: int

    @property
    def classifier(self) -> ClassifierParams:
        return self.params.train_classifier

    def runtime(self) -> rt.Runtime:
        return rt.Runtime(self.device, 0, 1, cpu_bf16=self.device.type == "cpu")


def shrink(params: Params) -> Params:
    """The paper preset at toy sizes for --quick: a 4-block ViT at 64 px, a ResNet-18 DeepLab, every switch kept."""
    c = params.train_classifier
    model = dataclasses.replace(c.model, pretrained="none", patch_size=8, embed_dim=32, depth=4, num_heads=2,
                                seg_dim=16, proj_hidden_dim=64, proj_bottleneck_dim=16, proj_out_dim=24)
    loss = dataclasses.replace(c.loss, local_crops=2, local_crop_size=16,
                               par=dataclasses.replace(c.loss.par, iterations=2))
    c = dataclasses.replace(c, model=model, loss=loss, augment=dataclasses.replace(c.augment, crop_size=64))
    s = params.train_segmenter
    s = dataclasses.replace(s, model=dataclasses.replace(s.model, backbone="resnet18", pretrained="none"),
                            augment=dataclasses.replace(s.augment, crop_size=32),
                            optim=dataclasses.replace(s.optim, batch_size=2))
    d = dataclasses.replace(params.dump_cams, image_size=64, cam_size=32, predict_size=64, batch_size=4)
    return dataclasses.replace(params, train_classifier=c, train_segmenter=s, dump_cams=d)


def make_setup(args: argparse.Namespace) -> Setup:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as training/runtime.py sets it for training
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    params = load_params(args.preset)
    c = params.train_classifier
    params = dataclasses.replace(params, train_classifier=dataclasses.replace(
        c, model=dataclasses.replace(c.model, pretrained="none")))  # nothing downloads on the GPU machine
    params = dataclasses.replace(params, train_segmenter=dataclasses.replace(
        params.train_segmenter, model=dataclasses.replace(params.train_segmenter.model, pretrained="none")))
    if args.quick:
        if device.type == "cpu":
            torch.set_num_threads(1)  # toy ops: one thread beats several spinning on a shared 2-core machine
        return Setup(device, shrink(params), True, args.compile_backend or "eager", steps=1, warmup=1,
                     max_batch=8, train_steps=args.train_steps or 12, train_batch=2, images=12,
                     image_sides=(64, 96), workers=0)
    return Setup(device, params, False, args.compile_backend or "inductor", steps=5, warmup=2, max_batch=512,
                 train_steps=args.train_steps or 300, train_batch=c.optim.batch_size, images=256,
                 image_sides=(375, 500), workers=min(8, max(0, (os.cpu_count() or 1) - 2)))


def environment(s: Setup, section: dict) -> None:
    import timm

    section.update(python=platform.python_version(), torch=torch.__version__, timm=timm.__version__,
                   numpy=np.__version__, pyarrow=pa.__version__, device=str(s.device), quick=s.quick,
                   cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                   compile_backend=s.compile_backend, preset_backbone=s.classifier.model.backbone,
                   crop_size=s.classifier.augment.crop_size, ctc_form=s.classifier.loss.ctc_form,
                   poly_over=s.classifier.optim.poly_over, cam_scales=list(s.classifier.loss.cam_scales))
    if s.device.type == "cuda":
        props = torch.cuda.get_device_properties(s.device)
        section.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                       capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                       tf32=torch.backends.cuda.matmul.allow_tf32, sdpa_flash=torch.backends.cuda.flash_sdp_enabled())
    else:
        section.update(cpu=platform.processor() or platform.machine(), cpu_bf16_autocast=True)


# ------------------------------------------------------------------------------------- ToCo throughput


def set_fused_attention(model: torch.nn.Module, fused: bool) -> None:
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused


def toco_batch(s: Setup, batch: int) -> dict[str, torch.Tensor]:
    """Random normalised images, a padded right quarter on every other image, 1-3 classes each."""
    g = torch.Generator().manual_seed(batch)
    size = s.classifier.augment.crop_size
    valid = torch.ones(batch, size, size, dtype=torch.bool)
    valid[::2, :, size * 3 // 4:] = False
    labels = torch.zeros(batch, K)
    for b in range(batch):
        labels[b, torch.randperm(K, generator=g)[: 1 + b % 3]] = 1
    return {"image": torch.randn(batch, 3, size, size, generator=g), "valid": valid, "labels": labels}


class ToCoRun:
    """One model + optimizer per configuration, timed at several batch sizes."""

    def __init__(self, s: Setup, *, bf16: bool, fused: bool, compiled: bool):
        self.s, self.bf16 = s, bf16
        torch.manual_seed(0)
        self.model = build_classifier(toco_config(s.classifier, K)).to(s.device)
        set_fused_attention(self.model, fused)
        if compiled:
            torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
            for block in self.model.backbone.blocks:
                block.compile(backend=s.compile_backend)  # a second input size recompiles once, dynamic
        self.trainer = ToCoTrainer(self.model, s.classifier.loss)
        self.optimizer = make_optimizer(*param_groups(self.model), s.classifier.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda i: 1.0)
        self.env = s.runtime()
        self.generator = torch.Generator(device=s.device).manual_seed(0)

    def measure(self, batch: int, steps: int, warmup: int) -> dict[str, Any]:
        s, env = self.s, self.env
        data = toco_batch(s, batch)
        data = {k: v.to(s.device) for k, v in data.items()}
        step = s.classifier.loss.seg_start_iter  # every loss on, as after the seg loss's start
        optim = dataclasses.replace(s.classifier.optim, batch_size=batch, grad_accum=1)

        def losses_of(b):
            return self.trainer(b["image"], b["valid"], b["labels"], step, self.generator)

        free_memory(s.device)
        reset_peak(s.device)
        began = time.perf_counter()
        try:
            for i in range(warmup + steps):
                if i == warmup:
                    sync(s.device)
                    started = time.perf_counter()
                losses, _ = accumulate(self.trainer, itertools.repeat(data), optim, env, self.bf16, losses_of)
                step_optimizer(self.optimizer, self.scheduler)
                self.model.update_teacher()
            sync(s.device)
        finally:
            self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        loss = float(losses["total"].detach())
        if not np.isfinite(loss):
            raise FloatingPointError(f"batch {batch}: loss {loss}")
        return {"batch": batch, "images_per_s": round(batch * steps / elapsed, 2),
                "s_per_step": round(elapsed / steps, 4), "peak_gib": peak_gib(s.device), "loss": round(loss, 4),
                "seconds": round(time.perf_counter() - began, 2)}


def toco_throughput(s: Setup, section: dict, deadline: float, *, bf16: bool, fused: bool, compiled: bool,
                    batches_from: dict | None = None) -> None:
    """Batch 4, then doubling until out of memory, the cap, or a size whose run would pass ``deadline`` (the last
    size's time x 2.5); each figure is kept as it comes. ``batches_from``: measure at that section's largest batch
    instead of searching (compiling per size is slow)."""
    run = ToCoRun(s, bf16=bf16, fused=fused, compiled=compiled)
    first = time.perf_counter()
    section["batch_4"] = run.measure(4, s.steps, s.warmup + (2 if compiled and not s.quick else 0))
    section["first_measure_s"] = round(time.perf_counter() - first, 1)  # build excluded; compile included
    if batches_from is not None:
        big = (batches_from.get("largest") or {}).get("batch")
        if big and big != 4:
            section["largest"] = run.measure(big, s.steps, s.warmup)
            section["largest_from"] = "toco_bf16_sdpa"
        return
    batch, last = 8, section["batch_4"]["seconds"]
    while batch <= s.max_batch:
        if time.perf_counter() + 2.5 * last > deadline:
            section["search_stopped_for_time_at"] = batch
            break
        try:
            result = run.measure(batch, max(2, s.steps - 2), 1)
        except Exception as exc:  # noqa: BLE001 - out of memory ends the search; anything else is a failure
            if not is_oom(exc):
                raise
            section["out_of_memory_at"] = batch
            break
        section["largest"], last = result, result["seconds"]
        batch *= 2
    else:
        section["search_capped_at"] = s.max_batch
    del run
    free_memory(s.device)


# ------------------------------------------------------------------------------------- generated data


def encode_jpeg(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def generated_row(task: tuple[ShapesConfig, str, int]) -> dict[str, Any]:
    cfg, split, i = task
    rgb, mask, _ = generate_image(cfg, split, i)
    tags = sorted({int(v) for v in np.unique(mask) if 0 < v < IGNORE_INDEX})
    return {"image_id": f"{split}_{i}", "split": split, "image": {"bytes": encode_jpeg(rgb), "path": None},
            "tags": tags, "height": int(rgb.shape[0]), "width": int(rgb.shape[1]), "gt": mask}


_ROWS: dict[tuple[str, int], list[dict[str, Any]]] = {}


def generated_rows(s: Setup, split: str, count: int) -> list[dict[str, Any]]:
    """Manifest-like rows (JPEG bytes, tags, ground truth) of the procedural shapes generator (synth/shapes.py) at
    VOC size (sides 375-500), made once per run; with ``s.workers`` in forked processes (numpy + PIL only)."""
    if (split, count) not in _ROWS:
        cfg = ShapesConfig(min_side=s.image_sides[0], max_side=s.image_sides[1], seed=15)
        tasks = [(cfg, split, i) for i in range(count)]
        if s.workers > 0:
            with multiprocessing.get_context("fork").Pool(s.workers) as pool:
                _ROWS[split, count] = pool.map(generated_row, tasks, chunksize=4)
        else:
            _ROWS[split, count] = [generated_row(t) for t in tasks]
    return _ROWS[split, count]


def write_parquet(rows: list[dict[str, Any]], path: Path) -> Path:
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "gt"} for r in rows])
    pq.write_table(table, path, row_group_size=16)
    return path


# ------------------------------------------------------------------------------------- 300 real steps


def toco_train_steps(s: Setup, section: dict, folder: Path, deadline: float) -> None:
    c = s.classifier
    n = s.train_steps
    scale = n / c.optim.iterations  # the preset's schedule compressed to n steps: warm-up, decay, seg start
    optim = dataclasses.replace(c.optim, iterations=n, batch_size=s.train_batch, grad_accum=1,
                                warmup_iters=max(1, round(c.optim.warmup_iters * scale)))
    loss_cfg = dataclasses.replace(c.loss, seg_start_iter=max(1, round(c.loss.seg_start_iter * scale)))
    section.update(steps_planned=n, batch=s.train_batch, warmup_iters=optim.warmup_iters,
                   seg_start_iter=loss_cfg.seg_start_iter, poly_over=optim.poly_over, ctc_form=loss_cfg.ctc_form)
    started = time.perf_counter()
    rows = generated_rows(s, "train", s.images)
    section["generate_s"] = round(time.perf_counter() - started, 1)
    path = write_parquet(rows, folder / "train-00000.parquet")
    index = RowIndex([path])
    env = s.runtime()
    torch.manual_seed(0)
    model = build_classifier(toco_config(dataclasses.replace(c, loss=loss_cfg), K)).to(s.device)
    trainer = ToCoTrainer(model, loss_cfg)
    optimizer = make_optimizer(*param_groups(model), optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, optim))
    generator = torch.Generator(device=s.device).manual_seed(0)
    data = batch_stream(TrainCrops(index, K, c.augment, 0), np.arange(len(index)), index, seed=0, p=optim, step=0,
                        env=env, num_workers=s.workers)
    curve: list[dict[str, float]] = []
    section["curve_every_10"] = curve
    model.train()
    step = 0
    reset_peak(s.device)
    sync(s.device)
    tick = time.perf_counter()
    while step < n and time.perf_counter() < deadline:
        def losses_of(batch):
            return trainer(batch["image"].to(s.device, non_blocking=True), batch["valid"].to(s.device),
                           batch["labels"].to(s.device), step, generator)

        losses, _ = accumulate(trainer, data, optim, env, c.loop.bf16, losses_of)
        step_optimizer(optimizer, scheduler)
        model.update_teacher()
        values = {k: float(v.detach()) for k, v in losses.items()}  # one sync per step: the NaN check needs it
        if not all(np.isfinite(v) for v in values.values()):
            section["nan_at_step"] = step
            raise FloatingPointError(f"step {step}: non-finite loss {values}")
        if step % 10 == 0:
            curve.append({"step": step, **{k: round(v, 4) for k, v in values.items()}})
        section.setdefault("_cls", []).append(values["cls"])
        section.setdefault("_total", []).append(values["total"])
        step += 1
    sync(s.device)
    elapsed = time.perf_counter() - tick
    cls, total = section.pop("_cls"), section.pop("_total")
    tenth = max(1, len(cls) // 10)
    section.update(steps_done=step, seconds=round(elapsed, 1), images_per_s=round(step * s.train_batch / elapsed, 2),
                   peak_gib=peak_gib(s.device), no_nan=True,
                   cls_first=round(float(np.mean(cls[:tenth])), 4), cls_last=round(float(np.mean(cls[-tenth:])), 4),
                   total_first=round(float(np.mean(total[:tenth])), 4),
                   total_last=round(float(np.mean(total[-tenth:])), 4))
    section["loss_fell"] = section["cls_last"] < section["cls_first"]
    section["cams"] = cam_check(s, model, env)


@torch.no_grad()
def cam_check(s: Setup, model: torch.nn.Module, env: rt.Runtime) -> dict[str, Any]:
    """Held-out generated images: are the final CAMs finite and not constant, and do present classes beat absent
    ones (the raw CAM's maximum)? The last is a learning signal, not a pass/fail: 300 steps from random weights."""
    model.eval()
    size = s.classifier.augment.crop_size
    rows = generated_rows(s, "val", 8)
    x = torch.stack([to_tensor(np.asarray(Image.open(io.BytesIO(r["image"]["bytes"])).convert("RGB")
                                          .resize((size, size), Image.BILINEAR))) for r in rows]).to(s.device)
    labels = torch.zeros(len(rows), K, device=s.device)
    for b, r in enumerate(rows):
        labels[b, [t - 1 for t in r["tags"]]] = 1
    with env.autocast(s.classifier.loop.bf16):
        cams = multiscale_cam(model, x, s.classifier.loss.cam_scales, labels=labels)  # (B, K, S, S) in [0, 1]
        raw = model.cams(x, "final").float()  # (B, K, h, w), ReLU'd
    present = labels.bool()
    planes = cams[present]  # (P, S, S)
    stds = planes.flatten(1).std(dim=1)
    raw_max = raw.flatten(2).amax(dim=2)  # (B, K)
    beats = [(raw_max[b][present[b]].max() > raw_max[b][~present[b]].max()).item() for b in range(len(rows))
             if (~present[b]).any()]
    model.train()
    result = {"finite": bool(torch.isfinite(cams).all() and torch.isfinite(raw).all()),
              "planes": int(planes.shape[0]), "nonconstant_fraction": round(float((stds > 0.01).float().mean()), 3),
              "mean_plane_std": round(float(stds.mean()), 4),
              "present_beats_absent": round(float(np.mean(beats)), 3) if beats else None}
    result["non_degenerate"] = result["finite"] and result["nonconstant_fraction"] >= 0.9
    return result


# ------------------------------------------------------------------------------------- CAM dump, DeepLab


@torch.no_grad()
def cam_dump(s: Setup, section: dict, deadline: float) -> None:
    p = s.params.dump_cams
    section.update(scales=list(p.scales), image_size=p.image_size, batch_size=p.batch_size, bf16=p.bf16)
    rows = generated_rows(s, "train", s.images)  # the training set's images (made once)
    torch.manual_seed(0)
    model = build_classifier(toco_config(s.classifier, K)).to(s.device).eval()
    set_fused_attention(model, True)
    env = s.runtime()
    groups: dict[tuple[int, int], list[dict]] = {}
    for row in rows:
        groups.setdefault(padded_size(row["height"], row["width"], p), []).append(row)
    batches = [g[i:i + p.batch_size] for g in groups.values() for i in range(0, len(g), p.batch_size)]
    cams_for_batch(model, batches[0], p, env)  # warm-up: kernels, cudnn autotuning
    sync(s.device)
    reset_peak(s.device)
    started, done = time.perf_counter(), 0
    for batch in batches:
        if time.perf_counter() > deadline:
            break
        out = cams_for_batch(model, batch, p, env)
        done += len(batch)
    sync(s.device)
    elapsed = time.perf_counter() - started
    cams = decode_cams(out[0])
    section.update(images=done, batches=len(batches), padded_shapes=len(groups), seconds=round(elapsed, 2),
                   images_per_s=round(done / elapsed, 2), peak_gib=peak_gib(s.device),
                   last_cam_finite=bool(np.isfinite(cams).all()), last_cam_shape=list(cams.shape))


def deeplab_train(s: Setup, section: dict) -> None:
    from stages.train_segmenter import masked_cross_entropy  # noqa: PLC0415 - the stage's own loss

    p: SegmenterParams = s.params.train_segmenter
    section.update(backbone=p.model.backbone, head=p.model.head, output_stride=p.model.output_stride,
                   crop_size=p.augment.crop_size, batch=p.optim.batch_size)
    torch.manual_seed(0)
    model = build_segmenter(deeplab_config(p, K + 1)).to(s.device).train()
    optimizer = make_optimizer(*deeplab_param_groups(model), p.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, p.optim))
    g = torch.Generator().manual_seed(0)
    size, batch = p.augment.crop_size, p.optim.batch_size
    data = {"image": torch.randn(batch, 3, size, size, generator=g).to(s.device),
            "mask": torch.randint(0, K + 1, (batch, size, size), generator=g).to(s.device)}
    data["mask"][:, :, : size // 8] = IGNORE_INDEX

    def losses_of(b):
        return {"total": masked_cross_entropy(model(b["image"])["out"], b["mask"])}

    env = s.runtime()
    for name, bf16 in (("fp32", False), ("bf16", True)):
        free_memory(s.device)
        reset_peak(s.device)
        for i in range(s.warmup + s.steps):
            if i == s.warmup:
                sync(s.device)
                started = time.perf_counter()
            losses, _ = accumulate(model, itertools.repeat(data), p.optim, env, bf16, losses_of)
            step_optimizer(optimizer, scheduler)
        sync(s.device)
        elapsed = time.perf_counter() - started
        loss = float(losses["total"].detach())
        if not np.isfinite(loss):
            raise FloatingPointError(f"DeepLab {name}: loss {loss}")
        section[name] = {"images_per_s": round(batch * s.steps / elapsed, 2), "s_per_step": round(elapsed / s.steps, 4),
                         "peak_gib": peak_gib(s.device), "loss": round(loss, 4)}


# ------------------------------------------------------------------------------------- report


def best_toco(results: dict) -> tuple[float | None, str]:
    best, where = None, ""
    for name in ("toco_fp32_eager", "toco_bf16_sdpa", "toco_bf16_compile"):
        for key in ("batch_4", "largest"):
            r = results["sections"].get(name, {}).get(key)
            if r and (best is None or r["images_per_s"] > best):
                best, where = r["images_per_s"], f"{name} batch {r['batch']}"
    return best, where


def summary(results: dict) -> str:
    sec = results["sections"]
    env = sec.get("environment", {})
    lines = [f"# gpu_check {results['started']}: {env.get('gpu') or env.get('cpu', '?')}, torch {env.get('torch')}, "
             f"{'QUICK (toy sizes) ' if env.get('quick') else ''}preset {results['preset']}", "",
             "| part | status | figures |", "| --- | --- | --- |"]
    for name in SECTIONS:
        part = sec.get(name, {})
        figures = []
        for key in ("batch_4", "largest"):
            if key in part:
                r = part[key]
                figures.append(f"batch {r['batch']}: {r['images_per_s']} img/s, {r['peak_gib']} GiB")
        if "out_of_memory_at" in part:
            figures.append(f"OOM at batch {part['out_of_memory_at']}")
        if "search_stopped_for_time_at" in part:
            figures.append(f"not tried for time: batch {part['search_stopped_for_time_at']}")
        if "search_capped_at" in part:
            figures.append(f"search capped at batch {part['search_capped_at']}")
        if name == "toco_train_steps" and "steps_done" in part:
            cams = part.get("cams", {})
            figures.append(f"{part['steps_done']} steps, {part['images_per_s']} img/s, cls loss {part['cls_first']} -> "
                           f"{part['cls_last']}, CAMs non-degenerate {cams.get('non_degenerate')}")
        if name == "cam_dump" and "images_per_s" in part:
            figures.append(f"{part['images']} images, {part['images_per_s']} img/s, {part['peak_gib']} GiB")
        if name == "deeplab_train":
            figures += [f"{k}: {part[k]['images_per_s']} img/s, {part[k]['peak_gib']} GiB" for k in ("fp32", "bf16")
                        if k in part]
        lines.append(f"| {name} | {part.get('status', 'not run')} ({part.get('seconds_used', '?')} s) | "
                     f"{'; '.join(figures)} |")
    lines += ["", "| performance goal (one H100) | goal | measured here |", "| --- | --- | --- |"]
    for name, (goal, measured) in results["goals"].items():
        lines.append(f"| {name} | {goal} | {measured} |")
    return "\n".join(lines) + "\n"


def run_part(results: dict, name: str, out: Path, budget: float, fn: Callable[[dict, float], None]) -> None:
    section = results["sections"].setdefault(name, {})
    started, cpu_started = time.perf_counter(), time.process_time()
    print(f"[gpu_check] {name}: up to {budget:.0f} s", flush=True)
    try:
        with time_box(budget):
            fn(section, time.perf_counter() + budget * 0.85)  # a part that loops stops itself at this deadline
        section["status"] = "ok"
    except PartTimeout:  # the traceback says where the time went (a compile, a batch size)
        section.update(status="timeout", error=traceback.format_exc())
    except Exception:  # noqa: BLE001 - record and go on to the next part
        section.update(status="failed", error=traceback.format_exc())
        print(section["error"], file=sys.stderr, flush=True)
    finally:
        section["seconds_used"] = round(time.perf_counter() - started, 1)
        section["cpu_seconds_used"] = round(time.process_time() - cpu_started, 1)  # this process, all threads
        free_memory(results["_device"])
    results["goals"] = goals(results)
    write(results, out)


def goals(results: dict) -> dict[str, list]:
    best, where = best_toco(results)
    dump = results["sections"].get("cam_dump", {}).get("images_per_s")
    return {"toco_train_images_per_s": [GOALS["toco_train_images_per_s"], f"{best} ({where})" if best else None],
            "cam_dump_images_per_s": [GOALS["cam_dump_images_per_s"], dump]}


def write(results: dict, out: Path) -> None:
    public = {k: v for k, v in results.items() if not k.startswith("_")}
    public["summary_markdown"] = summary(results)
    atomic_write_json(out, public)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu (default auto)")
    parser.add_argument("--quick", action="store_true", help="toy sizes and few steps (the test suite's CPU run)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "gpu_check_results.json"), help="results JSON file")
    parser.add_argument("--preset", default=str(PRESETS_DIR / "voc-vitb16.yaml"), help="params file to check")
    parser.add_argument("--compile-backend", default="", help="torch.compile backend (default inductor; --quick: "
                                                              "eager, Dynamo's capture without code generation)")
    parser.add_argument("--train-steps", type=int, default=0, help="real training steps (default 300; quick 12)")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's time box")
    parser.add_argument("--only", default="", help="comma-separated parts to run (default: all)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    s = make_setup(args)
    if s.device.type == "cpu":
        os.environ[rt.CPU_BF16_ENV] = "1"  # the bf16 parts run CPU bf16 autocast: the GPU's precision path
    results: dict[str, Any] = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                               "command": " ".join(["bench/gpu_check.sh", *(argv if argv is not None else
                                                                            sys.argv[1:])]),
                               "preset": Path(args.preset).name, "sections": {}, "goals": {}, "_device": s.device}
    scale = args.budget_scale * (0.5 if s.quick else 1.0)
    only = set(filter(None, args.only.split(",")))
    run_part(results, "environment", out, 60, lambda sec, _: environment(s, sec))
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as scratch:
        parts: dict[str, Callable[[dict, float], None]] = {
            "toco_fp32_eager": lambda sec, end: toco_throughput(s, sec, end, bf16=False, fused=False, compiled=False),
            "toco_bf16_sdpa": lambda sec, end: toco_throughput(s, sec, end, bf16=True, fused=True, compiled=False),
            "toco_bf16_compile": lambda sec, end: toco_throughput(
                s, sec, end, bf16=True, fused=True, compiled=True,  # --quick: batch 4 only (each size recompiles)
                batches_from={} if s.quick else results["sections"].get("toco_bf16_sdpa")),
            "toco_train_steps": lambda sec, deadline: toco_train_steps(s, sec, Path(scratch), deadline),
            "cam_dump": lambda sec, deadline: cam_dump(s, sec, deadline),
            "deeplab_train": lambda sec, _: deeplab_train(s, sec),
        }
        for name, fn in parts.items():
            if only and name not in only:
                results["sections"][name] = {"status": "skipped"}
                continue
            run_part(results, name, out, BUDGETS[name] * scale, fn)
    text = summary(results)
    print(text, flush=True)
    print(f"[gpu_check] results: {out}", flush=True)
    failed = [n for n, sec in results["sections"].items() if sec.get("status") not in ("ok", "skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

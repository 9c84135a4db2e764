"""Training-step benchmark of the ToCo classifier: images/s and peak memory.

    python bench/bench_train_step.py --preset cpu                 # the params.yaml default on this CPU
    python bench/bench_train_step.py --preset paper --device cuda # ViT-B/16 @ 448: fp32 eager vs bf16 fused,
                                                                  # batch 4 and the largest batch that fits
    python bench/bench_train_step.py --preset cpu --recipe        # plain vs reference views vs + CRF energy

Each row runs full ToCo steps (both global views in one pass, local crops, PTC, CTC, seg loss with PAR, backward,
AdamW) on random images, after warm-up steps. Ratios are against the first row, measured in the same run.
Needs only torch + timm (no dvc/prefect/pydensecrf), so it runs on the GPU machine too.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from config.schema import PRESETS_DIR, ClassifierParams, load_params  # noqa: E402
from training.classifier_model import build_classifier, toco_config  # noqa: E402
from training.toco_step import ToCoTrainer  # noqa: E402

PRESETS = {"cpu": ROOT / "params.yaml", "paper": PRESETS_DIR / "voc-vitb16.yaml"}


def set_fused_attention(model: torch.nn.Module, fused: bool) -> None:
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused


def measure(p: ClassifierParams, batch: int, device: torch.device, bf16: bool, fused: bool, steps: int,
            warmup: int, num_classes: int = 20) -> dict:
    torch.manual_seed(0)
    model = build_classifier(toco_config(p, num_classes)).to(device)
    set_fused_attention(model, fused)
    trainer = ToCoTrainer(model, dataclasses.replace(p.loss, seg_start_iter=0), p.augment)
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)
    s = p.augment.crop_size
    x = torch.randn(batch, 3, s, s, device=device)
    valid = torch.ones(batch, s, s, dtype=torch.bool, device=device)
    labels = torch.zeros(batch, num_classes, device=device)
    labels[:, 0] = 1
    labels[::2, 5] = 1
    second = torch.randn_like(x) if p.augment.second_view == "original" else None  # the loader's crop of the original
    generator = torch.Generator(device=device).manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (bf16 and device.type == "cuda") else \
        torch.autocast("cpu", enabled=False)
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        with autocast:
            losses = trainer(x, valid, labels, 10**6, generator, second)
        losses["total"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS, GiB
    elapsed = time.perf_counter() - start
    return {"batch": batch, "img_s": batch * steps / elapsed, "step_s": elapsed / steps, "peak_gib": peak}


def largest_batch(p, device, bf16, fused, start=8, limit=512) -> int:
    """Doubling, then bisection, on out-of-memory errors."""
    ok, bad = 0, None
    batch = start
    while batch <= limit:
        try:
            measure(p, batch, device, bf16, fused, steps=1, warmup=1)
            ok, batch = batch, batch * 2
        except torch.OutOfMemoryError:
            bad = batch
            break
        finally:
            torch.cuda.empty_cache()
    while bad is not None and bad - ok > max(1, ok // 8):
        mid = (ok + bad) // 2
        try:
            measure(p, mid, device, bf16, fused, steps=1, warmup=1)
            ok = mid
        except torch.OutOfMemoryError:
            bad = mid
        finally:
            torch.cuda.empty_cache()
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=("cpu", "paper"), default="cpu")
    parser.add_argument("--params", help="a params file instead of the preset's")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--recipe", action="store_true",
                        help="rows: plain views, the reference's views, and those with the dense CRF energy")
    args = parser.parse_args()
    device = torch.device(args.device)
    p = load_params(args.params or PRESETS[args.preset]).train_classifier
    # one training pass per step (cam_scales [1.0]) and random weights: the step's cost, nothing downloaded
    p = dataclasses.replace(p, loss=dataclasses.replace(p.loss, cam_scales=(1.0,)),
                            model=dataclasses.replace(p.model, pretrained="none"))
    rows = []
    if args.recipe:
        plain = dict(jitter=0.3, main_colour=False, main_flip_p=0.0, main_blur_p=0.0, second_view="crop",
                     local_colour=False, local_flip_p=0.0, local_blur_p=0.0)
        reference = dict(jitter=0.0, main_colour=True, main_flip_p=0.5, main_blur_p=1.0, second_view="original",
                         local_colour=True, local_flip_p=0.5, local_blur_p=0.5)
        energy = p.loss.crf_energy
        for label, views, scale in (("plain views", plain, None), ("reference views", reference, None),
                                    (f"reference views + energy at scale {energy.scale}", reference, energy.scale),
                                    ("reference views + energy at scale 0.5", reference, 0.5)):
            loss = dataclasses.replace(p.loss, crf_energy=dataclasses.replace(
                energy, weight=0.05 if scale else 0.0, scale=scale or energy.scale))
            q = dataclasses.replace(p, augment=dataclasses.replace(p.augment, **views), loss=loss)
            rows.append((label, measure(q, p.optim.batch_size, device, True, True, args.steps, args.warmup)))
    elif device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 baseline
        for bf16, fused in ((False, False), (True, True)):
            rows.append(("fp32 eager" if not bf16 else "bf16 fused", measure(p, 4, device, bf16, fused,
                                                                               args.steps, args.warmup)))
            big = largest_batch(p, device, bf16, fused)
            rows.append((f"{rows[-1][0]} (largest batch)", measure(p, big, device, bf16, fused, args.steps,
                                                                   args.warmup)))
    else:
        rows.append(("fp32 fused (CPU)", measure(p, p.optim.batch_size, device, False, True, args.steps, args.warmup)))
        rows.append(("fp32 eager (CPU)", measure(p, p.optim.batch_size, device, False, False, args.steps, args.warmup)))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'}"
    print(f"# ToCo train step, preset {args.preset}, backbone {p.model.backbone} "
          f"patch {p.model.patch_size or 'default'} "
          f"@ {p.augment.crop_size}px, {name}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| setting | batch | images/s | s/step | peak memory (GiB) | speed vs first row |")
    print("| --- | --- | --- | --- | --- | --- |")
    base = rows[0][1]["img_s"]
    for label, r in rows:
        print(f"| {label} | {r['batch']} | {r['img_s']:.1f} | {r['step_s']:.3f} | {r['peak_gib']:.2f} | "
              f"{r['img_s'] / base:.2f}x |")


if __name__ == "__main__":
    main()

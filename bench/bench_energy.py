"""The dense CRF energy regulariser (models/energy.py): the window approximation against the exact energy, and cost.

    python bench/bench_energy.py                  # CPU preset size: B 16, 64x64 (128-px crops at scale 0.5)
    python bench/bench_energy.py --size 112 --batch 1 --classes 21   # a VOC-like proxy (exact = 157M pairs)
    python bench/bench_energy.py --size 224 --batch 4 --classes 21 --device cuda   # the paper preset's size

Images are the embedded dataset's (synth/shapes.py) resized to ``--size``; the softmax is a noisy, blurred copy of
their ground truth (what a seg head half-way through training looks like), the ignore band of the ground truth is
the "uncertain" region. For each mode: the energy's relative error against ``exact``, the cosine between its
gradient and the exact one (the direction the regulariser pushes the seg head), and seconds per forward + backward.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config.schema import ShapesConfig  # noqa: E402
from models.energy import dense_crf_energy  # noqa: E402
from synth.shapes import generate_image  # noqa: E402

WINDOWS = ((4, 1), (8, 1), (16, 2), (24, 3), (32, 4), (48, 6))


def inputs(batch: int, size: int, classes: int, device: torch.device):
    images, labels = [], []
    for i in range(batch):
        rgb, mask, _ = generate_image(ShapesConfig(), "train", i)
        images.append(np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR)))
        labels.append(np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST)))
    image = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().to(device)  # (B, 3, S, S) 0..255
    label = torch.from_numpy(np.stack(labels)).long().to(device)  # (B, S, S)
    g = torch.Generator(device="cpu").manual_seed(0)
    onehot = F.one_hot(label.clamp(max=classes - 1) % classes, classes).permute(0, 3, 1, 2).float()
    noise = torch.randn(batch, classes, size // 8, size // 8, generator=g).to(device)
    logits = 4 * F.avg_pool2d(onehot, 5, 1, 2) + F.interpolate(noise, size=(size, size), mode="bilinear")
    roi = torch.ones(batch, size, size, dtype=torch.bool, device=device)
    return image, logits, roi, label == 255


def run(image, logits, roi, uncertain, sigma_xy, mode, radius=0, stride=1, repeats=3):
    times = []
    for _ in range(repeats):
        probs = F.softmax(logits, 1).detach().requires_grad_(True)
        if image.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        value = dense_crf_energy(image, probs, roi, uncertain, 15.0, sigma_xy, mode, radius, stride)
        value.backward()
        if image.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return value.item(), probs.grad.flatten(), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, help="side of the energy's resolution (crop x scale)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--classes", type=int, default=9, help="K+1 channels of the softmax")
    parser.add_argument("--sigma-xy", type=float, default=50.0, help="px at this resolution (reference: 100 x 0.5)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per mode (the fastest counts)")
    args = parser.parse_args()
    device = torch.device(args.device)
    image, logits, roi, uncertain = inputs(args.batch, args.size, args.classes, device)
    exact, grad, seconds = run(image, logits, roi, uncertain, args.sigma_xy, "exact", repeats=args.repeats)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}, device {device}; B {args.batch}, {args.size}x{args.size}, "
          f"K+1 {args.classes}, sigma_xy {args.sigma_xy}, sigma_rgb 15\n")
    print("| mode | pairs per pixel | energy rel. error | gradient cosine | s per fwd+bwd | vs exact |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| exact | {args.size ** 2} | 0 | 1 | {seconds:.4f} | 1.00x |")
    for radius, stride in WINDOWS:
        value, g, t = run(image, logits, roi, uncertain, args.sigma_xy, "window", radius, stride, args.repeats)
        cosine = F.cosine_similarity(g, grad, dim=0).item()
        pairs = (2 * (radius // stride) + 1) ** 2
        print(f"| window r {radius}, stride {stride} | {pairs} | {abs(value - exact) / abs(exact):.3f} | "
              f"{cosine:.4f} | {t:.4f} | {t / seconds:.2f}x |")


if __name__ == "__main__":
    main()

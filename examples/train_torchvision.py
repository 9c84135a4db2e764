"""Train torchvision's DeepLabV3-MobileNetV3 on a downloaded pseudo-label package (a consumer's view).

    dvc get <this repo> data/export -o pseudo_labels        # or: dvc repro export
    python -m examples.train_torchvision --package pseudo_labels --steps 1000 --size 321

The whole recipe: the package's PyTorch dataset (checksums verified on open), paired crops and flips, and a
cross-entropy that skips the ignore index (255): the pixels the pseudo labels are unsure of. Use
``weights_backbone=MobileNet_V3_Large_Weights.IMAGENET1K_V1`` for real training; the default here downloads
nothing.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch
from torch.utils.data import DataLoader
from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

from training.pseudo_dataset import PseudoLabelDataset, RowGroupSampler, TrainTransform

log = logging.getLogger("train_torchvision")


def main(argv: list[str] | None = None) -> list[float]:
    """Train for ``--steps`` steps; returns the loss of every step."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", required=True, help="an exported package folder (data/export)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--size", type=int, default=321, help="training crop side (px)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    dataset = PseudoLabelDataset(args.package, split=args.split, transform=TrainTransform(args.size))
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=RowGroupSampler(dataset, seed=args.seed),
                        num_workers=args.workers, drop_last=True)
    if len(loader) == 0:
        raise SystemExit(f"{args.package}: {len(dataset)} {args.split} images, fewer than one batch of "
                         f"{args.batch_size}")
    model = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=len(dataset.class_names))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    criterion = torch.nn.CrossEntropyLoss(ignore_index=dataset.ignore_index)
    model.train()
    losses: list[float] = []
    started, epoch = time.perf_counter(), 0
    while len(losses) < args.steps:
        loader.sampler.set_epoch(epoch)
        for image, mask in loader:  # (B, 3, S, S) float, (B, S, S) uint8
            logits = model(image)["out"]  # (B, K+1, S, S)
            loss = criterion(logits, mask.long())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if len(losses) >= args.steps:
                break
        epoch += 1
    seconds = time.perf_counter() - started
    log.info("%d steps in %.1f s (%.1f images/s); loss %.3f -> %.3f", len(losses), seconds,
             len(losses) * args.batch_size / max(seconds, 1e-9), losses[0], losses[-1])
    return losses


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(sys.argv[1:])

"""Train torchvision's DeepLabV3-MobileNetV3 on a downloaded pseudo-label package (a consumer's view).

    dvc get <this repo> data/export -o pseudo_labels        # or: dvc repro export
    python -m examples.train_torchvision --package pseudo_labels                     # a quick try: ~20 s on 2 CPU cores
    python -m examples.train_torchvision --package pseudo_labels --steps 1000 --size 321 --batch-size 8

The whole recipe: the package's PyTorch dataset (checksums verified on open), paired crops and flips, and a
cross-entropy that skips the ignore index (255): the pixels the pseudo labels are unsure of. A progress bar shows
the loss, a line per epoch its mean, and the trained model is saved to ``--out`` (written to a temporary name and
renamed, so a killed run never leaves half a file) with what is needed to use it again::

    saved = torch.load("checkpoints/deeplabv3_mobilenet_v3.pt", weights_only=True)   # tensors and plain values only
    model = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=len(saved["class_names"]))
    model.load_state_dict(saved["model"])

Use ``weights_backbone=MobileNet_V3_Large_Weights.IMAGENET1K_V1`` for real training; the default here downloads
nothing.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from shards.io import atomic_path
from training.pseudo_dataset import PseudoLabelDataset, RowGroupSampler, TrainTransform

log = logging.getLogger("train_torchvision")
ARCH = "deeplabv3_mobilenet_v3_large"


def save_model(path: Path, model: torch.nn.Module, dataset: PseudoLabelDataset, steps: int) -> None:
    """The weights and what using them needs (class names, ignore index, architecture), atomically."""
    state = {"model": model.state_dict(), "arch": ARCH, "class_names": list(dataset.class_names),
             "ignore_index": dataset.ignore_index, "steps": steps}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def main(argv: list[str] | None = None) -> list[float]:
    """Train for ``--steps`` steps and save the model to ``--out``; returns the loss of every step."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", required=True, help="an exported package folder (data/export)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (1000 or more for a real model)")
    parser.add_argument("--size", type=int, default=128, help="training crop side (px; 321 for a real model)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("checkpoints") / "deeplabv3_mobilenet_v3.pt",
                        help="where to save the trained model (folders are created)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps: {args.steps} is below 1")
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
    # logging_redirect_tqdm: the epoch lines print above the bar instead of through it
    with logging_redirect_tqdm(), tqdm(total=args.steps, desc="train", unit="step", disable=args.no_progress) as bar:
        while len(losses) < args.steps:
            loader.sampler.set_epoch(epoch)
            first = len(losses)
            for image, mask in loader:  # (B, 3, S, S) float, (B, S, S) uint8
                logits = model(image)["out"]  # (B, K+1, S, S)
                loss = criterion(logits, mask.long())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                bar.update()
                bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.3f}")
                if len(losses) >= args.steps:
                    break
            log.info("epoch %d: %d steps, mean loss %.3f", epoch, len(losses) - first,
                     sum(losses[first:]) / (len(losses) - first))
            epoch += 1
    seconds = time.perf_counter() - started
    save_model(args.out, model, dataset, len(losses))
    log.info("%d steps in %.1f s (%.1f images/s); loss %.3f -> %.3f; model saved to %s", len(losses), seconds,
             len(losses) * args.batch_size / max(seconds, 1e-9), losses[0], losses[-1], args.out)
    return losses


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(sys.argv[1:])

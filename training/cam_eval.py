"""Classifier metrics on validation images: multi-label F1 and CAM mIoU over a background-threshold sweep.

CAMs are the multi-scale + flip CAMs of the image's true tags (METHODS.md §4: report with the threshold and scales
stated, and the best threshold of a sweep), upsampled to the ground-truth size, labelled with the plain rule.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.cam import multiscale_cam
from models.pseudo import max_present
from shards.metrics import SWEEP, ThresholdSweep


@torch.no_grad()
def evaluate_classifier(model: torch.nn.Module, dataset, class_names: Sequence[str], *, scales: Sequence[float],
                        device: torch.device, autocast, thresholds: Sequence[float] = SWEEP,
                        progress: bool = False) -> dict[str, Any]:
    """``dataset`` yields EvalImages items; ``class_names`` includes background. Returns F1 and the CAM sweep."""
    model.eval()
    num_classes = len(class_names)
    sweep = ThresholdSweep(num_classes, thresholds)
    tp = fp = fn = 0
    for i in tqdm(range(len(dataset)), desc="eval", unit="img", disable=not progress, leave=False):
        item = dataset[i]
        x = item["image"][None].to(device)  # (1, 3, H, W)
        labels = item["labels"][None].to(device)  # (1, K)
        with autocast:
            logits = model(x, with_seg=False)["logits"].float()
        predicted = logits.sigmoid() > 0.5
        truth = labels.bool()
        tp += int((predicted & truth).sum())
        fp += int((predicted & ~truth).sum())
        fn += int((~predicted & truth).sum())
        if item["gt"] is None:
            continue
        gt = item["gt"]
        with autocast:
            cams = multiscale_cam(model, x, scales, head="final", labels=labels)
        cams = F.interpolate(cams.float(), size=gt.shape, mode="bilinear", align_corners=False)  # (1, K, H0, W0)
        value, label = max_present(cams, labels)  # (1, H0, W0) each: the plain rule's inputs (label_plain)
        sweep.update(gt, value[0].cpu().numpy(), label[0].cpu().numpy())
    model.train()
    f1 = 2 * tp / max(2 * tp + fp + fn, 1)
    curve = sweep.curve(thresholds) if sweep.counts.sum() else []
    result: dict[str, Any] = {"f1": round(f1, 4), "precision": round(tp / max(tp + fp, 1), 4),
                              "recall": round(tp / max(tp + fn, 1), 4), "images": len(dataset)}
    if curve:
        best = max(curve, key=lambda row: row["miou"])
        result.update(cam_miou=best["miou"], cam_threshold=best["threshold"], cam_scales=list(scales),
                      cam_per_class=sweep.confusion(best["threshold"]).summary(class_names)["per_class"], curve=curve)
    return result

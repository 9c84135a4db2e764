"""CAM -> pseudo-label rules (METHODS.md §1 "Thresholds" and "Online pseudo labels").

All functions take normalised CAMs (B, K, H, W) in [0, 1] over the K foreground classes and multi-hot image
tags (B, K); labels are 0 = background, 1..K = class id + 1, `ignore_index` = ignore (the caller passes the
pipeline's one value, shards/records.py: ``IGNORE_INDEX``). Only classes in an image's tags can win a pixel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.configs import ThresholdConfig
from models.par import ParConfig, refine_with_par, working_size


def max_present(cams: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max CAM value over present classes and its label 1..K: (B, H, W) each; -inf/1 where none present."""
    present = labels.bool()[:, :, None, None]  # (B, K, 1, 1)
    value, index = cams.masked_fill(~present, float("-inf")).max(dim=1)
    return value, index + 1


def label_plain(cams: torch.Tensor, labels: torch.Tensor, bkg: float = ThresholdConfig.bkg) -> torch.Tensor:
    """(B, H, W) long: the present class with the largest CAM if that value > bkg, else 0."""
    value, label = max_present(cams, labels)
    return torch.where(value > bkg, label, torch.zeros_like(label))


def label_ignore_middle(cams: torch.Tensor, labels: torch.Tensor, high: float = ThresholdConfig.high,
                        low: float = ThresholdConfig.low, *, ignore_index: int) -> torch.Tensor:
    """(B, H, W) long: class if v > high, ignore_index if low < v <= high, 0 if v <= low."""
    value, label = max_present(cams, labels)
    uncertain = torch.full_like(label, ignore_index)
    return torch.where(value > high, label, torch.where(value > low, uncertain, torch.zeros_like(label)))


def background_logits(cams: torch.Tensor, bkg_value: float, size: tuple[int, int] | None = None) -> torch.Tensor:
    """[constant background plane, CAMs] (B, K+1, H', W') fp32, resized (bilinear) to ``size`` if given."""
    b, k, h, w = cams.shape
    cams = cams.float()
    logits = torch.cat([cams.new_full((b, 1, h, w), bkg_value), cams], dim=1)  # (B, K+1, H, W)
    if size is not None and tuple(size) != (h, w):
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits


def present_softmax(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Softmax over background + the classes present in ``labels`` (B, K); absent classes are exactly 0.

    The -inf mask is applied to the final-size logits: interpolating -inf would give NaN.
    """
    b = logits.shape[0]
    keep = torch.cat([labels.new_ones(b, 1), labels], dim=1).bool()[:, :, None, None]  # (B, K+1, 1, 1)
    return logits.masked_fill(~keep, float("-inf")).softmax(dim=1)


def cams_with_background(cams: torch.Tensor, labels: torch.Tensor, bkg_value: float,
                         size: tuple[int, int] | None = None) -> torch.Tensor:
    """Softmax over [constant background plane, CAMs of present classes]: (B, K+1, H', W') fp32.

    Channel 0 is background, channel k the class k; absent classes are exactly 0. `size` resizes the stack
    (bilinear) *before* the softmax, as the ToCo reference does for its half-resolution PAR input.
    """
    return present_softmax(background_logits(cams, bkg_value, size), labels)


def present_class_slots(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact per-image class lists: (class_index (B, P), slot_valid (B, P)), P = max tags in the batch.

    Present classes come first, in ascending order; padding slots point at some absent class and are
    marked invalid. Lets PAR propagate P + 1 planes instead of K + 1 (COCO: ~3 instead of 81).
    One host sync (P must be a Python int).
    """
    b, k = labels.shape
    present = labels.bool()
    p = max(1, int(present.sum(dim=1).max()))
    order_key = (~present).long() * k + torch.arange(k, device=labels.device)  # present first, then by id
    class_index = order_key.argsort(dim=1)[:, :p]  # (B, P)
    return class_index, present.gather(1, class_index)


@torch.no_grad()
def online_pseudo_labels(cams: torch.Tensor, labels: torch.Tensor, images: torch.Tensor,
                         cfg: ThresholdConfig = ThresholdConfig(), par_cfg: ParConfig = ParConfig(),
                         valid: torch.Tensor | None = None, *, ignore_index: int) -> torch.Tensor:
    """Pseudo labels for ToCo's segmentation head: two PAR runs combined (ToCo `refine_cams_with_bkg_v2`).

    cams: (B, K, H, W) normalised final CAMs; labels: (B, K) multi-hot; images: (B, 3, H, W) in [0, 1];
    valid: optional (B, H, W) bool, False on crop padding. Returns (B, H, W) long in {0, tags, ignore_index}.

    Reference semantics kept: for each background value in (high, low), stack [bkg plane, present CAMs],
    resize to PAR's working resolution, softmax over background + present classes, PAR, upsample, argmax.
    Combination: the high run's label, except high says background -> ignore, and both say background -> 0.
    (So "high: class c" wins even where the low run says something else; the low run only decides
    between background and ignore.) Differences, both deliberate: the two runs share one affinity (it
    depends on the image only) and are propagated together, batched over images; PAR neighbours outside
    `valid` get no weight, and pixels outside `valid` are ignore_index.
    """
    b, _, height, width = cams.shape
    class_index, slot_valid = present_class_slots(labels)  # (B, P) each
    p = class_index.shape[1]
    fg = cams.float().gather(1, class_index[:, :, None, None].expand(-1, -1, height, width))  # (B, P, H, W)
    size = working_size(height, width, par_cfg.scale)
    if size != (height, width):
        fg = F.interpolate(fg, size=size, mode="bilinear", align_corners=False)
    keep = torch.cat([slot_valid.new_ones(b, 1), slot_valid], dim=1)[:, :, None, None]  # (B, P+1, 1, 1)
    stacks = []
    for bkg_value in (cfg.high, cfg.low):
        logits = torch.cat([fg.new_full((b, 1, *size), bkg_value), fg], dim=1)  # (B, P+1, h, w)
        stacks.append(logits.masked_fill(~keep, float("-inf")).softmax(dim=1))
    refined = refine_with_par(images, torch.cat(stacks, dim=1), par_cfg, valid)  # (B, 2(P+1), H, W)

    # slot s -> label: 0 is background, s >= 1 is class_index[s - 1] + 1
    slot_to_label = torch.cat([class_index.new_zeros(b, 1), class_index + 1], dim=1)  # (B, P+1)
    label_high = slot_to_label.gather(1, refined[:, :p + 1].argmax(dim=1).view(b, -1)).view(b, height, width)
    label_low = slot_to_label.gather(1, refined[:, p + 1:].argmax(dim=1).view(b, -1)).view(b, height, width)

    out = torch.where(label_high == 0, torch.full_like(label_high, ignore_index), label_high)
    out = torch.where((label_high == 0) & (label_low == 0), torch.zeros_like(out), out)
    if valid is not None:
        out = torch.where(valid.bool(), out, torch.full_like(out, ignore_index))
    return out

"""Pixel-Adaptive Refinement (PAR, AFA CVPR 2022, METHODS.md §2), batched over images.

PAR diffuses class probabilities along low-level colour affinities: every pixel takes a weighted average of
48 neighbours (8 directions x dilations 1, 2, 4, 8, 12, 24), 10 times. The weights are a softmax over the
neighbours of a colour term (RGB difference scaled by the local colour spread) plus a small position term.

Semantics relative to the reference (rulixiang/afa `wetr/PAR.py`, also used by ToCo):
- sigma_i (colour spread) is `torch.std` over the 48 neighbours, i.e. unbiased (/47), as in the reference;
  the pixel itself is not one of its neighbours. The colour term is invariant to the image's value scale, so
  images in [0, 1] and in [0, 255] give the same affinity (up to the 1e-8 guard).
- sigma_d is the unbiased std of the 48 neighbour distances (d * 1 or d * sqrt 2): one constant.
- The reference sums `softmax(colour) + w2 * softmax(position)`, whose rows sum to 1 + w2, so every iteration
  scales all probabilities by 1.01 (x1.105 after 10). We divide by (1 + w2): rows sum to 1, a constant map
  stays constant, and the argmax is identical to the reference's (the factor is the same for every pixel).
- `valid` (optional, padding excluded): neighbours outside the valid region get zero weight and the softmaxes
  renormalise over the valid ones, so padding never leaks into the image (the reference refines padding too).
  sigma_i is then the std over valid neighbours. A pixel with no valid neighbour keeps its value.
- All arithmetic is fp32, whatever the input dtype or autocast state; the outputs are fp32.

Memory at the working resolution (h, w): the affinity is (B, 48, h, w) fp32 and building it materialises
(B, 3, 48, h, w) once (B=8 at 112x112: 58 MB). Propagation never materialises (B, C, 48, h, w): it
accumulates one neighbour offset at a time into (B, C, h, w) buffers.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.configs import ParConfig

# The 8 neighbour directions, in the reference's (row-major, centre skipped) order.
_DIRECTIONS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def neighbour_offsets(dilations: tuple[int, ...]) -> list[tuple[int, int]]:
    """(dy, dx) of the 8 * len(dilations) neighbours, grouped by dilation."""
    return [(dy * d, dx * d) for d in dilations for dy, dx in _DIRECTIONS]


def _gather_neighbours(x: torch.Tensor, offsets: list[tuple[int, int]]) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, N, h, w): value of each neighbour, replicate padding at the border."""
    h, w = x.shape[-2:]
    pad = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    # replicate padding by the largest dilation once; slicing it gives the same values as padding per dilation
    padded = F.pad(x, [pad] * 4, mode="replicate")
    return torch.stack([padded[..., pad + dy:pad + dy + h, pad + dx:pad + dx + w] for dy, dx in offsets], dim=2)


def _masked_softmax(logits: torch.Tensor, mask: torch.Tensor | None, dim: int) -> torch.Tensor:
    """Softmax over `dim` restricted to `mask`; rows with nothing valid become all zeros (never NaN)."""
    if mask is None:
        return logits.softmax(dim)
    probs = logits.masked_fill(~mask, float("-inf")).softmax(dim)
    return probs.masked_fill(~mask, 0.0)  # all-masked rows are NaN after softmax; zero them


def _position_logits(cfg: ParConfig, device: torch.device) -> torch.Tensor:
    """(48,) position term -(d / sigma_d / w1)^2 of each neighbour; the same for every pixel."""
    dist = torch.tensor([math.hypot(dy, dx) for dy, dx in neighbour_offsets(cfg.dilations)],
                        dtype=torch.float32, device=device)
    return -(dist / (dist.std() + 1e-8) / cfg.w1) ** 2


def par_affinity(images: torch.Tensor, cfg: ParConfig = ParConfig(), valid: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Neighbour weights of every pixel, at the resolution of `images` (no resizing here).

    images: (B, 3, h, w), any value scale; valid: optional (B, h, w) bool.
    Returns (B, N, h, w) fp32 with N = 8 * len(cfg.dilations); each pixel's weights sum to 1 (0 where a
    pixel has no valid neighbour).
    """
    offsets = neighbour_offsets(cfg.dilations)
    with torch.autocast(device_type=images.device.type, enabled=False):
        images = images.float()
        diff = _gather_neighbours(images, offsets).sub_(images[:, :, None])  # (B, 3, N, h, w): I_j - I_i
        nb_valid = None
        if valid is None:
            var = diff.var(dim=2)  # (B, 3, h, w), unbiased as the reference; std(I_j) = std(I_j - I_i)
        else:
            nb_valid = _gather_neighbours(valid[:, None].float(), offsets) > 0.5  # (B, 1, N, h, w)
            weight = nb_valid.float()
            count = weight.sum(dim=2)  # (B, 1, h, w)
            mean = (diff * weight).sum(dim=2, keepdim=True) / count.clamp(min=1)[:, :, None]
            var = ((diff - mean).square_() * weight).sum(dim=2) / (count - 1).clamp(min=1)
        sq = diff.square_()  # |I_i - I_j|^2, in place: diff is not needed any more
        # (|dI| / (sigma + 1e-8) / w1)^2 = dI^2 * scale, mean over RGB
        scale = ((var.sqrt() + 1e-8) * cfg.w1).square().reciprocal()  # (B, 3, h, w)
        colour = -(sq * scale[:, :, None]).mean(dim=1)  # (B, N, h, w)
        mask = None if nb_valid is None else nb_valid[:, 0]  # (B, N, h, w)
        pos = _position_logits(cfg, images.device)[None, :, None, None].expand_as(colour)
        aff = _masked_softmax(colour, mask, dim=1) + cfg.w2 * _masked_softmax(pos, mask, dim=1)
        return aff / (1.0 + cfg.w2)


def par_propagate(probs: torch.Tensor, aff: torch.Tensor, cfg: ParConfig = ParConfig()) -> torch.Tensor:
    """``iterations`` steps of probs_i <- sum_j aff_ij probs_j (plus (1 - sum_j aff_ij) probs_i, 0 unless masked).

    probs: (B, C, h, w); aff: (B, N, h, w) from `par_affinity` at the same resolution. Returns fp32.
    """
    offsets = neighbour_offsets(cfg.dilations)
    pad = max(cfg.dilations)
    h, w = probs.shape[-2:]
    with torch.autocast(device_type=probs.device.type, enabled=False):
        probs = probs.float()
        aff = aff.float()
        # weight left on the pixel itself: 0 for normal rows, 1 for rows whose neighbours are all masked
        # (unclamped, so that keep + sum_j aff_ij is exactly 1 up to rounding and constants stay constant)
        keep = 1.0 - aff.sum(dim=1, keepdim=True)  # (B, 1, h, w)
        for _ in range(cfg.iterations):
            padded = F.pad(probs, [pad] * 4, mode="replicate")  # (B, C, h + 2p, w + 2p)
            out = keep * probs
            for k, (dy, dx) in enumerate(offsets):
                out.addcmul_(aff[:, k:k + 1], padded[..., pad + dy:pad + dy + h, pad + dx:pad + dx + w])
            probs = out
    return probs


def working_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """Resolution PAR works at: floor(size * scale) like the reference's h // 2, at least 1."""
    return max(1, math.floor(height * scale + 1e-6)), max(1, math.floor(width * scale + 1e-6))


def refine_with_par(images: torch.Tensor, probs: torch.Tensor, cfg: ParConfig = ParConfig(),
                    valid: torch.Tensor | None = None) -> torch.Tensor:
    """Refine class probabilities with PAR at `cfg.scale` of the image resolution.

    images: (B, 3, H, W) in [0, 1]; probs: (B, C, h', w') at any resolution (resized bilinearly to the working
    resolution, so a caller may hand them in already reduced); valid: optional (B, H, W) bool.
    Returns (B, C, H, W) fp32, bilinearly upsampled from the working resolution.
    """
    height, width = images.shape[-2:]
    size = working_size(height, width, cfg.scale)
    with torch.autocast(device_type=images.device.type, enabled=False):
        small_images = images.float()
        if size != (height, width):
            small_images = F.interpolate(small_images, size=size, mode="bilinear", align_corners=False)
        small_valid = None
        if valid is not None:
            small_valid = valid[:, None].float()
            if size != (height, width):
                small_valid = F.interpolate(small_valid, size=size, mode="bilinear", align_corners=False)
            small_valid = small_valid[:, 0] > 0.5  # (B, h, w)
        probs = probs.float()
        if probs.shape[-2:] != size:
            probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
        aff = par_affinity(small_images, cfg, small_valid)
        refined = par_propagate(probs, aff, cfg)  # (B, C, h, w)
        if size != (height, width):
            refined = F.interpolate(refined, size=(height, width), mode="bilinear", align_corners=False)
    return refined


class PAR(nn.Module):
    """Module form of `refine_with_par` (no parameters)."""

    def __init__(self, cfg: ParConfig = ParConfig()):
        super().__init__()
        self.cfg = cfg

    def forward(self, images: torch.Tensor, probs: torch.Tensor, valid: torch.Tensor | None = None
                ) -> torch.Tensor:
        return refine_with_par(images, probs, self.cfg, valid)

    def extra_repr(self) -> str:
        return f"cfg={self.cfg}"

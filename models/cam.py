"""Multi-scale, flip-fused class activation maps (METHODS.md §1, "Multi-scale CAM").

Per scale the image and its horizontal flip go through the network as one batch of 2B (``flip=False``: the image
alone); each map is resized to the input size (bilinear), fused as max(original, un-flipped flip), ReLU'd, and summed
over scales; then
every image and class is min-max normalised to [0, 1] and classes absent from the image's tags are zeroed.
With the flip the fusion is flip-equivariant by construction: the CAM of a flipped image is the flipped CAM.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from models.backbone import patch_stride

CamModel = Callable[[torch.Tensor], torch.Tensor]


def _raw_cams(model, x: torch.Tensor, heads: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
    """Token-grid CAMs before ReLU; a ToCo-like model gives every head from one pass, a callable one map."""
    if hasattr(model, "cams"):
        return tuple(model.cams(x, heads, relu=False))
    if len(heads) != 1:
        raise ValueError("a plain callable gives one CAM per call; pass one head")
    return (model(x),)


def _stride(model) -> int | None:
    backbone = getattr(model, "backbone", None)
    return patch_stride(backbone) if backbone is not None else None


def cam_to_size(cam: torch.Tensor, input_hw, out_hw, stride: int | None = None) -> torch.Tensor:
    """Token-grid CAMs (N, K, h, w) of an input of size ``input_hw`` resized to ``out_hw`` (bilinear).

    A backbone built with ``dynamic_img_pad`` pads the input on the right and bottom to a patch multiple, so the
    grid covers (h*stride, w*stride) >= input pixels: upsample to that extent, crop the padding off, then resize.
    Without this the map would be stretched by up to one token.
    """
    h, w = cam.shape[-2:]
    ih, iw = int(input_hw[0]), int(input_hw[1])
    if stride and (h * stride, w * stride) != (ih, iw) and h * stride >= ih and w * stride >= iw:
        cam = F.interpolate(cam, size=(h * stride, w * stride), mode="bilinear", align_corners=False)
        cam = cam[..., :ih, :iw]
    if tuple(cam.shape[-2:]) == tuple(out_hw):
        return cam
    return F.interpolate(cam, size=tuple(out_hw), mode="bilinear", align_corners=False)


def normalise_cams(
    cams: torch.Tensor,
    labels: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Per image and class min-max to [0, 1]; absent classes (labels (B, K) multi-hot) and padding are 0.

    cams (B, K, H, W); valid (B, H, W) bool marks real pixels (padding is excluded from min and max).
    The reference divides by (max − min) + eps, so a constant map becomes 0 instead of NaN.
    """
    B, K = cams.shape[:2]
    if valid is None:
        low = cams.amin(dim=(-2, -1), keepdim=True)  # (B, K, 1, 1)
        high = cams.amax(dim=(-2, -1), keepdim=True)
    else:
        inside = valid[:, None]  # (B, 1, H, W)
        big = torch.finfo(cams.dtype).max
        low = torch.where(inside, cams, big).amin(dim=(-2, -1), keepdim=True)
        high = torch.where(inside, cams, -big).amax(dim=(-2, -1), keepdim=True)
        low = torch.where(low == big, torch.zeros_like(low), low)  # images without a valid pixel
        high = torch.maximum(high, low)
    cams = (cams - low).clamp_min(0) / (high - low + eps)
    keep = torch.ones_like(cams, dtype=torch.bool)
    if valid is not None:
        keep = keep & valid[:, None]
    if labels is not None:
        keep = keep & (labels.view(B, K, 1, 1) > 0)
    return torch.where(keep, cams, torch.zeros_like(cams))


def multiscale_cam(
    model: CamModel,
    images: torch.Tensor,
    scales: Sequence[float] = (1.0, 0.5, 1.5),
    *,
    head: str | tuple[str, ...] = "final",
    labels: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    eps: float = 1e-5,
    flip: bool = True,
):
    """Normalised multi-scale + flip CAMs at the input resolution, (B, K, H, W) float32.

    ``flip=False``: each scale runs on the images alone (half the passes), no mirrored pass and no fusion.

    ``model``: a ToCo (its ``cams(x, head, relu=False)`` is used; ``head`` may be a tuple such as
    ("aux", "final") to get several maps from one encoder pass per scale, returned as a tuple) or any
    callable images (N, 3, h, w) → CAMs (N, K, h', w'). ``labels`` (B, K) multi-hot zeroes absent classes;
    ``valid`` (B, H, W) bool excludes padding. Wrap the call in ``torch.no_grad()`` when no gradient is wanted.
    """
    B, _, H, W = images.shape
    heads = (head,) if isinstance(head, str) else tuple(head)
    totals: list[torch.Tensor | None] = [None] * len(heads)
    for scale in scales:
        if scale == 1.0:
            x = images
        else:
            x = F.interpolate(images, size=(int(H * scale), int(W * scale)), mode="bilinear", align_corners=False)
        if flip:
            x = torch.cat([x, x.flip(-1)], dim=0)  # (2B, 3, h, w): one pass for both orientations
        for i, cam in enumerate(_raw_cams(model, x, heads)):
            cam = cam_to_size(cam.float(), x.shape[-2:], (H, W), _stride(model))  # (2B or B, K, H, W)
            cam = F.relu(torch.maximum(cam[:B], cam[B:].flip(-1)) if flip else cam)  # (B, K, H, W)
            totals[i] = cam if totals[i] is None else totals[i] + cam
    # TRT's class-agnostic "fg" map has one plane, not one per class: normalised without the tags
    out = tuple(normalise_cams(total, None if name == "fg" else labels, valid, eps)
                for name, total in zip(heads, totals))
    return out[0] if isinstance(head, str) else out


def cams_at_tokens(cams: torch.Tensor, grid: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Image-resolution CAMs (B, K, H, W) resampled to the token grid (B, K, h, w), e.g. for PTC labels.

    ``bilinear`` (the reference) samples near each token's centre; ``area`` averages the token's pixels.
    """
    if mode == "area":
        return F.adaptive_avg_pool2d(cams, grid)
    return F.interpolate(cams, size=grid, mode=mode, align_corners=False)


def valid_at_tokens(valid: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) bool padding mask → (B, h, w) bool: a token is valid when most of its pixels are."""
    return F.adaptive_avg_pool2d(valid[:, None].float(), grid)[:, 0] > 0.5

"""Class token contrast (CTC) pieces: projection head, EMA teacher, local crops and view augmentation.

METHODS.md §1 (ToCo, CTC): views are 2 global ones (the training crop and a random-resized, jittered copy)
plus local 96×96 crops centred on pixels the auxiliary CAM calls background or uncertain; a local crop is a
negative when its mean region value (0 background, 1 uncertain, 2 foreground) is ≤ 0.2. The student head
projects class tokens; the teacher is an EMA copy of the head applied to the *same* (detached) class tokens,
so no second encoder pass is needed. The InfoNCE loss itself lives in ``models/losses.py``.

Everything is batched over images and driven by an explicit ``torch.Generator``: no per-image Python loops
over tensors and no host syncs, so the views are reproducible and cheap on a GPU.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

# Region values of the auxiliary CAM (METHODS.md §1, CTC).
BACKGROUND, UNCERTAIN, FOREGROUND = 0, 1, 2


class ProjectionHead(nn.Module):
    """DINO-style head: MLP in→hidden→hidden→bottleneck (GELU), L2 normalise, weight-normalised linear."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, out_dim: int = 1024,
                 norm_last_layer: bool = True):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0  # (out_dim, 1): the weight-norm magnitude g
        with torch.no_grad():
            gain.fill_(1.0)
        # DINO keeps g fixed at 1 so that the output is a cosine against unit prototypes.
        gain.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)  # (N, bottleneck)
        return self.last_layer(x)  # (N, out_dim)


class EmaTeacher(nn.Module):
    """A frozen copy of a module, updated as ``teacher ← m·teacher + (1 − m)·student``."""

    def __init__(self, student: nn.Module, momentum: float = 0.9):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self.module = copy.deepcopy(student)
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        teacher_params = list(self.module.parameters())
        student_params = [p.detach() for p in student.parameters()]
        if len(teacher_params) != len(student_params):
            raise ValueError("student and teacher have different parameter lists")
        torch._foreach_lerp_(teacher_params, student_params, 1.0 - self.momentum)
        for t, s in zip(self.module.buffers(), student.buffers()):
            t.copy_(s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.module(x.detach())


def region_from_labels(labels: torch.Tensor, *, ignore_index: int) -> torch.Tensor:
    """An "ignore middle" label map (0 bg, class ids, ``ignore_index`` uncertain) as region values 0/1/2."""
    region = torch.full_like(labels, FOREGROUND, dtype=torch.uint8)
    region[labels == 0] = BACKGROUND
    region[labels == ignore_index] = UNCERTAIN
    return region


def _rand(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device, then moved (no host sync)."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=gen_device).to(device, non_blocking=True)


def sample_local_crops(
    images: torch.Tensor,
    regions: torch.Tensor,
    n_crops: int = 8,
    size: int = 96,
    *,
    generator: torch.Generator | None = None,
    valid: torch.Tensor | None = None,
    negative_max: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Local crops centred on background/uncertain pixels, with their positive flags.

    images (B, 3, H, W); regions (B, H, W) with values 0/1/2 (see ``region_from_labels``); valid (B, H, W)
    bool excludes padding from the centres. Centres are drawn uniformly without replacement among the
    candidates whose crop fits in the image; an image with fewer than ``n_crops`` candidates fills up with
    random fitting centres (as the reference falls back to random crops). Returns crops (B*n, 3, size, size)
    image-major and ``positive`` (B*n,) bool: a crop is negative when its mean region value ≤ ``negative_max``.
    """
    B, C, H, W = images.shape
    if H < size or W < size:
        raise ValueError(f"local crops of {size} px do not fit in {H}x{W} images")
    half = size // 2
    device = images.device
    # A centre c gives the crop rows [c - half, c - half + size): it fits when half <= c <= H - size + half.
    rows = torch.arange(H, device=device)
    cols = torch.arange(W, device=device)
    fits = (((rows >= half) & (rows <= H - size + half))[:, None]
            & ((cols >= half) & (cols <= W - size + half))[None, :])  # (H, W)
    candidate = regions <= UNCERTAIN
    if valid is not None:
        candidate = candidate & valid
    # Random scores: candidates in [1, 2), other fitting pixels in [0, 1), the rest -1; top-k samples
    # uniformly without replacement among candidates first.
    score = _rand((B, H * W), generator, device) + candidate.flatten(1).float()
    score = score.masked_fill(~fits.flatten()[None], -1.0)
    index = score.topk(n_crops, dim=1).indices  # (B, n)
    top = (torch.div(index, W, rounding_mode="floor") - half).clamp(0, H - size)  # (B, n)
    left = (index % W - half).clamp(0, W - size)
    offsets = torch.arange(size, device=device)
    row_idx = (top[..., None] + offsets)[..., :, None]  # (B, n, size, 1)
    col_idx = (left[..., None] + offsets)[..., None, :]  # (B, n, 1, size)
    batch_idx = torch.arange(B, device=device)[:, None, None, None]  # (B, 1, 1, 1)
    crops = images[batch_idx, :, row_idx, col_idx]  # (B, n, size, size, C): advanced dims come first
    crops = crops.permute(0, 1, 4, 2, 3).reshape(B * n_crops, C, size, size)
    mean_region = regions[batch_idx, row_idx, col_idx].float().mean(dim=(-2, -1))  # (B, n)
    positive = (mean_region > negative_max).flatten()  # (B*n,)
    return crops, positive


@dataclass(frozen=True)
class ViewAugConfig:
    """DINO's second global view as used by ToCo (METHODS.md §1, CTC); probabilities per image."""

    scale: tuple[float, float] = (0.4, 1.0)  # random-resized-crop area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # random-resized-crop aspect ratio
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.1
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.2
    solarize_threshold: float = 0.5


_LUMA = (0.299, 0.587, 0.114)
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def augment_view(
    images: torch.Tensor,
    cfg: ViewAugConfig = ViewAugConfig(),
    *,
    size: int | None = None,
    generator: torch.Generator | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
) -> torch.Tensor:
    """Random-resized crop + flip, colour jitter, grayscale, blur and solarise, each drawn per image.

    images (B, 3, H, W) in [0, 1], or normalised with ``mean``/``std`` (then the output is normalised too).
    Output (B, 3, size, size), ``size`` defaulting to H. Hue is shifted by a rotation in YIQ space (a linear,
    batched stand-in for torchvision's HSV round trip).
    """
    B, _, H, W = images.shape
    device, dtype = images.device, images.dtype
    size = size or H
    x = images.float()
    if mean is not None and std is not None:
        m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        s = torch.tensor(std, device=device).view(1, 3, 1, 1)
        x = x * s + m
    u = _rand((B, 16), generator, device)  # every random number of this call, one column per use

    # Random resized crop as one batched affine resampling; a flip is a negative x scale.
    area = cfg.scale[0] + (cfg.scale[1] - cfg.scale[0]) * u[:, 0]
    log_ratio = math.log(cfg.ratio[0]) + (math.log(cfg.ratio[1]) - math.log(cfg.ratio[0])) * u[:, 1]
    crop_w = torch.sqrt(area * log_ratio.exp()).clamp(max=1.0)  # fraction of the image width
    crop_h = torch.sqrt(area / log_ratio.exp()).clamp(max=1.0)
    centre_x = (1 - crop_w) * u[:, 2] + crop_w / 2  # in [0, 1]
    centre_y = (1 - crop_h) * u[:, 3] + crop_h / 2
    flip = torch.where(u[:, 4] < cfg.flip_p, -1.0, 1.0)
    theta = torch.zeros(B, 2, 3, device=device)
    theta[:, 0, 0] = crop_w * flip
    theta[:, 0, 2] = 2 * centre_x - 1
    theta[:, 1, 1] = crop_h
    theta[:, 1, 2] = 2 * centre_y - 1
    grid = F.affine_grid(theta, [B, 3, size, size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False).clamp(0, 1)

    # Colour jitter; images that skip it get the identity factors.
    jitter = u[:, 5] < cfg.jitter_p

    def factor(col: int, amount: float) -> torch.Tensor:
        f = 1 + amount * (2 * u[:, col] - 1)
        return torch.where(jitter, f, torch.ones_like(f)).view(B, 1, 1, 1)

    luma = torch.tensor(_LUMA, device=device).view(1, 3, 1, 1)
    x = (x * factor(6, cfg.brightness)).clamp(0, 1)
    grey_mean = (x * luma).sum(1, keepdim=True).mean((2, 3), keepdim=True)  # (B, 1, 1, 1)
    x = ((x - grey_mean) * factor(7, cfg.contrast) + grey_mean).clamp(0, 1)
    grey = (x * luma).sum(1, keepdim=True)  # (B, 1, H, W)
    x = ((x - grey) * factor(8, cfg.saturation) + grey).clamp(0, 1)
    angle = torch.where(jitter, 2 * math.pi * cfg.hue * (2 * u[:, 9] - 1), torch.zeros_like(u[:, 9]))
    to_yiq = torch.tensor(_RGB_TO_YIQ, device=device)
    rotation = torch.zeros(B, 3, 3, device=device)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1] = angle.cos()
    rotation[:, 1, 2] = -angle.sin()
    rotation[:, 2, 1] = angle.sin()
    rotation[:, 2, 2] = angle.cos()
    hue_matrix = torch.linalg.inv(to_yiq) @ rotation @ to_yiq  # (B, 3, 3)
    x = torch.einsum("bij,bjhw->bihw", hue_matrix, x).clamp(0, 1)

    grey = (x * luma).sum(1, keepdim=True).expand_as(x)
    x = torch.where((u[:, 10] < cfg.grayscale_p).view(B, 1, 1, 1), grey, x)

    sigma = cfg.blur_sigma[0] + (cfg.blur_sigma[1] - cfg.blur_sigma[0]) * u[:, 11]
    x = torch.where((u[:, 12] < cfg.blur_p).view(B, 1, 1, 1), _gaussian_blur(x, sigma, cfg.blur_sigma[1]), x)

    solarised = torch.where(x >= cfg.solarize_threshold, 1 - x, x)
    x = torch.where((u[:, 13] < cfg.solarize_p).view(B, 1, 1, 1), solarised, x)

    if mean is not None and std is not None:
        x = (x - m) / s
    return x.to(dtype)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma (B,), as one grouped convolution per axis."""
    B, C, H, W = x.shape
    radius = max(1, math.ceil(3 * max_sigma))
    radius = min(radius, (min(H, W) - 1) // 2) if min(H, W) > 2 else 0
    if radius == 0:
        return x
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)  # (B, k)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B*C, k)
    flat = x.reshape(1, B * C, H, W)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=B * C)  # vertical
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=B * C)  # horizontal
    return flat.reshape(B, C, H, W)

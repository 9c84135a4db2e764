"""Batched photometric and flip operations on image batches, drawn per image from an explicit ``torch.Generator``.

The ops of the ToCo reference's views (torchvision ``ColorJitter`` / ``RandomGrayscale`` / ``RandomHorizontalFlip``
and DINO's Gaussian blur and solarisation), written as tensor ops over a whole batch on its device: no per-image
Python loop, no host sync. Images are (B, 3, H, W) floats in [0, 1]. Every op takes its random numbers as
arguments (uniforms in [0, 1), one per image), so that a caller draws all the numbers of a view in one call and the
result is a function of the images and the generator's state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as torchvision's rgb_to_grayscale and PIL's "L"
JITTER_OPS = 4  # brightness, contrast, saturation, hue: applied in a random order per image (torchvision)


def uniforms(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device, then moved (no host sync)."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=gen_device).to(device, non_blocking=True)


def _per_image(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, 1, 1, 1)


def flip(x: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of the images where ``apply`` (B,) bool; works on (B, ..., W) tensors (masks too)."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    return torch.where(apply.view(shape), x.flip(-1), x)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma (B, 1, H, W) of RGB images (B, 3, H, W)."""
    luma = torch.tensor(LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * luma).sum(1, keepdim=True)


def random_grayscale(x: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """Three equal luma channels where ``apply`` (B,) bool (torchvision ``RandomGrayscale``)."""
    return torch.where(_per_image(apply), grayscale(x).expand_as(x), x)


def _hue_chroma(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hue in [0, 6) sixths of the circle, chroma = max - min, value = max), each (B, H, W), of RGB (B, 3, H, W)."""
    r, g, b = x.unbind(1)
    value = torch.maximum(torch.maximum(r, g), b)
    chroma = value - torch.minimum(torch.minimum(r, g), b)
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(value == r, (g - b) / safe, torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4))
    return hue.remainder(6), chroma, value


def _from_hue_chroma(hue: torch.Tensor, chroma: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """RGB (B, 3, H, W) of hue (sixths), chroma and value: channel n is V - C clamp(min(k, 4 - k), 0, 1) with
    k = (n + hue) mod 6, n = 5, 3, 1 for R, G, B (the piecewise-linear hexagon of HSV)."""
    n = torch.tensor([5.0, 3.0, 1.0], device=hue.device, dtype=hue.dtype).view(1, 3, 1, 1)
    k = (n + hue[:, None]).remainder(6)
    return value[:, None] - chroma[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> HSV with hue in [0, 1) (a fraction of the circle)."""
    hue, chroma, value = _hue_chroma(x)
    saturation = chroma / torch.where(value > 0, value, torch.ones_like(value))
    return torch.stack([hue / 6, saturation, value], 1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`."""
    hue, saturation, value = hsv.unbind(1)
    return _from_hue_chroma(6 * hue, saturation * value, value)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Hue rotated by ``shift`` (B,) fractions of the circle; saturation and value (max channel) are kept."""
    hue, chroma, value = _hue_chroma(x)
    return _from_hue_chroma(hue + 6 * shift.view(-1, 1, 1), chroma, value).clamp(0, 1)


def colour_jitter(x: torch.Tensor, apply: torch.Tensor, u: torch.Tensor, brightness: float, contrast: float,
                  saturation: float, hue: float) -> torch.Tensor:
    """torchvision's ``RandomApply([ColorJitter(b, c, s, h)], p)`` per image, batched.

    ``apply`` (B,) bool; ``u`` (B, 8) uniforms: 4 factors (brightness, contrast, saturation in 1 ± amount; hue
    shift in ± hue) and 4 sort keys for the order of the four ops, which torchvision draws per call. Each op
    clamps to [0, 1] as torchvision's do; contrast blends with the mean luma of the whole image.

    Brightness, contrast and saturation are each y -> clamp(a y + b mean + c grey) with per-image (a, b, c), so a
    position of the order is one fused step whatever op an image draws there; the costly hue runs once, between
    the steps before it and the steps after it in each image's order.
    """
    B = x.shape[0]
    f_b, f_c, f_s = (1 + amount * (2 * u[:, i] - 1) for i, amount in enumerate((brightness, contrast, saturation)))
    shift = torch.where(apply, hue * (2 * u[:, 3] - 1), torch.zeros_like(u[:, 3]))
    order = u[:, 4:8].argsort(dim=1)  # (B, 4): op index at each position; 3 = hue
    hue_at = (order == 3).float().argmax(1)  # (B,)
    one, zero = torch.ones_like(f_b), torch.zeros_like(f_b)
    # per op (rows: brightness, contrast, saturation, hue = identity here): coefficients of y, mean, grey
    coef = torch.stack([torch.stack([f_b, zero, zero], 1), torch.stack([f_c, 1 - f_c, zero], 1),
                        torch.stack([f_s, zero, 1 - f_s], 1), torch.stack([one, zero, zero], 1)], 1)  # (B, 4, 3)
    identity = torch.tensor([1.0, 0.0, 0.0], device=x.device, dtype=coef.dtype)

    def steps(y: torch.Tensor, before_hue: bool) -> torch.Tensor:
        for position in (range(JITTER_OPS - 1) if before_hue else range(1, JITTER_OPS)):
            active = apply & ((position < hue_at) if before_hue else (position > hue_at))  # (B,)
            c = coef[torch.arange(B, device=x.device), order[:, position]]  # (B, 3)
            c = torch.where(active[:, None], c, identity)
            grey = grayscale(y)  # (B, 1, H, W)
            mean = grey.mean((2, 3), keepdim=True)
            y = (c[:, 0].view(B, 1, 1, 1) * y + c[:, 1].view(B, 1, 1, 1) * mean
                 + c[:, 2].view(B, 1, 1, 1) * grey).clamp(0, 1)
        return y

    out = steps(x, True)
    if hue > 0:
        out = adjust_hue(out, shift)
    return steps(out, False)


def gaussian_blur(x: torch.Tensor, apply: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with a per-image ``sigma`` (B,) where ``apply`` (B,) bool (reflected borders).

    PIL's ``GaussianBlur(radius)`` of the reference takes the radius as the standard deviation, as here. The kernel
    spans 3 ``max_sigma`` on each side (fewer on images too small for it).
    """
    B, C, H, W = x.shape
    radius = min(math.ceil(3 * max_sigma), (min(H, W) - 1) // 2)
    if radius < 1:
        return x
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma.to(x.dtype).clamp(min=1e-3)[:, None]) ** 2)  # (B, k)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B*C, k)
    flat = F.pad(x.reshape(1, B * C, H, W), (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=B * C)  # vertical
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=B * C)  # horizontal
    return torch.where(_per_image(apply), flat.reshape(B, C, H, W), x)


def solarize(x: torch.Tensor, apply: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """PIL's ``ImageOps.solarize`` (pixels >= threshold inverted; PIL: 128 of 255) where ``apply`` (B,) bool."""
    return torch.where(_per_image(apply) & (x >= threshold), 1 - x, x)

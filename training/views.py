"""ToCo's views on the training device (the reference's pipeline; ``ClassifierAugmentConfig``).

The loader gives the training crop (rescale, flip, pad, crop: training/transforms.py) with its valid mask and, with
``second_view: original``, a random-resized crop of the original image (``training.transforms.random_resized_box``). Here, batched and
drawn from the step's generator:

- ``main_view``: a second flip of the training crop *with its valid mask* (the reference flips the image after
  taking its padding box, so the box no longer matches), colour jitter (p = colour_p: brightness, contrast,
  saturation, hue in a random order), grayscale, Gaussian blur (p = main_blur_p; the reference: always). It also
  returns the local-crop source: a copy of the flipped crop with its own jitter, grayscale and blur (p =
  local_blur_p), in the same geometry, so that the CAM regions that place local crops and flag them positive
  describe what the crops show.
- ``second_view``: flip, jitter, grayscale, blur (p 0.1) and solarize (p 0.2) of the loader's crop of the original
  image, or, with ``second_view: crop``, of a random-resized crop of the training crop.
- ``flip_local_crops``: each image's local crops flipped together after they are cut (the reference flips the
  whole copy before cutting, independently of the CAM that places the crops).

Values are (B, 3, H, W) ImageNet-normalised in, and out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from config.schema import ClassifierAugmentConfig
from models import photometric as ph
from models.stem import IMAGENET_MEAN, IMAGENET_STD


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return mean, std


def to_unit(x: torch.Tensor) -> torch.Tensor:
    mean, std = _stats(x)
    return (x.float() * std + mean).clamp(0, 1)


def from_unit(x: torch.Tensor) -> torch.Tensor:
    mean, std = _stats(x)
    return (x - mean) / std


def photometric(x: torch.Tensor, u: torch.Tensor, cfg: ClassifierAugmentConfig, colour: bool, blur_p: float
                ) -> torch.Tensor:
    """Jitter (p = colour_p) and grayscale if ``colour``, then blur (p = ``blur_p``), of images in [0, 1];
    ``u`` (B, 12) uniforms, one column per use."""
    if colour:
        x = ph.colour_jitter(x, u[:, 0] < cfg.colour_p, u[:, 1:9], cfg.brightness, cfg.contrast, cfg.saturation,
                             cfg.hue)
        x = ph.random_grayscale(x, u[:, 9] < cfg.grayscale_p)
    if blur_p > 0:
        lo, hi = cfg.blur_sigma
        x = ph.gaussian_blur(x, u[:, 10] < blur_p, lo + (hi - lo) * u[:, 11], hi)
    return x


def main_view(x: torch.Tensor, valid: torch.Tensor, cfg: ClassifierAugmentConfig,
              generator: torch.Generator | None, with_local: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(training view, its valid mask, the local-crop source): x (B, 3, S, S) normalised, valid (B, S, S) bool.
    Without ``with_local`` the third is the flipped crop without its own jitter (nothing cuts local crops)."""
    B = x.shape[0]
    u = ph.uniforms((B, 25), generator, x.device)  # every number of this call, in a fixed order
    flip = u[:, 0] < cfg.main_flip_p
    unit = ph.flip(to_unit(x), flip)
    valid = ph.flip(valid, flip)
    main = from_unit(photometric(unit, u[:, 1:13], cfg, cfg.main_colour, cfg.main_blur_p)).to(x.dtype)
    if not with_local:
        return main, valid, ph.flip(x, flip)
    local = photometric(unit, u[:, 13:25], cfg, cfg.local_colour, cfg.local_blur_p)
    return main, valid, from_unit(local).to(x.dtype)


def second_view(x: torch.Tensor, cfg: ClassifierAugmentConfig, generator: torch.Generator | None) -> torch.Tensor:
    """CTC's second global view of ``x`` (B, 3, S, S) normalised: the loader's crop of the original image, or the
    training crop (``second_view: crop``, then random-resized here first)."""
    B = x.shape[0]
    u = ph.uniforms((B, 18), generator, x.device)
    unit = to_unit(x)
    if cfg.second_view == "crop":
        unit = resized_crop(unit, u[:, 14:18], cfg.second_scale, cfg.second_ratio)
    unit = ph.flip(unit, u[:, 0] < cfg.second_flip_p)
    unit = photometric(unit, u[:, 1:13], cfg, True, cfg.second_blur_p)
    unit = ph.solarize(unit, u[:, 13] < cfg.second_solarize_p)
    return from_unit(unit).to(x.dtype)


def resized_crop(x: torch.Tensor, u: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float]
                 ) -> torch.Tensor:
    """A random-resized crop of each image back to its size, one batched bilinear resampling; ``u`` (B, 4)."""
    B, C, H, W = x.shape
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    crop_w = torch.sqrt(area * log_ratio.exp()).clamp(max=1.0)  # fraction of the width
    crop_h = torch.sqrt(area / log_ratio.exp()).clamp(max=1.0)
    theta = torch.zeros(B, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = crop_w
    theta[:, 0, 2] = (1 - crop_w) * (2 * u[:, 2] - 1)
    theta[:, 1, 1] = crop_h
    theta[:, 1, 2] = (1 - crop_h) * (2 * u[:, 3] - 1)
    grid = F.affine_grid(theta, [B, C, H, W], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False).clamp(0, 1)


def flip_local_crops(crops: torch.Tensor, per_image: int, cfg: ClassifierAugmentConfig,
                     generator: torch.Generator | None) -> torch.Tensor:
    """crops (B*n, 3, s, s) image-major: each image's n crops flipped together with p = local_flip_p."""
    B = crops.shape[0] // per_image
    flip = ph.uniforms((B,), generator, crops.device) < cfg.local_flip_p
    return ph.flip(crops, flip.repeat_interleave(per_image))

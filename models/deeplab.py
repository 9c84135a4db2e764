"""DeepLab segmenters on a timm CNN backbone: DeepLabV2 (the WSSS standard) and DeepLabV3+.

The last step of the WSSS protocol (DESIGN.md §1): a fully supervised segmenter trained on the pseudo masks. Both
heads sit on a timm backbone in ``features_only`` mode whose last stages are dilated to ``output_stride`` (8 or 16):

- ``v2`` (Chen et al., TPAMI 2017; the head of every WSSS paper's ResNet-101 segmenter): ASPP of four 3x3 convs
  with dilations (6, 12, 18, 24) at output stride 8, each mapping the last feature straight to class scores; the
  branches are *summed*.
- ``v3plus`` (Chen et al., ECCV 2018): ASPP of a 1x1 conv, three dilated 3x3 convs ((6, 12, 18) at output stride
  16, doubled at 8) and image pooling, concatenated and projected; a decoder fuses it with the stride-4 feature.

An optional auxiliary FCN head on the second-to-last feature gives ``aux`` logits (PSPNet-style deep supervision).
Outputs are ``{"out": (B, K+1, H, W), "aux": (B, K+1, H, W)}`` logits at the input size.

Inputs arrive normalised with ImageNet mean/std (the pipeline's convention); ``Renormalise`` (models/stem.py) maps
them to the backbone's own normalisation (mean = std = 0.5 for the TF EfficientNets). ``DeepLab(cfg)`` builds the
architecture with a random backbone; the weights ``cfg.pretrained`` names (``"none"``, ``"hub"``, a file) are read
by ``training/segmenter_model.py: build_segmenter`` through training/weights.py (no file or network I/O here), which
passes the loaded backbone as ``DeepLab(cfg, features)``. A file's weights are matched by name or, for another
implementation's export, by order (``load_features_weights``, models/stem.py: ``match_state_dict``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from models.configs import DeepLabConfig
from models.stem import IMAGENET_MEAN, IMAGENET_STD, Renormalise, match_state_dict


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SummedASPP(nn.Module):
    """DeepLabV2's ASPP: parallel dilated 3x3 convs straight to class scores, summed."""

    def __init__(self, cin: int, num_classes: int, dilations: tuple[int, ...]):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(cin, num_classes, 3, padding=d, dilation=d, bias=True) for d in dilations)
        for conv in self.branches:  # the reference's init: N(0, 0.01), zero bias
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([branch(x) for branch in self.branches]).sum(dim=0)  # (B, K+1, h, w)


class ASPP(nn.Module):
    """DeepLabV3's ASPP: 1x1, dilated 3x3 convs and image pooling, concatenated and projected."""

    def __init__(self, cin: int, channels: int, dilations: tuple[int, ...], dropout: float):
        super().__init__()
        self.branches = nn.ModuleList([conv_bn_relu(cin, channels, 1)] +
                                      [conv_bn_relu(cin, channels, 3, d) for d in dilations])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(cin, channels, 1))
        self.project = nn.Sequential(conv_bn_relu((len(dilations) + 2) * channels, channels, 1),
                                     nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(x).expand(-1, -1, *x.shape[-2:])  # (B, C, h, w)
        return self.project(torch.cat([branch(x) for branch in self.branches] + [pooled], dim=1))  # (B, C, h, w)


class Decoder(nn.Module):
    """DeepLabV3+'s decoder: the ASPP output upsampled to stride 4, fused with the projected stride-4 feature."""

    def __init__(self, low_channels: int, aspp_channels: int, cfg: DeepLabConfig):
        super().__init__()
        self.low = conv_bn_relu(low_channels, cfg.low_level_channels, 1)
        self.fuse = nn.Sequential(conv_bn_relu(aspp_channels + cfg.low_level_channels, cfg.decoder_channels),
                                  conv_bn_relu(cfg.decoder_channels, cfg.decoder_channels))
        self.classifier = nn.Conv2d(cfg.decoder_channels, cfg.num_classes, 1)

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        low = self.low(low)  # (B, 48, H/4, W/4)
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)  # (B, C, H/4, W/4)
        return self.classifier(self.fuse(torch.cat([high, low], dim=1)))  # (B, K+1, H/4, W/4)


class FCNHead(nn.Module):
    """Auxiliary head: 3x3 conv to a quarter of the channels, dropout, 1x1 to class scores."""

    def __init__(self, cin: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.block = nn.Sequential(conv_bn_relu(cin, max(cin // 4, 8)), nn.Dropout(dropout),
                                   nn.Conv2d(max(cin // 4, 8), num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def features_kwargs(output_stride: int) -> dict[str, Any]:
    """The ``timm.create_model`` arguments of a backbone in features_only mode at ``output_stride``."""
    return dict(features_only=True, output_stride=output_stride)


def create_features(name: str, output_stride: int, state: Mapping[str, torch.Tensor] | None = None,
                    source: str = "") -> nn.Module:
    """timm ``name`` in features_only mode at ``output_stride``: random, or with the weights ``state`` (see
    ``load_features_weights``; ``source`` names them in errors)."""
    features = timm.create_model(name, pretrained=False, **features_kwargs(output_stride))
    if state is not None:
        load_features_weights(features, name, state, source or name)
    return features


def load_features_weights(features: nn.Module, name: str, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Weights of the backbone (its own keys) or of the whole classification network (by name or by order)."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = features.state_dict()
    if not set(own) <= set(state):  # a whole network, perhaps another implementation's export: via the full model
        full = timm.create_model(name, pretrained=False)
        full.load_state_dict(match_state_dict(full, state, source))
        state = full.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"{source}: the backbone misses {len(missing)} tensors (first: {missing[0]})")
    mismatched = [k for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
    if mismatched:
        raise ValueError(f"{source}: tensor {mismatched[0]} {tuple(state[mismatched[0]].shape)} does not fit "
                         f"{tuple(own[mismatched[0]].shape)}")
    features.load_state_dict({k: state[k] for k in own})


class DeepLab(nn.Module):
    """Backbone features -> DeepLabV2 or V3+ head -> logits upsampled to the input size."""

    def __init__(self, cfg: DeepLabConfig, features: nn.Module | None = None):
        """``features``: the backbone (``training/segmenter_model.py: pretrained_features``); None builds a random
        one, which ``cfg.pretrained`` must then not ask to replace (weights are loaded outside models/)."""
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        if features is None:
            if cfg.pretrained not in ("none", "", None):
                raise ValueError(f"DeepLab(cfg) builds a random backbone; cfg.pretrained={cfg.pretrained!r} is loaded "
                                 "by training.segmenter_model.build_segmenter")
            features = create_features(cfg.backbone, cfg.output_stride)
        pcfg = getattr(features, "pretrained_cfg", None) or {}
        self.backbone = Renormalise(features, pcfg.get("mean", IMAGENET_MEAN), pcfg.get("std", IMAGENET_STD))
        channels = features.feature_info.channels()
        reductions = features.feature_info.reduction()
        if cfg.head == "v2":
            self.head = SummedASPP(channels[-1], cfg.num_classes, cfg.dilations())
        else:
            if 4 not in reductions:
                raise ValueError(f"{cfg.backbone}: no stride-4 feature for the V3+ decoder ({reductions})")
            self.low_index = reductions.index(4)
            self.aspp = ASPP(channels[-1], cfg.aspp_channels, cfg.dilations(), cfg.aspp_dropout)
            self.head = Decoder(channels[self.low_index], cfg.aspp_channels, cfg)
        self.aux_head = FCNHead(channels[-2], cfg.num_classes) if cfg.aux else None
        if cfg.freeze_bn:
            for module in features.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.requires_grad_(False)

    def train(self, mode: bool = True) -> "DeepLab":
        super().train(mode)
        if self.cfg.freeze_bn:  # fixed running statistics: batches of a few crops would only add noise
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        feats = self.backbone(x)  # list of (B, C_i, H / r_i, W / r_i)
        if self.cfg.head == "v2":
            logits = self.head(feats[-1])  # (B, K+1, H/os, W/os)
        else:
            logits = self.head(self.aspp(feats[-1]), feats[self.low_index])  # (B, K+1, H/4, W/4)
        out = {"out": F.interpolate(logits, size=size, mode="bilinear", align_corners=False)}  # (B, K+1, H, W)
        if self.aux_head is not None:
            aux = self.aux_head(feats[-2])  # (B, K+1, h, w)
            out["aux"] = F.interpolate(aux, size=size, mode="bilinear", align_corners=False)
        return out


def param_groups(model: DeepLab) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(pretrained backbone params, randomly initialised head params): heads train at a higher learning rate."""
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    ids = {id(p) for p in model.backbone.parameters()}
    heads = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return backbone, heads

"""Build the DeepLab segmenter from params (pretrained backbone read by training/weights.py), load the trained one,
and predict class probabilities of an image.

``predict_probs`` is the inference of METHODS.md §4 used by ``train_segmenter`` (single scale, periodic val mIoU)
and ``evaluate`` (multi-scale + flip): the image (long side resized to ``size``) is rescaled by each factor, the
network's softmax is taken on it and on its horizontal flip (un-flipped), resized back to the original image size
and averaged.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from config.schema import SegmenterParams
from models.configs import DeepLabConfig
from models.deeplab import DeepLab, create_features, features_kwargs
from shards.images import resize_long
from training.checkpoint import load_weights
from training.data import to_tensor
from training.weights import NO_WEIGHTS, hub_model, load_state_dict, resolve_weights


def deeplab_config(p: SegmenterParams, num_classes: int) -> DeepLabConfig:
    """The network of ``train_segmenter.model`` with ``num_classes`` (background included, K+1); a ``pkg:`` or file
    weight spec resolved to its file."""
    cfg = p.deeplab(num_classes)
    pretrained = cfg.pretrained if cfg.pretrained in ("none", "hub", "") else resolve_weights(cfg.pretrained)
    return dataclasses.replace(cfg, pretrained=pretrained or "none")


def pretrained_features(name: str, output_stride: int, pretrained: str = "none") -> torch.nn.Module:
    """``models.deeplab.create_features`` with the backbone weights ``pretrained`` names (training/weights.py)."""
    if pretrained == "hub":
        return hub_model(name, **features_kwargs(output_stride))
    if pretrained in NO_WEIGHTS:
        return create_features(name, output_stride)
    return create_features(name, output_stride, state=load_state_dict(pretrained), source=pretrained)


def build_segmenter(cfg: DeepLabConfig) -> DeepLab:
    """A fresh DeepLab with the pretrained backbone weights ``cfg.pretrained`` names loaded."""
    cfg.validate()
    return DeepLab(cfg, pretrained_features(cfg.backbone, cfg.output_stride, cfg.pretrained))


def config_to_json(cfg: DeepLabConfig, class_names: Sequence[str], palette: Sequence[Sequence[int]]) -> dict[str, Any]:
    # The trained weights are complete: rebuilding never needs the pretrained file again.
    return {"deeplab": {**dataclasses.asdict(cfg), "pretrained": "none"}, "class_names": list(class_names),
            "palette": [list(c) for c in palette]}


def load_segmenter(folder: str | Path, device: torch.device | str = "cpu") -> tuple[DeepLab, dict[str, Any]]:
    """The trained segmenter of a ``train_segmenter`` output folder (safetensors: no code runs on load)."""
    state, config = load_weights(folder)
    fields = dict(config["deeplab"])
    fields["aspp_dilations"] = tuple(fields["aspp_dilations"])
    model = DeepLab(DeepLabConfig(**fields))
    model.load_state_dict(state)
    return model.to(device).eval(), config


@torch.no_grad()
def predict_probs(model: torch.nn.Module, rgb: np.ndarray, *, size: int = 0, scales: Sequence[float] = (1.0,),
                  flip: bool = False, device: torch.device | str = "cpu", autocast=None) -> torch.Tensor:
    """Softmax (K+1, H, W) float32 on CPU at the size of ``rgb`` (H, W, 3) uint8, averaged over scales and flips."""
    return predict_views(model, rgb, size=size, scales=scales, flip=flip, device=device, autocast=autocast)[0]


@torch.no_grad()
def predict_views(model: torch.nn.Module, rgb: np.ndarray, *, size: int = 0, scales: Sequence[float] = (1.0,),
                  flip: bool = False, device: torch.device | str = "cpu",
                  autocast=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(average over scales and flips, the single-scale prediction): two (K+1, H, W) float32 softmax maps.

    The single-scale map is the un-flipped view at scale 1.0, reused from the average when 1.0 is among ``scales``.
    """
    height, width = rgb.shape[:2]
    base = to_tensor(resize_long(rgb, size))[None].to(device)  # (1, 3, h, w)
    total = single = None
    if 1.0 not in scales:
        single = predict_views(model, rgb, size=size, device=device, autocast=autocast)[0]
    for scale in scales:
        h, w = (max(8, round(d * scale)) for d in base.shape[-2:])
        x = base if (h, w) == tuple(base.shape[-2:]) else F.interpolate(base, size=(h, w), mode="bilinear",
                                                                        align_corners=False)
        views = torch.cat([x, x.flip(-1)]) if flip else x  # (V, 3, h, w)
        if autocast is not None:
            with autocast:
                logits = model(views)["out"].float()
        else:
            logits = model(views)["out"].float()  # (V, K+1, h, w)
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        probs = logits.softmax(dim=1)  # (V, K+1, H, W)
        if scale == 1.0 and single is None:
            single = probs[0].cpu()
        if flip:
            probs = probs[:1] + probs[1:].flip(-1)  # (1, K+1, H, W)
        total = probs if total is None else total + probs
    return (total[0] / (len(scales) * (2 if flip else 1))).cpu(), single  # (K+1, H, W) each

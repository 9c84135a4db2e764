"""Build the ToCo classifier from params (pretrained weights through training/weights.py), and load the trained one
(for dump_cams and relabel)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from config.schema import ClassifierParams
from models.backbone import check_vit, create_vit, vit_kwargs
from models.toco import ToCo, ToCoConfig, backbone_arguments
from training.checkpoint import load_weights
from training.weights import NO_WEIGHTS, hub_model, load_state_dict, resolve_weights


def toco_config(p: ClassifierParams, num_classes: int) -> ToCoConfig:
    backbone_kwargs = {k: v for k, v in (("embed_dim", p.embed_dim), ("depth", p.depth),
                                         ("num_heads", p.num_heads)) if v}
    backbone_kwargs["dynamic_img_pad"] = True  # any image size: timm pads to a patch multiple
    return ToCoConfig(
        backbone=p.backbone, num_classes=num_classes, img_size=p.crop_size, patch_size=p.patch_size or None,
        pretrained=p.pretrained, drop_path_rate=p.drop_path_rate, freeze_pos_embed=p.freeze_pos_embed,
        backbone_kwargs=backbone_kwargs, aux_layer=p.aux_layer, use_aux=p.use_aux,
        stem=p.stem, stem_weights=resolve_weights(p.stem_weights) if p.stem else "",
        stem_output_stride=p.stem_output_stride, freeze_stem=p.freeze_stem, use_seg_head=p.use_seg, use_ctc=p.use_ctc, seg_dim=p.seg_dim, proj_hidden_dim=p.proj_hidden_dim,
        proj_bottleneck_dim=p.proj_bottleneck_dim, proj_out_dim=p.proj_out_dim, ema_momentum=p.ema_momentum,
        pooling=p.pooling, akp_ratio=p.akp_ratio, use_afa=p.use_afa, afa_layers=p.afa_layers, use_trt=p.use_trt,
        trt_theta=p.trt_theta,
    )


def pretrained_vit(name: str, *, pretrained: str = "none", stem: str = "", stem_weights: str = "",
                   freeze_pos_embed: bool = False, **arch: Any) -> nn.Module:
    """``models.backbone.create_vit(name, **arch)`` with the weights of ``pretrained`` for the ViT and of
    ``stem_weights`` (the whole stem CNN, "" = random) for the stem ``stem`` names (training/weights.py reads them)."""
    if stem:
        arch.update(stem=stem, stem_source=stem_weights,
                    stem_state=load_state_dict(stem_weights) if stem_weights else None)
    if pretrained == "hub":  # timm resizes the position embedding itself
        return check_vit(hub_model(name, **vit_kwargs(**arch)), name, freeze_pos_embed=freeze_pos_embed)
    state = None if pretrained in NO_WEIGHTS else load_state_dict(pretrained)
    return create_vit(name, state=state, freeze_pos_embed=freeze_pos_embed, **arch)


def build_classifier(cfg: ToCoConfig) -> ToCo:
    """A fresh ToCo with the pretrained weights ``cfg`` names (``pretrained``, ``stem_weights``) loaded."""
    cfg.validate()
    return ToCo(cfg, pretrained_vit(cfg.backbone, pretrained=cfg.pretrained, stem_weights=cfg.stem_weights,
                                    **backbone_arguments(cfg)))


def config_to_json(cfg: ToCoConfig, class_names: list[str]) -> dict[str, Any]:
    # The trained weights are complete: rebuilding never needs the original pretrained file again.
    return {"toco": {**dataclasses.asdict(cfg), "pretrained": "none", "stem_weights": ""},
            "class_names": class_names}


def load_classifier(folder: str | Path, device: torch.device | str = "cpu") -> tuple[ToCo, list[str]]:
    """The trained classifier of a ``train_classifier`` output folder (safetensors: no code runs on load)."""
    state, config = load_weights(folder)
    model = ToCo(ToCoConfig(**config["toco"]))
    model.load_state_dict(state)
    return model.to(device).eval(), list(config["class_names"])

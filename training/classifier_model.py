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
from models.configs import ToCoConfig
from models.toco import ToCo, backbone_arguments
from training.checkpoint import load_weights
from training.feature_stats import load_stats
from training.weights import NO_WEIGHTS, hub_model, load_state_dict, resolve_weights


def toco_config(p: ClassifierParams, num_classes: int) -> ToCoConfig:
    """The network of ``train_classifier.model`` with the data's class count and the crop's grid; a ``pkg:`` stem
    weight spec resolved to its file."""
    cfg = p.toco(num_classes)
    return dataclasses.replace(cfg, stem_weights=resolve_weights(cfg.stem_weights) if cfg.stem else "")


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
    """The trained classifier of a ``train_classifier`` output folder (safetensors: no code runs on load).

    ``model.feature_stats``: its training images' feature statistics (training/feature_stats.py), None when the
    folder has none."""
    state, config = load_weights(folder)
    model = ToCo(ToCoConfig(**_current_fields(config["toco"])))
    model.load_state_dict(state)
    model.feature_stats = load_stats(folder)
    return model.to(device).eval(), list(config["class_names"])


def _current_fields(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved ``config.json`` of an earlier version (one ``backbone_kwargs`` dict) in today's fields."""
    fields = dict(saved)
    extra = dict(fields.pop("backbone_kwargs", {}) or {})
    for name in ("embed_dim", "depth", "num_heads", "dynamic_img_pad"):
        if name in extra:
            fields[name] = extra.pop(name)
    if extra:
        fields["timm_kwargs"] = {**extra, **fields.get("timm_kwargs", {})}
    if fields.get("patch_size") is None:
        fields["patch_size"] = 0
    return fields

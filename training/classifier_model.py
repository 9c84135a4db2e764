"""Build the ToCo classifier from params, and load the trained one (for dump_cams and relabel)."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

import torch

from config.schema import ClassifierParams
from models.configs import ToCoConfig
from models.toco import ToCo
from training.checkpoint import load_weights


def resolve_weights(spec: str) -> str:
    """A weight-file spec as a path: ``pkg:<module>/<file>`` names a file shipped inside an installed package."""
    if not spec.startswith("pkg:"):
        return spec
    module, _, relative = spec[4:].partition("/")
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"{spec}: package {module!r} is not installed (it is in requirements.txt)")
    path = Path(list(found.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise FileNotFoundError(f"{spec}: {path} does not exist")
    return str(path)


def toco_config(p: ClassifierParams, num_classes: int) -> ToCoConfig:
    """The network of ``train_classifier.model`` with the data's class count and the crop's grid; a ``pkg:`` stem
    weight spec resolved to its file."""
    cfg = p.toco(num_classes)
    return dataclasses.replace(cfg, stem_weights=resolve_weights(cfg.stem_weights) if cfg.stem else "")


def config_to_json(cfg: ToCoConfig, class_names: list[str]) -> dict[str, Any]:
    # The trained weights are complete: rebuilding never needs the original pretrained file again.
    return {"toco": {**dataclasses.asdict(cfg), "pretrained": "none", "stem_weights": ""},
            "class_names": class_names}


def load_classifier(folder: str | Path, device: torch.device | str = "cpu") -> tuple[ToCo, list[str]]:
    """The trained classifier of a ``train_classifier`` output folder (safetensors: no code runs on load)."""
    state, config = load_weights(folder)
    model = ToCo(ToCoConfig(**_current_fields(config["toco"])))
    model.load_state_dict(state)
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

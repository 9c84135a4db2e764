"""A tiny image collection and a tiny classifier for the relabel tests, made with the project's own code.

``make_collection(folder, n)`` writes ``n`` untagged shapes JPEGs (64-96 px) and, with ``broken=True``, one file
that is not an image (``broken.jpg``); ``make_classifier(folder)`` saves a tiny random ToCo with the shapes classes
(the format of ``train_classifier``'s output: ``model.safetensors`` + ``config.json``), in about a second.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from config.schema import ClassifierAugmentConfig, ClassifierParams, ShapesConfig
from models.configs import ToCoConfig
from models.toco import ToCo
from stages import shapes
from synth.shapes import CLASS_NAMES
from training.checkpoint import save_weights
from training.classifier_model import config_to_json, toco_config

TINY_CLASSIFIER = ClassifierParams(  # a 4-block, 32-wide ViT on 8-px patches: builds and runs in milliseconds
    model=ToCoConfig(backbone="vit_tiny_patch16_224", stem="", patch_size=8, embed_dim=32, depth=4, num_heads=2,
                     seg_dim=16, proj_hidden_dim=32, proj_bottleneck_dim=16, proj_out_dim=32),
    augment=ClassifierAugmentConfig(crop_size=32))
# What the relabel tests override in params.yaml: small CAMs, one refine process.
TINY_RELABEL = {
    "runtime": {"num_threads": 1, "num_workers": 1},
    "dump_cams": {"image_size": 64, "cam_size": 32, "scales": [1.0], "batch_size": 8, "workers": 1},
    "refine": {"overlays": 2},
}


def make_collection(folder: Path, n: int = 6, *, broken: bool = True, seed: int = 0, masks: bool = False) -> list[str]:
    """``n`` untagged images (and a broken file) in ``folder``, with ``masks/`` ground truth if asked; returns the
    image ids."""
    scratch = folder.parent / f".{folder.name}-shapes"
    shapes.run(ShapesConfig(num_train=n, num_val=1, min_side=64, max_side=96, seed=seed), scratch, progress=False)
    folder.mkdir(parents=True, exist_ok=True)
    ids = []
    for path in sorted((scratch / "JPEGImages").glob("*.jpg"))[:n]:
        shutil.copy2(path, folder / path.name)
        if masks:
            (folder / "masks").mkdir(exist_ok=True)
            shutil.copy2(scratch / "SegmentationClass" / f"{path.stem}.png", folder / "masks" / f"{path.stem}.png")
        ids.append(path.stem)
    shutil.rmtree(scratch)
    if broken:
        (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    return ids


def make_classifier(folder: Path, seed: int = 0) -> Path:
    names = ["background", *CLASS_NAMES]
    cfg = toco_config(TINY_CLASSIFIER, len(names) - 1)
    torch.manual_seed(seed)
    save_weights(ToCo(cfg), folder, config_to_json(cfg, names))
    return folder

"""The papers' segmenter preset written in params.yaml's comments: every key is a real param, and the wiring runs
(VOC classes, DeepLabV2 on a randomly initialised ResNet-101 at output stride 8, a tiny size, 2 steps, evaluate)."""

import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

pytest.importorskip("pydensecrf.densecrf")

from conftest import ROOT, tiny_params  # noqa: E402
from shards.classes import VOC_CLASSES  # noqa: E402
from config.loader import build  # noqa: E402
from shards.records import voc_palette  # noqa: E402
from stages import evaluate, prepare, train_segmenter  # noqa: E402
from config.schema import Params  # noqa: E402
from training.segmenter_model import load_segmenter  # noqa: E402
from tests.segmenter_inputs import write_pseudo_labels  # noqa: E402

PERSON, DOG = VOC_CLASSES.index("person") + 1, VOC_CLASSES.index("dog") + 1


def preset(section: str) -> dict:
    """The ``key: value, ...`` comment block (lines starting '#   ') nearest above ``section:`` in params.yaml."""
    lines = (ROOT / "params.yaml").read_text().splitlines()
    block, last = [], []
    for line in lines[: lines.index(f"{section}:")]:
        if line.startswith("#   "):
            block.append(line[4:])
        elif block:
            last, block = block, []
    text = " ".join(block or last)
    pairs = re.findall(r"(\w+): (\[[^\]]*\]|[^,]+)", text)
    assert pairs, f"no preset comment above {section}"
    return {key: yaml.safe_load(value.strip()) for key, value in pairs}


def write_voc_tree(root: Path) -> Path:
    """A VOC tree with the 20 VOC classes' ids in its masks (no classes.txt: the VOC list applies)."""
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    flat = [v for rgb in voc_palette() for v in rgb]
    for split, count in (("train", 4), ("val", 2)):
        names = [f"{split}{i}" for i in range(count)]
        (root / f"ImageSets/Segmentation/{split}.txt").write_text("\n".join(names) + "\n")
        for i, name in enumerate(names):
            mask = np.zeros((60, 80), np.uint8)
            mask[10:40, 10:40] = PERSON
            mask[30:55, 45:75] = DOG if i % 2 else PERSON
            mask[9, 10:40] = 255
            rgb = (rng.random((60, 80, 3)) * 40 + np.asarray(voc_palette())[mask % 21] * 0.8).astype(np.uint8)
            Image.fromarray(rgb).save(root / f"JPEGImages/{name}.jpg")
            png = Image.fromarray(mask, mode="P")
            png.putpalette(flat)
            png.save(root / f"SegmentationClass/{name}.png")
    return root


def test_the_papers_preset_names_real_params():
    segmenter, evaluation = preset("train_segmenter"), preset("evaluate")
    assert (segmenter["head"], segmenter["backbone"], segmenter["output_stride"]) == ("v2", "resnet101", 8)
    assert evaluation["scales"] == [0.5, 0.75, 1.0, 1.25, 1.5]
    params = tiny_params()
    params["train_segmenter"].update(segmenter)
    params["evaluate"].update(evaluation)
    built = build(Params, params)  # an unknown key or a bad value in the comment fails here
    assert built.train_segmenter.lr == 2.5e-4 and built.train_segmenter.freeze_bn


@pytest.mark.slow
def test_the_papers_deeplabv2_preset_trains_and_evaluates_on_a_voc_tree(tmp_path):
    tree = write_voc_tree(tmp_path / "voc")
    params = tiny_params()
    params["prepare"].update(source="voc", root=str(tree), classes="", rows_per_shard=4)
    params["train_segmenter"].update(preset("train_segmenter"))
    params["evaluate"].update(preset("evaluate"))
    # a tiny size: random weights (no download), 64-px crops, 2 steps, loading in the training process
    params["train_segmenter"].update(pretrained="none", crop_size=64, batch_size=2, iterations=2, eval_every=2,
                                     eval_images=2, checkpoint_every=1, num_workers=0)
    p = build(Params, params)
    manifest = tmp_path / "manifest"
    prepare.run(p.prepare, manifest, progress=False)
    pseudo = write_pseudo_labels(manifest, tmp_path / "pseudo_labels")
    train_segmenter.run(p, pseudo, tmp_path / "segmenter", tmp_path / "ckpt", manifest, tmp_path / "live",
                        progress=False)
    model, config = load_segmenter(tmp_path / "segmenter")
    assert config["class_names"] == ["background", *VOC_CLASSES]
    assert config["deeplab"]["head"] == "v2" and config["deeplab"]["output_stride"] == 8
    assert model.cfg.dilations() == (6, 12, 18, 24) and model.cfg.freeze_bn
    assert [m.out_channels for m in model.head.branches] == [21] * 4
    result = evaluate.run(p, tmp_path / "segmenter", manifest, tmp_path / "segmenter.json",
                          tmp_path / "confusion.csv", tmp_path / "overlays", progress=False)
    assert result["images"] == 2 and result["scales"] == [0.5, 0.75, 1.0, 1.25, 1.5]
    assert {"miou", "miou_ms_flip_crf", "per_class"} <= set(result) and len(result["per_class"]) == 21
    assert (tmp_path / "live/plots/metrics/val/miou.tsv").exists()

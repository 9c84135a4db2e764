"""Presets as files (config/presets/): `python -m pipeline preset NAME` writes one as params.yaml; the papers' setting
(VOC, ToCo ViT-B/16 at 448 px, DeepLabV2 ResNet-101) holds the papers' values and runs on a tiny VOC tree (random
weights, a tiny size, 2 steps: the wiring of every stage with the preset's other keys)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

pytest.importorskip("pydensecrf.densecrf")

from conftest import ROOT, merge  # noqa: E402

from config.loader import build  # noqa: E402
from config.schema import Params, load_params  # noqa: E402
from shards.classes import VOC_CLASSES  # noqa: E402
from shards.records import voc_palette  # noqa: E402
from stages import dump_cams, evaluate, prepare, refine, train_classifier, train_segmenter  # noqa: E402
from tests.segmenter_inputs import write_pseudo_labels  # noqa: E402
from training.classifier_model import load_classifier  # noqa: E402
from training.segmenter_model import load_segmenter  # noqa: E402

PERSON, DOG = VOC_CLASSES.index("person") + 1, VOC_CLASSES.index("dog") + 1


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


def apply(name: str, folder: Path) -> Path:
    """``python -m pipeline preset NAME --out folder/params.yaml``, as a user runs it."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "params.yaml"
    proc = subprocess.run([sys.executable, "-m", "pipeline", "preset", name, "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out


def test_the_papers_preset_is_the_papers_setting(tmp_path):
    p = load_params(apply("voc-vitb16", tmp_path))
    c, s, e = p.train_classifier, p.train_segmenter, p.evaluate
    assert (c.model.backbone, c.model.pretrained, c.model.stem, c.augment.crop_size) == \
        ("vit_base_patch16_224", "hub", "", 448)
    assert (c.optim.lr, c.optim.batch_size, c.optim.iterations, c.optim.warmup_iters) == (6e-5, 4, 20000, 1500)
    assert (c.loss.local_crops, c.loss.local_crop_size, c.loss.cam_scales) == (8, 96, (1.0, 0.5, 1.5))
    assert (c.loss.ctc_form, c.optim.poly_over) == ("reference", "whole")  # the authors' CTC and lr schedule
    assert (c.model.seg_dim, c.model.proj_hidden_dim, c.model.proj_out_dim) == (512, 2048, 1024)
    assert (s.model.head, s.model.backbone, s.model.output_stride, s.model.freeze_bn) == ("v2", "resnet101", 8, True)
    assert (s.optim.optimizer, s.optim.lr, s.optim.weight_decay, s.optim.batch_size) == ("sgd", 2.5e-4, 5e-4, 10)
    assert e.scales == (0.5, 0.75, 1.0, 1.25, 1.5) and e.use_crf and e.crf.bilateral_sxy == 121.0
    assert p.prepare.source == "voc" and p.dump_cams.scales == (1.0, 0.5, 1.5)


def test_an_unknown_preset_is_refused_and_params_stay(tmp_path):
    out = tmp_path / "params.yaml"
    out.write_text("keep: me\n")
    proc = subprocess.run([sys.executable, "-m", "pipeline", "preset", "voc-vitb17", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "voc-vitb16" in proc.stderr and out.read_text() == "keep: me\n"


@pytest.mark.slow
def test_the_papers_preset_runs_the_whole_chain_on_a_voc_tree(tmp_path):
    """The preset's every key, shrunk only in size (random weights: nothing downloads; 64-px inputs, 2 steps)."""
    tree = write_voc_tree(tmp_path / "voc")
    params = merge(yaml.safe_load(apply("voc-vitb16", tmp_path / "project").read_text()), {
        "runtime": {"num_workers": 1, "num_threads": 1},
        "prepare": {"root": str(tree), "rows_per_shard": 4},
        "train_classifier": {
            "model": {"pretrained": "none", "depth": 3, "seg_dim": 16, "proj_hidden_dim": 32,
                      "proj_bottleneck_dim": 16, "proj_out_dim": 32},
            "loss": {"local_crops": 2, "local_crop_size": 32, "seg_start_iter": 1},
            "augment": {"crop_size": 64}, "optim": {"batch_size": 2, "iterations": 2, "warmup_iters": 1},
            "eval_size": 64, "loop": {"eval_every": 100, "eval_images": 2, "checkpoint_every": 1, "num_workers": 0}},
        "dump_cams": {"image_size": 64, "cam_size": 32, "predict_size": 64, "batch_size": 4},
        "train_segmenter": {"model": {"pretrained": "none"}, "augment": {"crop_size": 64},
                            "optim": {"batch_size": 2, "iterations": 2},
                            "loop": {"eval_every": 2, "eval_images": 2, "checkpoint_every": 1, "num_workers": 0}},
    })
    p = build(Params, params)
    manifest = tmp_path / "manifest"
    prepare.run(p.prepare, manifest, progress=False)
    train_classifier.run(p, manifest, tmp_path / "classifier", tmp_path / "ckpt_c", progress=False)
    toco, classes = load_classifier(tmp_path / "classifier")
    assert classes == ["background", *VOC_CLASSES] and toco.cfg.backbone == "vit_base_patch16_224"
    assert toco.cfg.img_size == 64 and toco.proj_head is not None and toco.seg_head is not None
    dump_cams.run(p, manifest, tmp_path / "classifier", tmp_path / "cams", progress=False)
    refine.run(p, tmp_path / "cams", manifest, tmp_path / "pseudo_refined", progress=False)
    assert sorted(path.name for path in (tmp_path / "cams").glob("*.parquet")) == \
        sorted(path.name for path in (tmp_path / "pseudo_refined").glob("*.parquet"))

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

"""evaluate: a hand-checkable mIoU, the three variants, the confusion plot file, overlays, pool = inline."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("pydensecrf.densecrf")

from config.schema import EvaluateParams, Params, PrepareConfig, RuntimeConfig, SegmenterParams  # noqa: E402
from models.configs import DeepLabConfig  # noqa: E402
from models.deeplab import DeepLab  # noqa: E402
from shards.records import voc_palette  # noqa: E402
from stages import evaluate, prepare  # noqa: E402
from training.checkpoint import save_weights  # noqa: E402
from training.segmenter_model import config_to_json, deeplab_config  # noqa: E402

CLASSES = ["background", "square", "stripe"]
BLUE, RED = (0, 0, 255), (255, 0, 0)


def write_tree(root: Path) -> Path:
    """Two lossless 32x32 val images: a red square on blue, and plain blue; the truth adds a blue 'stripe' class.

    Image a: square rows/cols 8..23 (256 px, class 1); rows 0..3 are class 2 (128 px) though blue; rows 28..31 are
    255 (128 px); the remaining 512 px are background. Image b: 1024 px of background.
    """
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("a\nb\n")
    flat = [v for rgb in voc_palette() for v in rgb]
    square = np.zeros((32, 32), bool)
    square[8:24, 8:24] = True
    truth_a = np.where(square, 1, 0).astype(np.uint8)
    truth_a[:4] = 2
    truth_a[28:] = 255
    for name, rgb, truth in (("a", np.where(square[..., None], RED, BLUE), truth_a),
                             ("b", np.broadcast_to(np.array(BLUE), (32, 32, 3)), np.zeros((32, 32), np.uint8))):
        Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(root / f"JPEGImages/{name}.png")
        png = Image.fromarray(truth, mode="P")
        png.putpalette(flat)
        png.save(root / f"SegmentationClass/{name}.png")
    return root


class RedIsSquare(torch.nn.Module):
    """A per-pixel oracle: class 1 where the pixel is red, else background (confident logits)."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        red = x[:, 0] * 0.229 + 0.485 > 0.5  # (B, H, W), undoing the ImageNet normalisation
        logits = torch.zeros(x.shape[0], len(CLASSES), *x.shape[-2:])
        logits[:, 0] = torch.where(red, 0.0, 20.0)
        logits[:, 1] = torch.where(red, 20.0, 0.0)
        return {"out": logits}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    tree = write_tree(root / "tree")
    prepare.run(PrepareConfig(source="voc", root=str(tree), classes=str(tree / "classes.txt"), splits=("val",)),
                root / "manifest", progress=False)
    return root / "manifest"


def test_hand_checked_miou_of_an_oracle(manifest, tmp_path, monkeypatch):
    config = {"class_names": CLASSES, "palette": [list(c) for c in voc_palette()]}
    (tmp_path / "config.json").write_text(json.dumps(config))  # the stage reads class names from the folder
    monkeypatch.setattr(evaluate, "load_segmenter", lambda folder, device: (RedIsSquare(), config))
    params = Params(runtime=RuntimeConfig(num_threads=1, num_workers=1),
                    evaluate=EvaluateParams(scales=(1.0,), flip=True))
    result = evaluate.run(params, tmp_path, manifest, tmp_path / "segmenter.json", tmp_path / "confusion.csv",
                          tmp_path / "overlays", progress=False)
    # background: 1536 true pixels, all right, plus 128 'stripe' pixels wrongly called background: 1536 / 1664.
    # square: 256 / 256. stripe: 0 / 128. mIoU = (12/13 + 1 + 0) / 3 = 25/39.
    expected = round(100 * 25 / 39, 2)
    assert result["miou"] == result["miou_ms_flip"] == result["miou_ms_flip_crf"] == expected
    assert result["per_class"]["background"]["iou"] == round(100 * 12 / 13, 2)
    assert result["per_class"]["square"]["iou"] == 100.0 and result["per_class"]["stripe"]["iou"] == 0.0
    assert result["images"] == 2 and result["accuracy"] == round(100 * (1536 + 256) / (1536 + 256 + 128), 2)
    assert json.loads((tmp_path / "segmenter.json").read_text()) == result
    rows = (tmp_path / "confusion.csv").read_text().splitlines()
    assert rows[0] == "actual,predicted"
    pairs = [tuple(r.split(",")) for r in rows[1:]]
    # 1920 pixels -> 10000 rows: background/background 8000, square 1333, stripe/background 667
    assert pairs.count(("background", "background")) == 8000 and pairs.count(("stripe", "background")) == 667
    assert pairs.count(("square", "square")) == 1333 and len(pairs) == 8000 + 1333 + 667
    overlays = sorted(p.name for p in (tmp_path / "overlays").glob("*.png"))
    assert len(overlays) == 2 and all(name.endswith(("a.png", "b.png")) for name in overlays)


def test_a_trained_network_scores_the_same_in_one_process_and_in_a_pool(manifest, tmp_path):
    p = SegmenterParams(model=DeepLabConfig(backbone="mobilenetv3_small_050", pretrained="none", head="v3plus",
                                            output_stride=16, aspp_channels=16, decoder_channels=16,
                                            low_level_channels=8))
    torch.manual_seed(0)
    model = DeepLab(deeplab_config(p, len(CLASSES)))
    save_weights(model, tmp_path / "segmenter", config_to_json(model.cfg, CLASSES, voc_palette()))
    results = []
    for workers in (1, 2):
        params = Params(runtime=RuntimeConfig(num_threads=1, num_workers=workers),
                        evaluate=EvaluateParams(scales=(0.75, 1.0, 1.5), overlays=1))
        results.append(evaluate.run(params, tmp_path / "segmenter", manifest, tmp_path / f"m{workers}.json",
                                    tmp_path / f"c{workers}.csv", tmp_path / f"o{workers}", progress=False))
    assert results[0] == results[1]  # in-process or 2 workers (1 thread each): the same integer confusion counts
    assert {"miou", "miou_ms_flip_crf", "per_class", "miou_ms_flip", "per_class_ms_flip_crf"} <= set(results[0])
    assert all(0.0 <= results[0][k] <= 100.0 for k in ("miou", "miou_ms_flip", "miou_ms_flip_crf"))
    assert len(list((tmp_path / "o2").glob("*.png"))) == 1

"""Issue 16, acceptance: real photos of classes a shapes classifier never saw, relabelled by a classifier trained on
the embedded shapes with the real stages (shapes -> prepare -> train_classifier, the default frozen ImageNet stem, a
few steps): no tag is forced on them, their labels are the classes their masks hold, and the summary says they are
unlike the training images.

The photos are the colour photos shipped with scikit-image (an astronaut, a cat, coffee, a rocket, a motorcycle,
galaxies, a stained tissue, a retina), resized to the tiny sizes; four new shapes images sit beside them. The
statistics need some training images (here 100, and 40 held out): with a few dozen the covariance is too rough to
tell photos from shapes."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

pytest.importorskip("pydensecrf.densecrf")
skdata = pytest.importorskip("skimage.data")

from conftest import ROOT, tiny_params  # noqa: E402

from config.loader import build  # noqa: E402
from config.schema import Params  # noqa: E402
from shards.pseudo_labels import read_mask  # noqa: E402
from stages import prepare, relabel, shapes, train_classifier  # noqa: E402
from tests.collection_inputs import make_collection  # noqa: E402
from training.feature_stats import STATS_FILE  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "hubble_deep_field", "immunohistochemistry",
          "retina")


def write_photos(folder, long_side=96):
    folder.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        pixels = getattr(skdata, name)()
        image = Image.fromarray((pixels[0] if isinstance(pixels, tuple) else pixels)[..., :3])  # a stereo pair: left
        image.thumbnail((long_side, long_side))
        image.save(folder / f"photo_{name}.jpg", quality=90)


def shapes_classifier(root):
    """A classifier of the embedded shapes with the default stem, and its feature statistics."""
    raw = tiny_params({"shapes": {"num_train": 100, "num_val": 40}, "runtime": {"num_workers": 1},
                       "prepare": {"root": str(root / "shapes"), "rows_per_shard": 64}})
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())["train_classifier"]["model"]
    for key in ("stem", "patch_size"):  # the shipped default: the frozen ImageNet EfficientNet-Lite0 stem
        raw["train_classifier"]["model"][key] = shipped[key]
    raw["train_classifier"]["augment"] = {**raw["train_classifier"]["augment"], "crop_size": 64}
    raw["train_classifier"]["loss"]["local_crop_size"] = 32
    raw["train_classifier"]["loop"]["eval_every"] = 0
    # A few steps at the default lr on 100 images scramble a from-scratch ViT's tokens, and this test is about the
    # mechanism (statistics recorded at training, scores at the dump, flags in the summary), not about training: the
    # tiny lr keeps the ViT near its initialisation on top of the pretrained stem (bench/RESULTS.md §16 measures
    # the OOD scores of a classifier trained with the shipped params).
    raw["train_classifier"]["optim"]["lr"] = 1e-7
    raw["refine"]["overlays"] = 0
    # 128 px, not the tiny project's 64: a 4x3 token grid says little about what kind of picture an image is
    raw["dump_cams"].update(image_size=128, predict_size=128, cam_size=32)
    params = build(Params, raw)
    shapes.run(params.shapes, root / "shapes", progress=False)
    prepare.run(params.prepare, root / "manifest", progress=False)
    train_classifier.run(params, root / "manifest", root / "classifier", root / "ckpt", progress=False)
    return params, root / "classifier"


def test_photos_of_unknown_classes_get_no_forced_tags_and_are_flagged(tmp_path):
    params, classifier = shapes_classifier(tmp_path)
    assert (classifier / STATS_FILE).is_file()
    inbox = tmp_path / "inbox" / "photos"
    write_photos(inbox)
    shapes_ids = make_collection(inbox, 4, broken=False, seed=5)
    summary = relabel.run(params, "photos", inbox, classifier, tmp_path / "out", progress=False)
    version = tmp_path / "out" / summary["version"]
    per_image = {r["image_id"]: r for r in summary["per_image"]}
    rows = {r["image_id"]: r for p in sorted((version / "pseudo_labels").glob("*.parquet"))
            for r in pq.read_table(p).to_pylist()}
    threshold = params.dump_cams.predict_threshold
    assert summary["dumped"] == 12 and summary["given"] == 0 and len(rows) == 12
    for image_id, entry in per_image.items():
        assert all(s > threshold for s in entry["scores"])  # a tag only where its score clears the threshold
        assert (entry["tag_source"] == "unknown") == (entry["tags"] == [])
        held = sorted(int(v) for v in np.unique(read_mask(rows[image_id])) if 0 < v < 255)
        assert rows[image_id]["labels"] == held and set(entry["labels"]) <= set(entry["tags"])
    ood = {image_id: entry["ood_score"] for image_id, entry in per_image.items()}
    assert summary["ood_scored"] == 12 and all(v is not None for v in ood.values())
    photos = [ood[f"photo_{name}"] for name in PHOTOS]
    assert sum(v > 1 for v in photos) >= 7, ood  # the photos are unlike the shapes the classifier saw
    assert np.median(photos) > 1.2 * np.median([ood[i] for i in shapes_ids]), ood
    assert summary["unlike_training"] == sum(v > 1 for v in ood.values()) > 6
    assert summary["warnings"][0].startswith("Most of this collection")

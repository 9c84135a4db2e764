"""export: re-runs, the PyTorch reader over the package, the torchvision example, and `dvc get` from a clone."""

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from shards.images import decode_mask_png
from shards.package import PackageError, verify_package
from stages import export
from tests.export_inputs import CLASS_NAMES, export_params, write_inputs
from training.pseudo_dataset import PseudoLabelDataset, RowGroupSampler, TrainTransform


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_inputs(tmp_path_factory.mktemp("export_inputs"))


@pytest.fixture(scope="module")
def package(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "export"
    export.run(export_params(), inputs["pseudo"], inputs["manifest"], out, inputs["metrics"], progress=False)
    return out


def test_rerun_gives_the_same_bytes_and_a_reshard_leaves_no_stale_file(inputs, tmp_path):
    out = tmp_path / "export"
    first = export.run(export_params(), inputs["pseudo"], inputs["manifest"], out, inputs["metrics"], progress=False)
    sums = (out / "SHA256SUMS").read_text()
    again = export.run(export_params(), inputs["pseudo"], inputs["manifest"], out, inputs["metrics"], progress=False)
    assert (out / "SHA256SUMS").read_text() == sums and again["removed"] == []
    assert "coco/annotations/instances_val.json" in first["files"] and "voc/labelmap.txt" in first["files"]
    result = export.run(export_params(rows_per_shard=100, voc=False, splits=("train",)), inputs["pseudo"],
                        inputs["manifest"], out, None, progress=False)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "README.md", "SHA256SUMS", "coco/annotations/instances_train.json", "data/train-00000-of-00001.parquet",
        "package.json", "review.html"]
    assert {"data/val-00000-of-00001.parquet", "coco/annotations/instances_val.json"} <= set(result["removed"])
    assert not (out / "voc").exists()
    assert first["splits"] == {"train": 7, "val": 3} and result["splits"] == {"train": 7}
    info = json.loads((out / "package.json").read_text())
    assert info["quality"] is None  # no metrics file given: the card says quality is unknown
    assert info["coco"]["image_root"] is None  # no VOC folder: the images are in the Parquet rows only
    verify_package(out)
    result = export.run(export_params(rows_per_shard=100, voc=False, coco=False, splits=("train",)), inputs["pseudo"],
                        inputs["manifest"], out, None, progress=False)
    assert result["removed"] == ["coco/annotations/instances_train.json"] and not (out / "coco").exists()
    assert json.loads((out / "package.json").read_text())["coco"] is None


def review_ids(page: Path) -> list[str]:
    return re.findall(r'<tr data-id="([^"]+)"', page.read_text())


def test_the_review_page_is_listed_deterministic_and_capped(inputs, package, tmp_path):
    sums = (package / "SHA256SUMS").read_text()
    assert re.search(r"^[0-9a-f]{64}  review\.html$", sums, re.M)
    rows = [r for f in sorted(inputs["pseudo"].glob("*.parquet"))
            for r in pq.read_table(f, columns=["image_id", "confidence"]).to_pylist()]
    worst = [r["image_id"] for r in sorted(rows, key=lambda r: (r["confidence"], r["image_id"]))]
    assert review_ids(package / "review.html") == worst  # both splits, all 10 rows: review_rows is 200
    info = json.loads((package / "package.json").read_text())
    assert info["review"] == "review.html" and "`review.html`: a review page" in (package / "README.md").read_text()
    out = tmp_path / "export"
    export.run(export_params(review_rows=3), inputs["pseudo"], inputs["manifest"], out, progress=False)
    page = (out / "review.html").read_bytes()
    assert review_ids(out / "review.html") == worst[:3] and b"3 of 10 images" in page
    export.run(export_params(review_rows=3), inputs["pseudo"], inputs["manifest"], out, progress=False)
    assert (out / "review.html").read_bytes() == page
    result = export.run(export_params(review_rows=0), inputs["pseudo"], inputs["manifest"], out, progress=False)
    assert result["removed"] == ["review.html"] and "review.html" not in (out / "SHA256SUMS").read_text()
    assert json.loads((out / "package.json").read_text())["review"] is None
    verify_package(out)


def test_refuses_a_foreign_folder_and_an_unknown_split(inputs, tmp_path):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an export package"):
        export.run(export_params(), inputs["pseudo"], inputs["manifest"], foreign, progress=False)
    assert (foreign / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match=r"split\(s\) \['test'\]"):
        export.run(export_params(splits=("train", "test")), inputs["pseudo"], inputs["manifest"],
                   tmp_path / "out", progress=False)


def test_dataset_streams_rows_with_uint8_masks_and_a_row_group_shuffle(package, inputs):
    dataset = PseudoLabelDataset(package, split="train")
    assert len(dataset) == 7 and dataset.class_names == CLASS_NAMES and dataset.ignore_index == 255
    assert len(dataset.starts) == 4  # row groups of 2, 2 | 2, 1
    source = {r["image_id"]: r for f in sorted(inputs["pseudo"].glob("train-*.parquet"))
              for r in pq.read_table(f).to_pylist()}
    for index in range(len(dataset)):
        image_id, _, _ = dataset.row(index)
        image, mask = dataset[index]
        assert image.dtype == torch.float32 and image.shape[0] == 3 and 0.0 <= image.min() <= image.max() <= 1.0
        assert mask.dtype == torch.uint8 and mask.shape == image.shape[1:]
        np.testing.assert_array_equal(mask.numpy(), decode_mask_png(source[image_id]["mask"]["bytes"]))
    order = list(RowGroupSampler(dataset, seed=3))
    assert sorted(order) == list(range(7)) and order != list(range(7))
    groups = [np.searchsorted(dataset.starts, i, side="right") - 1 for i in order]
    assert sum(a != b for a, b in zip(groups, groups[1:])) == 3  # each row group visited once


def crop_kind(mask: np.ndarray, crop: np.ndarray) -> str:
    """'plain' or 'flipped' when ``crop`` is a window of ``mask`` or of its mirror image."""
    size = crop.shape[0]
    for kind, source in (("plain", mask), ("flipped", mask[:, ::-1])):
        for top in range(source.shape[0] - size + 1):
            for left in range(source.shape[1] - size + 1):
                if np.array_equal(source[top: top + size, left: left + size], crop):
                    return kind
    raise AssertionError("the crop is not a window of the mask")


def test_train_transform_crops_and_flips_image_and_mask_together():
    torch.manual_seed(0)
    mask = np.random.default_rng(0).integers(0, 4, size=(40, 50)).astype(np.uint8)
    mask[:5] = 255
    image = np.repeat(mask[..., None], 3, axis=2)  # the image is the mask: any misalignment shows
    transform = TrainTransform(crop_size=24, scale_range=(1.0, 1.0), mean=(0, 0, 0), std=(1 / 255,) * 3)
    kinds = set()
    for _ in range(12):
        out_image, out_mask = transform(image, mask)
        assert out_mask.dtype == torch.uint8 and out_image.shape == (3, 24, 24)
        torch.testing.assert_close(out_image[0].round().to(torch.uint8), out_mask)
        kinds.add(crop_kind(mask, out_mask.numpy()))
    assert kinds == {"plain", "flipped"}
    padded_image, padded_mask = TrainTransform(crop_size=64, scale_range=(1.0, 1.0))(image, mask)
    assert padded_mask.shape == (64, 64) and (padded_mask == 255).sum() >= 64 * 64 - 40 * 50
    assert set(torch.unique(padded_mask).tolist()) <= {0, 1, 2, 3, 255}


def test_reader_refuses_a_tampered_shard_naming_it(package, tmp_path):
    copy = shutil.copytree(package, tmp_path / "copy")
    shard = copy / "data" / "val-00000-of-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x10
    shard.write_bytes(bytes(data))
    PseudoLabelDataset(copy, split="train")  # the train shards are intact
    with pytest.raises(PackageError, match="val-00000-of-00001.parquet: sha256 does not match"):
        PseudoLabelDataset(copy, split="val")


def test_torchvision_example_trains_on_the_package_and_saves_a_model_that_loads(package, tmp_path):
    pytest.importorskip("torchvision")
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

    from examples.train_torchvision import main

    torch.set_num_threads(1)
    out = tmp_path / "runs" / "model.pt"
    losses = main(["--package", str(package), "--steps", "3", "--size", "32", "--batch-size", "2", "--lr", "0.05",
                   "--out", str(out), "--no-progress"])
    assert len(losses) == 3 and all(np.isfinite(losses)) and len(set(losses)) == 3
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.pt"]  # no temporary file left
    saved = torch.load(out, weights_only=True)  # plain tensors and values: loads without running code
    assert saved["class_names"] == CLASS_NAMES and saved["ignore_index"] == 255 and saved["steps"] == 3
    model = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=len(saved["class_names"]))
    untrained = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(saved["model"])  # strict: every key and shape matches
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, untrained[k])]
    assert changed, "the saved weights are the untrained ones"
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32))["out"].shape == (1, len(CLASS_NAMES), 32, 32)


@pytest.mark.slow
def test_dvc_get_from_a_clone_with_its_remote_returns_a_package_that_verifies(inputs, tmp_path):
    from conftest import make_project, run, tiny_params

    project = make_project(tmp_path / "project", tiny_params({"export": {"splits": ["train", "val"], "rows_per_shard": 4, "row_group_size": 2}}))
    shutil.copytree(inputs["pseudo"], project / "data" / "pseudo_labels")
    shutil.copytree(inputs["manifest"], project / "data" / "manifest")
    (project / "metrics").mkdir(exist_ok=True)
    shutil.copy2(inputs["metrics"], project / "metrics" / "pseudo_labels.json")
    run(["dvc", "remote", "add", "-f", "-d", "local", str(tmp_path / "remote")], project)  # absolute: clones find it
    out = run(["dvc", "repro", "--single-item", "export"], project)
    assert "Running stage 'export'" in out.stdout
    run(["dvc", "push", "export"], project)
    run(["git", "add", "dvc.lock", ".dvc/config", "data/.gitignore"], project)
    run(["git", "commit", "-qm", "export"], project)

    # As the README shows it, against a Git URL: a bare repository (what a server holds) by its file:// URL.
    bare = tmp_path / "published.git"
    run(["git", "clone", "-q", "--bare", str(project), str(bare)], tmp_path)
    url = bare.as_uri()
    run(["dvc", "get", url, "data/export", "-o", str(tmp_path / "download")], tmp_path)
    download = tmp_path / "download"
    info = verify_package(download)
    assert info["splits"]["train"]["images"] == 7
    assert (download / "SHA256SUMS").read_text() == (project / "data" / "export" / "SHA256SUMS").read_text()
    user = make_project(tmp_path / "user", tiny_params())  # someone else's DVC project
    run(["dvc", "import", url, "data/export", "-o", "data/pseudo_labels_import"], user)
    assert verify_package(user / "data" / "pseudo_labels_import")["splits"]["val"]["images"] == 3
    assert (user / "data" / "pseudo_labels_import.dvc").is_file()  # tracked: `dvc update` pulls new versions
    dvc_api = pytest.importorskip("dvc.api")
    with dvc_api.open("data/export/data/val-00000-of-00001.parquet", repo=url, mode="rb") as handle:
        assert pq.read_table(io.BytesIO(handle.read())).num_rows == 3  # one shard, without the rest

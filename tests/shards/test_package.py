"""The export package as consumers see it: load_dataset, the VOC folder, the card, checksums and tampering."""

import io
import json
import shutil
import subprocess
import xml.etree.ElementTree as ET

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from shards.images import decode_mask, decode_mask_png
from shards.package import CHECKSUMS_NAME, PackageError, read_checksums, verify_package, write_checksums
from shards.readers import open_source
from shards.records import voc_palette
from shards.voc_xml import annotation_xml
from stages import export
from tests.export_inputs import CLASS_NAMES, PRODUCER, export_params, write_inputs


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    root = tmp_path_factory.mktemp("package")
    inputs = write_inputs(root)
    export.run(export_params(), inputs["pseudo"], inputs["manifest"], root / "export", inputs["metrics"],
               progress=False)
    source = {r["image_id"]: r for f in sorted(inputs["pseudo"].glob("*.parquet"))
              for r in pq.read_table(f).to_pylist()}
    return root / "export", source, inputs


def test_load_dataset_round_trip_keeps_images_masks_255_and_class_names(package, tmp_path):
    datasets = pytest.importorskip("datasets")
    folder, source, _ = package
    loaded = datasets.load_dataset("parquet", data_dir=str(folder), cache_dir=str(tmp_path / "hf"))
    assert sorted(loaded) == ["train", "val"]
    assert (loaded["train"].num_rows, loaded["val"].num_rows) == (7, 3)
    features = loaded["train"].features
    assert type(features["image"]).__name__ == type(features["mask"]).__name__ == "Image"
    assert features["labels"].feature.names == CLASS_NAMES
    assert features["boxes"].feature["label"].names == CLASS_NAMES  # box labels decode as class names too
    assert features["boxes"].feature["x0"].dtype == "int32" and features["boxes"].feature["pixels"].dtype == "int64"
    seen_ignore, boxes = False, 0
    for split in ("train", "val"):
        for row in loaded[split]:
            original = source[row["image_id"]]
            assert row["split"] == split
            expected_rgb = np.asarray(Image.open(io.BytesIO(original["image"]["bytes"])).convert("RGB"))
            np.testing.assert_array_equal(np.asarray(row["image"].convert("RGB")), expected_rgb)
            mask = np.asarray(row["mask"])
            assert mask.dtype == np.uint8
            np.testing.assert_array_equal(mask, decode_mask_png(original["mask"]["bytes"]))
            seen_ignore |= bool((mask == 255).any())
            assert row["labels"] == original["labels"]
            assert row["boxes"] == original["boxes"]  # a list of {label, x0, y0, x1, y1, pixels} dicts
            boxes += len(row["boxes"])
    assert seen_ignore, "the synthetic masks carry 255 pixels; they must survive the round trip"
    assert boxes >= 10, "every synthetic mask holds at least one box"
    named = loaded["train"].features["labels"].feature.int2str(loaded["train"][0]["labels"])
    assert named == [CLASS_NAMES[i] for i in source[loaded["train"][0]["image_id"]]["labels"]]


def test_voc_folder_reads_back_in_the_projects_voc_reader_with_identical_masks(package):
    folder, source, _ = package
    class_names, records = open_source("voc", folder / "voc", splits=("train", "val"), tags_from="mask")
    assert list(class_names) == CLASS_NAMES[1:]
    records = list(records)
    assert all(type(r).__name__ == "SourceRecord" for r in records), [r for r in records if hasattr(r, "reason")]
    assert sorted(r.image_id for r in records) == sorted(source)
    for record in records:
        original = source[record.image_id]
        assert record.split == original["split"]
        with open(record.image_path, "rb") as handle:
            assert handle.read() == original["image"]["bytes"]
        mask = decode_mask(record.mask, name=record.mask, size=None, num_classes=len(class_names),
                           palette=voc_palette())
        np.testing.assert_array_equal(mask, decode_mask_png(original["mask"]["bytes"]))
        assert list(record.tags) == original["labels"]


def voc_objects(path) -> list[dict]:
    """The objects of a VOC annotation XML, as ``boxes`` dicts (VOC's 1-based inclusive ends made 0-based exclusive)."""
    objects = []
    for node in ET.parse(path).getroot().findall("object"):
        bndbox = {key: int(node.findtext(f"bndbox/{key}")) for key in ("xmin", "ymin", "xmax", "ymax")}
        objects.append({"label": CLASS_NAMES.index(node.findtext("name")), "x0": bndbox["xmin"] - 1,
                        "y0": bndbox["ymin"] - 1, "x1": bndbox["xmax"], "y1": bndbox["ymax"]})
    return objects


def test_voc_annotations_round_trip_to_the_boxes_and_give_the_xml_tags(package):
    folder, source, _ = package
    sums = read_checksums(folder)
    for image_id, original in source.items():
        path = folder / "voc" / "Annotations" / f"{image_id}.xml"
        assert f"voc/Annotations/{image_id}.xml" in sums
        assert voc_objects(path) == [{k: v for k, v in b.items() if k != "pixels"} for b in original["boxes"]]
        root = ET.parse(path).getroot()
        assert (int(root.findtext("size/width")), int(root.findtext("size/height"))) == (original["width"],
                                                                                       original["height"])
        assert (folder / "voc" / "JPEGImages" / root.findtext("filename")).is_file()
    _, records = open_source("voc", folder / "voc", splits=("train", "val"), tags_from="xml")
    records = list(records)
    assert len(records) == len(source)
    for record in records:  # the project's own VOC reader takes the objects' names as tags
        assert record.tag_source == "xml"
        assert list(record.tags) == sorted({b["label"] for b in source[record.image_id]["boxes"]})


def test_voc_annotation_of_no_boxes_and_of_a_box_on_the_border():
    empty = ET.fromstring(annotation_xml("a.png", 6, 8, []))
    assert empty.findall("object") == [] and empty.findtext("filename") == "a.png"
    whole = (CLASS_NAMES[2], (0, 1, 8, 5))  # spans the width: truncated
    inner = (CLASS_NAMES[3], (1, 1, 3, 2))
    root = ET.fromstring(annotation_xml("b.jpg", 6, 8, [whole, inner]))
    assert [(o.findtext("name"), o.findtext("truncated")) for o in root.findall("object")] == [("box", "1"),
                                                                                               ("bar", "0")]
    assert [root.findtext(f"object/bndbox/{k}") for k in ("xmin", "ymin", "xmax", "ymax")] == ["1", "2", "8", "5"]


def test_shards_are_sized_by_params_and_checksums_follow_coreutils(package):
    folder, _, _ = package
    shards = sorted(p.name for p in (folder / "data").glob("*.parquet"))
    assert shards == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet", "val-00000-of-00001.parquet"]
    meta = pq.ParquetFile(folder / "data" / shards[0]).metadata
    assert meta.num_rows == 4 and [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [2, 2]
    sums = read_checksums(folder)
    listed = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {CHECKSUMS_NAME}
    assert set(sums) == listed
    if shutil.which("sha256sum"):
        check = subprocess.run(["sha256sum", "-c", "--quiet", CHECKSUMS_NAME], cwd=folder, capture_output=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_card_header_carries_classes_counts_quality_and_provenance(package):
    folder, _, inputs = package
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    header = yaml.safe_load(text.split("---\n")[1])
    assert header["class_names"] == CLASS_NAMES and header["ignore_index"] == 255
    assert header["palette"]["disc"] == list(voc_palette()[1]) and header["license"] == "unknown"
    assert {s: v["images"] for s, v in header["splits"].items()} == {"train": 7, "val": 3}
    metrics = json.loads(inputs["metrics"].read_text())
    assert header["quality"]["miou"] == metrics["miou"] and header["quality"]["coverage"] == metrics["coverage"]
    assert header["provenance"]["classifier_fingerprint"] == PRODUCER["model_fingerprint"]
    assert header["provenance"]["params"]["refine"]["methods"] == ["par", "crf"]
    for split in header["splits"].values():
        assert sum(split["pixel_share"].values()) + split["ignored_pixel_share"] == pytest.approx(1.0, abs=1e-4)
        assert 0 < split["ignored_pixel_share"] < 0.2
    assert header["configs"][0]["data_files"][0] == {"split": "train", "path": "data/train-*.parquet"}


def flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def add_unlisted(path):
    shutil.copy2(path, path.with_name("train-00009-of-00009.parquet"))


@pytest.mark.parametrize("tamper, needle", [(flip_byte, "sha256 does not match"), (truncate, "sha256 does not match"),
                                            (add_unlisted, "not listed"), (lambda p: p.unlink(), "missing")])
def test_tampered_truncated_unlisted_or_missing_shard_is_refused_naming_the_file(package, tmp_path, tamper, needle):
    folder = shutil.copytree(package[0], tmp_path / "copy")
    verify_package(folder)  # intact copy passes
    shard = folder / "data" / "train-00001-of-00002.parquet"
    tamper(shard)
    with pytest.raises(PackageError, match=needle) as info:
        verify_package(folder)
    assert "data/train-0000" in str(info.value)


def test_a_package_of_another_version_is_refused(package, tmp_path):
    folder = shutil.copytree(package[0], tmp_path / "copy")
    info = json.loads((folder / "package.json").read_text())
    (folder / "package.json").write_text(json.dumps({**info, "package_version": 99}))
    with pytest.raises(PackageError, match="package.json"):
        verify_package(folder)  # its checksum no longer matches
    write_checksums(folder)  # even with matching checksums, the version is checked
    with pytest.raises(PackageError, match="package version 99 is not the supported 1"):
        verify_package(folder)

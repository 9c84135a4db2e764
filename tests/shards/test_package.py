"""The export package as consumers see it: load_dataset, the VOC folder, the card, checksums and tampering."""

import io
import json
import shutil
import subprocess
import xml.etree.ElementTree as ET

import numpy as np
import pyarrow.parquet as pq
import pycocotools.mask as mask_utils
import pytest
import yaml
from PIL import Image
from pycocotools.coco import COCO

from shards.images import decode_mask, decode_mask_png
from shards.package import (
    CHECKSUMS_NAME,
    PackageError,
    cvat_labelmap,
    read_checksums,
    verify_package,
    write_checksums,
)
from shards.readers import open_source
from shards.records import voc_palette
from shards.voc_xml import annotation_xml
from stages import export
from tests.export_inputs import BOX_MIN_PIXELS, CLASS_NAMES, PRODUCER, export_params, write_inputs, write_mask_inputs

# pycocotools 2.0.11 decodes through a numpy-1 style __array__; harmless, and not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


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


def painted(coco: COCO, image_id: int, shape: tuple[int, int]) -> tuple[np.ndarray, list[dict]]:
    """An image's annotations, each decoded from its RLE and painted with its category id; no pixel twice."""
    annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
    canvas, covered = np.zeros(shape, np.uint8), np.zeros(shape, np.int64)
    for annotation in annotations:
        region = mask_utils.decode(annotation["segmentation"]).astype(bool)
        assert region.shape == shape
        canvas[region] = annotation["category_id"]
        covered += region
    assert covered.max(initial=0) <= 1, "two annotations share a pixel"
    return canvas, annotations


def test_coco_loads_in_pycocotools_and_paints_back_every_pseudo_mask(package):
    folder, source, _ = package
    info = json.loads((folder / "package.json").read_text())
    sums = read_checksums(folder)
    assert info["coco"]["image_root"] == "voc/JPEGImages" and sorted(info["coco"]["splits"]) == ["train", "val"]
    seen, ignored = [], 0
    for split, entry in info["coco"]["splits"].items():
        assert entry["annotations"] == f"coco/annotations/instances_{split}.json" and entry["annotations"] in sums
        assert entry["connectivity"] == 8  # what the shards record for their boxes
        coco = COCO(str(folder / entry["annotations"]))
        assert [(c["id"], c["name"]) for c in coco.loadCats(coco.getCatIds())] == list(enumerate(CLASS_NAMES))[1:]
        images = coco.loadImgs(coco.getImgIds())
        ids = (folder / "voc" / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
        assert [image["package_image_id"] for image in images] == ids  # the package's order
        count = 0
        for image in images:
            row = source[image["package_image_id"]]
            assert (folder / info["coco"]["image_root"] / image["file_name"]).read_bytes() == row["image"]["bytes"]
            assert (image["width"], image["height"]) == (row["width"], row["height"])
            assert image["tag_source"] == row["tag_source"] and image["confidence"] == pytest.approx(row["confidence"])
            mask = decode_mask_png(row["mask"]["bytes"])
            canvas, annotations = painted(coco, image["id"], mask.shape)
            np.testing.assert_array_equal(canvas, np.where(mask == 255, 0, mask))  # ignored pixels: in no region
            ignored += int((mask == 255).sum())
            for annotation in annotations:
                region = mask_utils.decode(annotation["segmentation"]).astype(bool)
                assert annotation["area"] == int(region.sum()) and annotation["iscrowd"] == 0
                rle = {**annotation["segmentation"], "counts": annotation["segmentation"]["counts"].encode()}
                assert annotation["bbox"] == mask_utils.toBbox(rle).astype(int).tolist()
                assert annotation["tag_source"] == row["tag_source"]
                assert annotation["confidence"] == pytest.approx(row["confidence"])
            # regions of at least refine's min_pixels are exactly the boxes column, in its order
            assert [{"label": a["category_id"], "x0": a["bbox"][0], "y0": a["bbox"][1],
                     "x1": a["bbox"][0] + a["bbox"][2], "y1": a["bbox"][1] + a["bbox"][3], "pixels": a["area"]}
                    for a in annotations if a["area"] >= BOX_MIN_PIXELS] == row["boxes"]
            count += len(annotations)
        assert count == entry["count"] and count >= len(images)
        seen += ids
    assert sorted(seen) == sorted(source) and ignored > 0


def test_coco_of_hand_drawn_masks_an_empty_image_two_regions_and_the_recorded_connectivity(tmp_path):
    empty = np.zeros((12, 16), np.uint8)
    empty[5] = 255  # an ignore band and nothing else
    two = np.zeros((12, 16), np.uint8)
    two[1:4, 1:5] = 2
    two[8:11, 10:15] = 2  # the same class twice, far apart
    two[6, :] = 255
    corner = np.zeros((12, 16), np.uint8)
    corner[2:5, 2:5] = 1
    corner[5:8, 5:8] = 1  # two squares of class 1 that meet at a corner only
    corner[9:11, 0:3] = 3
    masks = {"train": [empty, two, corner]}
    expected = {4: [0, 2, 3], 8: [0, 2, 2]}  # annotations per image at each connectivity
    for connectivity, recorded in ((4, 4), (8, 8), (8, None)):  # None: shards without the boxes metadata
        root = tmp_path / f"{connectivity}-{recorded}"
        inputs = write_mask_inputs(root, masks, connectivity=recorded)
        export.run(export_params(splits=("train",)), inputs["pseudo"], inputs["manifest"], root / "export",
                   progress=False)
        info = json.loads((root / "export" / "package.json").read_text())
        assert info["coco"]["splits"]["train"]["connectivity"] == connectivity
        coco = COCO(str(root / "export" / "coco" / "annotations" / "instances_train.json"))
        images = coco.loadImgs(coco.getImgIds())
        assert [i["file_name"] for i in images] == ["train_00.png", "train_01.jpg", "train_02.png"]
        assert [len(coco.getAnnIds(imgIds=[i["id"]])) for i in images] == expected[connectivity]
        for image, mask in zip(images, masks["train"]):
            canvas, annotations = painted(coco, image["id"], mask.shape)
            np.testing.assert_array_equal(canvas, np.where(mask == 255, 0, mask))
        regions = coco.loadAnns(coco.getAnnIds(imgIds=[images[1]["id"]]))
        assert [(a["category_id"], a["bbox"], a["area"]) for a in regions] == [(2, [1, 1, 4, 3], 12),
                                                                             (2, [10, 8, 5, 3], 15)]
        verify_package(root / "export")


def test_labelmap_names_every_class_and_the_ignore_band_in_the_package_colours(package):
    folder, _, _ = package
    info = json.loads((folder / "package.json").read_text())
    lines = (folder / "voc" / "labelmap.txt").read_text().splitlines()
    assert lines[0] == "# label:color_rgb:parts:actions"
    entries = [line.split(":") for line in lines[1:]]
    assert all(len(e) == 4 and e[2] == e[3] == "" for e in entries)  # no parts, no actions
    assert [e[0] for e in entries] == [*CLASS_NAMES, "ignored"]
    colours = [[int(v) for v in e[1].split(",")] for e in entries]
    assert colours == [*info["palette"], info["ignore_colour"]]
    assert colours[:len(CLASS_NAMES)] == [list(c) for c in voc_palette()[:len(CLASS_NAMES)]]
    assert "voc/labelmap.txt" in read_checksums(folder)
    # every colour a mask PNG is painted with is in the label map (CVAT refuses an undeclared colour)
    for path in (folder / "voc" / "SegmentationClass").glob("*.png"):
        rgb = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
        assert {tuple(c) for c in np.unique(rgb, axis=0).tolist()} <= {tuple(c) for c in colours}


@pytest.mark.parametrize("names, palette, needle", [
    (["background", "a:b"], voc_palette(), "contains ':'"),
    (["background", "#x"], voc_palette(), "starts with '#'"),
    (["background", "ignored"], voc_palette(), "rename the class"),
    (["background", "a", "b"], [(0, 0, 0), (1, 2, 3), (1, 2, 3)], "share the colour"),
])
def test_cvat_labelmap_refuses_what_cvat_could_not_read_back(names, palette, needle):
    with pytest.raises(ValueError, match=needle):
        cvat_labelmap(names, palette, (224, 224, 192))

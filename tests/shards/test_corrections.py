"""Importing corrected masks (shards/corrections.py): VOC PNGs (index, colour + labelmap), COCO JSON, rejects,
refusals before any work, and a later import that replaces earlier corrections."""

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from shards.corrections import (
    INDEX_FILE,
    REJECTS_FILE,
    CorrectionError,
    Target,
    corrections_of,
    import_corrections,
    load_correction,
    read_index,
)
from shards.records import voc_palette

NAMES = ("background", "cat", "dog")
PALETTE = tuple(voc_palette())
TARGET = Target("dataset", NAMES, PALETTE, {"a": (40, 32), "b": (40, 32), "c": (20, 10)})


def index_png(values: np.ndarray, path) -> None:
    image = Image.fromarray(values.astype(np.uint8), "P")
    image.putpalette([v for rgb in PALETTE for v in rgb])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def a_mask(class_id: int, shape=(32, 40)) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[4:20, 6:30] = class_id
    return mask


def rejects_of(folder) -> dict[str, str]:
    rows = list(csv.DictReader(io.StringIO((folder / REJECTS_FILE).read_text())))
    return {row["file"].rsplit("/", 1)[-1]: row["reason"] for row in rows}


def test_voc_index_pngs_are_imported_and_bad_files_rejected(tmp_path):
    source = tmp_path / "export" / "SegmentationClass"
    index_png(a_mask(1), source / "a.png")
    index_png(a_mask(2, (10, 10)), source / "b.png")  # wrong size
    index_png(a_mask(7), source / "c.png")  # size aside, 7 is no class id
    index_png(a_mask(1), source / "ghost.png")  # not an image of the target
    (source / "d.png").write_bytes(b"not a png")
    result = import_corrections(tmp_path / "export", tmp_path / "set", TARGET)
    assert result["imported"] == ["a"] and result["total"] == 1
    assert np.array_equal(load_correction(tmp_path / "set", "a"), a_mask(1))
    reasons = rejects_of(tmp_path / "set")
    assert set(reasons) == {"b.png", "c.png", "ghost.png", "d.png"}
    assert "mask 10x10 differs from image 40x32" in reasons["b.png"]
    assert "not in dataset" in reasons["ghost.png"]
    index = read_index(tmp_path / "set")
    assert index["class_names"] == list(NAMES) and set(index["images"]) == {"a"}
    assert corrections_of(tmp_path / "set", NAMES) == {"a": index["images"]["a"]["sha256"]}


def test_colour_pngs_through_a_cvat_labelmap_of_other_colours(tmp_path):
    source = tmp_path / "export"
    (source).mkdir()
    (source / "labelmap.txt").write_text("# label:color_rgb:parts:actions\nbackground:0,0,0::\ncat:250,50,83::\n"
                                         "dog:36,179,83::\n")
    colours = np.zeros((32, 40, 3), np.uint8)
    colours[4:20, 6:30] = (36, 179, 83)  # dog in CVAT's colour, not the VOC palette's
    (source / "SegmentationClass").mkdir()
    Image.fromarray(colours).save(source / "SegmentationClass" / "a.png")
    result = import_corrections(source, tmp_path / "set", TARGET)
    assert result["imported"] == ["a"]
    assert np.array_equal(load_correction(tmp_path / "set", "a"), a_mask(2))


def test_a_labelmap_of_another_class_list_is_refused_before_any_work(tmp_path):
    source = tmp_path / "export"
    index_png(a_mask(1), source / "a.png")
    (source / "labelmap.txt").write_text("background:0,0,0::\nhorse:1,2,3::\n")
    with pytest.raises(CorrectionError, match="horse"):
        import_corrections(source, tmp_path / "set", TARGET)
    assert not (tmp_path / "set").exists()


def coco(tmp_path, categories, annotations, images=None):
    images = images or [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 32},
                        {"id": 2, "file_name": "b.jpg", "width": 40, "height": 32}]
    folder = tmp_path / "coco" / "annotations"
    folder.mkdir(parents=True)
    (folder / "instances_default.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": categories}))
    return tmp_path / "coco"


def test_coco_json_by_category_name(tmp_path):
    source = coco(tmp_path, [{"id": 5, "name": "dog"}, {"id": 9, "name": "cat"}], [
        {"id": 1, "image_id": 1, "category_id": 5, "segmentation": [[6, 4, 30, 4, 30, 20, 6, 20]]},
        {"id": 2, "image_id": 2, "category_id": 9, "segmentation": [[1, 1, "x", 2, 3, 3]]},  # malformed
    ])
    result = import_corrections(source, tmp_path / "set", TARGET)
    assert result["imported"] == ["a"] and len(result["rejects"]) == 1
    assert "annotations[1].segmentation" in result["rejects"][0][1]
    mask = load_correction(tmp_path / "set", "a")
    assert mask[10, 10] == 2 and mask[25, 35] == 0  # dog is class 2 of *our* list, whatever its COCO id


def test_a_coco_category_outside_the_class_list_is_refused(tmp_path):
    source = coco(tmp_path, [{"id": 1, "name": "horse"}], [])
    with pytest.raises(CorrectionError, match="'horse' is not in the class list"):
        import_corrections(source, tmp_path / "set", TARGET)


def test_a_later_import_replaces_its_images_and_keeps_the_others(tmp_path):
    first, second = tmp_path / "one", tmp_path / "two"
    index_png(a_mask(1), first / "a.png")
    index_png(a_mask(1), first / "b.png")
    index_png(a_mask(2), second / "b.png")
    import_corrections(first, tmp_path / "set", TARGET)
    result = import_corrections(second, tmp_path / "set", TARGET)
    assert result["imported"] == ["b"] and result["total"] == 2
    assert np.array_equal(load_correction(tmp_path / "set", "b"), a_mask(2))
    assert np.array_equal(load_correction(tmp_path / "set", "a"), a_mask(1))
    other = Target("dataset", ("background", "horse"), PALETTE, TARGET.sizes)
    with pytest.raises(CorrectionError, match="earlier import has classes"):
        import_corrections(second, tmp_path / "set", other)
    with pytest.raises(CorrectionError, match="corrections of classes"):
        corrections_of(tmp_path / "set", other.class_names)
    assert json.loads((tmp_path / "set" / INDEX_FILE).read_text())["images"]["b"]["source"] == "b.png"


def test_an_empty_export_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorrectionError, match="no corrected masks"):
        import_corrections(tmp_path / "empty", tmp_path / "set", TARGET)

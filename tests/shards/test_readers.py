"""Class lists, tags files and the VOC / COCO / folder readers, on tiny trees built in tmp_path."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from shards.classes import VOC_CLASSES, names_to_ids, read_class_list, read_tags_csv, split_tags
from shards.images import encode_mask
from shards.readers import open_source, read_coco, read_folder, read_voc, voc_class_names
from shards.readers.coco import coco_class_names, decode_rle_string, rle_to_mask
from shards.records import DataError, Reject, RejectError, SourceRecord, voc_palette

CLASSES = ("cat", "dog", "bird")


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def write_mask(path: Path, mask: np.ndarray) -> None:
    write(path, encode_mask(mask.astype(np.uint8), voc_palette()))


def by_id(items) -> dict[str, SourceRecord | Reject]:
    """Records and rejects keyed by (id, split); the first one wins (a later duplicate is a Reject)."""
    found: dict = {}
    for item in items:
        found.setdefault((item.image_id, item.split), item)
    return found


# ------------------------------------------------------------------------------------------- classes


def test_class_list_drops_background_and_comments(tmp_path):
    path = write(tmp_path / "classes.txt", "_background_\n# a comment\ncat  # pets\n\n dog\ntraffic light\n")
    assert read_class_list(path) == ("cat", "dog", "traffic light")
    labelme = write(tmp_path / "labelme.txt", "__ignore__\n_background_\ncat\n")
    assert read_class_list(labelme) == ("cat",)


def test_class_list_duplicate_names_file_and_line(tmp_path):
    path = write(tmp_path / "classes.txt", "background\ncat\ndog\ncat\n")
    with pytest.raises(DataError, match=r"classes\.txt:4: duplicate class 'cat' \(first at line 2\)"):
        read_class_list(path)


def test_class_list_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="empty"):
        read_class_list(write(tmp_path / "empty.txt", "# nothing\nbackground\n"))
    with pytest.raises(DataError, match=":2: background"):
        read_class_list(write(tmp_path / "late.txt", "cat\nbackground\n"))
    with pytest.raises(DataError, match="separator"):
        read_class_list(write(tmp_path / "sep.txt", "cat;dog\n"))
    with pytest.raises(DataError, match="cannot read"):
        read_class_list(tmp_path / "missing.txt")


def test_voc_classes_and_names_to_ids():
    assert len(VOC_CLASSES) == 20 and VOC_CLASSES[0] == "aeroplane" and VOC_CLASSES[-1] == "tvmonitor"
    assert names_to_ids(["dog", "cat", "dog", "background"], CLASSES, where="x") == (1, 2)
    with pytest.raises(DataError, match=r"tags\.csv:17: unknown class 'cow' \(known: cat, dog, bird\)"):
        names_to_ids(["cow"], CLASSES, where="tags.csv:17")


def test_split_tags():
    assert split_tags("cat dog") == ["cat", "dog"]
    assert split_tags("traffic light; dog|cat") == ["traffic light", "dog", "cat"]
    assert split_tags("  ") == []


def test_tags_csv_reads_and_checks(tmp_path):
    path = write(tmp_path / "tags.csv", "image,tags\na,cat dog\nb,\n\nc,\"bird;cat\"\n")
    assert read_tags_csv(path, CLASSES) == {"a": ((1, 2), 2), "b": ((), 3), "c": ((1, 3), 5)}
    bad = write(tmp_path / "bad.csv", "image,tags\na,cat\nb,dog cow\n")
    with pytest.raises(DataError, match=r"bad\.csv:3: unknown class 'cow'"):
        read_tags_csv(bad, CLASSES)
    with pytest.raises(DataError, match=r"dup\.csv:3: duplicate row"):
        read_tags_csv(write(tmp_path / "dup.csv", "a,cat\nb,dog\na,dog\n"), CLASSES)
    with pytest.raises(DataError, match=r"cols\.csv:1: expected 2 columns"):
        read_tags_csv(write(tmp_path / "cols.csv", "a,cat,dog\n"), CLASSES)


# ------------------------------------------------------------------------------------------- VOC


def xml(*objects: str, difficult: tuple[str, ...] = ()) -> str:
    body = "".join(f"<object><name>{name}</name><difficult>{int(name in difficult)}</difficult>"
                   f"<part><name>head</name></part></object>" for name in objects)
    return f"<annotation><filename>x.jpg</filename>{body}</annotation>"


@pytest.fixture
def voc_root(tmp_path) -> Path:
    root = tmp_path / "voc"
    write(root / "classes.txt", "background\ncat\ndog\nbird\n")
    for name in ("a.jpg", "b.jpg", "c.png", "d.jpg", "f.jpg", "g.JPG", "h.jpeg"):
        write(root / "JPEGImages" / name, b"not decoded by the reader")
    write(root / "ImageSets" / "Segmentation" / "train.txt", "a\nb\nc\n\na\n../x\ne\nd\n")
    write(root / "ImageSets" / "Main" / "val.txt", "f\nb\ng\nh\n")  # no Segmentation/val.txt: fallback
    write(root / "Annotations" / "a.xml", xml("cat", "dog", difficult=("dog",)))
    write(root / "Annotations" / "b.xml", xml("bird"))
    write(root / "Annotations" / "d.xml", "<annotation><object><name>cat</name></annotation")
    write(root / "Annotations" / "h.xml", xml())
    c_mask = np.zeros((4, 5))
    c_mask[1, 1], c_mask[0, 0] = 2, 255
    write_mask(root / "SegmentationClass" / "c.png", c_mask)
    write_mask(root / "SegmentationClass" / "f.png", np.full((4, 5), 3))
    write_mask(root / "SegmentationClass" / "a.png", np.ones((4, 5)))
    return root


def test_voc_auto_tags_and_rejects(voc_root):
    names = voc_class_names(voc_root)
    assert names == CLASSES
    items = list(read_voc(voc_root, class_names=names))
    found = by_id(items)
    assert len(items) == 11  # every listed id ends in exactly one record or reject
    a = found["a", "train"]
    assert isinstance(a, SourceRecord) and a.tags == (1, 2) and a.tag_source == "xml"  # difficult included
    assert a.mask == str(voc_root / "SegmentationClass" / "a.png") and a.image_path.endswith("a.jpg")
    assert found["b", "train"].tags == (3,) and found["b", "train"].mask is None
    c = found["c", "train"]
    assert c.tags == (2,) and c.tag_source == "mask" and c.image_path.endswith("c.png")
    assert found["f", "val"].tags == (3,) and found["f", "val"].tag_source == "mask"
    assert found["g", "val"].tags is None and found["g", "val"].tag_source == "none"
    assert found["g", "val"].image_path.endswith("g.JPG")
    assert found["h", "val"].tags == () and found["h", "val"].tag_source == "xml"  # no objects: background
    rejects = [item for item in items if isinstance(item, Reject)]
    reasons = {(r.image_id, r.split): r.reason for r in rejects}
    assert reasons[("e", "train")] == "image file not found"
    assert "unreadable annotation XML" in reasons[("d", "train")]
    assert "'..'" in reasons[("../x", "train")] or "separator" in reasons[("../x", "train")]
    assert reasons[("b", "val")] == "duplicate id"
    assert [r.reason for r in rejects if r.image_id == "a"] == ["duplicate id"]
    assert [r.path for r in rejects if r.image_id == "a"] == [f"{voc_root}/ImageSets/Segmentation/train.txt:5"]


def test_voc_tags_file_and_explicit_sources(voc_root, tmp_path):
    tags = write(tmp_path / "tags.csv", "image,tags\na,bird\nJPEGImages/b.jpg,cat;dog\nzzz,cat\n")
    found = by_id(read_voc(voc_root, class_names=CLASSES, tags_file=tags))
    assert (found["a", "train"].tags, found["a", "train"].tag_source) == ((3,), "file")
    assert (found["b", "train"].tags, found["b", "train"].tag_source) == ((1, 2), "file")
    assert (found["c", "train"].tags, found["c", "train"].tag_source) == ((2,), "mask")  # auto falls back
    only_file = by_id(read_voc(voc_root, class_names=CLASSES, tags_from="file", tags_file=tags))
    assert only_file["c", "train"].tags is None and only_file["f", "val"].tags is None
    only_mask = by_id(read_voc(voc_root, class_names=CLASSES, tags_from="mask"))
    assert only_mask["a", "train"].tags == (1,) and only_mask["b", "train"].tags is None
    assert isinstance(only_mask["d", "train"], SourceRecord)  # the broken XML is not read for mask tags
    only_xml = by_id(read_voc(voc_root, class_names=CLASSES, tags_from="xml"))
    assert only_xml["c", "train"].tags is None and only_xml["a", "train"].tags == (1, 2)
    nothing = list(read_voc(voc_root, class_names=CLASSES, tags_from="none"))
    assert all(item.tags is None for item in nothing if isinstance(item, SourceRecord))


def test_voc_unknown_class_in_tags_file_is_data_error(voc_root, tmp_path):
    tags = write(tmp_path / "tags.csv", "image,tags\na,cat\nb,horse\n")
    with pytest.raises(DataError, match=r"tags\.csv:3: unknown class 'horse'"):
        read_voc(voc_root, class_names=CLASSES, tags_file=tags)


def test_voc_unknown_class_in_xml_is_data_error_before_any_record(voc_root):
    write(voc_root / "Annotations" / "b.xml", xml("cat", "horse"))
    with pytest.raises(DataError, match=r"b\.xml: unknown class 'horse'"):
        read_voc(voc_root, class_names=CLASSES)  # raised by the call itself, not by iterating


def test_voc_missing_split_list_names_path(voc_root):
    with pytest.raises(DataError, match=r"ImageSets/Segmentation/test\.txt"):
        read_voc(voc_root, splits=("train", "test"), class_names=CLASSES)


def test_voc_bad_mask_value_rejects_image(voc_root):
    write_mask(voc_root / "SegmentationClass" / "c.png", np.full((4, 5), 9))
    found = by_id(read_voc(voc_root, class_names=CLASSES))
    assert isinstance(found["c", "train"], Reject) and "mask value 9" in found["c", "train"].reason


def test_voc_class_names_sources(voc_root, tmp_path):
    other = write(tmp_path / "other.txt", "x\ny\n")
    assert voc_class_names(voc_root, other) == ("x", "y")
    assert voc_class_names(tmp_path) == VOC_CLASSES


# ------------------------------------------------------------------------------------------- COCO RLE


def encode_rle_string(counts: list[int]) -> str:
    """The test's own COCO compressed-RLE encoder, written from the format description."""
    out = []
    for index, count in enumerate(counts):
        value = count - counts[index - 2] if index > 2 else count
        more = True
        while more:
            group = value & 0x1F
            value >>= 5  # arithmetic shift keeps the sign
            more = value != -1 if group & 0x10 else value != 0
            out.append(chr(group + (0x20 if more else 0) + 48))
    return "".join(out)


def mask_to_counts(mask: np.ndarray) -> list[int]:
    flat = mask.T.reshape(-1).astype(np.int8)  # column-major, as COCO stores it
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat[0] else runs


def test_rle_hand_computed_case():
    # 3x4 image, runs 3 off, 2 on, 4 off, 1 on, 2 off; runs 4 and 5 are stored as -1 and -2 (deltas).
    assert encode_rle_string([3, 2, 4, 1, 2]) == "324ON"
    assert decode_rle_string("324ON") == [3, 2, 4, 1, 2]
    assert decode_rle_string("T3") == [100]  # 100 = 4 + 3 * 32: two 5-bit groups
    expected = np.array([[0, 1, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(rle_to_mask(decode_rle_string("324ON"), 3, 4), expected)


def test_rle_round_trip_random_masks():
    rng = np.random.default_rng(0)
    for height, width in ((7, 5), (40, 33), (1, 64)):
        mask = rng.random((height, width)) < rng.uniform(0.1, 0.9)
        mask[:, : width // 3] = True  # long runs: multi-character numbers and negative deltas
        counts = mask_to_counts(mask)
        assert decode_rle_string(encode_rle_string(counts)) == counts
        np.testing.assert_array_equal(rle_to_mask(counts, height, width), mask)


def test_rle_bad_inputs():
    with pytest.raises(RejectError, match="covers"):
        rle_to_mask([3, 2], 3, 4)
    with pytest.raises(RejectError, match="middle"):
        decode_rle_string("T")  # continuation bit set on the last character


# ------------------------------------------------------------------------------------------- COCO


@pytest.fixture
def coco_root(tmp_path) -> Path:
    root = tmp_path / "coco"
    height, width = 6, 8
    bird = np.zeros((height, width), dtype=bool)
    bird[2:5, 3:7] = True  # overlaps the cat polygon in columns 3..3
    crowd = np.zeros((height, width), dtype=bool)
    crowd[:, 6:] = True
    data = {
        "images": [
            {"id": 10, "file_name": "COCO_x_1.jpg", "height": height, "width": width},
            {"id": 11, "file_name": "COCO_x_2.jpg", "height": height, "width": width},
            {"id": 12, "file_name": "COCO_x_3.jpg", "height": height, "width": width},
        ],
        "categories": [{"id": 7, "name": "bird"}, {"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 7, "iscrowd": 0,
             "segmentation": {"size": [height, width], "counts": encode_rle_string(mask_to_counts(bird))}},
            {"id": 2, "image_id": 10, "category_id": 1, "iscrowd": 0,
             "segmentation": [[0, 0, 4, 0, 4, 6, 0, 6]]},  # columns 0..3, all rows
            {"id": 3, "image_id": 10, "category_id": 3, "iscrowd": 1,
             "segmentation": {"size": [height, width], "counts": mask_to_counts(crowd)}},
        ],
    }
    write(root / "annotations" / "instances_train2014.json", json.dumps(data))
    for name in ("COCO_x_1.jpg", "COCO_x_2.jpg"):
        write(root / "train2014" / name, b"x")
    return root


def test_coco_records_tags_and_mask(coco_root):
    assert coco_class_names(coco_root / "annotations" / "instances_train2014.json") == ("cat", "dog", "bird")
    found = by_id(read_coco(coco_root, splits=("train",)))
    first = found["COCO_x_1", "train"]
    assert first.tags == (1, 2, 3) and first.tag_source == "coco"  # crowd dog included
    assert first.image_path == str(coco_root / "train2014" / "COCO_x_1.jpg")
    mask = first.mask()
    expected = np.zeros((6, 8), dtype=np.uint8)
    expected[:, 6:] = 255  # crowd: ignore
    expected[:, 0:4] = 1  # cat polygon
    expected[2:5, 3:7] = 3  # bird (class 3) wins over cat (class 1) and over the crowd
    np.testing.assert_array_equal(mask, expected)
    assert pickle.loads(pickle.dumps(first.mask))().tolist() == expected.tolist()  # picklable for pools
    assert found["COCO_x_2", "train"].tags == ()  # no annotations: background only
    assert (found["COCO_x_2", "train"].mask() == 0).all()
    missing = found["COCO_x_3", "train"]
    assert isinstance(missing, Reject) and missing.reason == "image file not found"


def test_coco_crowd_painted_when_asked(coco_root):
    found = by_id(read_coco(coco_root, splits=("train",), crowd_ignore=False))
    mask = found["COCO_x_1", "train"].mask()
    assert mask[0, 7] == 2 and mask[3, 5] == 3


def test_coco_given_class_list_and_errors(coco_root, tmp_path):
    annotation = coco_root / "annotations" / "instances_train2014.json"
    found = by_id(read_coco(coco_root, annotation_files={"train": annotation},
                            image_dirs={"train": coco_root / "train2014"}, class_names=("bird", "dog", "cat")))
    assert found["COCO_x_1", "train"].tags == (1, 2, 3)
    assert found["COCO_x_1", "train"].mask()[3, 5] == 1  # bird is class 1 now; cat (3) wins the overlap
    with pytest.raises(DataError, match="'bird'.*not in the class list"):
        read_coco(coco_root, splits=("train",), class_names=("cat", "dog"))
    with pytest.raises(DataError, match="instances_val"):
        read_coco(coco_root, splits=("val",))
    data = json.loads(annotation.read_text())
    data["annotations"].append({"id": 9, "image_id": 99, "category_id": 1, "segmentation": []})
    write(annotation, json.dumps(data))
    with pytest.raises(DataError, match=r"annotations\[3\]\.image_id refers to unknown image id 99"):
        read_coco(coco_root, splits=("train",))


def test_coco_bad_rle_size_rejects_via_mask(coco_root):
    annotation = coco_root / "annotations" / "instances_train2014.json"
    data = json.loads(annotation.read_text())
    data["annotations"][0]["segmentation"]["size"] = [5, 8]
    write(annotation, json.dumps(data))
    record = by_id(read_coco(coco_root, splits=("train",)))["COCO_x_1", "train"]
    with pytest.raises(RejectError, match="differs from image"):
        record.mask()


# ------------------------------------------------------------------------------------------- folder


@pytest.fixture
def folder_root(tmp_path) -> Path:
    root = tmp_path / "photos"
    for name in ("cats/a.jpg", "dogs/b.PNG", "c.jpg", "c.png", "bad name.jpg", "deep/x/y.webp",
                 "notes.txt", ".hidden/z.jpg", "masks/c.png"):
        write(root / name, b"x")
    return root


def test_folder_without_csv(folder_root):
    items = list(read_folder(folder_root))
    found = by_id(items)
    records = [item for item in items if isinstance(item, SourceRecord)]
    assert [r.image_id for r in records] == ["c", "cats__a", "deep__x__y", "dogs__b"]
    assert all(r.tags is None and r.tag_source == "none" and r.split == "train" for r in records)
    assert found["c", "train"].image_path.endswith("c.jpg") and found["c", "train"].mask.endswith("masks/c.png")
    assert found["cats__a", "train"].mask is None
    rejects = {r.image_id: r.reason for r in items if isinstance(r, Reject)}
    assert rejects["c"] == "duplicate id" and "bad name" in rejects
    # every other entry is accounted for too: the text file and the hidden folder are reject rows
    assert rejects["notes"] == "unsupported format .txt" and rejects[".hidden"] == "hidden folder, not read"
    assert len(items) == 8


def test_folder_with_csv(folder_root, tmp_path):
    tags = write(tmp_path / "tags.csv", "image,tags\ncats/a.jpg,cat\ndogs__b,dog;cat\nmissing.jpg,bird\n")
    items = list(read_folder(folder_root, tags_csv=tags, class_names=CLASSES, split="new"))
    found = by_id(items)
    assert (found["cats__a", "new"].tags, found["cats__a", "new"].tag_source) == ((1,), "csv")
    assert found["dogs__b", "new"].tags == (1, 2)
    assert found["c", "new"].tags is None  # no row: untagged
    orphan = found["missing", "new"]
    assert isinstance(orphan, Reject) and orphan.path == f"{tags}:4"
    bad = write(tmp_path / "bad.csv", "image,tags\ncats/a.jpg,cat\nc.jpg,cow\n")
    with pytest.raises(DataError, match=r"bad\.csv:3: unknown class 'cow'"):
        read_folder(folder_root, tags_csv=bad, class_names=CLASSES)
    with pytest.raises(DataError, match="class list"):
        read_folder(folder_root, tags_csv=tags)


# ------------------------------------------------------------------------------------------- dispatch


def test_open_source_dispatch(voc_root, coco_root, folder_root):
    for source in ("voc", "shapes"):
        names, records = open_source(source, voc_root)
        assert names == CLASSES and len(list(records)) == 11
    names, records = open_source("coco", coco_root, splits=("train",))
    assert names == ("cat", "dog", "bird") and len(list(records)) == 3
    write(folder_root / "tags.csv", "image,tags\nc.jpg,dog\n")
    write(folder_root / "classes.txt", "cat\ndog\n")
    names, records = open_source("folder", folder_root, splits=("incoming",))
    found = by_id(records)
    assert names == ("cat", "dog") and found["c", "incoming"].tags == (2,)
    names, records = open_source("folder", folder_root, tags_from="none")
    assert all(r.tags is None for r in records if isinstance(r, SourceRecord))
    with pytest.raises(DataError, match="prepare.source"):
        open_source("kitti", voc_root)
    with pytest.raises(DataError, match="tags_from"):
        open_source("voc", voc_root, tags_from="guess")

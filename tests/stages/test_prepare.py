"""The prepare stage on real files: a custom-class VOC tree chosen through params.yaml only, broken inputs, resume."""

import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from config.schema import PrepareConfig
from shards.images import decode_mask_png
from shards.io import ShardSet, read_metadata
from shards.manifest import manifest_files
from shards.records import voc_palette
from stages import prepare

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ["apple", "pear", "plum"]


def write_voc_tree(root: Path, n_train=6, n_val=3):
    """A small VOC tree with its own three classes, XML tags and palette masks."""
    for sub in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("background\n" + "\n".join(CLASSES) + "\n")
    rng = np.random.default_rng(0)
    flat_palette = [v for rgb in voc_palette() for v in rgb]
    ids = {"train": [f"tr{i}" for i in range(n_train)], "val": [f"va{i}" for i in range(n_val)]}
    for split, names in ids.items():
        (root / f"ImageSets/Segmentation/{split}.txt").write_text("\n".join(names) + "\n")
        for i, name in enumerate(names):
            h, w = 40 + 4 * i, 56
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"JPEGImages/{name}.jpg")
            cls = 1 + i % 3
            mask = np.zeros((h, w), np.uint8)
            mask[5:20, 5:30] = cls
            mask[4, 5:30] = 255
            png = Image.fromarray(mask, mode="P")
            png.putpalette(flat_palette)
            png.save(root / f"SegmentationClass/{name}.png")
            (root / f"Annotations/{name}.xml").write_text(
                f"<annotation><filename>{name}.jpg</filename><object><name>{CLASSES[cls - 1]}</name>"
                "<bndbox><xmin>6</xmin><ymin>6</ymin><xmax>30</xmax><ymax>20</ymax></bndbox></object></annotation>")
    return ids


def all_rows(folder, split):
    return [r for f in manifest_files(folder, split) for r in pq.read_table(f).to_pylist()]


def test_custom_class_voc_tree_through_params_only(tmp_path):
    tree = tmp_path / "tree"
    write_voc_tree(tree)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prepare"].update(source="voc", root=str(tree), classes=str(tree / "classes.txt"), rows_per_shard=4)
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(params))
    out, metrics = tmp_path / "manifest", tmp_path / "prepare.json"
    assert prepare.main(["--params", str(params_path), "--out", str(out), "--metrics", str(metrics)]) == 0
    summary = json.loads(metrics.read_text())
    assert summary["images"] == {"train": 6, "val": 3} and summary["rejects"] == 0
    assert json.loads((out / "classes.json").read_text())["class_names"] == ["background", *CLASSES]
    shard = manifest_files(out, "train")[0]
    assert read_metadata(shard)["class_names"] == ["background", *CLASSES]
    assert [len(pq.read_table(f)) for f in manifest_files(out, "train")] == [4, 2]
    for i, row in enumerate(all_rows(out, "train")):
        assert row["tags"] == [1 + i % 3] and row["tag_source"] == "xml"
        mask = decode_mask_png(row["mask"]["bytes"])
        assert mask.shape == (row["height"], row["width"])
        assert set(np.unique(mask)) == {0, 1 + i % 3, 255}
        assert Image.open(io.BytesIO(row["image"]["bytes"])).size == (row["width"], row["height"])


def test_broken_files_are_rejected_by_name_and_the_rest_goes_through(tmp_path):
    tree = tmp_path / "tree"
    ids = write_voc_tree(tree, n_train=8)
    (tree / "JPEGImages/tr1.jpg").write_bytes(b"")  # zero bytes
    data = (tree / "JPEGImages/tr2.jpg").read_bytes()
    (tree / "JPEGImages/tr2.jpg").write_bytes(data[: len(data) // 2])  # truncated
    (tree / "JPEGImages/tr3.jpg").write_text("not an image")
    (tree / "JPEGImages/tr4.jpg").unlink()  # missing
    Image.new("RGB", (20, 20)).save(tree / "SegmentationClass/tr5.png")  # mask of the wrong size
    with open(tree / "ImageSets/Segmentation/train.txt", "a") as handle:
        handle.write("../etc\ntr0\n")  # unsafe id and a duplicate
    cfg = PrepareConfig(source="voc", root=str(tree), rows_per_shard=3)
    summary = prepare.run(cfg, tmp_path / "m", progress=False)
    rejects = pq.read_table(tmp_path / "m/rejects.parquet").to_pylist()
    reasons = {r["image_id"]: r["reason"] for r in rejects if r["image_id"] != "tr0"}
    assert set(reasons) == {"tr1", "tr2", "tr3", "tr4", "tr5", "../etc"}
    assert "differs from image" in reasons["tr5"]
    assert any(r["image_id"] == "tr0" and "duplicate" in r["reason"] for r in rejects)
    accepted = [r["image_id"] for r in all_rows(tmp_path / "m", "train")]
    assert sorted(accepted) == ["tr0", "tr6", "tr7"]
    # every input ends in exactly one of manifest and rejects
    inputs = len(ids["train"]) + 2 + len(ids["val"])
    assert summary["inputs"] == inputs == len(rejects) + sum(summary["images"].values())


def test_rerun_skips_intact_shards_and_redoes_changed_ones(tmp_path):
    tree = tmp_path / "tree"
    write_voc_tree(tree, n_train=6)
    cfg = PrepareConfig(source="voc", root=str(tree), rows_per_shard=2)
    out = tmp_path / "m"
    prepare.run(cfg, out, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    first = {name: e["sha256"] for name, e in ShardSet(out).index().items()}
    (out / "train-00001.parquet").unlink()  # as if killed before this shard landed
    prepare.run(cfg, out, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    redone = {n for n in after if n.startswith(("train", "val")) and after[n] != before.get(n)}
    assert redone == {"train-00001.parquet"}
    assert {n: e["sha256"] for n, e in ShardSet(out).index().items()} == first  # identical output
    # A changed param invalidates every shard, and shards that no longer belong are removed.
    prepare.run(PrepareConfig(source="voc", root=str(tree), rows_per_shard=4), out, progress=False)
    names = sorted(p.name for p in out.glob("*-0000?.parquet"))
    assert names == ["train-00000.parquet", "train-00001.parquet", "val-00000.parquet"]


def test_unknown_class_stops_before_any_work(tmp_path):
    tree = tmp_path / "tree"
    write_voc_tree(tree)
    (tree / "tags.csv").write_text("image,tags\ntr0,apple\ntr1,banana\n")
    cfg = PrepareConfig(source="voc", root=str(tree), tags_from="file", tags_file=str(tree / "tags.csv"))
    with pytest.raises(Exception, match=r"tags.csv:3.*banana"):
        prepare.run(cfg, tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists()


def test_an_edited_mask_or_xml_reruns_its_shard(tmp_path):
    """Fingerprints cover every input of a row (issue 14, row 12): an edited mask used to keep its old shard."""
    tree = tmp_path / "tree"
    write_voc_tree(tree, n_train=4)
    cfg = PrepareConfig(source="voc", root=str(tree), rows_per_shard=2)
    out = tmp_path / "m"
    prepare.run(cfg, out, progress=False)

    def shard_states():
        return {p.name: p.stat().st_mtime_ns for p in out.glob("train-*.parquet")}

    def row(image_id):
        return next(r for r in all_rows(out, "train") if r["image_id"] == image_id)

    before = shard_states()
    mask_path = tree / "SegmentationClass/tr3.png"
    stat = mask_path.stat()
    mask = decode_mask_png(mask_path.read_bytes())
    mask[25:30, 40:50] = 255  # same size, same classes: only the bytes change
    png = Image.fromarray(mask, mode="P")
    png.putpalette([v for rgb in voc_palette() for v in rgb])
    png.save(mask_path)
    os.utime(mask_path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old modification time
    prepare.run(cfg, out, progress=False)
    after = shard_states()
    assert {n for n in after if after[n] != before[n]} == {"train-00001.parquet"}
    assert np.array_equal(decode_mask_png(row("tr3")["mask"]["bytes"]), mask)

    # An XML that keeps its tags but changes otherwise reruns its shard too.
    xml = tree / "Annotations/tr0.xml"
    xml.write_text(xml.read_text().replace("<xmax>30</xmax>", "<xmax>31</xmax>"))
    prepare.run(cfg, out, progress=False)
    again = shard_states()
    assert {n for n in again if again[n] != after[n]} == {"train-00000.parquet"}


def test_an_edited_coco_segmentation_reruns_its_shard(tmp_path):
    root = tmp_path / "coco"
    (root / "train").mkdir(parents=True)
    images = []
    for number in range(1, 5):
        Image.fromarray(np.full((32, 40, 3), number * 40, np.uint8)).save(root / "train" / f"i{number}.png")
        images.append({"id": number, "file_name": f"i{number}.png", "width": 40, "height": 32})
    annotations = [{"id": n, "image_id": n, "category_id": 1, "segmentation": [[2, 2, 20, 2, 20, 20]]}
                   for n in range(1, 5)]
    data = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "cat"}]}
    (root / "annotations").mkdir()
    (root / "annotations/instances_train.json").write_text(json.dumps(data))
    cfg = PrepareConfig(source="coco", root=str(root), splits=("train",), rows_per_shard=2)
    out = tmp_path / "m"
    prepare.run(cfg, out, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("train-*.parquet")}
    annotations[3]["segmentation"] = [[2, 2, 30, 2, 30, 25]]
    (root / "annotations/instances_train.json").write_text(json.dumps(data))
    prepare.run(cfg, out, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("train-*.parquet")}
    assert {n for n in after if after[n] != before[n]} == {"train-00001.parquet"}
    mask = decode_mask_png(all_rows(out, "train")[3]["mask"]["bytes"])
    assert mask[10, 28] == 1  # inside the new polygon only

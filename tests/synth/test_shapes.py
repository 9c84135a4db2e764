"""The embedded shapes generator: determinism, label integrity, context bias, VOC layout, weak supervision."""

from __future__ import annotations

import dataclasses
import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from config.loader import ParamsError
from config.schema import ShapesConfig
from shards.voc_xml import read_annotation
from stages import shapes as stage
from synth.shapes import (
    CLASS_NAMES,
    IGNORE_INDEX,
    _visible_layout,
    boundary_band,
    generate_image,
    plan_image,
    write_dataset,
)

SMALL = ShapesConfig(num_train=6, num_val=3, min_side=96, max_side=128)
K = len(CLASS_NAMES)


def _classes(mask: np.ndarray) -> set[str]:
    return {CLASS_NAMES[v - 1] for v in np.unique(mask) if 0 < v < IGNORE_INDEX}


def test_same_index_same_image_and_other_index_or_seed_differs():
    image, mask, objects = generate_image(SMALL, "train", 3)
    again = generate_image(SMALL, "train", 3)
    np.testing.assert_array_equal(image, again[0])
    np.testing.assert_array_equal(mask, again[1])
    assert objects == again[2]
    for other in (generate_image(SMALL, "train", 4), generate_image(SMALL, "val", 3),
                  generate_image(ShapesConfig(min_side=96, max_side=128, seed=1), "train", 3)):
        assert other[0].shape != image.shape or not np.array_equal(other[0], image)


def test_unknown_split_is_an_error():
    with pytest.raises(ValueError, match="split"):
        generate_image(SMALL, "test", 0)


def test_tags_equal_mask_classes_and_labels_are_well_formed():
    widths, heights = set(), set()
    for index in range(40):
        image, mask, objects = generate_image(SMALL, "train", index)
        assert image.dtype == np.uint8 and mask.dtype == np.uint8
        assert image.shape == (*mask.shape, 3)
        assert 1 <= len(objects) <= SMALL.max_objects
        assert {name for name, _ in objects} == _classes(mask)
        assert set(np.unique(mask)) <= set(range(K + 1)) | {IGNORE_INDEX}
        h, w = mask.shape
        heights.add(h), widths.add(w)
        for name, (x0, y0, x1, y1) in objects:  # 0-based, exclusive ends
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            box = mask[y0:y1, x0:x1]
            assert (box == CLASS_NAMES.index(name) + 1).any()
        # The ignore band separates every pair of different labels: no two 4-neighbours with distinct
        # non-ignore labels (background included) ever touch.
        for a, b in ((mask[1:], mask[:-1]), (mask[:, 1:], mask[:, :-1])):
            assert not ((a != b) & (a != IGNORE_INDEX) & (b != IGNORE_INDEX)).any()
        assert (mask == IGNORE_INDEX).any()
    assert len(widths) > 5 and len(heights) > 5
    assert min(widths | heights) >= SMALL.min_side and max(widths | heights) <= SMALL.max_side


def test_default_sizes_and_aspect_ratios_vary():
    cfg = ShapesConfig()
    plans = [plan_image(cfg, "train", i) for i in range(60)]
    aspects = np.array([p.width / p.height for p in plans])
    assert aspects.min() < 0.8 and aspects.max() > 1.25
    assert all(cfg.min_side <= s <= cfg.max_side for p in plans for s in (p.height, p.width))
    rel = np.array([o.size / min(p.height, p.width) for p in plans for o in p.objects])
    assert rel.min() < 0.25 and rel.max() > 0.5
    assert rel.min() >= cfg.min_object - 1e-6 and rel.max() <= cfg.max_object + 1e-6


def test_boundary_band_has_the_configured_width():
    labels = np.zeros((8, 20), np.int16)
    labels[:, 10:] = 2
    for width in range(0, 6):
        band = boundary_band(labels, width)
        assert band.sum(1).tolist() == [width] * 8
        assert not band[:, :10 - width // 2].any() and not band[:, 10 + (width + 1) // 2:].any()
    _, no_band, _ = generate_image(ShapesConfig(boundary_width=0, min_side=96, max_side=128), "train", 0)
    assert not (no_band == IGNORE_INDEX).any()


def test_an_object_hidden_behind_a_later_one_is_dropped():
    plan = plan_image(SMALL, "train", 0)
    h, w = plan.height, plan.width
    small, large = np.zeros((h, w), bool), np.zeros((h, w), bool)
    small[40:50, 40:50] = True
    large[30:70, 30:70] = True
    plan = type(plan)(h, w, plan.background, plan.objects[:1] * 2)
    owner, keep = _visible_layout(SMALL, plan, [small, large])
    assert keep == [1] and (owner == 1).sum() == large.sum()
    owner, keep = _visible_layout(SMALL, plan, [large, small])  # small in front: both stay
    assert keep == [0, 1] and (owner == 0).sum() == large.sum() - small.sum()


def test_context_bias_holds_statistically():
    cfg = ShapesConfig(min_side=64, max_side=96)
    on_water = {True: [], False: []}  # has a boat (and no plane) -> background is water?
    in_sky = {True: [], False: []}
    for index in range(240):
        plan = plan_image(cfg, "train", index)
        names = {o.name for o in plan.objects}
        if "boat" in names and "plane" not in names:
            on_water[True].append(plan.background == "water")
        if "plane" in names and "boat" not in names:
            in_sky[True].append(plan.background == "sky")
        if not names & {"boat", "plane"}:
            on_water[False].append(plan.background == "water")
            in_sky[False].append(plan.background == "sky")
    for stats in (on_water, in_sky):
        assert len(stats[True]) >= 30
        assert abs(np.mean(stats[True]) - cfg.context_bias) < 0.15
        assert np.mean(stats[False]) < 0.15
    unbiased = ShapesConfig(min_side=64, max_side=96, context_bias=0.0)
    for index in range(60):
        plan = plan_image(unbiased, "train", index)
        if "boat" in {o.name for o in plan.objects} and "plane" not in {o.name for o in plan.objects}:
            assert plan.background != "water"


def test_mean_colour_does_not_identify_the_class():
    cfg = ShapesConfig(min_side=64, max_side=96)
    colours, labels = [], []
    for index in range(120):
        image, mask, _ = generate_image(cfg, "train", index)
        for value in np.unique(mask):
            if 0 < value < IGNORE_INDEX:
                colours.append(image[mask == value].mean(0))
                labels.append(value - 1)
    colours, labels = np.array(colours), np.array(labels)
    half = len(labels) // 2
    means = np.stack([colours[:half][labels[:half] == k].mean(0) for k in range(K)])  # (K, 3)
    predicted = np.argmin(((colours[half:, None] - means) ** 2).sum(-1), 1)
    accuracy = (predicted == labels[half:]).mean()
    assert accuracy < 1 / K + 0.12, accuracy  # chance is 1/K = 0.125


def _check_voc_folder(root, cfg):
    assert (root / "classes.txt").read_text().split() == list(CLASS_NAMES)
    meta = json.loads((root / "generator.json").read_text())
    assert meta["config"]["num_train"] == cfg.num_train and meta["counts"]["val"] == cfg.num_val
    for split, count in (("train", cfg.num_train), ("val", cfg.num_val)):
        ids = (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
        assert ids == [f"shapes_{split}_{i:06d}" for i in range(count)]
        for index, name in enumerate(ids):
            mask_file = Image.open(root / "SegmentationClass" / f"{name}.png")
            assert mask_file.mode == "P"
            assert mask_file.getpalette()[3 * 1:3 * 2] == [128, 0, 0]  # VOC colour of class 1
            mask = np.asarray(mask_file)
            _, expected, objects = generate_image(cfg, split, index)
            np.testing.assert_array_equal(mask, expected)
            with Image.open(root / "JPEGImages" / f"{name}.jpg") as image:
                assert image.format == "JPEG" and image.size == (mask.shape[1], mask.shape[0])
            xml = ET.parse(root / "Annotations" / f"{name}.xml").getroot()
            assert xml.findtext("filename") == f"{name}.jpg"
            assert int(xml.findtext("size/width")) == mask.shape[1]
            assert int(xml.findtext("size/height")) == mask.shape[0]
            names = [o.findtext("name") for o in xml.findall("object")]
            assert names == [n for n, _ in objects] and set(names) == _classes(mask)
            for node, (_, (x0, y0, x1, y1)) in zip(xml.findall("object"), objects):  # VOC: 1-based, inclusive
                assert [int(node.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")] == \
                    [x0 + 1, y0 + 1, x1, y1]
            assert [(o.name, o.box) for o in read_annotation(root / "Annotations" / f"{name}.xml")] == objects


def test_write_dataset_writes_voc_layout_and_replaces_atomically(tmp_path):
    root = tmp_path / "shapes"
    (tmp_path / "shapes.tmp-999999999" / "JPEGImages").mkdir(parents=True)  # left by a killed run
    counts = write_dataset(SMALL, root, progress=False)
    assert counts["train"] == 6 and counts["val"] == 3 and counts["objects"] >= 9
    _check_voc_folder(root, SMALL)
    (root / "stale.txt").write_text("from an older run")
    smaller = ShapesConfig(num_train=2, num_val=1, min_side=64, max_side=80, jpeg_quality=50)
    write_dataset(smaller, root, progress=False, workers=2)
    assert not (root / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]  # no temporary folder left
    _check_voc_folder(root, smaller)
    assert len(list((root / "JPEGImages").iterdir())) == 3
    assert json.loads((root / "generator.json").read_text())["config"]["jpeg_quality"] == 50


def test_stage_main_reads_params_and_rejects_unknown_keys(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("shapes:\n  num_train: 2\n  num_val: 1\n  min_side: 64\n  max_side: 64\n")
    counts = stage.main(["--params", str(params), "--out", str(tmp_path / "out"), "--no-progress"])
    assert counts["train"] == 2 and (tmp_path / "out" / "JPEGImages" / "shapes_val_000000.jpg").exists()
    assert "images/s" in capsys.readouterr().out
    params.write_text("shapes:\n  num_trian: 2\n")
    with pytest.raises(ParamsError, match="shapes.num_trian"):
        stage.main(["--params", str(params), "--out", str(tmp_path / "out")])
    params.write_text("shapes:\n  min_side: 300\n  max_side: 200\n")
    with pytest.raises(ParamsError, match="min_side"):
        stage.main(["--params", str(params), "--out", str(tmp_path / "out")])


def test_harder_variant_backgrounds_and_clutter():
    """``backgrounds`` restricts the generic backgrounds; ``clutter`` changes the background, never the labels."""
    hard = dataclasses.replace(SMALL, backgrounds=("clutter",), context_bias=1.0)
    plans = [plan_image(hard, "train", i) for i in range(40)]
    assert {p.background for p in plans} <= {"clutter", "water", "sky"}
    for plan in plans:  # context bias 1: a boat always on water, a plane (without a boat first) on sky
        anchors = [o.name for o in plan.objects if o.name in ("boat", "plane")]
        if anchors:
            assert plan.background == {"boat": "water", "plane": "sky"}[anchors[0]]
    index = next(i for i, p in enumerate(plans) if p.background == "clutter")
    plain, busy = generate_image(hard, "train", index), generate_image(dataclasses.replace(hard, clutter=3.0),
                                                                       "train", index)
    np.testing.assert_array_equal(plain[1], busy[1])
    assert plain[2] == busy[2] and not np.array_equal(plain[0], busy[0])
    with pytest.raises(ValueError, match="backgrounds"):
        dataclasses.replace(SMALL, backgrounds=()).validate()

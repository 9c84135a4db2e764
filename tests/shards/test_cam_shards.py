"""CAM and pseudo-label shard formats: fp16 round trip through a real shard, the threshold sweep, pseudo-label rows."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shards.cams import cam_schema, decode_cams, encode_cams
from shards.images import encode_mask
from shards.io import ShardSet, read_metadata
from shards.metrics import ConfusionMatrix, ThresholdSweep
from shards.pseudo_labels import (PSEUDO_LABEL_SCHEMA, mask_stats, pseudo_label_metrics, pseudo_label_schema,
                                  read_mask)
from shards.records import voc_palette

NAMES = ["background", "cat", "dog", "cow"]
PRODUCER = {"stage": "test", "code_version": "c", "params_fingerprint": "p", "model_fingerprint": "m"}


def cam_row(rng, classes, h, w, aux=False):
    cams = rng.random((len(classes), h, w), dtype=np.float32)
    return {"image_id": f"im{h}x{w}", "split": "train", "height": 4 * h, "width": 4 * w, "cam_height": h,
            "cam_width": w, "classes": classes, "scores": [0.9] * len(classes), "tag_source": "given",
            "cams": encode_cams(cams), "aux_cams": encode_cams(cams[::-1].copy()) if aux else None}, cams


def test_cam_shard_round_trip_is_identity_at_fp16(tmp_path):
    rng = np.random.default_rng(0)
    rows, arrays = zip(*[cam_row(rng, [1, 3], 5, 7, aux=True), cam_row(rng, [2], 6, 4), cam_row(rng, [], 3, 3)])
    schema = cam_schema(NAMES, voc_palette(), PRODUCER, scales=(1.0, 0.5))
    entry = ShardSet(tmp_path).write("train-00000.parquet", pa.Table.from_pylist(list(rows), schema=schema),
                                     fingerprint="f")
    assert entry["rows"] == 3 and ShardSet(tmp_path).is_done("train-00000.parquet", "f")
    meta = read_metadata(tmp_path / "train-00000.parquet")
    assert meta["class_names"] == NAMES and meta["producer"] == PRODUCER and meta["scales"] == [1.0, 0.5]
    back = pq.read_table(tmp_path / "train-00000.parquet").to_pylist()
    for row, original in zip(back, arrays):
        decoded = decode_cams(row)
        assert decoded.dtype == np.float32 and decoded.shape == original.shape
        np.testing.assert_array_equal(decoded, original.astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(encode_cams(decoded), row["cams"])  # fp16 -> fp32 -> fp16 is exact
    np.testing.assert_array_equal(decode_cams(back[0], "aux_cams"), decode_cams(back[0])[::-1])
    with pytest.raises(ValueError, match="aux_cams"):
        decode_cams(back[1], "aux_cams")


def test_encode_clips_and_checks_shape_and_decode_checks_size():
    assert np.frombuffer(encode_cams(np.array([[[-1.0, 2.0]]])), "<f2").tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match=r"\(P, h, w\)"):
        encode_cams(np.zeros((4, 4)))
    row = {"image_id": "x", "classes": [1], "cam_height": 2, "cam_width": 3, "cams": encode_cams(np.zeros((1, 2, 2)))}
    with pytest.raises(ValueError, match="expected"):
        decode_cams(row)


def test_threshold_sweep_equals_one_confusion_matrix_per_threshold():
    rng = np.random.default_rng(1)
    thresholds = [0.05 * i for i in range(1, 20)]
    sweep = ThresholdSweep(4, thresholds)
    direct = {t: ConfusionMatrix(4) for t in thresholds}
    for _ in range(3):
        gt = rng.integers(0, 4, (9, 11)).astype(np.uint8)
        gt[0, :4] = 255
        value = rng.random((9, 11)).round(2)  # values exactly on thresholds test the strict ">"
        label = rng.integers(1, 4, (9, 11))
        sweep.update(gt, value, label)
        for t, matrix in direct.items():
            matrix.update(gt, np.where(value > t, label, 0))
    for t, matrix in direct.items():
        np.testing.assert_array_equal(sweep.matrix(t), matrix.matrix)
    metrics, curve = sweep.report(NAMES, 0.5, thresholds)
    assert metrics["miou"] == round(100 * direct[0.5].miou(), 2) and len(curve) == 19
    assert metrics["best_miou"] == max(p["miou"] for p in curve)


def test_pseudo_label_rows_round_trip_and_metrics(tmp_path):
    palette = voc_palette()
    mask = np.zeros((6, 8), np.uint8)
    mask[1:4, 2:6], mask[5] = 2, 255
    ignore_fraction, pixels = mask_stats(mask, len(NAMES))
    assert ignore_fraction == 8 / 48 and pixels == [28, 0, 12, 0]
    row = {"image_id": "a", "split": "train", "image": {"bytes": b"jpeg", "path": "a.jpg"},
           "mask": {"bytes": encode_mask(mask, palette), "path": "a.png"}, "labels": [2], "tag_source": "given",
           "provenance": "pseudo", "height": 6, "width": 8, "ignore_fraction": float(np.float32(ignore_fraction)),
           "confidence": 0.75, "object_confidence": 0.5, "label_score": 0.625, "pixels": pixels,  # float32 columns
           "boxes": [{"label": 2, "x0": 2, "y0": 1, "x1": 6, "y1": 4, "pixels": 12}]}  # the class-2 block
    schema = pseudo_label_schema(NAMES, palette, PRODUCER, methods=("par", "crf"))
    gt = mask.copy()
    gt[5] = 0
    confusion = ConfusionMatrix(len(NAMES))
    confusion.update(gt, mask)
    ShardSet(tmp_path).write("train-00000.parquet", pa.Table.from_pylist([row], schema=schema), fingerprint="f",
                             split="train", gt_images=1, confusion=confusion.matrix.tolist())
    back = pq.read_table(tmp_path / "train-00000.parquet").to_pylist()[0]
    assert {k: v for k, v in back.items() if k != "mask"} == {k: v for k, v in row.items() if k != "mask"}
    np.testing.assert_array_equal(read_mask(back), mask)
    hf = json.loads(pq.read_schema(tmp_path / "train-00000.parquet").metadata[b"huggingface"])["info"]["features"]
    assert hf["labels"]["feature"] == {"names": NAMES, "_type": "ClassLabel"} and hf["mask"] == {"_type": "Image"}
    metrics = pseudo_label_metrics(tmp_path, NAMES, ["train"], ["par", "crf"])
    assert metrics["miou"] == round(100 * (28 / 36 + 1) / 2, 2)  # background loses its 8 ignored pixels
    assert metrics["coverage"] == round(40 / 48, 4) and metrics["images"] == 1
    assert metrics["corrected_images"] == 0 and "uncorrected" not in metrics
    assert metrics["mean_confidence"] == 0.75 and metrics["mean_object_confidence"] == 0.5
    assert metrics["no_known_class"] == 0
    assert pseudo_label_metrics(tmp_path, NAMES, ["val"])["images"] == 0


def test_hugging_face_reads_images_masks_and_class_names():
    datasets = pytest.importorskip("datasets")
    features = datasets.Features.from_arrow_schema(pseudo_label_schema(NAMES, voc_palette(), PRODUCER, methods=()))
    assert isinstance(features["image"], datasets.Image) and isinstance(features["mask"], datasets.Image)
    labels = features["labels"].feature  # the metadata is used only where its arrow type matches the column's
    assert isinstance(labels, datasets.ClassLabel) and labels.int2str(2) == "dog"
    boxes = features["boxes"].feature  # a list of dicts, not the struct of lists a dict Sequence would be
    assert isinstance(boxes["label"], datasets.ClassLabel) and boxes["label"].int2str(2) == "dog"
    assert features.arrow_schema.field("boxes").type == PSEUDO_LABEL_SCHEMA.field("boxes").type

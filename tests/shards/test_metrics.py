import numpy as np
import pytest

from shards.metrics import ConfusionMatrix


def test_hand_computed_with_ignore_pixel_and_absent_class():
    # 3 classes (0 bg, 1, 2); class 2 never occurs in the ground truth but is predicted once.
    gt = np.array([[0, 0, 1, 1],
                   [0, 1, 1, 255]])
    pred = np.array([[0, 1, 1, 1],
                     [2, 1, 0, 1]])  # the 255 pixel's prediction must not count
    cm = ConfusionMatrix(3)
    cm.update(gt, pred)
    # bg: TP 1 (0,0); gt bg = 3 px; pred bg = 2 px (one is gt 1) -> union 3 + 2 - 1 = 4 -> 1/4
    # c1: TP 3; gt 1 = 4 px; pred 1 = 4 px (one is gt 0) -> union 4 + 4 - 3 = 5 -> 3/5
    iou = cm.iou()
    assert iou[0] == pytest.approx(0.25)
    assert iou[1] == pytest.approx(0.6)
    assert np.isnan(iou[2])  # absent from ground truth: no IoU, not in the mean
    assert cm.miou() == pytest.approx((0.25 + 0.6) / 2)
    assert cm.coverage() == 1.0


def test_ignored_predictions_are_misses_and_lower_coverage():
    gt = np.array([1, 1, 0, 0])
    pred = np.array([1, 255, 0, 255])
    cm = ConfusionMatrix(2)
    cm.update(gt, pred)
    assert cm.iou().tolist() == [0.5, 0.5]
    assert cm.coverage() == 0.5
    precision, recall = cm.precision_recall()
    assert precision.tolist() == [1.0, 1.0] and recall.tolist() == [0.5, 0.5]
    summary = cm.summary(["background", "thing"])
    assert summary["miou"] == 50.0 and summary["coverage"] == 0.5
    assert summary["per_class"]["thing"]["iou"] == 50.0


def test_dataset_level_accumulation_differs_from_mean_of_images():
    cm = ConfusionMatrix(2)
    cm.update(np.array([1, 1, 1, 1]), np.array([1, 1, 1, 1]))
    cm.update(np.array([1, 0]), np.array([0, 0]))
    # class 1: TP 4, FN 1 -> 4/5; class 0: TP 1, FP 1 -> 1/2
    assert cm.iou().tolist() == pytest.approx([0.5, 0.8])


def test_bad_values_are_errors():
    cm = ConfusionMatrix(2)
    with pytest.raises(ValueError, match="outside"):
        cm.update(np.array([3]), np.array([0]))
    with pytest.raises(ValueError, match="differ in shape"):
        cm.update(np.zeros((2, 2)), np.zeros((2, 3)))

import numpy as np
import pytest

from shards.metrics import SWEEP, ConfusionMatrix, ThresholdSweep


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


def test_sweep_decides_v_above_t_in_the_precision_of_the_values():
    """float32 CAMs are compared as torch compares them (t rounded to float32: models.pseudo.label_plain)."""
    t = 0.05
    on_t = np.float32(t)  # 0.0500000007...: above t in float64, not above float32(t)
    gt = np.ones((1, 2), np.uint8)
    label = np.ones((1, 2), np.int64)
    for dtype, above in ((np.float32, 0), (np.float64, 1)):
        sweep = ThresholdSweep(2, [t])
        sweep.update(gt, np.array([[on_t, 0.9]], dtype), label)
        assert sweep.matrix(t)[1].tolist() == [1 - above, 1 + above, 0]
        assert (np.array([[on_t]], dtype) > t).item() == bool(above)  # numpy's own comparison agrees


def test_sweep_curve_is_the_miou_of_each_threshold_in_order():
    rng = np.random.default_rng(0)
    sweep = ThresholdSweep(3, SWEEP)
    gt = rng.integers(0, 3, (5, 7)).astype(np.uint8)
    value = rng.random((5, 7)).astype(np.float32)
    label = rng.integers(1, 3, (5, 7))
    sweep.update(gt, value, label)
    curve = sweep.curve(SWEEP[::-1])
    assert [p["threshold"] for p in curve] == list(SWEEP[::-1])
    for point in curve:
        direct = ConfusionMatrix(3)
        direct.update(gt, np.where(value > point["threshold"], label, 0))
        assert point["miou"] == round(100 * direct.miou(), 2)

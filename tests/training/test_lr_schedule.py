"""training/loop.py lr_factor: the two poly-decay spans (``optim.poly_over``) against lrs computed by hand."""

import pytest

from config.schema import OptimConfig
from training.loop import lr_factor


def test_poly_over_after_warmup_decays_over_the_steps_after_warmup():
    p = OptimConfig(iterations=20000, warmup_iters=1500, warmup_ratio=1e-6, poly_power=0.9, poly_over="after_warmup")
    assert lr_factor(0, p) == pytest.approx(1e-6)
    assert lr_factor(750, p) == pytest.approx(1e-6 + (1 - 1e-6) * 0.5)
    assert lr_factor(1500, p) == pytest.approx(1.0)  # continuous at the end of warm-up
    assert lr_factor(10000, p) == pytest.approx((1 - 8500 / 18500) ** 0.9)
    assert lr_factor(20000, p) == 0.0


def test_poly_over_whole_is_the_reference_schedule():
    p = OptimConfig(iterations=20000, warmup_iters=1500, warmup_ratio=1e-6, poly_power=0.9, poly_over="whole")
    assert lr_factor(750, p) == pytest.approx(1e-6 + (1 - 1e-6) * 0.5)  # warm-up is the same
    assert lr_factor(1500, p) == pytest.approx(0.925 ** 0.9)  # the reference drops to 0.932 when warm-up ends
    assert lr_factor(10000, p) == pytest.approx(0.5 ** 0.9)
    assert lr_factor(19999, p) == pytest.approx((1 / 20000) ** 0.9)
    assert lr_factor(20000, p) == 0.0
    after = OptimConfig(iterations=20000, warmup_iters=1500, poly_power=0.9, poly_over="after_warmup")
    # throughout the decay the reference's lr is (18500 / 20000)^0.9 = 0.932 of the after-warm-up form's
    for step in (1500, 5000, 12345, 19000):
        assert lr_factor(step, p) / lr_factor(step, after) == pytest.approx(0.925 ** 0.9)


def test_without_warmup_both_spans_agree():
    for step in (0, 10, 99):
        a = OptimConfig(iterations=100, warmup_iters=0, poly_power=0.9, poly_over="whole")
        b = OptimConfig(iterations=100, warmup_iters=0, poly_power=0.9, poly_over="after_warmup")
        assert lr_factor(step, a) == pytest.approx(lr_factor(step, b))

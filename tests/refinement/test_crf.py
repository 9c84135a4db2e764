"""Dense CRF through pydensecrf: shapes, label sets, edge snapping, the two-threshold rule, shared pairwise set-up."""

import numpy as np
import pytest

pytest.importorskip("pydensecrf.densecrf")

from config.loader import ParamsError, build  # noqa: E402
from config.schema import CrfConfig, load_params  # noqa: E402
from refinement.crf import (  # noqa: E402
    _infer,
    _pairwise_crf,
    _softmax_with_background,
    crf_inference,
    crf_inference_runs,
    crf_refine_probs,
    crf_two_thresholds,
)
from tests.conftest import ROOT  # noqa: E402

EVAL_CRF = load_params(ROOT / "params.yaml").evaluate.crf  # the segmenter-evaluation kernels

RED, BLUE, GREEN = (200, 40, 40), (40, 40, 200), (40, 190, 40)


def random_case(seed=0, h=20, w=28, p=2):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    cams = rng.random((p, h, w), dtype=np.float32)
    return image, cams


def quadrant_case(seed=0, h=24, w=32):
    """Four colour quadrants; class 1 strong top-left, class 2 strong bottom-right, a weak top-right; noisy."""
    rng = np.random.default_rng(seed)
    image = np.zeros((h, w, 3), np.uint8)
    image[:h // 2, :w // 2], image[:h // 2, w // 2:] = RED, GREEN
    image[h // 2:, :w // 2], image[h // 2:, w // 2:] = BLUE, (200, 200, 40)
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    cams = np.zeros((2, h, w), np.float32)
    cams[0, :h // 2, :w // 2] = 0.95
    cams[0, :h // 2, w // 2:] = 0.45
    cams[1, h // 2:, w // 2:] = 0.9
    return image, np.clip(cams + rng.normal(0, 0.1, cams.shape), 0, 1).astype(np.float32)


def two_colour_image(h=24, w=48, edge=28):
    image = np.zeros((h, w, 3), np.uint8)
    image[:, :edge] = RED
    image[:, edge:] = BLUE
    return image


def test_config_defaults_and_ranges():
    assert CrfConfig() == CrfConfig(10, 3.0, 3.0, 36.0, 3.0, 4.0)
    # the segmenter-evaluation kernels of METHODS.md §2, as params.yaml sets them
    assert (EVAL_CRF.gauss_sxy, EVAL_CRF.gauss_compat, EVAL_CRF.bilateral_sxy, EVAL_CRF.bilateral_srgb,
            EVAL_CRF.bilateral_compat, EVAL_CRF.iterations) == (1.0, 1.0, 121.0, 5.0, 4.0, 10)
    assert load_params(ROOT / "params.yaml").refine.crf == CrfConfig()  # pseudo labels: the ToCo/AFA values
    assert build(CrfConfig, {"iterations": 5, "bilateral_sxy": 80}).bilateral_sxy == 80.0
    with pytest.raises(ParamsError, match="iterations"):
        build(CrfConfig, {"iterations": 0})


@pytest.mark.parametrize("cfg", [CrfConfig(), EVAL_CRF])
def test_crf_inference_shapes_and_normalisation(cfg):
    image, cams = random_case(p=3)
    probs = cams / cams.sum(axis=0, keepdims=True)
    q = crf_inference(image, probs, cfg)
    assert q.shape == probs.shape and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(axis=0), 1.0, atol=1e-4)
    assert (q >= 0).all()


def test_crf_snaps_blurry_map_to_colour_edge():
    edge = 28
    image = two_colour_image(edge=edge)
    x = np.arange(image.shape[1])
    fg = np.clip(0.5 + (x - 20) / 40, 0.05, 0.95).astype(np.float32)  # 0.5 crossing 8 px left of the edge
    probs = np.broadcast_to(np.stack([1 - fg, fg])[:, None, :], (2, *image.shape[:2]))  # (2, H, W)
    expected = np.broadcast_to((x >= edge).astype(np.int64), image.shape[:2])
    assert (probs.argmax(axis=0) != expected).sum() > 0  # the input boundary really is off the edge
    for cfg in (CrfConfig(), EVAL_CRF):
        np.testing.assert_array_equal(crf_inference(image, probs, cfg).argmax(axis=0), expected)
        np.testing.assert_array_equal(crf_refine_probs(image, probs * 2, cfg).argmax(axis=0), expected)


def test_two_thresholds_labels_dtype_and_values():
    image, cams = random_case(seed=1, p=2)
    out = crf_two_thresholds(image, cams, [4, 17])
    assert out.shape == image.shape[:2] and out.dtype == np.uint8
    assert set(np.unique(out)) <= {0, 4, 17, 255}
    image, cams = quadrant_case(seed=1)
    out = crf_two_thresholds(image, cams, [4, 17])
    assert set(np.unique(out)) == {0, 4, 17, 255}


def test_two_thresholds_rule_background_ignore_class():
    """Three colour bands with CAM below low, between low and high, above high -> 0, 255, class."""
    h, w = 18, 48
    image = np.zeros((h, w, 3), np.uint8)
    image[:, :16], image[:, 16:32], image[:, 32:] = RED, GREEN, BLUE
    rng = np.random.default_rng(2)
    cam = np.repeat(np.array([0.05, 0.45, 0.95], np.float32), 16)[None, None, :].repeat(h, axis=1)  # (1, H, W)
    cam = np.clip(cam + rng.normal(0, 0.05, cam.shape).astype(np.float32), 0, 1)
    out = crf_two_thresholds(image, cam, [7])
    assert (out[:, :16] == 0).all()
    assert (out[:, 16:32] == 255).all()
    assert (out[:, 32:] == 7).all()


def test_two_thresholds_equals_two_fresh_crfs():
    image, cams = quadrant_case(seed=3)
    class_ids = np.array([2, 9])
    cfg = CrfConfig(iterations=5)
    slot_to_label = np.array([0, 2, 9])
    high, low = (slot_to_label[crf_inference(image, _softmax_with_background(cams, bkg), cfg).argmax(axis=0)]
                 for bkg in (0.7, 0.25))  # each call builds its own DenseCRF2D
    expected = np.where(high == 0, 255, high)
    expected[(high == 0) & (low == 0)] = 0
    assert set(np.unique(expected)) == {0, 2, 9, 255}  # not a trivial map
    np.testing.assert_array_equal(crf_two_thresholds(image, cams, class_ids, cfg), expected)


def test_reused_pairwise_gives_identical_marginals():
    image, cams = random_case(seed=4, p=2)
    cfg = CrfConfig()
    probs_a, probs_b = (_softmax_with_background(cams, bkg) for bkg in (0.7, 0.25))
    shared = _pairwise_crf(image, 3, cfg)
    q_a, q_b = _infer(shared, probs_a, cfg.iterations), _infer(shared, probs_b, cfg.iterations)
    np.testing.assert_array_equal(q_a, _infer(_pairwise_crf(image, 3, cfg), probs_a, cfg.iterations))
    np.testing.assert_array_equal(q_b, _infer(_pairwise_crf(image, 3, cfg), probs_b, cfg.iterations))
    assert not np.array_equal(q_a, q_b)  # the second unary really replaced the first


def test_runs_sharing_pairwise_equal_separate_calls():
    image, cams = random_case(seed=5, p=2)
    cfg = CrfConfig(iterations=5)
    runs = [_softmax_with_background(cams, bkg) for bkg in (0.7, 0.5)]
    shared = crf_inference_runs(image, runs, cfg)
    assert len(shared) == 2 and not np.array_equal(shared[0], shared[1])
    for probs, marginals in zip(runs, shared):
        np.testing.assert_array_equal(marginals, crf_inference(image, probs, cfg))
    one_label = [np.ones((1, *image.shape[:2]), np.float32)] * 2
    assert all((q == 1).all() for q in crf_inference_runs(image, one_label, cfg))
    with pytest.raises(ValueError, match="same number of labels"):
        crf_inference_runs(image, [runs[0], runs[0][:2]], cfg)


def test_no_present_class_gives_all_background():
    image, _ = random_case()
    out = crf_two_thresholds(image, np.zeros((0, *image.shape[:2]), np.float32), [])
    assert out.dtype == np.uint8 and out.shape == image.shape[:2] and (out == 0).all()


@pytest.mark.parametrize("h, w", [(1, 1), (1, 7), (3, 2)])
def test_tiny_images(h, w):
    image, cams = random_case(seed=5, h=h, w=w, p=1)
    assert crf_two_thresholds(image, cams, [1]).shape == (h, w)
    probs = np.concatenate([cams, 1 - cams])
    assert crf_inference(image, probs).shape == (2, h, w)


def test_non_contiguous_and_fp16_inputs_match_contiguous():
    image, cams = random_case(seed=6, h=16, w=24, p=2)
    flipped_image, flipped_cams = image[:, ::-1], cams[:, :, ::-1].astype(np.float16)  # negative strides
    expected = crf_two_thresholds(np.ascontiguousarray(flipped_image),
                                  np.ascontiguousarray(flipped_cams).astype(np.float32), [1, 2])
    np.testing.assert_array_equal(crf_two_thresholds(flipped_image, flipped_cams, [1, 2]), expected)
    probs = np.stack([cams[0], 1 - cams[0]]).transpose(0, 2, 1)  # (2, W, H) view -> non-contiguous
    image_t = image.transpose(1, 0, 2)
    np.testing.assert_array_equal(crf_inference(image_t, probs),
                                  crf_inference(np.ascontiguousarray(image_t), np.ascontiguousarray(probs)))


def test_single_label_and_bad_inputs():
    image, cams = random_case()
    np.testing.assert_array_equal(crf_inference(image, np.ones((1, *image.shape[:2]), np.float32)), 1.0)
    with pytest.raises(TypeError):
        crf_inference(image.astype(np.float32) / 255, np.ones((2, *image.shape[:2]), np.float32) / 2)
    with pytest.raises(ValueError):
        crf_two_thresholds(image, cams[:, :-1], [1, 2])  # CAMs not at image size
    with pytest.raises(ValueError):
        crf_two_thresholds(image, cams, [1])  # one id for two planes
    with pytest.raises(ValueError):
        crf_two_thresholds(image, cams, [0, 3])  # 0 is background

"""The classifier's training-feature statistics and the OOD score (training/feature_stats.py)."""

import numpy as np
import pytest
import torch

from training.feature_stats import STATS_FILE, fit_stats, load_stats, pooled_features, save_stats


def gaussian(rng, n, dims=8, shift=0.0):
    scales = np.linspace(0.5, 3.0, dims)  # unequal variances: the distance must whiten them
    return rng.normal(size=(n, dims)) * scales + shift


def test_held_out_images_like_the_training_ones_score_below_one_and_shifted_ones_above():
    rng = np.random.default_rng(0)
    stats = fit_stats(gaussian(rng, 2000), gaussian(rng, 2000), quantile=0.95, shrinkage=0.0)
    alike = stats.scores(gaussian(rng, 4000))
    assert 0.03 < (alike > 1).mean() < 0.07  # the held-out quantile is the unit: ~5 % above it
    assert (stats.scores(gaussian(rng, 500, shift=4.0)) > 1).all()  # another distribution
    # whitening: a step of one standard deviation costs the same along a narrow and a wide axis
    step = np.zeros((2, 8))
    step[0, 0], step[1, 7] = 0.5, 3.0
    d = stats.distances(stats.mean + step)
    assert d[0] == pytest.approx(d[1], rel=0.15)


def test_few_images_in_many_dimensions_stay_finite_with_shrinkage():
    rng = np.random.default_rng(1)
    stats = fit_stats(rng.normal(size=(10, 64)), None, quantile=0.99, shrinkage=0.1)
    assert stats.held_out == 0 and np.isfinite(stats.scores(rng.normal(size=(5, 64)))).all()
    with pytest.raises(ValueError, match="at least 2"):
        fit_stats(rng.normal(size=(1, 4)), None, quantile=0.99, shrinkage=0.1)
    with pytest.raises(ValueError, match="do not match"):
        stats.scores(np.zeros((1, 3)))


def test_statistics_round_trip_and_a_damaged_file_is_named(tmp_path):
    rng = np.random.default_rng(2)
    assert load_stats(tmp_path) is None  # a classifier trained without them
    stats = fit_stats(gaussian(rng, 50), gaussian(rng, 20), quantile=0.9, shrinkage=0.2)
    save_stats(stats, tmp_path)
    back = load_stats(tmp_path)
    np.testing.assert_array_equal(back.mean, stats.mean)
    np.testing.assert_array_equal(back.precision, stats.precision)
    assert (back.threshold, back.quantile, back.images, back.held_out) == (stats.threshold, 0.9, 50, 20)
    (tmp_path / STATS_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not safetensors")
    with pytest.raises(ValueError, match=STATS_FILE):
        load_stats(tmp_path)


def test_pooled_features_leave_padding_tokens_out():
    tokens = torch.zeros(2, 3, 2, 2)
    tokens[:, :, 1, 1] = 5.0  # a padding token with the largest values
    tokens[:, :, 0, 0] = torch.tensor([1.0, 2.0, 3.0])
    inside = torch.ones(2, 2, 2, dtype=torch.bool)
    inside[0, 1, 1] = False
    out = pooled_features(tokens, inside)
    assert out[0].tolist() == pytest.approx([1 / 3, 2 / 3, 1.0])  # three inside tokens: (1, 2, 3), 0, 0
    assert out[1].tolist() == pytest.approx([1.5, 1.75, 2.0])  # all four
    assert pooled_features(tokens).tolist() == out[1:].repeat(2, 1).tolist()

"""Threshold rules and ToCo's online pseudo labels on hand-made tiny cases."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from models.par import ParConfig
from models.pseudo import (
    ThresholdConfig,
    cams_with_background,
    label_ignore_middle,
    label_plain,
    online_pseudo_labels,
    present_class_slots,
)
from shards.records import IGNORE_INDEX


def _pixels(values):
    """[[v_class1, v_class2, ...] per pixel] -> (1, K, 1, P) CAMs."""
    return torch.tensor(values, dtype=torch.float32).t()[None, :, None, :]


def test_label_plain_uses_present_classes_and_strict_threshold():
    cams = _pixels([[0.9, 0.95, 0.2],  # class 1 wins; absent class 2 is higher but not a tag
                    [0.3, 0.99, 0.4],  # best present 0.4 <= 0.5 -> background
                    [0.1, 0.2, 0.6],  # class 3
                    [0.5, 0.0, 0.5]])  # exactly at the threshold -> background
    labels = torch.tensor([[1, 0, 1]])
    assert label_plain(cams, labels, bkg=0.5).tolist() == [[[1, 0, 3, 0]]]


def test_label_plain_without_tags_is_background():
    cams = torch.rand(1, 3, 2, 2)
    assert label_plain(cams, torch.zeros(1, 3), bkg=0.0).eq(0).all()


def test_label_ignore_middle_bands():
    cams = _pixels([[0.8, 0.1], [0.1, 0.7], [0.3, 0.0], [0.25, 0.2], [0.0, 0.71]])
    labels = torch.tensor([[1, 1]])
    out = label_ignore_middle(cams, labels, high=0.7, low=0.25, ignore_index=IGNORE_INDEX)
    assert out.tolist() == [[[1, 255, 255, 0, 2]]]
    assert out.dtype == torch.long


def test_cams_with_background_masks_absent_classes():
    cams = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[1, 0, 1], [0, 1, 0]])
    probs = cams_with_background(cams, labels, 0.5)
    assert probs.shape == (2, 4, 8, 8)
    assert_close(probs.sum(dim=1), torch.ones(2, 8, 8))
    assert probs[0, 2].eq(0).all() and probs[1, 1].eq(0).all() and probs[1, 3].eq(0).all()
    # the argmax of the stack is the plain rule (ties aside)
    assert torch.equal(probs.argmax(dim=1), label_plain(cams, labels, 0.5))
    small = cams_with_background(cams, labels, 0.5, size=(4, 4))
    assert small.shape == (2, 4, 4, 4) and torch.isfinite(small).all()


def test_present_class_slots():
    index, valid = present_class_slots(torch.tensor([[0, 1, 0, 1], [1, 0, 0, 0]]))
    assert index[0].tolist() == [1, 3] and valid[0].tolist() == [True, True]
    assert index[1, 0].item() == 0 and valid[1].tolist() == [True, False]


def _stripes():
    """Three 16-px vertical stripes of distinct colours; CAM of class index 2 is 0.9 | 0.5 | 0.0 on them."""
    h, w = 16, 48
    images = torch.zeros(1, 3, h, w)
    images[0, 0, :, :16] = 1.0
    images[0, 1, :, 16:32] = 1.0
    images[0, 2, :, 32:] = 1.0
    cams = torch.zeros(1, 4, h, w)
    cams[0, 2, :, :16] = 0.9
    cams[0, 2, :, 16:32] = 0.5
    cams[0, 0] = 0.95  # a confident CAM of a class that is not a tag must never appear
    labels = torch.tensor([[0, 0, 1, 0]])
    return images, cams, labels


def test_online_pseudo_labels_combines_high_and_low_runs():
    images, cams, labels = _stripes()
    out = online_pseudo_labels(cams, labels, images, ThresholdConfig(), ParConfig(), ignore_index=IGNORE_INDEX)
    assert out.shape == (1, 16, 48) and out.dtype == torch.long
    # interiors (2 px away from the stripe borders): high says class 3 / high says bg but low says class -> 255 /
    # both say background -> 0
    assert out[0, :, :14].eq(3).all()
    assert out[0, :, 18:30].eq(255).all()
    assert out[0, :, 34:].eq(0).all()


def test_online_pseudo_labels_valid_region_and_batch_with_different_tags():
    images, cams, labels = _stripes()
    images = torch.cat([images, images.flip(-1)])
    cams = torch.cat([cams, cams.flip(-1)])
    cams[1, 2] = 0.0
    cams[1, 1] = cams[0, 2].flip(-1)  # image 1: class index 1 plays the role, plus class index 3 weakly
    cams[1, 3] = 0.1
    labels = torch.tensor([[0, 0, 1, 0], [0, 1, 0, 1]])
    valid = torch.ones(2, 16, 48, dtype=torch.bool)
    valid[0, :, 40:] = False
    out = online_pseudo_labels(cams, labels, images, valid=valid, ignore_index=IGNORE_INDEX)
    assert out[0, :, 40:].eq(255).all()
    assert out[0, :, :14].eq(3).all() and out[0, :, 34:40].eq(0).all()
    assert out[1, :, 34:].eq(2).all() and out[1, :, 18:30].eq(255).all() and out[1, :, :14].eq(0).all()


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 5))
def test_online_pseudo_labels_only_tags_background_or_ignore(seed, k):
    g = torch.Generator().manual_seed(seed)
    cams = torch.rand(2, k, 12, 10, generator=g)
    labels = (torch.rand(2, k, generator=g) > 0.5).long()
    images = torch.rand(2, 3, 12, 10, generator=g)
    out = online_pseudo_labels(cams, labels, images, par_cfg=ParConfig(iterations=2), ignore_index=IGNORE_INDEX)
    for b in range(2):
        allowed = {0, 255} | {c + 1 for c in range(k) if labels[b, c]}
        assert set(out[b].unique().tolist()) <= allowed

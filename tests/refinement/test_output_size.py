"""refinement/chain.py: masks at the image's own size from probabilities refined at the working size."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import refinement.chain as chain
from config.schema import RefineParams
from shards.records import IGNORE_INDEX


@pytest.mark.parametrize("size", [(37, 53), (100, 131), (20, 30)])  # same, larger, smaller than the stacks
def test_labels_at_is_the_rule_on_bilinear_upsampled_probabilities(size, monkeypatch):
    monkeypatch.setattr(chain, "BAND_VALUES", 1000)  # many bands of a few rows: the band seams must not show
    torch.manual_seed(0)
    runs = torch.rand(2, 4, 37, 53).softmax(1)  # (runs, P+1, h, w)
    slot_to_label = torch.tensor([0, 3, 7, 9])
    mask, top = chain.labels_at(runs, slot_to_label, size, ignore_band=True)
    up = F.interpolate(runs, size=size, mode="bilinear", align_corners=False)
    high, low = (slot_to_label[r.argmax(0)] for r in up)
    expected = torch.where(high == 0, torch.where(low == 0, 0, IGNORE_INDEX), high).numpy()
    assert mask.shape == size and mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_allclose(top, up[0].amax(0).numpy(), atol=1e-5)
    assert {0, IGNORE_INDEX} < set(np.unique(mask).tolist())  # every outcome of the rule occurs


def disc(size: int, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return ((yy + 0.5 - size / 2) ** 2 + (xx + 0.5 - size / 2) ** 2) < radius ** 2


def test_a_mask_larger_than_the_working_size_follows_the_object_not_the_working_pixels():
    """A disc refined at 24 px and returned at 96 px: upsampling the probabilities follows its round edge better
    than enlarging the 24-px mask would (the nearest-neighbour staircase of the previous code)."""
    work, out = 24, 96
    cam = disc(work, 7.3).astype(np.float32)[None] * 0.9 + 0.05  # one class, soft edge-free CAM
    cam = F.avg_pool2d(torch.from_numpy(cam)[None], 3, 1, 1, count_include_pad=False)[0].numpy()  # a blurred edge
    rgb = np.zeros((work, work, 3), np.uint8)
    p = dataclasses.replace(RefineParams(), methods=(), ignore_band=False)
    [(small, _, _)] = chain.refine_chunk([rgb], [cam], [[4]], p, torch.device("cpu"))
    [(large, confidence, objects)] = chain.refine_chunk([rgb], [cam], [[4]], p, torch.device("cpu"),
                                                        out_sizes=[(out, out)])
    assert small.shape == (work, work) and large.shape == (out, out)
    assert set(np.unique(large)) == {0, 4} and 0 < confidence <= 1 and 0 < objects <= 1
    truth = disc(out, 7.3 * out / work)
    enlarged = small.repeat(out // work, 0).repeat(out // work, 1)  # nearest-neighbour to 96 px

    def iou(mask):
        return ((mask == 4) & truth).sum() / ((mask == 4) | truth).sum()

    assert iou(large) > iou(enlarged) + 0.01
    assert ((large == 4) != (enlarged == 4)).mean() < 0.05  # the same object, finer edge

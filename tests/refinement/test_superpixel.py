"""refinement/superpixel.py and the ``superpixel`` method of the chain: pooling within SLIC superpixels."""

import dataclasses

import numpy as np
import pytest
import torch

from config.schema import RefineParams, SuperpixelConfig
from refinement.chain import refine_chunk, superpixel_step
from refinement.superpixel import segment_mean, slic_segments
from shards.records import IGNORE_INDEX


def two_tone_image(h=40, w=48, seed=0) -> np.ndarray:
    """A dark left part and a bright right part (a vertical edge at w/2), with a little noise."""
    rng = np.random.default_rng(seed)
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:, : w // 2] = (40, 60, 200)
    rgb[:, w // 2:] = (220, 200, 30)
    return np.clip(rgb + rng.integers(-8, 9, rgb.shape), 0, 255).astype(np.uint8)


def test_slic_segments_follow_size_and_edges():
    rgb = two_tone_image()
    small, large = slic_segments(rgb, 36, 10.0, 0.0), slic_segments(rgb, 400, 10.0, 0.0)
    assert small.shape == rgb.shape[:2] and small.dtype == np.int64 and small.min() == 0
    assert len(np.unique(small)) > len(np.unique(large)) >= 2
    for seg in np.unique(small):  # the colour edge is a superpixel edge
        left = (np.nonzero(small == seg)[1] < 24).mean()
        assert left > 0.9 or left < 0.1


def test_pooling_is_idempotent_and_keeps_constants():
    torch.manual_seed(0)
    segments = torch.from_numpy(slic_segments(two_tone_image(), 36, 10.0, 1.0))
    maps = torch.rand(3, 40, 48)
    once = segment_mean(maps, segments)
    torch.testing.assert_close(segment_mean(once, segments), once)
    constant = torch.full((2, 40, 48), 0.37)
    torch.testing.assert_close(segment_mean(constant, segments), constant)
    # a map constant inside each superpixel is unchanged; the mean over the image is kept per segment area
    per_segment = torch.rand(int(segments.max()) + 1)[segments][None]
    torch.testing.assert_close(segment_mean(per_segment, segments), per_segment)
    assert not torch.allclose(once, maps)  # it does smooth a map that is not constant on segments
    with pytest.raises(ValueError, match="do not match"):
        segment_mean(maps[:, :20], segments)


def test_stack_step_keeps_padding_and_normalisation():
    rgbs = [two_tone_image(), two_tone_image(32, 40, seed=1)]
    sizes = [r.shape[:2] for r in rgbs]
    stacks = torch.zeros(2, 3, 40, 48)
    probs = torch.rand(2, 3, 40, 48).softmax(dim=1)
    stacks[0] = probs[0]
    stacks[1, :, :32, :40] = probs[1, :, :32, :40]
    out = superpixel_step(stacks, rgbs, sizes, RefineParams(superpixel=SuperpixelConfig(area=36)))
    torch.testing.assert_close(out[1, :, 32:], stacks[1, :, 32:])  # padding untouched
    torch.testing.assert_close(out[0].sum(0), torch.ones(40, 48))  # still probabilities
    torch.testing.assert_close(out[1, :, :32, :40].sum(0), torch.ones(32, 40))


@pytest.mark.parametrize("methods", [("superpixel",), ("superpixel", "par", "crf"), ("par", "superpixel")])
def test_chain_runs_with_superpixel(methods):
    pytest.importorskip("pydensecrf.densecrf")
    rgb = two_tone_image()
    cam = np.zeros((1, 10, 12), np.float32)
    cam[0, :, 6:] = 1.0  # the class on the right half, at CAM resolution
    p = RefineParams(methods=methods, superpixel=SuperpixelConfig(area=36))
    [(mask, confidence, _)] = refine_chunk([rgb], [cam], [[2]], p, torch.device("cpu"))
    assert mask.shape == (40, 48) and 0.0 < confidence <= 1.0
    assert set(np.unique(mask)) <= {0, 2, IGNORE_INDEX}
    assert (mask[:, 30:] == 2).mean() > 0.9 and (mask[:, :18] == 0).mean() > 0.9


def test_leading_superpixel_pools_cams_before_thresholds():
    """First in the chain it averages the CAMs: a CAM at 0.8 on one half of a superpixel and 0 on the other is
    0.4 on all of it, below the high threshold: no pixel of that class, where [] labels half of it."""
    rgb = np.full((16, 16, 3), 128, np.uint8)  # one colour: superpixels are the SLIC grid
    cam = np.zeros((1, 16, 16), np.float32)
    cam[0, :, :8] = 0.8
    p = RefineParams(methods=("superpixel",), superpixel=SuperpixelConfig(area=256, compactness=100.0))
    [(pooled, _, _)] = refine_chunk([rgb], [cam], [[1]], p, torch.device("cpu"))
    [(plain, _, _)] = refine_chunk([rgb], [cam], [[1]], dataclasses.replace(p, methods=()), torch.device("cpu"))
    assert (plain == 1).sum() == 128 and (pooled == 1).sum() == 0

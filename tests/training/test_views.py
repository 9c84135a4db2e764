"""ToCo's device-side views (training/views.py, models/photometric.py): each op fires at its probability, a seed
gives one batch, and views stay aligned with their valid masks and local-crop flags."""

import dataclasses

import numpy as np
import pytest
import torch

from config.schema import ClassifierAugmentConfig
from models import photometric as ph
from models.ctc import sample_local_crops
from training.transforms import random_resized_box
from training.views import flip_local_crops, from_unit, main_view, second_view, to_unit

N = 2000  # images per statistic: a binomial share's standard deviation is at most 0.011
TOLERANCE = 0.05  # ~4.5 standard deviations; the seeds are fixed, so a pass is a pass for good
OFF = ClassifierAugmentConfig(colour_p=0.0, grayscale_p=0.0, main_colour=False, main_flip_p=0.0, main_blur_p=0.0,
                              second_view="original", second_flip_p=0.0, second_blur_p=0.0, second_solarize_p=0.0,
                              local_colour=False, local_flip_p=0.0, local_blur_p=0.0)


def batch(n: int = N, size: int = 6, seed: int = 0) -> torch.Tensor:
    """Normalised images whose unit values lie in [0.05, 0.95] (no op is a no-op on them by clamping)."""
    g = torch.Generator().manual_seed(seed)
    return from_unit(0.05 + 0.9 * torch.rand(n, 3, size, size, generator=g))


def changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).abs().amax(1) > 1e-4


def share(mask: torch.Tensor) -> float:
    return mask.float().mean().item()


def run_main(cfg, x, seed=1):
    valid = torch.ones(x.shape[0], *x.shape[-2:], dtype=torch.bool)
    return main_view(x, valid, cfg, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name, overrides, p", [
    ("colour jitter", {"main_colour": True, "colour_p": 0.8}, 0.8),
    ("grayscale", {"main_colour": True, "grayscale_p": 0.2}, 0.2),
    ("blur", {"main_blur_p": 0.5}, 0.5),
    ("second flip", {"main_flip_p": 0.5}, 0.5),
])
def test_each_op_of_the_training_crop_fires_at_its_probability(name, overrides, p):
    x = batch()
    out, _, _ = run_main(dataclasses.replace(OFF, **overrides), x)
    assert abs(share(changed(out, x)) - p) < TOLERANCE, name


def test_the_local_copy_and_the_second_view_draw_their_own_ops_at_their_probabilities():
    x = batch()
    main, _, local = run_main(dataclasses.replace(OFF, local_colour=True, colour_p=0.8, local_blur_p=0.5), x)
    assert not changed(main, x).any()  # the training crop itself is untouched here
    jittered = changed(local, x)
    assert abs(share(jittered) - (1 - 0.2 * 0.5)) < TOLERANCE  # jitter 0.8 or blur 0.5
    g = torch.Generator().manual_seed(2)
    for overrides, p in (({"second_flip_p": 0.5}, 0.5), ({"second_blur_p": 0.1}, 0.1),
                         ({"second_solarize_p": 0.2}, 0.2)):
        out = second_view(x, dataclasses.replace(OFF, **overrides), g)
        assert abs(share(changed(out, x)) - p) < TOLERANCE, overrides
    crops = torch.arange(N * 4 * 3 * 4 * 4, dtype=torch.float32).view(N * 4, 3, 4, 4)
    flipped = flip_local_crops(crops, 4, dataclasses.replace(OFF, local_flip_p=0.5), g)
    per_crop = changed(flipped, crops).view(N, 4)
    assert (per_crop.all(1) | ~per_crop.any(1)).all()  # an image's crops flip together
    assert abs(share(per_crop[:, 0]) - 0.5) < TOLERANCE


def test_the_same_seed_gives_the_same_views_and_another_seed_others():
    x = batch(64)
    reference = ClassifierAugmentConfig()
    a = run_main(reference, x, seed=5)
    b = run_main(reference, x, seed=5)
    c = run_main(reference, x, seed=6)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    assert changed(a[0], c[0]).any()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(second_view(x, reference, g1), second_view(x, reference, g2), rtol=0, atol=0)


def test_the_flipped_crop_keeps_its_valid_mask_and_its_local_copy_its_geometry():
    """Padding (black, valid False) at the right of each crop: after the flip it is still exactly where valid is
    False, and the local-crop source shows the same scene at the same place."""
    x_unit = 0.05 + 0.9 * torch.rand(N, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    valid = torch.ones(N, 8, 8, dtype=torch.bool)
    valid[:, :, 5:] = False
    x_unit[:, :, :, 5:] = 0.0
    cfg = dataclasses.replace(OFF, main_flip_p=0.5)
    out, out_valid, local = main_view(from_unit(x_unit), valid, cfg, torch.Generator().manual_seed(4))
    flipped = ~out_valid[:, 0, 0]  # the padding moved to the left
    assert abs(share(flipped) - 0.5) < TOLERANCE
    unit = to_unit(out)
    assert (unit.amax(1)[~out_valid] < 1e-5).all() and (unit.amax(1)[out_valid] > 0.04).all()
    torch.testing.assert_close(unit[flipped], x_unit[flipped].flip(-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(local, out)  # photometric ops off: the copy is the flipped crop itself
    # with its own jitter on, the copy differs in colour but its padding lies where the mask says
    cfg = dataclasses.replace(cfg, local_colour=True, colour_p=1.0, brightness=0.0, contrast=0.0, hue=0.0)
    out, out_valid, local = main_view(from_unit(x_unit), valid, cfg, torch.Generator().manual_seed(4))
    assert (to_unit(local).amax(1)[~out_valid] < 1e-5).all()  # saturation keeps black black


def test_local_crop_flags_describe_the_crops_after_the_flip():
    """Regions and crops come from the same (flipped) geometry; the later per-image flip moves no flag."""
    B, S, n, size = 64, 16, 4, 6
    x = batch(B, S)
    valid = torch.ones(B, S, S, dtype=torch.bool)
    _, valid, local = main_view(x, valid, dataclasses.replace(OFF, main_flip_p=0.5),
                                torch.Generator().manual_seed(7))
    regions = torch.zeros(B, S, S, dtype=torch.uint8)
    regions[:, :, S // 2:] = 2  # foreground right half of the view the CAM sees
    crops, positive = sample_local_crops(local, regions, n, size, generator=torch.Generator().manual_seed(8))
    flipped = flip_local_crops(crops, n, dataclasses.replace(OFF, local_flip_p=0.5), torch.Generator().manual_seed(9))
    # every crop is a window of the view; its flag is the mean region of that window, flipped or not
    for i in range(B * n):
        b = i // n
        image = local[b]
        window = flipped[i] if any((image.unfold(1, size, 1).unfold(2, size, 1) == flipped[i][:, None, None])
                                   .flatten(3).all(-1).all(0).flatten()) else flipped[i].flip(-1)
        hits = (image.unfold(1, size, 1).unfold(2, size, 1) == window[:, None, None]).flatten(3).all(-1).all(0)
        top, left = [int(v[0]) for v in torch.nonzero(hits, as_tuple=True)]
        assert bool(positive[i]) == (regions[b, top:top + size, left:left + size].float().mean() > 0.2)


def test_hue_keeps_the_value_range_and_value_and_grayscale_gives_equal_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 3, 5, 5, generator=g)
    shifted = ph.adjust_hue(x, torch.rand(32, generator=g) - 0.5)
    assert shifted.min() >= 0 and shifted.max() <= 1
    torch.testing.assert_close(shifted.amax(1), x.amax(1), rtol=0, atol=1e-5)  # HSV value = max channel
    torch.testing.assert_close(ph.hsv_to_rgb(ph.rgb_to_hsv(x)), x, rtol=0, atol=1e-5)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(ph.adjust_hue(red, torch.tensor([1 / 3])).flatten(), torch.tensor([0.0, 1.0, 0.0]))
    grey = ph.random_grayscale(x, torch.ones(32, dtype=torch.bool))
    assert (grey[:, 0] == grey[:, 1]).all() and (grey[:, 1] == grey[:, 2]).all()
    jittered = ph.colour_jitter(x, torch.ones(32, dtype=torch.bool), torch.rand(32, 8, generator=g), 0.4, 0.4, 0.2,
                                0.1)
    assert jittered.min() >= 0 and jittered.max() <= 1


def test_random_resized_boxes_lie_in_the_image_with_their_area_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = int(rng.integers(20, 80)), int(rng.integers(20, 80))
        top, left, bh, bw = random_resized_box(h, w, (0.4, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top and top + bh <= h and 0 <= left and left + bw <= w and bh > 0 and bw > 0
        assert 0.3 < bh * bw / (h * w) <= 1.0 and 0.6 < bw / bh < 1.6
    assert random_resized_box(30, 50, (0.4, 1.0), (0.75, 1.33), np.random.default_rng(1)) == \
        random_resized_box(30, 50, (0.4, 1.0), (0.75, 1.33), np.random.default_rng(1))


def test_a_toco_step_with_the_reference_views_and_the_energy_regulariser():
    from models.configs import CrfEnergyConfig, ToCoConfig, ToCoLossConfig
    from models.toco import ToCo
    from training.toco_step import ToCoTrainer

    torch.manual_seed(0)
    model = ToCo(ToCoConfig(backbone="vit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=8, embed_dim=32,
                            depth=4, num_heads=2, seg_dim=16, proj_hidden_dim=64, proj_bottleneck_dim=16,
                            proj_out_dim=24))
    loss = ToCoLossConfig(seg_start_iter=1, local_crops=2, local_crop_size=16, cam_scales=(1.0,),
                          crf_energy=CrfEnergyConfig(sigma_xy=16.0))
    trainer = ToCoTrainer(model, loss, ClassifierAugmentConfig(crop_size=32))
    x, second = batch(2, 32), batch(2, 32, seed=1)
    valid = torch.ones(2, 32, 32, dtype=torch.bool)
    valid[0, :, 24:] = False
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="second"):
        trainer(x, valid, labels, 0, torch.Generator().manual_seed(0))
    before = trainer(x, valid, labels, 0, torch.Generator().manual_seed(0), second)
    assert before["energy"].item() == 0  # the regulariser starts with the seg loss
    after = trainer(x, valid, labels, 1, torch.Generator().manual_seed(0), second)
    assert after["energy"].item() < 0 and torch.isfinite(after["total"])
    after["energy"].backward(retain_graph=True)
    assert model.seg_head.classifier.weight.grad.abs().sum() > 0
    assert model.classifier.weight.grad is None  # the energy trains the seg head (and the encoder under it) only
    after["total"].backward()

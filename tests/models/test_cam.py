"""models/cam.py: multi-scale + flip CAMs, normalisation, tag masks, padding, token-grid resampling."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.cam import cams_at_tokens, multiscale_cam, normalise_cams, valid_at_tokens
from models.toco import ToCo, ToCoConfig

K = 3


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ToCoConfig(backbone="vit_tiny_patch16_224", num_classes=K, img_size=32, patch_size=8,
                     embed_dim=32, depth=4, num_heads=2, seg_dim=16, use_ctc=False)
    return ToCo(cfg).eval()


def test_range_and_absent_classes(model):
    torch.manual_seed(1)
    labels = torch.tensor([[1, 0, 1], [0, 1, 0]])
    with torch.no_grad():
        cams = multiscale_cam(model, torch.randn(2, 3, 32, 32), head="final", labels=labels)
    assert cams.shape == (2, K, 32, 32) and cams.dtype == torch.float32
    assert cams.min() >= 0 and cams.max() <= 1
    assert torch.all(cams[labels == 0] == 0)
    peaks = cams.amax(dim=(-2, -1))[labels == 1]
    assert torch.all(peaks > 0.99)  # min-max: each present class reaches ~1


def test_flip_equivariance(model):
    torch.manual_seed(2)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for head in ("final", "aux"):
            cams = multiscale_cam(model, images, (1.0, 0.5, 1.5), head=head)
            cams_of_flip = multiscale_cam(model, images.flip(-1), (1.0, 0.5, 1.5), head=head)
            torch.testing.assert_close(cams_of_flip, cams.flip(-1))


def test_tuple_heads_match_single_heads(model):
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        aux, final = multiscale_cam(model, images, (1.0, 0.5), head=("aux", "final"))
        torch.testing.assert_close(aux, multiscale_cam(model, images, (1.0, 0.5), head="aux"))
        torch.testing.assert_close(final, multiscale_cam(model, images, (1.0, 0.5), head="final"))


def test_matches_reference_recipe_for_a_plain_callable():
    """A conv 'network' at stride 2: the fused map is the per-scale max/flip/ReLU sum, then min-max."""
    torch.manual_seed(3)
    conv = torch.nn.Conv2d(3, K, 3, stride=2, padding=1)
    images = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        cams = multiscale_cam(conv, images, (1.0, 0.5))
        total = 0
        for s in (1.0, 0.5):
            x = torch.nn.functional.interpolate(images, scale_factor=s, mode="bilinear") if s != 1 else images
            up = lambda t: torch.nn.functional.interpolate(t, size=(16, 16), mode="bilinear")  # noqa: E731
            total = total + torch.maximum(up(conv(x)), up(conv(x.flip(-1))).flip(-1)).relu()
        low = total.amin((-2, -1), keepdim=True)
        expected = (total - low) / (total.amax((-2, -1), keepdim=True) - low + 1e-5)
    torch.testing.assert_close(cams, expected)
    with torch.no_grad():  # flip=False: the per-scale ReLU sum of the images alone
        total = sum(up(conv(torch.nn.functional.interpolate(images, scale_factor=s, mode="bilinear")
                            if s != 1 else images)).relu() for s in (1.0, 0.5))
        low = total.amin((-2, -1), keepdim=True)
        torch.testing.assert_close(multiscale_cam(conv, images, (1.0, 0.5), flip=False),
                                   (total - low) / (total.amax((-2, -1), keepdim=True) - low + 1e-5))
    with pytest.raises(ValueError, match="one head"):
        multiscale_cam(conv, images, head=("aux", "final"))


def test_padding_excluded_from_normalisation():
    torch.manual_seed(4)
    cams = torch.rand(2, K, 8, 8)
    valid = torch.zeros(2, 8, 8, dtype=torch.bool)
    valid[:, :5, :6] = True
    padded = cams.clone()
    padded[~valid[:, None].expand_as(padded)] = 100.0  # huge values in the padding must not matter
    out = normalise_cams(padded, valid=valid)
    torch.testing.assert_close(out[..., :5, :6], normalise_cams(cams[..., :5, :6]))
    assert torch.all(out[~valid[:, None].expand_as(out)] == 0)
    empty = normalise_cams(cams, valid=torch.zeros(2, 8, 8, dtype=torch.bool))
    assert torch.all(empty == 0)


def test_constant_map_gives_zero_not_nan():
    out = normalise_cams(torch.full((1, K, 4, 4), 3.0))
    assert torch.all(out == 0)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 4), st.integers(1, 5))
def test_normalise_properties(seed, batch, classes):
    g = torch.Generator().manual_seed(seed)
    cams = torch.randn(batch, classes, 6, 7, generator=g) * 10
    labels = torch.randint(0, 2, (batch, classes), generator=g)
    valid = torch.rand(batch, 6, 7, generator=g) > 0.3
    out = normalise_cams(cams, labels, valid)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert torch.all(out[labels == 0] == 0)
    assert torch.all(out.permute(0, 2, 3, 1)[~valid] == 0)


def test_token_grid_helpers():
    cams = torch.zeros(1, 1, 32, 32)
    cams[..., :16, :] = 1.0
    tokens = cams_at_tokens(cams, (4, 4))
    assert tokens.shape == (1, 1, 4, 4)
    assert torch.all(tokens[..., :2, :] == 1) and torch.all(tokens[..., 2:, :] == 0)
    torch.testing.assert_close(cams_at_tokens(cams, (4, 4), mode="area"), tokens)
    valid = torch.zeros(1, 32, 32, dtype=torch.bool)
    valid[:, :20, :] = True  # token row 2 covers rows 16..23: half valid → not a majority
    assert valid_at_tokens(valid, (4, 4))[0, :, 0].tolist() == [True, True, False, False]


def test_cam_to_size_crops_the_patch_padding_before_resizing():
    from models.cam import cam_to_size

    # An input of 20 px with stride 8 is padded to 24: the grid's last token covers 4 real + 4 padded pixels.
    cam = torch.arange(3, dtype=torch.float32).view(1, 1, 1, 3).expand(1, 1, 3, 3).contiguous()
    out = cam_to_size(cam, (20, 20), (20, 20), stride=8)
    stretched = torch.nn.functional.interpolate(cam, size=(20, 20), mode="bilinear", align_corners=False)
    padded = torch.nn.functional.interpolate(cam, size=(24, 24), mode="bilinear", align_corners=False)[..., :20, :20]
    torch.testing.assert_close(out, padded)
    assert not torch.allclose(out, stretched)
    full = torch.nn.functional.interpolate(cam, size=(24, 24), mode="bilinear", align_corners=False)
    torch.testing.assert_close(cam_to_size(cam, (24, 24), (24, 24), stride=8), full)  # no padding: no crop

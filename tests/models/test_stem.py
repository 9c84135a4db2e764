"""The pretrained-CNN stem: weights matched by name or order, renormalisation, a hybrid ViT's token grid.

Stem weights read from a file: tests/training/test_weights.py.
"""

import pytest
import timm
import torch

from models.backbone import create_vit, patch_stride
from models.stem import Renormalise, match_state_dict

STEM = "tf_efficientnet_lite0"


def test_weights_matched_by_order_reach_the_stem():
    torch.manual_seed(1)
    full = timm.create_model(STEM, pretrained=False)
    # a full CNN's weights under other names (as another implementation would export them)
    state = {f"_{i:03d}.{k.replace('.', '_')}": v.clone() for i, (k, v) in enumerate(full.state_dict().items())}
    model = create_vit("vit_tiny_patch16_224", img_size=64, depth=2, stem=STEM, stem_state=state)
    own = model.patch_embed.backbone.module.state_dict()
    for key in ("conv_stem.weight", "bn1.running_mean", "blocks.1.0.conv_dw.weight"):
        torch.testing.assert_close(own[key], full.state_dict()[key])


def test_mismatched_networks_are_refused():
    full = timm.create_model(STEM, pretrained=False)
    state = dict(full.state_dict())
    with pytest.raises(ValueError, match="tensors, but the stem has"):
        match_state_dict(full, dict(list(state.items())[:-1]), "w.pth")
    first = next(iter(state))
    bad = {("x" + k): (v[:1] if k == first else v) for k, v in state.items()}
    with pytest.raises(ValueError, match="does not fit"):
        match_state_dict(full, bad, "w.pth")


def test_hybrid_token_grid_and_any_input_size():
    torch.manual_seed(0)
    model = create_vit("vit_tiny_patch16_224", img_size=64, depth=2, stem=STEM, stem_output_stride=8)
    assert patch_stride(model) == 8
    for h, w in ((64, 64), (48, 80)):
        final, inter = model.forward_intermediates(torch.randn(1, 3, h, w), indices=[0], output_fmt="NCHW")
        assert inter[0].shape[-2:] == (h // 8, w // 8)


def test_renormalise_maps_imagenet_input_to_the_stem_convention():
    module = Renormalise(torch.nn.Identity(), mean_out=(0.5,) * 3, std_out=(0.5,) * 3)
    pixels = torch.rand(1, 3, 4, 4)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    out = module((pixels - mean) / std)
    torch.testing.assert_close(out, (pixels - 0.5) / 0.5)

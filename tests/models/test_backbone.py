"""models/backbone.py: timm ViT creation, in-memory weights fitted to it (pos_embed resizing, patch kernel).

Reading weight files and the hub: tests/training/test_weights.py.
"""

import pytest
import timm
import torch

from models.backbone import create_vit, load_backbone_weights, patch_grid, patch_stride

TINY = dict(embed_dim=32, depth=4, num_heads=2)


def tiny(img_size=32, patch_size=8, seed=0, **kw):
    torch.manual_seed(seed)
    return create_vit("vit_tiny_patch16_224", img_size=img_size, patch_size=patch_size, **TINY, **kw).eval()


def test_any_input_size_and_grid():
    model = tiny()
    assert patch_stride(model) == 8
    assert patch_grid(model, 32, 48) == (4, 6)
    for h, w in [(32, 32), (16, 40), (64, 24)]:
        out = model.forward_features(torch.randn(1, 3, h, w))
        assert out.shape == (1, 1 + (h // 8) * (w // 8), 32)


def test_freeze_pos_embed():
    assert not tiny(freeze_pos_embed=True).pos_embed.requires_grad
    assert tiny().pos_embed.requires_grad


def test_weights_into_another_grid():
    source = tiny(img_size=32)
    target = create_vit("vit_tiny_patch16_224", img_size=64, patch_size=8, state=source.state_dict(), **TINY).eval()
    assert target.pos_embed.shape == (1, 1 + 8 * 8, 32)
    # The source resamples its 4×4 embedding on the fly at 64 px exactly as the loader resized it.
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(target.forward_features(x), source.forward_features(x))


def test_prefixes_and_a_classifier_head_are_dropped():
    source = tiny()
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    state["head.weight"] = torch.zeros(5, 32)
    target = tiny(seed=1)
    load_backbone_weights(target, state)
    assert "head.weight" not in target.state_dict()
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value)


def test_patch_kernel_resampled_for_another_patch_size():
    model = create_vit("vit_tiny_patch16_224", img_size=32, patch_size=4, state=tiny(patch_size=8).state_dict(),
                       **TINY)
    assert model.patch_embed.proj.weight.shape[-2:] == (4, 4)
    assert model.pos_embed.shape[1] == 1 + 8 * 8


def test_mismatched_weights_name_the_keys():
    deeper = create_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=5, num_heads=2)
    with pytest.raises(ValueError, match=r"unexpected \(\d+\): blocks\.4\."):
        create_vit("vit_tiny_patch16_224", img_size=32, state=deeper.state_dict(), patch_size=8, **TINY)
    state = tiny().state_dict()
    del state["norm.weight"]
    with pytest.raises(ValueError, match=r"missing \(1\): norm\.weight"):
        load_backbone_weights(tiny(), state)


def test_pos_embed_of_a_non_square_grid_is_refused():
    state = tiny().state_dict()
    state["pos_embed"] = torch.zeros(1, 1 + 6, 32)  # 6 patch tokens: no square grid
    with pytest.raises(ValueError, match="not a square grid"):
        load_backbone_weights(tiny(), state)


def test_timm_equivalence():
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=0,
                            dynamic_img_size=True, **TINY).eval()
    ours = tiny()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 40, 24)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x))

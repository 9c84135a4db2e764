"""feature_walk: the affinity of frozen features (models/feature_affinity.py), its walk, the backbone and its weights
(refinement/features.py), and the method in the chain."""

import dataclasses

import numpy as np
import pytest
import timm
import torch

from config.schema import FeatureWalkConfig, RefineParams, SuperpixelConfig
from models.feature_affinity import feature_affinity, load_features_state, transition, walk, walk_maps, wrap_frozen
from refinement.chain import refine_chunk
from refinement.features import build_backbone, token_features
from training import weights

SMALL = "mobilenetv3_small_050"  # a tiny timm CNN: built in well under a second


def two_region_features(h=6, w=8, d=4) -> torch.Tensor:
    """(d, h, w): identical features on the left half, an orthogonal feature on the right half."""
    features = torch.zeros(d, h, w)
    features[0, :, : w // 2] = 1.0
    features[1, :, w // 2:] = 1.0
    return features


def test_affinity_symmetric_and_rows_sum_to_one():
    torch.manual_seed(0)
    features = torch.randn(16, 5, 7)
    for radius in (0, 2):
        affinity = feature_affinity(features, power=3.0, radius=radius)
        assert affinity.shape == (35, 35) and (affinity >= 0).all()
        torch.testing.assert_close(affinity, affinity.t())  # symmetric before the rows are normalised
        torch.testing.assert_close(affinity.diagonal(), torch.ones(35))
        t = transition(affinity)
        torch.testing.assert_close(t.sum(dim=1), torch.ones(35))
    far = feature_affinity(features, power=3.0, radius=2).view(5, 7, 5, 7)
    assert (far[0, 0, :, 3:] == 0).all() and (far[0, 0, 3:] == 0).all()  # beyond 2 rows or columns
    sharp, soft = feature_affinity(features, power=8.0), feature_affinity(features, power=1.0)
    assert (sharp <= soft + 1e-6).all()  # cosines in [0, 1]: a higher power sharpens


def test_walk_with_identity_keeps_support_and_argmax():
    torch.manual_seed(0)
    maps = torch.rand(3, 4, 5)
    maps[2, :2] = 0.0  # a class absent from the top rows
    walked = walk(maps, torch.eye(20), steps=3)
    torch.testing.assert_close(walked, maps)
    assert torch.equal(walked.argmax(0), maps.argmax(0)) and torch.equal(walked[2] > 0, maps[2] > 0)
    with pytest.raises(ValueError, match="does not match"):
        walk(maps, torch.eye(12))


def test_walk_spreads_inside_a_region_and_not_across_a_feature_edge():
    features = two_region_features()
    seed = torch.zeros(2, 6, 8)
    seed[0, 2, 1] = 1.0  # one token of class 0 on the left
    seed[1, 3, 6] = 1.0  # one token of class 1 on the right
    walked = walk(seed, transition(feature_affinity(features, power=2.0)), steps=1)
    torch.testing.assert_close(walked[0, :, :4], torch.full((6, 4), 1 / 24))  # uniform over its region
    assert (walked[0, :, 4:] == 0).all() and (walked[1, :, :4] == 0).all()  # nothing across the edge
    assert (walked.argmax(0)[:, :4] == 0).all() and (walked.argmax(0)[:, 4:] == 1).all()
    # at pixel resolution too: 48x64 maps, features on the 6x8 grid
    big = torch.nn.functional.interpolate(seed[None], size=(48, 64), mode="nearest")[0]
    out = walk_maps(big, features, power=2.0, steps=2)
    assert out.shape == (2, 48, 64)
    assert (out[0, :, :28] > out[1, :, :28]).all() and (out[1, :, 36:] > out[0, :, 36:]).all()
    constant = torch.full((1, 48, 64), 0.3)  # rows sum to 1: a constant map stays constant
    torch.testing.assert_close(walk_maps(constant, features, steps=3), constant)


def test_weights_from_a_file_with_shape_checks(tmp_path):
    torch.manual_seed(1)
    full = timm.create_model(SMALL, pretrained=False)
    path = tmp_path / "small.pth"
    torch.save(full.state_dict(), path)
    backbone = build_backbone(FeatureWalkConfig(backbone=SMALL, weights=str(path)))
    loaded = backbone.module.state_dict()
    torch.testing.assert_close(loaded["conv_stem.weight"], full.state_dict()["conv_stem.weight"])
    assert all(not p.requires_grad for p in backbone.parameters()) and not backbone.training
    other = timm.create_model("mobilenetv3_small_075", pretrained=False)  # same layout, other widths
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other\.pth.*not the same network"):
        build_backbone(FeatureWalkConfig(backbone=SMALL, weights=str(tmp_path / "other.pth")))


def test_default_weights_from_the_package():
    cfg = FeatureWalkConfig()  # the classifier's frozen EfficientNet-Lite0 stem, shipped with the dependencies
    assert cfg.weights.startswith("pkg:")
    backbone = build_backbone(cfg)
    shipped = weights.load_state_dict(cfg.weights)
    first = next(iter(shipped.values()))  # the package's names differ from timm's: matched by order and shape
    torch.testing.assert_close(backbone.module.state_dict()["conv_stem.weight"], first)
    rgb = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    [features] = token_features([rgb], dataclasses.replace(cfg, image_size=64), backbone=backbone)
    assert features.shape == (320, 3, 4)  # 64 px long side at stride 16, sides rounded to the stride
    with pytest.raises(FileNotFoundError, match="not installed"):
        build_backbone(dataclasses.replace(cfg, weights="pkg:no_such_package_here/w.pth"))


def test_vit_features_load_from_a_full_state():
    """A ViT's features_only wrapper names its tensors ``model.*``; the full network's weights still fit."""
    kwargs = {"features_only": True, "out_indices": (-1,), "dynamic_img_size": True, "embed_dim": 32, "depth": 2,
              "num_heads": 2}
    torch.manual_seed(2)
    full = timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=32, depth=2, num_heads=2)
    features = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
    load_features_state(features, "vit_tiny_patch16_224", kwargs, full.state_dict(), "vit.pth")
    torch.testing.assert_close(features.state_dict()["model.patch_embed.proj.weight"],
                               full.state_dict()["patch_embed.proj.weight"])
    [out] = wrap_frozen(features)(torch.zeros(1, 3, 48, 64))
    assert out.shape == (1, 32, 3, 4)  # any input size, at the patch stride
    wrong = {k: (v[..., :1] if k == "pos_embed" else v) for k, v in full.state_dict().items()}
    with pytest.raises(ValueError, match="vit.pth.*not the same network"):
        load_features_state(features, "vit_tiny_patch16_224", kwargs, wrong, "vit.pth")


def test_hub_offline_gives_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1: no network call at all
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match="unreachable.*local file"):
        build_backbone(FeatureWalkConfig(backbone=SMALL, weights="hub"))


@pytest.mark.parametrize("methods", [("feature_walk",), ("feature_walk", "superpixel", "par"),
                                     ("par", "feature_walk")])
def test_chain_runs_with_feature_walk(methods):
    rgb = np.zeros((40, 48, 3), np.uint8)
    rgb[:, 24:] = 255
    cam = np.zeros((1, 10, 12), np.float32)
    cam[0, 3:7, 7:10] = 1.0  # a blob on the right (white) half
    p = RefineParams(methods=methods, superpixel=SuperpixelConfig(area=16),
                     feature_walk=FeatureWalkConfig(backbone=SMALL, weights="none", image_size=64))
    [(mask, confidence, _)] = refine_chunk([rgb], [cam], [[3]], p, torch.device("cpu"))
    assert mask.shape == (40, 48) and 0.0 < confidence <= 1.0 and set(np.unique(mask)) <= {0, 3, 255}
    if "par" not in methods:  # (PAR's 24-px dilations wash a blob out of a 40x48 image)
        assert (mask[:, 24:] == 3).any() and not (mask[:, :20] == 3).any()

"""training/weights.py: weight files read safely, ``pkg:`` specs, hub errors, and the builders that use them."""

import contextlib
import dataclasses
import time

import pytest
import timm
import torch
from safetensors.torch import save_file

from config.schema import ClassifierAugmentConfig, ClassifierParams, SegmenterParams
from models.configs import DeepLabConfig, ToCoConfig
from models.backbone import create_vit
from models.deeplab import DeepLab
from models.toco import ToCo
from training import weights
from training.classifier_model import build_classifier, pretrained_vit, toco_config
from training.segmenter_model import build_segmenter, deeplab_config, pretrained_features
from training.weights import read_state_dict, resolve_weights

TINY = dict(embed_dim=32, depth=4, num_heads=2)
SMALL = "mobilenetv3_small_050"
STEM = "tf_efficientnet_lite0"


def tiny(img_size=32, patch_size=8, seed=0, **kw):
    torch.manual_seed(seed)
    return create_vit("vit_tiny_patch16_224", img_size=img_size, patch_size=patch_size, **TINY, **kw).eval()


def renamed_export(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s weights under other names, in the same order (as another implementation would export them)."""
    return {f"_{i:03d}.{k.replace('.', '_')}": v.clone() for i, (k, v) in enumerate(model.state_dict().items())}


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_into_another_grid(tmp_path, suffix):
    source = tiny(img_size=32)
    path = tmp_path / f"w{suffix}"
    state = source.state_dict()
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:  # a training checkpoint: nested, DDP prefixes, a classifier head the backbone does not have
        nested = {f"module.{k}": v for k, v in state.items()}
        nested["module.head.weight"] = torch.zeros(5, 32)
        torch.save({"model": nested, "step": torch.tensor(3)}, path)
    target = pretrained_vit("vit_tiny_patch16_224", img_size=64, patch_size=8, pretrained=str(path), **TINY).eval()
    assert target.pos_embed.shape == (1, 1 + 8 * 8, 32)
    # The source resamples its 4×4 embedding on the fly at 64 px exactly as the loader resized it.
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(target.forward_features(x), source.forward_features(x))
    assert "head.weight" not in target.state_dict()


def test_patch_kernel_resampled_for_another_patch_size(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(tiny(patch_size=8).state_dict(), str(path))
    model = pretrained_vit("vit_tiny_patch16_224", img_size=32, patch_size=4, pretrained=str(path), **TINY)
    assert model.patch_embed.proj.weight.shape[-2:] == (4, 4)
    assert model.pos_embed.shape[1] == 1 + 8 * 8


_EXECUTED = []


class _Payload:
    def __reduce__(self):
        return (_EXECUTED.append, ("pwned",))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": tiny().state_dict(), "payload": _Payload()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        read_state_dict(str(path))
    assert _EXECUTED == []


def test_mismatched_weights_name_the_keys(tmp_path):
    path = tmp_path / "deeper.safetensors"
    save_file(create_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=5,
                         num_heads=2).state_dict(), str(path))
    with pytest.raises(ValueError, match=r"unexpected \(\d+\): blocks\.4\."):
        pretrained_vit("vit_tiny_patch16_224", img_size=32, pretrained=str(path), patch_size=8, **TINY)


def test_unknown_file_type_and_not_a_state_dict(tmp_path):
    with pytest.raises(ValueError, match="unknown weight file type"):
        read_state_dict(str(tmp_path / "w.npz"))
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        read_state_dict(str(tmp_path / "list.pt"))


def test_pkg_specs_name_files_of_installed_packages():
    found = resolve_weights("pkg:timm/__init__.py")
    assert found.endswith("__init__.py") and found == timm.__file__
    assert resolve_weights("some/file.pth") == "some/file.pth"
    with pytest.raises(FileNotFoundError, match="not installed"):
        resolve_weights("pkg:no_such_package_here/w.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_weights("pkg:timm/no_such_file.pth")


def test_stem_weights_from_a_file_matched_by_order(tmp_path):
    torch.manual_seed(1)
    full = timm.create_model(STEM, pretrained=False)
    path = tmp_path / "stem.pth"
    torch.save(renamed_export(full), path)
    model = pretrained_vit("vit_tiny_patch16_224", img_size=64, depth=2, stem=STEM, stem_weights=str(path))
    own = model.patch_embed.backbone.module.state_dict()
    for key in ("conv_stem.weight", "bn1.running_mean", "blocks.1.0.conv_dw.weight"):
        torch.testing.assert_close(own[key], full.state_dict()[key])


def test_segmenter_backbone_from_a_file_by_name_and_by_order(tmp_path):
    torch.manual_seed(1)
    full = timm.create_model(SMALL, pretrained=False)
    path = tmp_path / "renamed.pth"
    torch.save(renamed_export(full), path)
    own = pretrained_features(SMALL, 16, str(path)).state_dict()
    for key in ("conv_stem.weight", "bn1.running_var", "blocks.1.0.conv_pw.weight"):
        torch.testing.assert_close(own[key], full.state_dict()[key])
    features_only = tmp_path / "features.pth"
    torch.save(own, features_only)
    torch.manual_seed(5)
    reloaded = pretrained_features(SMALL, 16, str(features_only)).state_dict()
    for key in own:
        torch.testing.assert_close(reloaded[key], own[key])


def test_builders_load_what_the_config_names(tmp_path):
    torch.manual_seed(1)
    full = timm.create_model(SMALL, pretrained=False)
    path = tmp_path / "backbone.pth"
    torch.save(full.state_dict(), path)
    p = SegmenterParams(model=DeepLabConfig(backbone=SMALL, pretrained=str(path), head="v3plus", output_stride=16,
                                            aspp_channels=16, decoder_channels=16, low_level_channels=8))
    cfg = deeplab_config(p, 3)
    model = build_segmenter(cfg)
    assert isinstance(model, DeepLab)
    loaded = model.backbone.module.state_dict()
    torch.testing.assert_close(loaded["conv_stem.weight"], full.state_dict()["conv_stem.weight"])
    # The same random init as a model built without weights: loading consumes no random numbers.
    torch.manual_seed(0)
    heads = build_segmenter(cfg).head.state_dict()
    torch.manual_seed(0)
    plain = DeepLab(dataclasses.replace(cfg, pretrained="none")).head.state_dict()
    for key in heads:
        torch.testing.assert_close(heads[key], plain[key])

    stem_path = tmp_path / "stem.pth"
    torch.save(renamed_export(timm.create_model(STEM, pretrained=False)), stem_path)
    toco = toco_config(ClassifierParams(
        model=ToCoConfig(backbone="vit_tiny_patch16_224", stem=STEM, stem_weights=str(stem_path), freeze_stem=True,
                         embed_dim=32, depth=3, num_heads=2, seg_dim=16, proj_hidden_dim=32, proj_bottleneck_dim=16,
                         proj_out_dim=32),
        augment=ClassifierAugmentConfig(crop_size=64)), 3)
    assert isinstance(build_classifier(toco), ToCo)
    with pytest.raises(ValueError, match="build_classifier"):  # models/ reads no file
        ToCo(toco)


def test_hub_unreachable_gives_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    def no_route(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(weights.socket, "create_connection", no_route)  # as on a machine without internet
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="unreachable.*local file"):
        pretrained_vit("vit_tiny_patch16_224", img_size=32, pretrained="hub", **TINY)
    with pytest.raises(RuntimeError, match="unreachable.*local file"):
        pretrained_features(SMALL, 16, "hub")
    assert time.perf_counter() - start < 10  # no minute of download retries
    assert hf_constants.HF_HUB_OFFLINE is False  # offline mode was only borrowed


def test_hub_errors_classified(monkeypatch):
    import timm.models._builder as builder

    monkeypatch.setattr(weights, "offline_unless_reachable", contextlib.nullcontext)

    def refuse(*args, **kwargs):
        raise ConnectionError("name resolution failed")

    monkeypatch.setattr(builder, "load_pretrained", refuse)
    with pytest.raises(RuntimeError, match="unreachable"):
        pretrained_vit("vit_tiny_patch16_224", img_size=32, pretrained="hub", **TINY)

    def broken(*args, **kwargs):
        raise KeyError("not a network problem")

    monkeypatch.setattr(builder, "load_pretrained", broken)
    with pytest.raises(KeyError):
        pretrained_vit("vit_tiny_patch16_224", img_size=32, pretrained="hub", **TINY)

"""models/backbone.py: timm ViT creation, safe local weights, pos_embed resizing, offline hub errors."""

import contextlib

import pytest
import timm
import torch
from safetensors.torch import save_file

from models.backbone import create_vit, load_backbone_weights, patch_grid, patch_stride, read_state_dict

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
    target = create_vit("vit_tiny_patch16_224", img_size=64, patch_size=8, pretrained=str(path), **TINY).eval()
    assert target.pos_embed.shape == (1, 1 + 8 * 8, 32)
    # The source resamples its 4×4 embedding on the fly at 64 px exactly as the loader resized it.
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(target.forward_features(x), source.forward_features(x))
    assert "head.weight" not in target.state_dict()


def test_patch_kernel_resampled_for_another_patch_size(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(tiny(patch_size=8).state_dict(), str(path))
    model = create_vit("vit_tiny_patch16_224", img_size=32, patch_size=4, pretrained=str(path), **TINY)
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
        create_vit("vit_tiny_patch16_224", img_size=32, pretrained=str(path), patch_size=8, **TINY)
    state = tiny().state_dict()
    del state["norm.weight"]
    with pytest.raises(ValueError, match=r"missing \(1\): norm\.weight"):
        load_backbone_weights(tiny(), state)


def test_unknown_file_type(tmp_path):
    with pytest.raises(ValueError, match="unknown weight file type"):
        read_state_dict(str(tmp_path / "w.npz"))


def test_hub_unreachable_gives_clear_error(tmp_path, monkeypatch):
    import socket

    import huggingface_hub.constants as hf_constants

    probes, lookups = [], []

    def no_route(address, timeout=None, *args, **kwargs):
        probes.append((address, timeout))
        raise OSError("Name or service not known")

    def no_dns(host, *args, **kwargs):
        lookups.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", no_route)  # as on a machine without internet
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)  # any other way out (a download) would look its host up
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match="unreachable.*local file"):
        create_vit("vit_tiny_patch16_224", img_size=32, pretrained="hub", **TINY)
    # One bounded probe of the hub, then offline: no download, so none of huggingface_hub's minute of lookup retries.
    assert len(probes) == 1 and probes[0][1] is not None and probes[0][1] <= 5
    assert lookups == []
    assert hf_constants.HF_HUB_OFFLINE is False  # offline mode was only borrowed


def test_hub_errors_classified(monkeypatch):
    import timm.models._builder as builder

    import models.backbone as backbone

    monkeypatch.setattr(backbone, "_offline_unless_reachable", contextlib.nullcontext)

    def refuse(*args, **kwargs):
        raise ConnectionError("name resolution failed")

    monkeypatch.setattr(builder, "load_pretrained", refuse)
    with pytest.raises(RuntimeError, match="unreachable"):
        create_vit("vit_tiny_patch16_224", img_size=32, pretrained="hub", **TINY)

    def broken(*args, **kwargs):
        raise KeyError("not a network problem")

    monkeypatch.setattr(builder, "load_pretrained", broken)
    with pytest.raises(KeyError):
        create_vit("vit_tiny_patch16_224", img_size=32, pretrained="hub", **TINY)


def test_timm_equivalence():
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=0,
                            dynamic_img_size=True, **TINY).eval()
    ours = tiny()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 40, 24)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x))

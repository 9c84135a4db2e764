"""ViT backbones from timm, with safe local weight loading.

The backbone is always a timm ``VisionTransformer`` (or a hybrid with a conv stem) built with
``dynamic_img_size=True``: multi-scale CAMs and 96 px local crops feed images of any size, and timm
interpolates the position embedding on the fly from the grid the model was built for (METHODS.md §1:
the pretrained 14×14 embedding is resized once, bicubic, to the 448 px training grid and then frozen).

Weights come from nowhere (``"none"``), the Hugging Face hub through timm (``"hub"``), or a local
``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` file. Local files are read with safetensors or with
``torch.load(weights_only=True)``: a checkpoint must not be able to run code (DESIGN.md §3).
"""

from __future__ import annotations

import contextlib
import math
import socket
import urllib.parse
from collections.abc import Mapping

import timm
import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from torch import nn

# Keys of a classifier head that a backbone built with num_classes=0 does not have.
_HEAD_PREFIXES = ("head.", "head_dist.", "fc_norm.", "pre_logits.")
_NESTED_KEYS = ("model", "state_dict", "model_state", "module")
_NETWORK_MODULES = ("httpx", "httpcore", "requests", "urllib3", "urllib", "socket", "huggingface_hub")


def create_vit(
    name: str,
    *,
    img_size: int,
    pretrained: str = "none",
    patch_size: int | None = None,
    drop_path_rate: float = 0.0,
    freeze_pos_embed: bool = False,
    stem: str = "",
    stem_weights: str = "",
    stem_output_stride: int = 16,
    freeze_stem: bool = False,
    **kw,
) -> nn.Module:
    """A timm ViT without a classifier head, accepting inputs of any size.

    ``pretrained``: ``"none"``, ``"hub"`` (timm's own download; it resizes pos_embed itself) or a path to a
    local weight file. ``patch_size`` overrides the name's patch size (local weights with another patch size
    have their patch-embedding kernel resampled, FlexiViT style). Extra ``kw`` go to ``timm.create_model``
    (e.g. ``embed_dim``, ``depth``, ``num_heads`` for tiny test models).
    ``stem``: a timm CNN name whose features (dilated to ``stem_output_stride``) replace the patch embedding
    (models/stem.py), with weights of the whole CNN from the local file ``stem_weights`` ("" = random).
    """
    kwargs = dict(num_classes=0, img_size=img_size, dynamic_img_size=True, drop_path_rate=drop_path_rate, **kw)
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    if stem:
        from models.stem import create_stem, hybrid_embed_layer

        state = read_state_dict(stem_weights) if stem_weights else None
        cnn = create_stem(stem, output_stride=stem_output_stride, state=state, source=stem_weights,
                          frozen=freeze_stem)
        kwargs.update(embed_layer=hybrid_embed_layer(cnn), patch_size=1)
        kwargs.pop("dynamic_img_pad", None)  # the CNN takes any size itself
    if pretrained == "hub":
        try:
            with _offline_unless_reachable():
                model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as exc:  # noqa: BLE001 - classified below, re-raised untouched if not a network error
            if not _is_network_error(exc):
                raise
            raise RuntimeError(
                f"could not download pretrained weights for {name!r}: the model hub is unreachable "
                f"({type(exc).__name__}: {exc}). Download the weights elsewhere and pass the local "
                "file instead (pretrained: path/to/weights.safetensors or .pth)."
            ) from exc
    else:
        model = timm.create_model(name, pretrained=False, **kwargs)
        if pretrained not in ("none", "", None):
            load_backbone_weights(model, read_state_dict(pretrained))
    if not hasattr(model, "forward_intermediates"):
        raise ValueError(f"timm model {name!r} has no forward_intermediates; ToCo needs a timm ViT")
    if freeze_pos_embed and getattr(model, "pos_embed", None) is not None:
        model.pos_embed.requires_grad_(False)
    return model


@contextlib.contextmanager
def _offline_unless_reachable(timeout_s: float = 3.0):
    """Use only the local hub cache when the hub host does not answer within ``timeout_s``.

    Without this, huggingface_hub retries a failed name lookup for about a minute before giving up.
    """
    try:
        from huggingface_hub import constants
    except ImportError:  # timm without huggingface_hub downloads through torch.hub, which fails fast
        yield
        return
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    saved = constants.HF_HUB_OFFLINE
    if not saved:
        try:
            socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
        except OSError:
            constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _is_network_error(exc: BaseException) -> bool:
    """True when ``exc`` (or anything in its cause chain) looks like a failed download."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (OSError, ConnectionError, TimeoutError)):
            return True
        if type(exc).__module__.split(".")[0] in _NETWORK_MODULES:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a local weight file, never unpickling arbitrary objects."""
    lower = str(path).lower()
    if lower.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    elif lower.endswith((".pth", ".pt", ".bin", ".ckpt")):
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - the unpickler refuses code objects with various types
            raise ValueError(
                f"{path}: refused to load (only plain tensor checkpoints are accepted, weights_only=True): {exc}"
            ) from exc
    else:
        raise ValueError(f"{path}: unknown weight file type (expected .safetensors, .pth, .pt, .bin or .ckpt)")
    for key in _NESTED_KEYS:  # training checkpoints nest the weights: {"model": {...}, "optimizer": ...}
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: does not hold a state dict of tensors")
    return dict(state)


def load_backbone_weights(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load ``state`` into ``model`` strictly, after adapting it (prefixes, head, pos_embed, patch kernel)."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith(_HEAD_PREFIXES)}
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        state["pos_embed"] = _resize_pos_embed(model, state["pos_embed"])
    key = "patch_embed.proj.weight"
    if key in state and key in own and state[key].shape[-2:] != own[key].shape[-2:]:
        state[key] = resample_patch_embed(state[key], list(own[key].shape[-2:]))
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or mismatched:
        parts = [f"{label} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", mismatched))
                 if keys]
        raise ValueError("weights do not match the backbone; " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def _resize_pos_embed(model: nn.Module, pos_embed: torch.Tensor) -> torch.Tensor:
    """Bicubic resize of a (1, prefix + h*w, C) embedding to the model's grid; prefix tokens are kept."""
    num_prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    old_tokens = pos_embed.shape[1] - num_prefix
    side = math.isqrt(old_tokens)
    if side * side != old_tokens:
        raise ValueError(f"pos_embed with {old_tokens} patch tokens is not a square grid; cannot resize it")
    return resample_abs_pos_embed(pos_embed, new_size=list(model.patch_embed.grid_size),
                                  old_size=[side, side], num_prefix_tokens=num_prefix)


def patch_stride(model: nn.Module) -> int:
    """Pixels per token along each side (conv stem stride × patch size for hybrids)."""
    return int(model.patch_embed.feat_ratio())


def patch_grid(model: nn.Module, h: int, w: int) -> tuple[int, int]:
    """Token grid (rows, cols) the backbone produces for an h×w input."""
    rows, cols = model.patch_embed.dynamic_feat_size((h, w))
    return int(rows), int(cols)

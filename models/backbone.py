"""ViT backbones from timm, and the pure adaptation of a state dict to one.

The backbone is always a timm ``VisionTransformer`` (or a hybrid with a conv stem) built with
``dynamic_img_size=True``: multi-scale CAMs and 96 px local crops feed images of any size, and timm
interpolates the position embedding on the fly from the grid the model was built for (METHODS.md §1:
the pretrained 14×14 embedding is resized once, bicubic, to the 448 px training grid and then frozen).

Weights arrive here as in-memory state dicts (``load_backbone_weights``: prefixes, head, pos_embed, patch kernel);
reading them from files, installed packages or the hub is ``training/weights.py``'s work, put together with this
module by ``training/classifier_model.py: pretrained_vit``, so that models/ does no file or network I/O (DESIGN.md §2).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import timm
import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from torch import nn

# Keys of a classifier head that a backbone built with num_classes=0 does not have.
_HEAD_PREFIXES = ("head.", "head_dist.", "fc_norm.", "pre_logits.")


def vit_kwargs(
    *,
    img_size: int,
    patch_size: int | None = None,
    drop_path_rate: float = 0.0,
    stem: str = "",
    stem_state: Mapping[str, torch.Tensor] | None = None,
    stem_source: str = "",
    stem_output_stride: int = 16,
    freeze_stem: bool = False,
    **kw,
) -> dict[str, Any]:
    """The ``timm.create_model`` arguments of a ViT without a classifier head, accepting inputs of any size.

    ``patch_size`` overrides the name's patch size (loaded weights with another patch size have their
    patch-embedding kernel resampled, FlexiViT style). Extra ``kw`` go to ``timm.create_model`` (e.g.
    ``embed_dim``, ``depth``, ``num_heads`` for tiny test models). ``stem``: a timm CNN name whose features
    (dilated to ``stem_output_stride``) replace the patch embedding (models/stem.py), built here with the weights
    of the whole CNN in ``stem_state`` (None = random; ``stem_source`` names them in errors).
    """
    kwargs = dict(num_classes=0, img_size=img_size, dynamic_img_size=True, drop_path_rate=drop_path_rate, **kw)
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    if stem:
        from models.stem import create_stem, hybrid_embed_layer

        cnn = create_stem(stem, output_stride=stem_output_stride, state=stem_state, source=stem_source,
                          frozen=freeze_stem)
        kwargs.update(embed_layer=hybrid_embed_layer(cnn), patch_size=1)
        kwargs.pop("dynamic_img_pad", None)  # the CNN takes any size itself
    return kwargs


def create_vit(name: str, *, state: Mapping[str, torch.Tensor] | None = None, freeze_pos_embed: bool = False,
               **arch) -> nn.Module:
    """timm ViT ``name`` built from ``vit_kwargs(**arch)``, random or with the backbone weights ``state``."""
    model = timm.create_model(name, pretrained=False, **vit_kwargs(**arch))
    if state is not None:
        load_backbone_weights(model, state)
    return check_vit(model, name, freeze_pos_embed=freeze_pos_embed)


def check_vit(model: nn.Module, name: str, *, freeze_pos_embed: bool = False) -> nn.Module:
    """``model`` once it is known to be a ViT ToCo can use, its position embedding frozen if asked."""
    if not hasattr(model, "forward_intermediates"):
        raise ValueError(f"timm model {name!r} has no forward_intermediates; ToCo needs a timm ViT")
    if freeze_pos_embed and getattr(model, "pos_embed", None) is not None:
        model.pos_embed.requires_grad_(False)
    return model


def load_backbone_weights(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load ``state`` into ``model`` strictly, after adapting it (prefixes, head, pos_embed, patch kernel)."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith(_HEAD_PREFIXES)}
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        state["pos_embed"] = resize_pos_embed(model, state["pos_embed"])
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


def resize_pos_embed(model: nn.Module, pos_embed: torch.Tensor) -> torch.Tensor:
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

"""Pretrained weights from files, installed packages and the model hub: the one place that reads them.

``models/`` builds architectures and fits in-memory state dicts (``models/backbone.py``: ``load_backbone_weights``,
``models/deeplab.py``: ``load_features_weights``, ``models/stem.py``: ``match_state_dict``); the file and network work
is done here, so that the model code runs where there is neither (DESIGN.md §2). The builders put the two together:
``training/classifier_model.py: pretrained_vit``, ``training/segmenter_model.py: pretrained_features``.

A weight spec is ``"none"`` (or ``""``: random init), ``"hub"`` (timm's download from the Hugging Face hub, which
also resizes the position embedding itself), a local ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt``
file, or ``pkg:<module>/<file>``: a file shipped inside an installed package. Local files are read with safetensors
or with ``torch.load(weights_only=True)``: a checkpoint must not be able to run code (DESIGN.md §3). An unreachable
hub fails within seconds with an error that says to pass a local file instead.
"""

from __future__ import annotations

import contextlib
import importlib.util
import socket
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

NO_WEIGHTS = ("none", "", None)
_NESTED_KEYS = ("model", "state_dict", "model_state", "module")
_NETWORK_MODULES = ("httpx", "httpcore", "requests", "urllib3", "urllib", "socket", "huggingface_hub")


def resolve_weights(spec: str) -> str:
    """A weight-file spec as a path: ``pkg:<module>/<file>`` names a file shipped inside an installed package."""
    if not spec.startswith("pkg:"):
        return spec
    module, _, relative = spec[4:].partition("/")
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"{spec}: package {module!r} is not installed (it is in requirements.txt)")
    path = Path(list(found.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise FileNotFoundError(f"{spec}: {path} does not exist")
    return str(path)


def load_state_dict(spec: str) -> dict[str, torch.Tensor]:
    """The tensors a weight-file spec (a path or ``pkg:<module>/<file>``) names."""
    return read_state_dict(resolve_weights(spec))


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


def hub_model(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=True, **kwargs)``, failing fast and clearly when the hub is unreachable."""
    try:
        with offline_unless_reachable():
            return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - classified below, re-raised untouched if not a network error
        if not is_network_error(exc):
            raise
        raise RuntimeError(
            f"could not download pretrained weights for {name!r}: the model hub is unreachable "
            f"({type(exc).__name__}: {exc}). Download the weights elsewhere and pass the local "
            "file instead (pretrained: path/to/weights.safetensors or .pth)."
        ) from exc


@contextlib.contextmanager
def offline_unless_reachable(timeout_s: float = 3.0):
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


def is_network_error(exc: BaseException) -> bool:
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

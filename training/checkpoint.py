"""Atomic training checkpoints that cannot run code when loaded, keyed by a fingerprint.

A checkpoint holds model, optimizer, scheduler and scaler state, the step, and the state of the training-time
torch generator (data order needs none: it is a function of seed and epoch, see shards/sampling.py). It is written
with ``torch.save`` to a temporary name and ``os.replace``-d into ``<folder>/<fingerprint>/last.pt``; it is read
with ``torch.load(weights_only=True)``, which refuses pickled code. A run whose fingerprint (params + code + inputs)
differs finds no checkpoint in its own folder and starts fresh: stale state is never resumed.
Final weights are written as safetensors, with the model config as JSON beside them.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from shards.io import atomic_path, pause_point

log = logging.getLogger("checkpoint")


def checkpoint_path(folder: str | Path, fingerprint: str) -> Path:
    return Path(folder) / fingerprint / "last.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    pause_point("checkpoint")  # test hook (WSSS_PAUSE_AFTER=checkpoint:N): a no-op unless set


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path`` or None; never unpickles code (weights_only=True)."""
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def prune_other_runs(folder: str | Path, keep: str) -> None:
    """Remove checkpoint folders of other fingerprints (they can never be resumed by this params set)."""
    folder = Path(folder)
    if not folder.exists():
        return
    for child in folder.iterdir():
        if child.is_dir() and child.name != keep:
            shutil.rmtree(child, ignore_errors=True)


def resume(ckpt_dir: str | Path, key: str, model: torch.nn.Module, optimizer, scheduler, *, is_main: bool,
           generator: torch.Generator | None = None, rank: int = 0) -> tuple[Path, int]:
    """(checkpoint path, step to start from) of a training run with fingerprint ``key``.

    With a checkpoint there, model, optimizer, scheduler, this rank's ``generator`` and torch's RNG are restored
    from it; without one, the main process removes the checkpoints of other fingerprints.
    """
    ckpt = checkpoint_path(ckpt_dir, key)
    state = load_checkpoint(ckpt)
    if state is None:
        if is_main:
            prune_other_runs(ckpt_dir, key)
        return ckpt, 0
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if generator is not None:
        generator.set_state(state["generator"][rank])
    torch.set_rng_state(state["torch_rng"])
    step = int(state["step"])
    log.info("resuming from %s at step %d", ckpt, step)
    return ckpt, step


def save_weights(model: torch.nn.Module, folder: str | Path, config: dict[str, Any]) -> None:
    """Final weights as ``model.safetensors`` + ``config.json``, each written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, tmp)
    with atomic_path(folder / "config.json") as tmp, open(tmp, "w") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)


def load_weights(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    return load_file(folder / "model.safetensors"), config

"""Attention scores of chosen timm ViT blocks, for the heads that need them (AFA, TRT; METHODS.md §2-3).

timm's ``Attention`` computes ``softmax(q·kᵀ / √d)·v`` with fused scaled-dot-product attention, which never
materialises the scores. AFA needs the raw (pre-softmax) scores of the last blocks and TRT the class token's
attention probabilities of the blocks before the last; only those blocks are switched, by :func:`capture`, to an
explicit forward that keeps what was asked for on the module (``scores``: (B, H, N, N) raw q·k/√d; ``cls_probs``:
(B, H, N) the class token's row of the softmax). Every other block keeps the fused kernel.

The switch replaces the instance's ``forward`` (not the module), so parameter names, state dicts and checkpoints
are those of the plain backbone; the stored tensors keep their autograd graph (AFA's loss trains the attention).
"""

from __future__ import annotations

import types

import torch
from torch import nn


def _explicit_forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
                      ) -> torch.Tensor:
    """timm ``Attention.forward`` without the fused kernel, keeping the requested scores."""
    if attn_mask is not None or is_causal:
        raise NotImplementedError("attention capture supports unmasked, non-causal attention only")
    B, N, _ = x.shape
    gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    scores = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
    probs = scores.softmax(dim=-1)
    if "scores" in self.capture_kinds:
        self.scores = scores
    if "cls" in self.capture_kinds:
        self.cls_probs = probs[:, :, 0]  # (B, H, N): the class token's attention over every token
    x = self.attn_drop(probs) @ v
    x = x.transpose(1, 2).reshape(B, N, -1)
    x = self.norm(x)
    if gate is not None:
        x = x * gate
    return self.proj_drop(self.proj(x))


def capture(block: nn.Module, kinds: tuple[str, ...]) -> None:
    """Make ``block.attn`` keep ``kinds`` of scores ("scores" raw q·k, "cls" class-token probabilities)."""
    attn = block.attn
    unknown = set(kinds) - {"scores", "cls"}
    if unknown:
        raise ValueError(f"unknown attention capture kinds {sorted(unknown)}")
    for name in ("qkv", "q_norm", "k_norm", "num_heads", "head_dim", "scale", "proj"):
        if not hasattr(attn, name):
            raise ValueError(f"{type(attn).__name__} is not a timm Attention (no {name!r}); cannot capture scores")
    attn.capture_kinds = tuple(sorted(set(getattr(attn, "capture_kinds", ())) | set(kinds)))
    attn.forward = types.MethodType(_explicit_forward, attn)


def captured(block: nn.Module, kind: str) -> torch.Tensor:
    """The tensor of ``kind`` ("scores" or "cls_probs") that ``block`` kept in its last forward."""
    value = getattr(block.attn, kind, None)
    if value is None:
        raise RuntimeError(f"block attention kept no {kind!r}: call capture() and run a forward first")
    return value


def release(blocks) -> None:
    """Drop kept scores (they hold activations and their graph) once they have been used."""
    for block in blocks:
        for kind in ("scores", "cls_probs"):
            if hasattr(block.attn, kind):
                setattr(block.attn, kind, None)

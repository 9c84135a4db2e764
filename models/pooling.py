"""Image-level logits from patch-level scores: global max pooling (ToCo) or APC's Adaptive-K pooling.

ToCo max-pools the patch *features* and applies the 1×1 classifier (METHODS.md §1): one patch decides each class.
APC (METHODS.md §3) scores every patch first and averages the top-K patch logits per image and class, with K
adapting to the scores: here K = the number of patches whose sigmoid score is at least ``ratio`` × the best patch's
(at least 1). A class spread over an object then gets a logit from the whole object, not one abnormal patch; an
absent class, low everywhere, averages its low scores.
"""

from __future__ import annotations

import torch


def adaptive_k_pool(patch_logits: torch.Tensor, ratio: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, K, N) patch logits → (B, K) mean of each class's top-K logits; K chosen per image and class.

    ``valid`` (B, N) bool keeps padding tokens out. The selection is not differentiated (it is a count); the mean
    is, so every selected patch receives gradient.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    logits = patch_logits.float()
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None], float("-inf"))
    ordered = logits.sort(dim=-1, descending=True).values  # (B, K, N)
    with torch.no_grad():
        probs = ordered.sigmoid()
        k = (probs >= ratio * probs[..., :1]).sum(dim=-1, keepdim=True).clamp(min=1)  # (B, K, 1)
        rank = torch.arange(ordered.shape[-1], device=ordered.device)
        take = rank < k  # (B, K, N): the top k of each class
    picked = torch.where(take, ordered, torch.zeros_like(ordered))
    return picked.sum(dim=-1) / k.squeeze(-1).to(picked.dtype)

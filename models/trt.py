"""TRT (re-attention): a class-agnostic foreground map from the ViT's own attention (METHODS.md §3).

1. Preliminary attention (:func:`preliminary_attention`): the class token's attention to the patch tokens,
   averaged over heads, summed over blocks 1…L−1, normalised to sum 1 per image.
2. Token selection (:func:`select_tokens`), the adaptive threshold: sort the preliminary attention, keep the
   smallest set of top tokens whose mass reaches θ (a token is kept while the mass *before* it is < θ, so the top
   token always is). θ = 0.6 on CUB, 0.95 on ImageNet in the paper.
3. Masked re-attention (:class:`ReAttention`): one query (from the final class token) attends over the kept final
   patch tokens only; the attended feature feeds a linear classifier trained with the multi-label loss, so the
   re-attention learns which kept tokens carry the object.
4. Map (:func:`foreground_map`): re-attention scores on kept tokens, scaled to the preliminary mass of the kept
   set (so the two parts are commensurate), the preliminary attention elsewhere; each token's value is then
   1 − the share of that attention held by the tokens ranked above it (1 at the top, ~0 on the background tail).
"""

from __future__ import annotations

import torch
from torch import nn


def preliminary_attention(cls_probs: list[torch.Tensor], num_prefix: int) -> torch.Tensor:
    """(B, N) over patch tokens: Σ over blocks of the head-mean class-token attention, normalised to sum 1.

    ``cls_probs``: per block (B, H, prefix + N) class-token attention probabilities.
    """
    if not cls_probs:
        raise ValueError("TRT needs the attention of at least one block before the last")
    total = sum(p.float().mean(dim=1)[:, num_prefix:] for p in cls_probs)  # (B, N)
    return total / total.sum(dim=1, keepdim=True).clamp(min=1e-12)


def select_tokens(attention: torch.Tensor, theta: float) -> torch.Tensor:
    """(B, N) bool: the top tokens whose cumulative mass first reaches ``theta`` (the top token always kept)."""
    if not 0.0 < theta <= 1.0:
        raise ValueError(f"theta must be in (0, 1], got {theta}")
    values, order = attention.sort(dim=1, descending=True)
    before = values.cumsum(dim=1) - values  # mass of the tokens ranked above each one
    keep_sorted = before < theta
    keep_sorted[:, 0] = True
    return torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)


class ReAttention(nn.Module):
    """Masked single-query attention over the kept tokens, then a linear classifier: (logits, scores)."""

    def __init__(self, dim: int, num_classes: int, num_heads: int = 1):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, query: torch.Tensor, tokens: torch.Tensor, keep: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """query (B, C), tokens (B, N, C), keep (B, N) bool → logits (B, K), scores (B, N) summing to 1 on kept."""
        b, n, c = tokens.shape
        q = self.q(query).view(b, self.num_heads, 1, self.head_dim)
        k, v = self.kv(tokens).view(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-2, -1)).squeeze(2) / self.head_dim ** 0.5  # (B, H, N)
        logits = logits.float().masked_fill(~keep[:, None], float("-inf"))
        attn = logits.softmax(dim=-1).to(v.dtype)  # (B, H, N)
        pooled = (attn[:, :, None] @ v).reshape(b, c)  # (B, C)
        feature = self.norm(self.proj(pooled))
        return self.classifier(feature), attn.float().mean(dim=1)


def foreground_map(preliminary: torch.Tensor, scores: torch.Tensor, keep: torch.Tensor, grid: tuple[int, int]
                   ) -> torch.Tensor:
    """(B, 1, h, w) in [0, 1]: the merged attention as "1 − the attention mass ranked above this token".

    Merged attention: re-attention scores on kept tokens (× their preliminary mass, so both parts are shares of
    one distribution), the preliminary attention elsewhere. Attention is peaky (a few tokens hold most of it), so a
    min-max map would be ~0 on most of an object; the mass rank instead gives the top token 1, a token that closes
    the top-θ set 1 − θ, and the long tail of background tokens ~0: the same cumulative mass that selects tokens.
    """
    mass = (preliminary * keep).sum(dim=1, keepdim=True)  # (B, 1)
    merged = torch.where(keep, scores * mass, preliminary)
    merged = merged / merged.sum(dim=1, keepdim=True).clamp(min=1e-12)
    values, order = merged.sort(dim=1, descending=True)
    above = values.cumsum(dim=1) - values  # mass of the tokens ranked above each one
    fg = torch.empty_like(values).scatter_(1, order, (1.0 - above).clamp(0.0, 1.0))
    return fg.view(-1, 1, *grid)


def fg_prior(cams: torch.Tensor, fg: torch.Tensor, power: float = 1.0, eps: float = 1e-5) -> torch.Tensor:
    """CAMs (P, H, W) in [0, 1] fused with a class-agnostic map fg (H, W) in [0, 1]: cam·fg^power, rescaled so each
    class keeps its own peak value: a class stays as strong where the object is and fades where the prior says
    background (e.g. the water under a boat). A prior of ones changes nothing; a class the prior erases entirely
    is left as it was (the prior missed it, the tags say it is there)."""
    if cams.shape[0] == 0:
        return cams
    cams = cams.float()
    fused = cams * fg.float().clamp(0, 1)[None] ** power
    peak = cams.flatten(1).amax(dim=1)[:, None, None]
    high = fused.flatten(1).amax(dim=1)[:, None, None]
    return torch.where(high > eps, fused * (peak / high.clamp(min=eps)), cams)

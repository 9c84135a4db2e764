"""AFA: affinity from attention, its loss, and the random walk that propagates CAMs with it (METHODS.md §2).

- :class:`AffinityHead`: the raw attention scores (q·k/√d) of the last blocks' heads, symmetrised (S + Sᵀ), a 1×1
  conv over the heads × blocks channels, sigmoid: a predicted affinity (B, N, N) between patch tokens.
- :func:`affinity_targets` / :func:`affinity_loss`: pairs of tokens within ``radius`` (Chebyshev distance on the
  token grid) of a pseudo label: same label → 1, different → 0, either ignored → no term;
  loss = 0.5·mean(1 − a) over positives + 0.5·mean(a) over negatives (0, not NaN, when a side has no pair).
- :func:`transition_matrix` / :func:`random_walk`: affinities beyond the radius zeroed, raised to ``power`` (2),
  T = A / (row sum + 0.1); one step x'ᵢ = Σⱼ Tᵢⱼ xⱼ on a stack of maps at the token grid. T is non-negative and
  every row sums to less than 1 (the 0.1), so values shrink slightly but the arg-max over planes is a weighted
  vote of the neighbours. The reference normalises columns and multiplies from the right; with AFA's symmetric
  affinity that is the same operator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.losses import _mean_or_zero


class AffinityHead(nn.Module):
    """sigmoid(1×1 conv over symmetrised raw attention scores): (B, L·H, N, N) → (B, N, N) logits or probs."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, 1, kernel_size=1, bias=True)

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        """Affinity logits (B, N, N) from raw scores (B, C, N, N) of patch tokens; sigmoid gives the affinity."""
        return self.proj(scores + scores.transpose(-2, -1))[:, 0]


def radius_mask(height: int, width: int, radius: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, N) bool, N = height·width: True where two tokens are within ``radius`` rows and columns."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    near_rows = (rows[:, None] - rows[None, :]).abs() <= radius
    near_cols = (cols[:, None] - cols[None, :]).abs() <= radius
    return near_rows & near_cols


def affinity_targets(token_labels: torch.Tensor, radius: int, *, ignore_index: int) -> torch.Tensor:
    """(B, N, N) float: 1 same label, 0 different, -1 no term (an ignored token or beyond ``radius``).

    token_labels: (B, h, w) long pseudo labels at the token grid.
    """
    b, h, w = token_labels.shape
    lab = token_labels.reshape(b, h * w)
    valid = lab != ignore_index
    pair = valid[:, :, None] & valid[:, None, :] & radius_mask(h, w, radius, lab.device)[None]
    same = (lab[:, :, None] == lab[:, None, :]).float()
    return torch.where(pair, same, torch.full_like(same, -1.0))


def affinity_loss(affinity_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0.5·mean(1 − a) over positive pairs + 0.5·mean(a) over negatives; a = sigmoid(logits). fp32, 0 not NaN."""
    with torch.autocast(device_type=affinity_logits.device.type, enabled=False):
        a = affinity_logits.float().sigmoid()
        pos, neg = (targets == 1).float(), (targets == 0).float()
        return 0.5 * _mean_or_zero(((1 - a) * pos).sum(), pos.sum()) + 0.5 * _mean_or_zero((a * neg).sum(), neg.sum())


def transition_matrix(affinity: torch.Tensor, height: int, width: int, radius: int = 8, power: float = 2.0,
                      eps: float = 0.1) -> torch.Tensor:
    """T = (A·[within radius])^power / (row sum + eps): (..., N, N) non-negative, every row sum < 1.

    ``affinity``: (..., N, N) in [0, 1] (negative values, which a sigmoid never gives, are clamped to 0).
    """
    if eps <= 0:
        raise ValueError(f"eps must be > 0 (it keeps row sums below 1), got {eps}")
    n = height * width
    if affinity.shape[-2:] != (n, n):
        raise ValueError(f"affinity of shape {tuple(affinity.shape[-2:])} does not match a {height}x{width} grid")
    a = affinity.float().clamp(min=0) * radius_mask(height, width, radius, affinity.device)
    a = a ** power
    return a / (a.sum(dim=-1, keepdim=True) + eps)


def random_walk(maps: torch.Tensor, transition: torch.Tensor) -> torch.Tensor:
    """One propagation step of maps (C, h, w) or (B, C, h, w) at the token grid: x'ᵢ = Σⱼ Tᵢⱼ xⱼ."""
    squeeze = maps.dim() == 3
    if squeeze:
        maps, transition = maps[None], transition[None] if transition.dim() == 2 else transition
    b, c, h, w = maps.shape
    out = maps.float().reshape(b, c, h * w) @ transition.float().transpose(-2, -1)  # (B, C, N)
    out = out.reshape(b, c, h, w)
    return out[0] if squeeze else out


def propagate(stack: torch.Tensor, affinity: torch.Tensor, grid: tuple[int, int], radius: int = 8,
              power: float = 2.0, eps: float = 0.1) -> torch.Tensor:
    """One image's stack (C, H, W) at any resolution: area-resize to the affinity's token ``grid``, one random
    walk step, bilinear back to (H, W). ``affinity``: (N, N) for that grid."""
    c, height, width = stack.shape
    small = F.adaptive_avg_pool2d(stack[None].float(), grid)[0] if (height, width) != tuple(grid) else stack.float()
    walked = random_walk(small, transition_matrix(affinity, grid[0], grid[1], radius, power, eps))
    if (height, width) == tuple(grid):
        return walked
    return F.interpolate(walked[None], size=(height, width), mode="bilinear", align_corners=False)[0]

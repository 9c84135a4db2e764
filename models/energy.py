"""The dense CRF energy regulariser of ToCo's segmentation head, in pure torch (no compiled extension).

Tang et al. 2018 ("On regularized losses for weakly-supervised CNN segmentation"): with S_k the softmax of class k
over the N pixels and W the bilateral Gaussian kernel W_ij = exp(-|p_i - p_j|^2 / 2 sigma_xy^2
- |I_i - I_j|^2 / 2 sigma_rgb^2) (position p in px, colour I in RGB 0..255; W_ii = 1), the energy
sum_k S_k^T W (1 - S_k) = 1^T W 1 - sum_k S_k^T W S_k (as sum_k S_k = 1), so the loss drops the constant.

The reference (ToCo's ``DenseEnergyLoss``, from AFA) computes at half the crop size (image nearest, softmax
bilinear, sigma_xy scaled along), keeps pixels inside the crop box (ROI), and gates each pixel i by
G_i = max(0, 1 - max_k S_ik) inside the ROI, 1 where the pseudo label is 255 (uncertain), so that confident
pixels are left alone:

    value = -sum_i sum_k G_i S'_ik (W S'_k)_i / B,  S' = S * ROI,   gradient d/dS = -2 ROI G (W S') / B,

with G held constant: the reference's backward, which is the exact gradient where G = 1 (W is symmetric).
``dense_crf_energy`` returns that value with that gradient; the product's constant factor and weight are the
caller's (``CrfEnergyConfig``: normaliser 1e-7, weight 0.05).

W S is computed in one of two ways:
- ``exact``: every pair, W built in row chunks from the features f = (x/sigma_xy, y/sigma_xy, rgb/sigma_rgb) as
  exp(-|f_i - f_j|^2 / 2) and multiplied with S: O(N^2) time, O(chunk x N) memory.
- ``window``: a strided local window, pairs at offsets (dy, dx) in {-R, -R+s, ..., R}^2, each term weighted by s^2
  (each sampled offset stands for the s x s offsets around it): O(N (2R/s + 1)^2). Its error against ``exact``
  is in bench/RESULTS.md (``python bench/bench_energy.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.configs import CrfEnergyConfig

CHUNK_ELEMENTS = 1 << 24  # kernel entries (B x rows x N) built at once by the exact filter


def bilateral_features(image: torch.Tensor, sigma_rgb: float, sigma_xy: float) -> torch.Tensor:
    """(B, 3, H, W) RGB 0..255 -> (B, N, 5) features (y, x, r, g, b) scaled by their standard deviations."""
    B, _, H, W = image.shape
    ys, xs = torch.meshgrid(torch.arange(H, device=image.device, dtype=torch.float32),
                            torch.arange(W, device=image.device, dtype=torch.float32), indexing="ij")
    position = torch.stack([ys, xs]).view(1, 2, H * W).expand(B, -1, -1) / sigma_xy
    colour = image.float().reshape(B, 3, H * W) / sigma_rgb
    return torch.cat([position, colour], 1).transpose(1, 2)  # (B, N, 5)


def exact_filter(image: torch.Tensor, values: torch.Tensor, sigma_rgb: float, sigma_xy: float) -> torch.Tensor:
    """W @ values over every pixel pair: image (B, 3, H, W) RGB 0..255, values (B, K, H, W) -> (B, K, H, W)."""
    B, K, H, W = values.shape
    N = H * W
    f = bilateral_features(image, sigma_rgb, sigma_xy)  # (B, N, 5)
    f = f - f.mean(1, keepdim=True)  # centred: smaller norms, less cancellation in |fi|^2 + |fj|^2 - 2 fi.fj
    sq = (f * f).sum(-1)  # (B, N)
    v = values.float().reshape(B, K, N).transpose(1, 2)  # (B, N, K)
    rows = max(1, CHUNK_ELEMENTS // max(1, B * N))
    out = []
    for start in range(0, N, rows):
        fi = f[:, start:start + rows]  # (B, c, 5)
        d2 = (sq[:, start:start + rows, None] + sq[:, None, :] - 2 * fi @ f.transpose(1, 2)).clamp(min=0)
        out.append(torch.exp(-0.5 * d2) @ v)  # (B, c, K)
    return torch.cat(out, 1).transpose(1, 2).reshape(B, K, H, W)


def window_filter(image: torch.Tensor, values: torch.Tensor, sigma_rgb: float, sigma_xy: float, radius: int,
                  stride: int) -> torch.Tensor:
    """The strided-window approximation of :func:`exact_filter` (module docstring); pairs outside the image
    contribute nothing."""
    H, W = values.shape[-2:]
    image, values = image.float(), values.float()
    steps = range(-(radius // stride) * stride, radius + 1, stride)
    pad = max(abs(s) for s in steps)
    padded_image = F.pad(image, (pad, pad, pad, pad))
    padded_values = F.pad(values, (pad, pad, pad, pad))  # zeros: no neighbour outside the image
    out = torch.zeros_like(values)
    for dy in steps:
        for dx in steps:
            shifted_image = padded_image[:, :, pad + dy:pad + dy + H, pad + dx:pad + dx + W]
            shifted_values = padded_values[:, :, pad + dy:pad + dy + H, pad + dx:pad + dx + W]
            colour = ((image - shifted_image) ** 2).sum(1, keepdim=True) / (2 * sigma_rgb ** 2)  # (B, 1, H, W)
            weight = stride ** 2 * torch.exp(-colour - (dy * dy + dx * dx) / (2 * sigma_xy ** 2))
            out = out + weight * shifted_values
    return out


def dense_crf_energy(image: torch.Tensor, probs: torch.Tensor, roi: torch.Tensor, uncertain: torch.Tensor,
                     sigma_rgb: float, sigma_xy: float, mode: str = "exact", radius: int = 24,
                     stride: int = 3) -> torch.Tensor:
    """The gated energy (module docstring), summed over pixels and classes and averaged over images.

    image (B, 3, H, W) RGB 0..255 (no gradient); probs (B, K, H, W) softmax; roi (B, H, W) bool: the crop's valid
    pixels; uncertain (B, H, W) bool: pixels whose pseudo label is the ignore index. Computed in fp32.
    """
    if mode not in ("exact", "window"):
        raise ValueError(f"mode must be 'exact' or 'window', got {mode!r}")
    B = probs.shape[0]
    probs = probs.float()
    roi = roi.float()[:, None]  # (B, 1, H, W)
    with torch.no_grad():
        gate = (roi - probs.max(1, keepdim=True).values)
        gate = torch.where(uncertain[:, None], torch.ones_like(gate), gate).clamp(min=0)  # (B, 1, H, W)
        masked = probs.detach() * roi
        if mode == "exact":
            filtered = exact_filter(image, masked, sigma_rgb, sigma_xy)
        else:
            filtered = window_filter(image, masked, sigma_rgb, sigma_xy, radius, stride)
        gated = filtered * gate  # (B, K, H, W): G (W S')
        value = -(masked * gated).sum() / B
    surrogate = -2 * (probs * roi * gated).sum() / B  # its gradient is the reference's
    return value + (surrogate - surrogate.detach())


def crf_energy_loss(image: torch.Tensor, seg_logits: torch.Tensor, pseudo: torch.Tensor, valid: torch.Tensor,
                    cfg: CrfEnergyConfig, ignore_index: int = 255) -> torch.Tensor:
    """The regulariser of a ToCo step, as the reference computes it (times ``cfg.normaliser``, not ``cfg.weight``).

    image (B, 3, S, S) RGB in [0, 1] (the augmented training crop); seg_logits (B, K+1, h, w) of the seg head;
    pseudo (B, S, S) online pseudo labels (``ignore_index`` = uncertain); valid (B, S, S) bool. The logits are
    resized to S and softmaxed (as for the seg loss), then everything goes to ``cfg.scale`` x S: the softmax
    bilinear, the image, ROI and labels nearest, and sigma_xy scales with it.
    """
    size = image.shape[-2:]
    small = [max(1, round(s * cfg.scale)) for s in size]
    with torch.autocast(image.device.type, enabled=False):
        probs = F.softmax(F.interpolate(seg_logits.float(), size=size, mode="bilinear", align_corners=False), 1)
        probs = F.interpolate(probs, size=small, mode="bilinear", align_corners=False)
        rgb = F.interpolate(image.float() * 255, size=small, mode="nearest")
        roi = F.interpolate(valid[:, None].float(), size=small, mode="nearest")[:, 0] > 0.5
        uncertain = F.interpolate((pseudo == ignore_index)[:, None].float(), size=small, mode="nearest")[:, 0] > 0.5
        energy = dense_crf_energy(rgb, probs, roi, uncertain, cfg.sigma_rgb, cfg.sigma_xy * small[0] / size[0],
                                  cfg.mode, cfg.window_radius, cfg.window_stride)
    return energy * cfg.normaliser

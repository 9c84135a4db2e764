"""The dense CRF energy regulariser (models/energy.py) against brute force on tiny images."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from models import energy
from models.configs import CrfEnergyConfig
from models.energy import crf_energy_loss, dense_crf_energy, exact_filter, window_filter

SIGMA_RGB, SIGMA_XY = 30.0, 2.5


def brute_kernel(image: torch.Tensor, sigma_rgb: float, sigma_xy: float) -> torch.Tensor:
    """W (N, N) of one image (3, H, W) by explicit loops over pixel pairs."""
    _, H, W = image.shape
    rgb = image.double().tolist()
    pixels = list(itertools.product(range(H), range(W)))
    kernel = [[0.0] * len(pixels) for _ in pixels]
    for a, (yi, xi) in enumerate(pixels):
        for b, (yj, xj) in enumerate(pixels):
            colour = sum((rgb[c][yi][xi] - rgb[c][yj][xj]) ** 2 for c in range(3))
            kernel[a][b] = math.exp(-((yi - yj) ** 2 + (xi - xj) ** 2) / (2 * sigma_xy ** 2)
                                    - colour / (2 * sigma_rgb ** 2))
    return torch.tensor(kernel, dtype=torch.float64)


def inputs(seed: int = 0, B: int = 2, K: int = 3, H: int = 4, W: int = 5):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(B, 3, H, W, generator=g) * 255
    logits = torch.randn(B, K, H, W, generator=g) * 2
    roi = torch.ones(B, H, W, dtype=torch.bool)
    roi[0, :, -2:] = False  # padding at the right of the first image
    uncertain = torch.rand(B, H, W, generator=g) < 0.3
    return image, logits, roi, uncertain


def test_exact_energy_and_gradient_equal_the_brute_force_sum():
    image, logits, roi, uncertain = inputs()
    probs = F.softmax(logits, 1).requires_grad_(True)
    value = dense_crf_energy(image, probs, roi, uncertain, SIGMA_RGB, SIGMA_XY, "exact")
    value.backward()
    B, K, H, W = probs.shape
    expected_value, expected_grad = 0.0, torch.zeros(B, K, H * W, dtype=torch.float64)
    for b in range(B):
        kernel = brute_kernel(image[b], SIGMA_RGB, SIGMA_XY).tolist()
        s = probs[b].detach().double().reshape(K, -1).tolist()
        r = roi[b].double().flatten().tolist()
        unsure = uncertain[b].flatten().tolist()
        gate = [1.0 if unsure[i] else max(0.0, r[i] - max(s[k][i] for k in range(K))) for i in range(H * W)]
        for k in range(K):
            for i in range(H * W):
                ws = sum(kernel[i][j] * s[k][j] * r[j] for j in range(H * W))  # (W S')_i
                expected_value -= gate[i] * s[k][i] * r[i] * ws / B
                expected_grad[b, k, i] = -2 * r[i] * gate[i] * ws / B
    assert value.item() == pytest.approx(expected_value, rel=1e-5)
    torch.testing.assert_close(probs.grad.double().reshape(B, K, -1), expected_grad, rtol=1e-4, atol=1e-6)


def test_ungated_energy_is_tangs_up_to_a_constant_with_its_exact_gradient():
    """G = 1 everywhere (all uncertain): the value is E = sum_k S_k^T W (1 - S_k) less 1^T W 1, and the gradient
    that reaches the logits is E's own (the per-pixel constant W 1 vanishes through the softmax)."""
    image, logits, _, _ = inputs(1, B=1)
    roi = torch.ones(1, 4, 5, dtype=torch.bool)
    logits_a = logits.clone().double().requires_grad_(True)
    value = dense_crf_energy(image, F.softmax(logits_a, 1), roi, roi, SIGMA_RGB, SIGMA_XY, "exact")
    value.backward()
    kernel = brute_kernel(image[0], SIGMA_RGB, SIGMA_XY)
    logits_b = logits.clone().double().requires_grad_(True)
    s = F.softmax(logits_b, 1)[0].reshape(3, -1)  # (K, N)
    tang = sum(s[k] @ kernel @ (1 - s[k]) for k in range(3))
    tang.backward()
    assert value.item() == pytest.approx(tang.item() - kernel.sum().item(), rel=1e-5)
    torch.testing.assert_close(logits_a.grad, logits_b.grad, rtol=1e-4, atol=1e-6)


def test_the_chunked_product_and_a_full_window_equal_one_dense_product(monkeypatch):
    image, logits, _, _ = inputs(2, H=6, W=7)
    values = F.softmax(logits, 1)
    whole = exact_filter(image, values, SIGMA_RGB, SIGMA_XY)
    monkeypatch.setattr(energy, "CHUNK_ELEMENTS", 50)  # a few rows per chunk
    torch.testing.assert_close(exact_filter(image, values, SIGMA_RGB, SIGMA_XY), whole, rtol=1e-4, atol=1e-5)
    # a window that spans the image with stride 1 holds every pair
    torch.testing.assert_close(window_filter(image, values, SIGMA_RGB, SIGMA_XY, radius=7, stride=1), whole,
                               rtol=1e-4, atol=1e-5)
    # a narrower one misses pairs: the approximation is smaller, never larger (all terms are positive)
    assert (window_filter(image, values, SIGMA_RGB, SIGMA_XY, radius=1, stride=1) <= whole + 1e-5).all()


def test_the_loss_reaches_the_seg_logits_and_only_inside_the_crop():
    g = torch.Generator().manual_seed(3)
    image = torch.rand(2, 3, 16, 16, generator=g)
    seg = torch.randn(2, 4, 4, 4, generator=g, requires_grad=True)
    pseudo = torch.randint(0, 4, (2, 16, 16), generator=g)
    pseudo[:, :4] = 255
    valid = torch.ones(2, 16, 16, dtype=torch.bool)
    valid[1] = False  # the second image is all padding: nothing of it counts
    cfg = CrfEnergyConfig(sigma_xy=8.0)
    loss = crf_energy_loss(image, seg, pseudo, valid, cfg)
    loss.backward()
    assert loss.item() < 0 and seg.grad[0].abs().sum() > 0 and seg.grad[1].abs().sum() == 0
    seg.grad = None
    window = crf_energy_loss(image, seg, pseudo, valid, CrfEnergyConfig(sigma_xy=8.0, mode="window",
                                                                         window_radius=8, window_stride=1))
    assert window.item() == pytest.approx(loss.item(), rel=1e-4)  # 8x8 at scale 0.5: the window spans it

"""PAR: affinity normalisation, equivariances, edge preservation, masking, against a naive per-pixel loop."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from models.par import PAR, ParConfig, neighbour_offsets, par_affinity, par_propagate, refine_with_par

FULL_RES = ParConfig(scale=1.0)


def _random(b=2, c=3, h=20, w=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, h, w, generator=g)
    probs = torch.rand(b, c, h, w, generator=g).softmax(dim=1)
    return images, probs


def test_affinity_rows_sum_to_one_and_are_positive():
    images, _ = _random()
    aff = par_affinity(images, ParConfig())
    assert aff.shape == (2, 48, 20, 24) and aff.dtype == torch.float32
    assert bool((aff > 0).all())
    assert_close(aff.sum(dim=1), torch.ones(2, 20, 24))


def test_affinity_prefers_similar_colours():
    # left half dark, right half bright: a pixel next to the edge gives its cross-edge neighbour less weight
    images = torch.zeros(1, 3, 16, 16)
    images[..., 8:] = 1.0
    aff = par_affinity(images, FULL_RES)
    offsets = neighbour_offsets(FULL_RES.dilations)
    left, right = offsets.index((0, -1)), offsets.index((0, 1))
    assert aff[0, right, 8, 7] < 0.1 * aff[0, left, 8, 7]  # not 0: the position term gives every neighbour some


def _naive_par(images, probs, cfg):
    """Per-pixel loops over plain Python floats: the METHODS.md formula, written independently."""
    _, _, h, w = images.shape
    img = images[0].tolist()
    offsets = [(dy * d, dx * d) for d in cfg.dilations
               for dy, dx in ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))]
    dists = [math.hypot(dy, dx) for dy, dx in offsets]
    n = len(offsets)
    mean_d = sum(dists) / n
    sigma_d = math.sqrt(sum((d - mean_d) ** 2 for d in dists) / (n - 1))
    pos_logit = [-(d / (sigma_d + 1e-8) / cfg.w1) ** 2 for d in dists]

    def softmax(v):
        m = max(v)
        e = [math.exp(x - m) for x in v]
        return [x / sum(e) for x in e]

    def clamp(i, size):
        return min(max(i, 0), size - 1)

    pos_sm = softmax(pos_logit)
    aff = {}
    for y in range(h):
        for x in range(w):
            nbs = [(clamp(y + dy, h), clamp(x + dx, w)) for dy, dx in offsets]
            logit = [0.0] * n
            for c in range(3):
                vals = [img[c][yy][xx] for yy, xx in nbs]
                mu = sum(vals) / n
                sigma = math.sqrt(sum((v - mu) ** 2 for v in vals) / (n - 1))
                for j, v in enumerate(vals):
                    logit[j] += -(abs(img[c][y][x] - v) / (sigma + 1e-8) / cfg.w1) ** 2 / 3
            col_sm = softmax(logit)
            aff[y, x] = [(nbs[j], (col_sm[j] + cfg.w2 * pos_sm[j]) / (1 + cfg.w2)) for j in range(n)]
    p = probs[0].tolist()
    for _ in range(cfg.iterations):
        p = [[[sum(a * pc[yy][xx] for (yy, xx), a in aff[y, x]) for x in range(w)] for y in range(h)] for pc in p]
    return torch.tensor(p)[None]


def test_matches_naive_loop():
    cfg = ParConfig(dilations=(1, 2, 4), iterations=2, scale=1.0)
    images, probs = _random(b=1, c=2, h=6, w=7, seed=3)
    assert_close(refine_with_par(images, probs, cfg), _naive_par(images, probs, cfg), atol=1e-5, rtol=1e-5)


def test_constant_map_stays_constant():
    images, _ = _random(h=32, w=40)
    probs = torch.tensor([0.2, 0.3, 0.5])[None, :, None, None].expand(2, 3, 32, 40)
    out = refine_with_par(images, probs, ParConfig())
    assert out.shape == (2, 3, 32, 40)
    assert_close(out, probs.expand_as(out), atol=1e-5, rtol=0)


@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 2), c=st.integers(1, 3), h=st.integers(4, 21), w=st.integers(4, 21),
       scale=st.sampled_from([1.0, 0.5]), seed=st.integers(0, 1000))
def test_flip_equivariance(b, c, h, w, scale, seed):
    images, probs = _random(b, c, h, w, seed)
    cfg = ParConfig(iterations=3, scale=scale)
    flipped = refine_with_par(images.flip(-1), probs.flip(-1), cfg)
    assert_close(flipped, refine_with_par(images, probs, cfg).flip(-1), atol=1e-5, rtol=1e-5)


@settings(max_examples=10, deadline=None)
@given(c=st.integers(2, 5), seed=st.integers(0, 1000))
def test_class_permutation_equivariance(c, seed):
    images, probs = _random(2, c, 12, 14, seed)
    perm = torch.randperm(c, generator=torch.Generator().manual_seed(seed))
    cfg = ParConfig(iterations=3)
    assert_close(refine_with_par(images, probs[:, perm], cfg), refine_with_par(images, probs, cfg)[:, perm])


def test_batch_equals_one_image_at_a_time():
    images, probs = _random(b=3, h=16, w=18, seed=5)
    batched = refine_with_par(images, probs)
    singles = torch.cat([refine_with_par(images[i:i + 1], probs[i:i + 1]) for i in range(3)])
    assert_close(batched, singles)


def test_sharp_edge_stops_leaking_while_regions_smooth():
    h, w = 32, 32
    g = torch.Generator().manual_seed(0)
    region = torch.zeros(h, w, dtype=torch.bool)
    region[:, 16:] = True
    edge_image = torch.where(region, 1.0, 0.0).expand(1, 3, h, w).clone()
    flat_image = torch.full((1, 3, h, w), 0.5)
    # class 1 on the right region, class 0 on the left, plus noise that PAR should average out
    noisy = torch.stack([(~region).float(), region.float()])[None] + 0.3 * torch.rand(1, 2, h, w, generator=g)
    probs = noisy / noisy.sum(dim=1, keepdim=True)
    with_edge = refine_with_par(edge_image, probs, FULL_RES)
    blurred = refine_with_par(flat_image, probs, FULL_RES)
    leak_edge = with_edge[0, 1][~region].mean()
    leak_blur = blurred[0, 1][~region].mean()
    assert leak_edge < 0.5 * leak_blur
    assert leak_edge < probs[0, 1][~region].mean()  # the noise within the left region is averaged away
    assert with_edge[0, 1][region].std() < 0.5 * probs[0, 1][region].std()


def test_valid_mask_keeps_padding_out():
    h, w = 24, 24
    images = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(1))
    valid = torch.zeros(1, h, w, dtype=torch.bool)
    valid[:, :, :18] = True
    probs = torch.stack([valid[0].float(), (~valid[0]).float()])[None]  # padding is all class 1
    masked = refine_with_par(images, probs, FULL_RES, valid=valid)
    unmasked = refine_with_par(images, probs, FULL_RES)
    assert_close(masked[0, 0][valid[0]], torch.ones(int(valid.sum())), atol=1e-5, rtol=0)
    assert unmasked[0, 1][valid[0]].max() > 0.1
    aff = par_affinity(images, FULL_RES, valid)
    assert_close(aff.sum(dim=1)[valid], torch.ones(int(valid.sum())))


def test_single_valid_pixel_keeps_its_value():
    images, probs = _random(b=1, c=2, h=8, w=8)
    valid = torch.zeros(1, 8, 8, dtype=torch.bool)
    valid[0, 3, 3] = True
    out = refine_with_par(images, probs, FULL_RES, valid=valid)
    assert torch.isfinite(out).all()
    assert_close(out[0, :, 3, 3], probs[0, :, 3, 3])


def test_half_resolution_output_size_and_low_res_probs():
    images, _ = _random(b=2, h=33, w=45)
    probs = torch.rand(2, 4, 16, 22).softmax(dim=1)  # already at the working resolution
    out = refine_with_par(images, probs)
    assert out.shape == (2, 4, 33, 45)
    assert_close(out.sum(dim=1), torch.ones(2, 33, 45), atol=1e-5, rtol=0)


def test_bf16_autocast_computes_in_fp32():
    images, probs = _random(h=16, w=16)
    images, probs = images.bfloat16(), probs.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = refine_with_par(images, probs)
    assert out.dtype == torch.float32
    assert_close(out, refine_with_par(images.float(), probs.float()))


def test_module_wrapper_and_propagate_agree():
    images, probs = _random(h=12, w=12)
    assert_close(PAR(FULL_RES)(images, probs), par_propagate(probs, par_affinity(images, FULL_RES), FULL_RES))

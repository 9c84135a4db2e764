"""AFA, APC and TRT operators and losses on hand-computed tiny cases (METHODS.md §2-3)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models import attention
from models.affinity import affinity_loss, affinity_targets, propagate, radius_mask, random_walk, transition_matrix
from models.losses import pcl_loss, ptc_loss
from models.pooling import adaptive_k_pool
from models.toco import ToCo, ToCoConfig
from models.trt import ReAttention, fg_prior, foreground_map, preliminary_attention, select_tokens
from shards.records import IGNORE_INDEX


# ------------------------------------------------------------------------------------------------ AFA
def test_radius_mask_is_chebyshev_distance_on_the_token_grid():
    mask = radius_mask(2, 3, radius=1)  # tokens 0 1 2 / 3 4 5
    expected_from_0 = [True, True, False, True, True, False]
    assert mask[0].tolist() == expected_from_0
    assert mask[4].all()  # the centre of the bottom row reaches every token
    assert torch.equal(mask, mask.T) and mask.diagonal().all()


def test_affinity_targets_and_loss_by_hand():
    labels = torch.tensor([[[1, 1, 0, 255]]])  # (1, 1, 4): two of class 1, background, an ignored token
    targets = affinity_targets(labels, radius=1, ignore_index=IGNORE_INDEX)[0]
    # token 0: itself and token 1 positive, token 2 beyond radius 1, token 3 ignored
    assert targets[0].tolist() == [1.0, 1.0, -1.0, -1.0]
    assert targets[1].tolist() == [1.0, 1.0, 0.0, -1.0]
    assert targets[3].tolist() == [-1.0] * 4
    logits = torch.zeros(1, 4, 4)  # a = 0.5 everywhere: 0.5 * 0.5 + 0.5 * 0.5
    assert affinity_loss(logits, targets[None]).item() == pytest.approx(0.5)
    big = torch.full((1, 4, 4), 20.0)  # a ~ 1: positives cost 0, negatives (1-2, 2-1) cost 1 -> 0.5
    assert affinity_loss(big, targets[None]).item() == pytest.approx(0.5, abs=1e-6)
    none = torch.full((1, 4, 4), -1.0)  # no pair at all: 0, not NaN, and a finite gradient
    logits = torch.zeros(1, 4, 4, requires_grad=True)
    loss = affinity_loss(logits, none)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_transition_matrix_by_hand():
    a = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
    t = transition_matrix(a, 1, 2, radius=1, power=2, eps=0.1)
    expected = torch.tensor([[1.0, 0.25], [0.25, 1.0]]) / 1.35
    assert torch.allclose(t, expected)
    far = transition_matrix(torch.ones(4, 4), 1, 4, radius=1)
    assert far[0, 2] == 0 and far[0, 3] == 0 and far[0, 1] > 0  # zero beyond the radius


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), st.floats(0.5, 3.0), st.integers(0, 1000))
def test_transition_is_non_negative_with_rows_summing_below_one(h, w, radius, power, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(h * w, h * w, generator=g)
    a = (a + a.T) / 2
    t = transition_matrix(a, h, w, radius, power, eps=0.1)
    assert (t >= 0).all()
    assert (t.sum(dim=1) < 1).all()


def test_random_walk_without_affinity_keeps_shape_and_class_support():
    """An affinity with nothing between distinct tokens (the identity) leaves the CAM as it was, up to scale."""
    cams = torch.zeros(3, 2, 3)  # background plane, class A, an absent class
    cams[0] = 0.5
    cams[1, 0, :2] = torch.tensor([0.9, 0.7])
    t = transition_matrix(torch.eye(6), 2, 3, radius=8)
    walked = random_walk(cams, t)
    assert walked.shape == cams.shape
    assert torch.allclose(walked, cams / 1.1)
    assert torch.equal(walked.argmax(dim=0), cams.argmax(dim=0))
    assert torch.equal(walked.flatten(1).amax(dim=1) > 0, cams.flatten(1).amax(dim=1) > 0)
    # at pixel resolution too: area down to the grid, walk, bilinear back
    big = torch.zeros(3, 32, 48)
    big[0] = 0.5
    big[1, :16, :16] = 0.9
    out = propagate(big, torch.eye(6), (2, 3))
    assert out.shape == big.shape
    assert torch.equal(out.flatten(1).amax(dim=1) > 0, big.flatten(1).amax(dim=1) > 0)
    assert torch.equal(out.argmax(dim=0)[4:12, 4:12], big.argmax(dim=0)[4:12, 4:12])


def test_random_walk_spreads_a_class_along_strong_affinity():
    # 1x3 grid: tokens 0 and 1 strongly affine, token 2 not; class mass only at token 0
    a = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    cams = torch.tensor([[[0.4, 0.4, 0.4]], [[1.0, 0.0, 0.0]]])  # (2, 1, 3): background plane, class
    assert cams.argmax(dim=0).tolist() == [[1, 0, 0]]
    walked = random_walk(cams, transition_matrix(a, 1, 3, radius=8))
    # tokens 0 and 1: class (1 + 0) / 2.1 = 0.476 against background (0.4 + 0.4) / 2.1 = 0.381
    assert walked.argmax(dim=0).tolist() == [[1, 1, 0]]
    assert walked[1, 0, 1] == pytest.approx(1 / 2.1)
    assert walked[0, 0, 2] == pytest.approx(0.4 / 1.1) and walked[1, 0, 2] == 0.0


# ------------------------------------------------------------------------------------------------ attention capture
def test_captured_attention_matches_the_fused_block_and_keeps_state_dict_names():
    torch.manual_seed(0)
    model = ToCo(ToCoConfig(backbone="vit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=8,
                            use_seg_head=False, use_ctc=False, embed_dim=32, depth=3, num_heads=2))
    names = set(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    reference = model.encode(x)["tokens"]
    block = model.backbone.blocks[-1]
    attention.capture(block, ("scores", "cls"))
    assert set(model.state_dict()) == names
    assert torch.allclose(model.encode(x)["tokens"], reference, atol=1e-5)
    model.backbone.forward_features(x)
    scores = attention.captured(block, "scores")
    assert scores.shape == (2, 2, 17, 17)
    assert torch.allclose(attention.captured(block, "cls_probs"), scores.softmax(-1)[:, :, 0])


def test_afa_and_trt_heads_in_toco():
    torch.manual_seed(0)
    model = ToCo(ToCoConfig(backbone="vit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=8,
                            use_seg_head=False, use_ctc=False, use_afa=True, afa_layers=2, use_trt=True,
                            embed_dim=32, depth=3, num_heads=2))
    out = model(torch.randn(2, 3, 32, 48))
    aff, fg = out["affinity_logits"], out["fg"]
    assert aff.shape == (2, 24, 24) and torch.allclose(aff, aff.transpose(1, 2), atol=1e-6)  # symmetric
    assert fg.shape == (2, 1, 4, 6) and fg.min() >= 0 and fg.max() <= 1
    assert out["trt_logits"].shape == (2, 3)
    (aff.sigmoid().mean() + out["trt_logits"].sum()).backward()
    qkv_last = model.backbone.blocks[-1].attn.qkv.weight.grad
    assert qkv_last is not None and qkv_last.abs().sum() > 0  # the affinity loss trains the attention
    assert model.cams(torch.randn(1, 3, 32, 32), ("final", "fg"))[1].shape == (1, 1, 4, 4)


# ------------------------------------------------------------------------------------------------ APC
def test_adaptive_k_pool_by_hand():
    logits = torch.tensor([[[3.0, 3.0, -5.0, 0.0]]])  # sigmoid: .953 .953 .007 .5
    assert adaptive_k_pool(logits, 0.8).item() == pytest.approx(3.0)  # K = 2
    assert adaptive_k_pool(logits, 0.5).item() == pytest.approx(2.0)  # K = 3: (3 + 3 + 0) / 3
    assert adaptive_k_pool(logits, 1.0).item() == pytest.approx(3.0)  # ties with the best are kept
    valid = torch.tensor([[True, False, True, True]])
    assert adaptive_k_pool(logits, 0.5, valid).item() == pytest.approx(1.5)  # (3 + 0) / 2: padding left out
    grad_in = logits.clone().requires_grad_(True)
    adaptive_k_pool(grad_in, 0.8).sum().backward()
    assert grad_in.grad.tolist() == [[[0.5, 0.5, 0.0, 0.0]]]


def test_pcl_uses_the_signed_cosine_unlike_ptc():
    tokens = torch.tensor([[1.0, 1.0, -1.0], [0.0, 0.0, 0.0]]).view(1, 2, 1, 3)  # t1 = t2 = (1, 0), t3 = (-1, 0)
    labels = torch.tensor([[[1, 1, 0]]])
    # negatives anti-parallel: done for PCL; |cos| = 1 counts them as similar for PTC
    assert pcl_loss(tokens, labels, ignore_index=IGNORE_INDEX).item() == pytest.approx(0.0)
    assert ptc_loss(tokens, labels, ignore_index=IGNORE_INDEX).item() == pytest.approx(0.5)
    orthogonal = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 2, 1, 3)  # t2 = (0, 1) _|_ t1 = t3
    # positives (t1, t2): 1 - 0; negatives (t1, t3), (t2, t3): cos 1 and 0 -> mean 0.5
    assert pcl_loss(orthogonal, labels, ignore_index=IGNORE_INDEX).item() == pytest.approx(0.5 * 1.0 + 0.5 * 0.5)


# ------------------------------------------------------------------------------------------------ TRT
def test_select_tokens_keeps_the_smallest_top_set_reaching_theta():
    attn = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    assert select_tokens(attn, 0.6).tolist() == [[False, True, False, True]]  # 0.5 + 0.3
    assert select_tokens(attn, 0.95).tolist() == [[False, True, True, True]]  # 0.8 + 0.15 reaches 0.95
    assert select_tokens(attn, 0.1).tolist() == [[False, True, False, False]]  # the top token always


def test_preliminary_attention_and_foreground_map_by_hand():
    # two blocks, two heads, one prefix token and three patches
    b1 = torch.tensor([[[0.1, 0.6, 0.2, 0.1], [0.1, 0.2, 0.6, 0.1]]])
    b2 = torch.tensor([[[0.0, 0.5, 0.5, 0.0], [0.0, 0.5, 0.5, 0.0]]])
    prelim = preliminary_attention([b1, b2], num_prefix=1)
    raw = torch.tensor([0.4 + 0.5, 0.4 + 0.5, 0.1])
    assert torch.allclose(prelim, (raw / raw.sum())[None])
    keep = torch.tensor([[True, True, False]])
    scores = torch.tensor([[0.75, 0.25, 0.0]])
    fg = foreground_map(prelim, scores, keep, (1, 3))
    # merged: [0.75, 0.25] x kept mass 0.9474 on the kept tokens, 0.0526 on the other: [0.7105, 0.2368, 0.0526]
    # -> 1 - mass ranked above: [1, 1 - 0.7105, 1 - 0.7105 - 0.2368]
    assert fg.shape == (1, 1, 1, 3)
    assert torch.allclose(fg.flatten(), torch.tensor([1.0, 1 - 0.75 * 18 / 19, 1 / 19]), atol=1e-6)
    swapped = foreground_map(prelim, torch.tensor([[0.25, 0.75, 0.0]]), keep, (1, 3))
    assert torch.allclose(swapped.flatten(), torch.tensor([1 - 0.75 * 18 / 19, 1.0, 1 / 19]), atol=1e-6)


def test_reattention_ignores_tokens_that_were_not_kept():
    torch.manual_seed(0)
    module = ReAttention(8, 3, num_heads=2)
    query, tokens = torch.randn(1, 8), torch.randn(1, 4, 8)
    keep = torch.tensor([[True, False, True, False]])
    logits, scores = module(query, tokens, keep)
    assert scores[0, 1] == 0 and scores[0, 3] == 0 and scores.sum().item() == pytest.approx(1.0)
    changed = tokens.clone()
    changed[0, 1] += 100.0
    assert torch.allclose(module(query, changed, keep)[0], logits)


def test_fg_prior_by_hand():
    cams = torch.tensor([[[1.0, 0.5, 0.2]], [[0.2, 0.4, 0.0]]])  # (2, 1, 3)
    fg = torch.tensor([[0.5, 1.0, 0.0]])
    out = fg_prior(cams, fg, power=1.0)
    assert torch.allclose(out[0, 0], torch.tensor([1.0, 1.0, 0.0]))  # [0.5, 0.5, 0] / 0.5
    assert torch.allclose(out[1, 0], torch.tensor([0.1, 0.4, 0.0]))  # [0.1, 0.4, 0]: its peak 0.4 is kept
    assert torch.equal(fg_prior(cams, fg, power=0.0), cams)
    assert torch.equal(fg_prior(cams, torch.ones(1, 3)), cams)
    gone = fg_prior(cams, torch.zeros(1, 3))
    assert torch.equal(gone, cams)  # a prior that erases a class entirely is not trusted for it
    assert not math.isnan(float(fg_prior(torch.zeros(1, 1, 3), fg).sum()))

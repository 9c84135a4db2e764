"""ToCo losses against numbers computed by hand with plain Python math."""

import math

import pytest
import torch
import torch.nn.functional as F

from models.losses import LossWeights, balanced_seg_loss, ctc_loss, multilabel_cls_loss, ptc_loss
from shards.records import IGNORE_INDEX

R2 = 1 / math.sqrt(2)


def _close(value, expected, tol=1e-5):
    assert value.item() == pytest.approx(expected, abs=tol, rel=tol)


def _softplus(x):
    return math.log1p(math.exp(x))


def test_loss_weights_defaults():
    w = LossWeights()
    assert (w.cls, w.aux_cls, w.ptc, w.ctc, w.seg, w.reg) == (1.0, 1.0, 0.2, 0.5, 0.1, 0.05)
    assert w.seg_start_iter == 2000 and w.ctc_temperature == 0.5


def test_multilabel_cls_loss_by_hand():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    labels = torch.tensor([[1, 0], [0, 1]])
    # present class: log(1 + e^-x); absent class: log(1 + e^x); mean over classes, then images
    img0 = (_softplus(-2.0) + _softplus(-1.0)) / 2
    img1 = (_softplus(0.5) + _softplus(-3.0)) / 2
    _close(multilabel_cls_loss(logits, labels), (img0 + img1) / 2)
    _close(multilabel_cls_loss(logits, labels), F.multilabel_soft_margin_loss(logits, labels.float()).item())


def _three_tokens():
    # t0 = (1, 0), t1 = (1, 1), t2 = (0, -2): |cos| t0t1 = 1/sqrt2, t0t2 = 0, t1t2 = 1/sqrt2 (abs of a negative cos)
    return torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, -2.0]]).reshape(1, 2, 1, 3)


def test_ptc_loss_by_hand():
    tokens = _three_tokens()
    # positives (0,1),(1,0): S = 1/sqrt2; negatives (0,2),(2,0): 0 and (1,2),(2,1): 1/sqrt2
    expected = 0.5 * (1 - R2) + 0.5 * (2 * R2 / 4)
    _close(ptc_loss(tokens, torch.tensor([[[1, 1, 2]]]), ignore_index=IGNORE_INDEX), expected)


def test_ptc_loss_missing_sides_are_zero():
    tokens = _three_tokens()
    _close(ptc_loss(tokens, torch.tensor([[[1, 1, 255]]]), ignore_index=IGNORE_INDEX), 0.5 * (1 - R2))  # no negatives
    # no positives: the term is 0, not 0.5
    _close(ptc_loss(tokens, torch.tensor([[[1, 2, 255]]]), ignore_index=IGNORE_INDEX), 0.5 * R2)
    tokens.requires_grad_(True)
    loss = ptc_loss(tokens, torch.full((1, 1, 3), 255), ignore_index=IGNORE_INDEX)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(tokens.grad).all()


def test_ptc_loss_pairs_stay_within_an_image():
    # image A: tokens (1, 0), (2, 0), same label; image B: tokens (0, 1), (1, 0), different labels.
    # Across images, (A0, B0) would be a positive pair with S = 0 and raise the loss: it must not count.
    tokens = torch.tensor([[[[1.0, 2.0]], [[0.0, 0.0]]], [[[0.0, 1.0]], [[1.0, 0.0]]]])  # (2, 2, 1, 2)
    labels = torch.tensor([[[1, 1]], [[1, 2]]])
    _close(ptc_loss(tokens, labels, ignore_index=IGNORE_INDEX), 0.5 * (1 - 1.0) + 0.5 * 0.0)


def test_ptc_loss_bf16_autocast_gradient_finite():
    tokens = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0)).bfloat16().requires_grad_(True)
    labels = torch.randint(0, 3, (2, 4, 4), generator=torch.Generator().manual_seed(1))
    labels[0, 0] = 255
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ptc_loss(tokens, labels, ignore_index=IGNORE_INDEX)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(tokens.grad).all()


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def test_ctc_loss_by_hand():
    t = [[1.0, 0.0], [0.0, 1.0]]  # teacher global views
    s = [[0.5, 0.5], [1.0, -0.5]]  # student global views (same order)
    loc = [[0.2, 0.8], [-1.0, 0.3]]  # local crops: the first positive, the second negative
    temp = 0.5
    terms = []
    for g in range(2):
        z_neg = _dot(t[g], loc[1]) / temp
        for p in (s[1 - g], loc[0]):  # the other global view and the positive local crop
            z_pos = _dot(t[g], p) / temp
            terms.append(-math.log(math.exp(z_pos) / (math.exp(z_pos) + math.exp(z_neg))))
    expected = sum(terms) / len(terms)
    loss = ctc_loss(torch.tensor(t)[:, None], torch.tensor(s)[:, None], torch.tensor(loc)[:, None],
                    torch.tensor([[True], [False]]), temperature=temp)
    _close(loss, expected)


def test_ctc_loss_image_without_negatives_counts_zero_and_stays_finite():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 2, 4, generator=g)
    student = torch.randn(2, 2, 4, generator=g).requires_grad_(True)
    locals_ = torch.randn(3, 2, 4, generator=g).requires_grad_(True)
    flags = torch.tensor([[True, True], [False, True], [True, True]])  # image 1: all local crops positive
    loss = ctc_loss(teacher, student, locals_, flags)
    only_image0 = ctc_loss(teacher[:, :1], student[:, :1], locals_[:, :1], flags[:, :1])
    _close(loss, only_image0.item() / 2)
    loss.backward()
    assert torch.isfinite(student.grad).all() and torch.isfinite(locals_.grad).all()
    assert locals_.grad[:, 1].abs().sum() == 0  # image 1 contributes nothing
    none = ctc_loss(teacher, student, locals_, torch.ones(3, 2, dtype=torch.bool))
    assert none.item() == 0.0


def test_ctc_loss_large_logits_and_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    teacher = (100 * torch.randn(2, 2, 16, generator=g)).bfloat16()
    student = (100 * torch.randn(2, 2, 16, generator=g)).bfloat16().requires_grad_(True)
    locals_ = (100 * torch.randn(8, 2, 16, generator=g)).bfloat16().requires_grad_(True)
    flags = torch.rand(8, 2, generator=g) > 0.5
    flags[0] = True
    flags[1] = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ctc_loss(teacher, student, locals_, flags)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert torch.isfinite(student.grad).all() and torch.isfinite(locals_.grad).all()


def _ce(logits, target):
    return -(logits[target] - math.log(sum(math.exp(v) for v in logits)))


def test_balanced_seg_loss_by_hand():
    px = [[2.0, 0.0, -1.0], [0.0, 1.0, 0.5], [1.0, 1.0, 3.0], [0.3, 0.2, 0.1]]  # logits of 4 pixels, K+1 = 3
    pseudo = [0, 2, 255, 0]
    logits = torch.tensor(px).t().reshape(1, 3, 1, 4)
    bg = (_ce(px[0], 0) + _ce(px[3], 0)) / 2
    fg = _ce(px[1], 2)
    _close(balanced_seg_loss(logits, torch.tensor(pseudo).reshape(1, 1, 4), ignore_index=IGNORE_INDEX),
           0.5 * (bg + fg))


def test_balanced_seg_loss_one_sided_and_all_ignored():
    logits = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    background_only = torch.zeros(2, 4, 4, dtype=torch.long)
    loss = balanced_seg_loss(logits, background_only, ignore_index=IGNORE_INDEX)
    _close(loss, 0.5 * F.cross_entropy(logits, background_only).item())  # the fg term is exactly 0
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    logits.grad = None
    ignored = balanced_seg_loss(logits, torch.full((2, 4, 4), 255), ignore_index=IGNORE_INDEX)
    ignored.backward()
    assert ignored.item() == 0.0 and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() == 0


def test_balanced_seg_loss_upsamples_logits():
    logits = torch.randn(1, 3, 4, 4)
    pseudo = torch.randint(0, 3, (1, 8, 8))
    up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    _close(balanced_seg_loss(logits, pseudo, ignore_index=IGNORE_INDEX),
           balanced_seg_loss(up, pseudo, ignore_index=IGNORE_INDEX).item())


def _reference_ctc_by_loops(t, s, loc, flags, temp, eps=1e-4):
    """The ToCo code's CTCLoss_neg written out with Python loops: t (G, B, D), s (G, B, D), loc (L, B, D) lists;
    flags[b][l] True = local crop l of image b is positive. Every global view is a positive, the same view too."""
    G, B = len(t), len(t[0])
    total = 0.0
    for b in range(B):
        views = [s[g][b] for g in range(G)] + [loc[l][b] for l in range(len(loc))]
        positive = [True] * G + [flags[b][l] for l in range(len(loc))]
        image_loss = 0.0
        for g in range(G):
            e = [math.exp(_dot(t[g][b], v) / temp) for v in views]
            negatives = sum(x for x, p in zip(e, positive) if not p)
            for x, p in zip(e, positive):
                if p:
                    image_loss += -math.log(x / (x + negatives + eps))
            image_loss += -math.log(1 / (1 + negatives + eps))  # the for-else clause's extra term
        total += image_loss / G / (sum(positive) + eps)
    return total / B


def test_ctc_loss_reference_form_by_hand():
    g = torch.Generator().manual_seed(3)
    teacher, student, locals_ = (torch.randn(n, 2, 5, generator=g, dtype=torch.float64) for n in (2, 2, 3))
    flags = [[True, False, False], [True, True, True]]  # image 1: no negative at all
    expected = _reference_ctc_by_loops(teacher.tolist(), student.tolist(), locals_.tolist(), flags, temp=0.5)
    loss = ctc_loss(teacher.float(), student.float(), locals_.float(), torch.tensor(flags).t(), temperature=0.5,
                    form="reference")
    _close(loss, expected)
    fixed = ctc_loss(teacher.float(), student.float(), locals_.float(), torch.tensor(flags).t(), temperature=0.5)
    assert abs(fixed.item() - expected) > 0.05  # the two forms are different losses


def test_ctc_loss_reference_form_stays_finite_where_the_reference_overflows():
    g = torch.Generator().manual_seed(0)
    teacher = 30 * torch.randn(2, 2, 16, generator=g)  # t.s / T reaches thousands: exp() overflows in fp32
    student = (30 * torch.randn(2, 2, 16, generator=g)).requires_grad_(True)
    locals_ = (30 * torch.randn(4, 2, 16, generator=g)).requires_grad_(True)
    flags = torch.tensor([[True, False], [False, True], [False, False], [True, True]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ctc_loss(teacher, student, locals_, flags, form="reference")
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert torch.isfinite(student.grad).all() and torch.isfinite(locals_.grad).all()
    with pytest.raises(ValueError, match="ctc form"):
        ctc_loss(teacher, student, locals_, flags, form="dino")

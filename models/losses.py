"""ToCo training losses (METHODS.md §1), as plain functions on tensors.

Every loss is computed in fp32 (autocast is switched off inside), returns a 0-dim tensor, and is 0 rather than
NaN when the pairs / pixels it averages over are missing; gradients stay finite there too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.configs import CTC_FORMS


@dataclass(frozen=True)
class LossWeights:
    """Loss weights and schedule of the ToCo code (VOC)."""

    cls: float = 1.0  # multilabel soft margin on the final tokens
    aux_cls: float = 1.0  # same on block -3
    ptc: float = 0.2  # patch token contrast
    ctc: float = 0.5  # class token contrast
    seg: float = 0.1  # segmentation head on online pseudo labels
    reg: float = 0.05  # dense-CRF regulariser (optional)
    seg_start_iter: int = 2000  # seg and reg are switched on after this many iterations
    ctc_temperature: float = 0.5  # COCO: 1.0


def _no_autocast(t: torch.Tensor) -> torch.autocast:
    return torch.autocast(device_type=t.device.type, enabled=False)


def multilabel_cls_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multi-label soft margin: mean over images and classes of the binary logistic loss. (B, K), (B, K)."""
    with _no_autocast(logits):
        return F.multilabel_soft_margin_loss(logits.float(), labels.float())


def _mean_or_zero(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """total / count, or 0 where count == 0 (no host sync, no NaN in value or gradient)."""
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def _token_pairs(tokens: torch.Tensor, token_labels: torch.Tensor, ignore_index: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cosine (B, N, N), positive pairs, negative pairs) of the patch tokens of each image, fp32.

    Positives: same label; negatives: different labels; pairs with an ignored token and the diagonal are neither.
    """
    b, c, h, w = tokens.shape
    x = F.normalize(tokens.float().reshape(b, c, h * w), p=2, dim=1, eps=1e-8)  # (B, C, N)
    sim = torch.bmm(x.transpose(1, 2), x)  # (B, N, N)
    lab = token_labels.reshape(b, h * w)
    valid = lab != ignore_index  # (B, N)
    pair_valid = valid[:, :, None] & valid[:, None, :]  # (B, N, N)
    pair_valid &= ~torch.eye(h * w, dtype=torch.bool, device=tokens.device)
    same = lab[:, :, None] == lab[:, None, :]
    return sim, (pair_valid & same).float(), (pair_valid & ~same).float()


def ptc_loss(tokens: torch.Tensor, token_labels: torch.Tensor, *, ignore_index: int) -> torch.Tensor:
    """Patch token contrast (ToCo `get_masked_ptc_loss`).

    tokens: (B, C, h, w) final patch tokens; token_labels: (B, h, w) long, ignore_index ignored.
    S = |cos| between tokens of the same image; positives = same label, negatives = different labels; pairs
    with an ignored token and the diagonal are skipped. Loss = 0.5 (1 - mean S over positives) +
    0.5 mean S over negatives, the means pooled over the whole batch (as the reference). A term is 0 when
    the batch has no pair of its kind (the reference's "+1" in the denominator biased both terms instead).
    """
    with _no_autocast(tokens):
        sim, pos, neg = _token_pairs(tokens, token_labels, ignore_index)
        sim = sim.abs()
        pos_term = _mean_or_zero(((1.0 - sim) * pos).sum(), pos.sum())  # 1 - mean S over positives
        neg_term = _mean_or_zero((sim * neg).sum(), neg.sum())
        return 0.5 * pos_term + 0.5 * neg_term


def pcl_loss(tokens: torch.Tensor, token_labels: torch.Tensor, *, ignore_index: int) -> torch.Tensor:
    """APC's patch contrastive learning (METHODS.md §3): same-class patch embeddings together, others apart.

    Same pairs as :func:`ptc_loss`, but with the *signed* cosine S: loss = 0.5 mean(1 - S) over positives +
    0.5 mean(max(S, 0)) over negatives. PTC's |cos| is satisfied by anti-parallel positives and counts
    anti-parallel negatives as similar; here positives must point the same way and negatives are done once
    orthogonal. Labels come from the final CAM (``training/toco_step.py``), so PCL needs no auxiliary head.
    """
    with _no_autocast(tokens):
        sim, pos, neg = _token_pairs(tokens, token_labels, ignore_index)
        pos_term = _mean_or_zero(((1.0 - sim) * pos).sum(), pos.sum())
        neg_term = _mean_or_zero((sim.clamp(min=0) * neg).sum(), neg.sum())
        return 0.5 * pos_term + 0.5 * neg_term


def ctc_loss(teacher_globals: torch.Tensor, student_globals: torch.Tensor, student_locals: torch.Tensor,
             local_positive: torch.Tensor, temperature: float = LossWeights.ctc_temperature,
             form: str = "fixed") -> torch.Tensor:
    """Class token contrast (ToCo `CTCLoss_neg`), InfoNCE per image, log-sum-exp in fp32.

    Shapes, view-major like the model's concatenated crops:
    - teacher_globals: (G, B, D) teacher head outputs of the G global views (G = 2);
    - student_globals: (G, B, D) student head outputs of the same G views, same order;
    - student_locals: (L, B, D) student head outputs of the L local crops (L = 8);
    - local_positive: (L, B) bool, True where a local crop is positive (mean region value > 0.2).
    For image b and teacher view g, positives are the student outputs of the *other* global views and of the
    positive local crops; negatives are the negative local crops of image b. With logits z = t.s / T:
        loss(b, g, p) = -log(exp(z_p) / (exp(z_p) + sum_n exp(z_n))) = softplus(logsumexp_n z_n - z_p).
    Per image: the mean over its (g, p) pairs; 0 when it has no positive or no negative. Result: mean over B
    (images without a term count as 0, as in the reference's sum / b).
    Deliberate differences from the reference: the same-view pair (t_g, s_g) is not a positive (the teacher
    is an EMA copy on the same features, so that pair is trivially similar; DINO skips it as well), the
    "+1e-4" inside the log and the spurious extra term of its for-else clause are dropped. The outputs are
    used as given (no normalisation here), as in the reference.
    ``form="reference"`` computes the reference's loss instead (:func:`ctc_loss_reference`).
    """
    if form == "reference":
        return ctc_loss_reference(teacher_globals, student_globals, student_locals, local_positive, temperature)
    if form != "fixed":
        raise ValueError(f"ctc form must be one of {CTC_FORMS}, got {form!r}")
    g, b, _ = teacher_globals.shape
    with _no_autocast(teacher_globals):
        students = torch.cat([student_globals, student_locals], dim=0).float()  # (V, B, D)
        z = torch.einsum("gbd,vbd->bgv", teacher_globals.float(), students) / temperature  # (B, G, V)
        local_pos = local_positive.bool().t()  # (B, L)
        other_global = ~torch.eye(g, dtype=torch.bool, device=z.device)  # (G, G)
        pos = torch.cat([other_global[None].expand(b, g, g), local_pos[:, None].expand(b, g, -1)], dim=2)
        neg = torch.cat([torch.zeros_like(other_global)[None].expand(b, g, g),
                         (~local_pos)[:, None].expand(b, g, -1)], dim=2)  # (B, G, V)
        # finite fill instead of -inf keeps logsumexp's gradient finite when an image has no negative
        lowest = torch.finfo(z.dtype).min
        lse_neg = z.masked_fill(~neg, lowest).logsumexp(dim=2, keepdim=True)  # (B, G, 1)
        has_neg = neg.any(dim=2, keepdim=True)
        pair_loss = F.softplus(lse_neg - z)  # (B, G, V)
        use = pos & has_neg
        pair_loss = torch.where(use, pair_loss, torch.zeros_like(pair_loss))
        per_image = _mean_or_zero(pair_loss.sum(dim=(1, 2)), use.sum(dim=(1, 2)).float())  # (B,)
        return per_image.mean()


def ctc_loss_reference(teacher_globals: torch.Tensor, student_globals: torch.Tensor, student_locals: torch.Tensor,
                       local_positive: torch.Tensor, temperature: float = LossWeights.ctc_temperature,
                       eps: float = 1e-4) -> torch.Tensor:
    """The ToCo code's class token contrast (``CTCLoss_neg``) exactly, in a numerically safe form.

    Same inputs as :func:`ctc_loss`. Views v = the G global views then the L local crops; every global view is
    positive (its flag is 1 in the reference), a local crop as ``local_positive`` says. With z = t_g.s_v / T,
    E = exp(z) and N_g = sum of E over the negative views of the image, the reference's loss of image b is

        ( sum_g [ sum_{v positive} -log(E_gv / (E_gv + N_g + eps)) - log(1 / (1 + N_g + eps)) ] ) / G / (P + eps)

    with P the number of positive views (the G global ones included), and the result is the mean over images. So,
    unlike the ``fixed`` form: the same-view pair (t_g, s_g) is a positive, each teacher view adds the extra term
    -log(1 / (1 + N_g + eps)) (its for-else clause), eps = 1e-4 sits in every denominator, and an image without
    negatives still counts (its terms are ~eps, not 0). The reference exponentiates z directly (inf beyond
    z ~ 88 in fp32); here each log of a ratio is a difference of log-sum-exps, equal up to rounding, finite always.
    """
    g, b, _ = teacher_globals.shape
    with _no_autocast(teacher_globals):
        students = torch.cat([student_globals, student_locals], dim=0).float()  # (V, B, D)
        z = torch.einsum("gbd,vbd->bgv", teacher_globals.float(), students) / temperature  # (B, G, V)
        local_pos = local_positive.bool().t()  # (B, L)
        pos = torch.cat([torch.ones(b, g, dtype=torch.bool, device=z.device), local_pos], dim=1)  # (B, V)
        log_eps = z.new_full((b, g, 1), math.log(eps))
        lowest = torch.finfo(z.dtype).min
        neg_z = z.masked_fill(pos[:, None, :], lowest)  # (B, G, V): only the negatives count
        log_neg_eps = torch.cat([neg_z, log_eps], dim=2).logsumexp(dim=2, keepdim=True)  # log(N_g + eps), (B, G, 1)
        pair = torch.logaddexp(z, log_neg_eps) - z  # -log(E / (E + N + eps)), (B, G, V)
        pair = torch.where(pos[:, None, :], pair, torch.zeros_like(pair))
        extra = F.softplus(log_neg_eps[..., 0])  # log(1 + N_g + eps), (B, G)
        per_image = (pair.sum(dim=2) + extra).sum(dim=1) / g / (pos.sum(dim=1).float() + eps)  # (B,)
        return per_image.mean()


def balanced_seg_loss(seg_logits: torch.Tensor, pseudo: torch.Tensor, *, ignore_index: int) -> torch.Tensor:
    """0.5 CE over background pixels + 0.5 CE over foreground pixels (ToCo `get_seg_loss`).

    seg_logits: (B, K+1, h, w), upsampled bilinearly to the label size if smaller; pseudo: (B, H, W) long,
    ``ignore_index`` ignored.
    Each side's CE is a mean over its pixels in the whole batch; a side with no pixel contributes 0 (the
    reference gives NaN), and the other side keeps its 0.5 weight. All ignored -> exactly 0.
    """
    with _no_autocast(seg_logits):
        logits = seg_logits.float()
        if logits.shape[-2:] != pseudo.shape[-2:]:
            logits = F.interpolate(logits, size=pseudo.shape[-2:], mode="bilinear", align_corners=False)
        pseudo = pseudo.long()
        ce = F.cross_entropy(logits, pseudo, ignore_index=ignore_index, reduction="none")  # (B, H, W)
        bg = pseudo == 0
        fg = (pseudo != 0) & (pseudo != ignore_index)
        zero = torch.zeros_like(ce)
        bg_loss = _mean_or_zero(torch.where(bg, ce, zero).sum(), bg.sum().float())
        fg_loss = _mean_or_zero(torch.where(fg, ce, zero).sum(), fg.sum().float())
        return 0.5 * (bg_loss + fg_loss)

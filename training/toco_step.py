"""One ToCo training step as a module, so that DDP sees one forward (METHODS.md §1).

Passes: the training crop and the second global view go through the encoder as ONE batch of 2B; the local crops
(a different size) are the second pass; nothing else touches the encoder. With ``cam_scales == (1.0,)`` the
auxiliary CAM that labels PTC tokens and places local crops, and the final CAM behind the online pseudo labels,
come from that same pass (detached) instead of extra multi-scale passes; other scales run the reference's
no-grad multi-scale CAM. The EMA teacher projects the student's detached class tokens (shared encoder).

With an augmentation config (``train_classifier.augment``), the views are the reference's (training/views.py): the
training crop is flipped again (with its valid mask), jittered and blurred on the device; the second global view
comes from the loader's crop of the original image (``second``); the local crops are cut from a separately
jittered copy, in the same geometry, and flipped per image afterwards. Without one, the second view is
``models.ctc.augment_view`` of the training crop and nothing else is augmented here. From ``seg_start_iter`` on, the
dense CRF energy (models/energy.py) regularises the seg head when ``loss.crf_energy.weight`` > 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from config.schema import ClassifierAugmentConfig
from models.affinity import affinity_loss, affinity_targets
from models.backbone import patch_stride
from models.cam import cam_to_size, cams_at_tokens, multiscale_cam, normalise_cams, valid_at_tokens
from models.configs import ToCoLossConfig
from models.ctc import ViewAugConfig, augment_view, region_from_labels, sample_local_crops
from models.energy import crf_energy_loss
from models.losses import balanced_seg_loss, ctc_loss, multilabel_cls_loss, pcl_loss, ptc_loss
from models.pseudo import label_ignore_middle, online_pseudo_labels
from models.toco import ToCo
from shards.records import IGNORE_INDEX
from training.data import IMAGENET_MEAN, IMAGENET_STD, denormalize
from training.views import flip_local_crops, main_view, second_view


class ToCoTrainer(nn.Module):
    def __init__(self, model: ToCo, cfg: ToCoLossConfig, augment: ClassifierAugmentConfig | None = None):
        super().__init__()
        self.model, self.cfg, self.augment = model, cfg, augment

    def _cam(self, tokens: torch.Tensor, head: str, x: torch.Tensor, labels, valid) -> torch.Tensor:
        """Normalised CAM (B, K, S, S), no gradient: from this pass's tokens, or multi-scale passes."""
        with torch.no_grad():
            if tuple(self.cfg.cam_scales) != (1.0,):
                return multiscale_cam(self.model, x, self.cfg.cam_scales, head=head, labels=labels, valid=valid)
            conv = self.model.classifier if head == "final" else self.model.aux_classifier
            cam = F.relu(F.conv2d(tokens.detach().float(), conv.weight.float()))  # (B, K, h, w)
            cam = cam_to_size(cam, x.shape[-2:], x.shape[-2:], patch_stride(self.model.backbone))
            return normalise_cams(cam, labels, valid)

    def forward(self, x: torch.Tensor, valid: torch.Tensor, labels: torch.Tensor, step: int,
                generator: torch.Generator | None = None, second: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """x (B, 3, S, S) normalised training crops, valid (B, S, S) bool, labels (B, K) multi-hot; ``second``
        (B, 3, S, S): the loader's crop of the original image (``augment.second_view: original``)."""
        cfg, model, aug = self.cfg, self.model, self.augment
        net = model.cfg  # the heads that exist decide which losses run
        B = x.shape[0]
        loaded, local_source = x, x
        if aug is not None:
            x, valid, local_source = main_view(x, valid, aug, generator, with_local=net.use_ctc)
        views = x
        if net.use_ctc:
            if aug is None:
                second = augment_view(x, ViewAugConfig(), generator=generator, mean=IMAGENET_MEAN, std=IMAGENET_STD)
            elif aug.second_view == "original":
                if second is None:
                    raise ValueError("augment.second_view is 'original' but the batch has no 'second' image (the "
                                     "loader's crop of the original image: training.data.TrainCrops)")
                second = second_view(second, aug, generator)
            else:
                second = second_view(loaded, aug, generator)
            views = torch.cat([x, second], dim=0)  # (2B, 3, S, S): one encoder pass for both global views
        run_seg = net.use_seg_head and step >= cfg.seg_start_iter
        out = model(views, with_seg=run_seg)
        zero = x.new_zeros(())
        losses = {"cls": multilabel_cls_loss(out["logits"][:B], labels)}
        losses["aux"] = multilabel_cls_loss(out["aux_logits"][:B], labels) if net.use_aux else zero

        need_aux_cam = net.use_aux and (cfg.use_ptc or net.use_ctc)
        if need_aux_cam:
            aux_cam = self._cam(out["aux_tokens"][:B], "aux", x, labels, valid)  # (B, K, S, S)
        if cfg.use_ptc and need_aux_cam:
            grid = out["tokens"].shape[-2:]
            token_labels = label_ignore_middle(cams_at_tokens(aux_cam, grid), labels, cfg.thresholds.high,
                                               cfg.thresholds.low, ignore_index=IGNORE_INDEX)  # (B, h, w)
            token_labels = token_labels.masked_fill(~valid_at_tokens(valid, grid), IGNORE_INDEX)
            losses["ptc"] = ptc_loss(out["tokens"][:B], token_labels, ignore_index=IGNORE_INDEX)
        else:
            losses["ptc"] = zero

        if net.use_ctc:
            if need_aux_cam:
                pixel_labels = label_ignore_middle(aux_cam, labels, cfg.thresholds.high, cfg.thresholds.low,
                                                   ignore_index=IGNORE_INDEX)
            else:  # without the aux head every pixel counts as uncertain
                pixel_labels = torch.full(valid.shape, IGNORE_INDEX, dtype=torch.long, device=x.device)
            regions = region_from_labels(pixel_labels, ignore_index=IGNORE_INDEX)
            crops, positive = sample_local_crops(local_source, regions, cfg.local_crops, cfg.local_crop_size,
                                                 generator=generator, valid=valid)
            if aug is not None:
                crops = flip_local_crops(crops, cfg.local_crops, aug, generator)
            local_tokens = model.class_token(crops)  # (B*n, C): the second and last encoder pass
            n = cfg.local_crops
            students = model.project(torch.cat([out["cls_token"], local_tokens], dim=0))
            D = students.shape[-1]
            student_globals = students[:2 * B].view(2, B, D)
            student_locals = students[2 * B:].view(B, n, D).transpose(0, 1)  # (n, B, D)
            teacher_globals = model.project_teacher(out["cls_token"].detach()).view(2, B, D)
            losses["ctc"] = ctc_loss(teacher_globals, student_globals, student_locals,
                                     positive.view(B, n).t(), cfg.ctc_temperature, form=cfg.ctc_form)
        else:
            losses["ctc"] = zero

        # AFA's affinity loss, like the segmentation head, learns from the PAR-refined online pseudo labels
        run_afa = net.use_afa and step >= cfg.seg_start_iter
        final_cam = self._cam(out["tokens"][:B], "final", x, labels, valid) if (run_seg or run_afa or cfg.use_pcl) \
            else None
        pseudo = online_pseudo_labels(final_cam, labels, denormalize(x), cfg.thresholds, cfg.par, valid,
                                      ignore_index=IGNORE_INDEX) if (run_seg or run_afa) else None
        losses["seg"] = balanced_seg_loss(out["seg"][:B], pseudo, ignore_index=IGNORE_INDEX) if run_seg else zero
        losses["energy"] = crf_energy_loss(denormalize(x), out["seg"][:B], pseudo, valid, cfg.crf_energy,
                                           ignore_index=IGNORE_INDEX) if run_seg and cfg.crf_energy.weight > 0 else zero
        grid = out["tokens"].shape[-2:]
        if run_afa:
            token_pseudo = F.interpolate(pseudo[:, None].float(), size=grid, mode="nearest")[:, 0].long()
            targets = affinity_targets(token_pseudo, cfg.afa_radius, ignore_index=IGNORE_INDEX)
            losses["afa"] = affinity_loss(out["affinity_logits"][:B], targets)
        else:
            losses["afa"] = zero
        if cfg.use_pcl:  # APC: token labels from the final CAM (ignore-middle), signed-cosine contrast
            token_labels = label_ignore_middle(cams_at_tokens(final_cam, grid), labels, cfg.thresholds.high,
                                               cfg.thresholds.low, ignore_index=IGNORE_INDEX)
            token_labels = token_labels.masked_fill(~valid_at_tokens(valid, grid), IGNORE_INDEX)
            losses["pcl"] = pcl_loss(out["tokens"][:B], token_labels, ignore_index=IGNORE_INDEX)
        else:
            losses["pcl"] = zero
        losses["trt"] = multilabel_cls_loss(out["trt_logits"][:B], labels) if net.use_trt else zero

        losses["total"] = (losses["cls"] + cfg.aux_weight * losses["aux"] + cfg.ptc_weight * losses["ptc"]
                           + cfg.ctc_weight * losses["ctc"] + cfg.seg_weight * losses["seg"]
                           + cfg.afa_weight * losses["afa"] + cfg.pcl_weight * losses["pcl"]
                           + cfg.trt_weight * losses["trt"] + cfg.crf_energy.weight * losses["energy"])
        return losses

"""ToCo: a timm ViT with max-pooled CAM classifiers, a LargeFOV segmentation head and a CTC projection head.

METHODS.md §1. One encoder pass per view gives everything a training step needs: the final patch tokens
(after the final LayerNorm) for the classifier, the CAM, the segmentation head and PTC; the tokens of
block ``aux_layer`` (−3, *before* the final norm) for the auxiliary classifier and its CAM; and the class
token for CTC. No head uses the class token for classification.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models import attention
from models.affinity import AffinityHead
from models.backbone import create_vit, patch_grid
from models.configs import ToCoConfig
from models.ctc import EmaTeacher, ProjectionHead
from models.pooling import adaptive_k_pool
from models.trt import ReAttention, foreground_map, preliminary_attention, select_tokens

HEADS = ("final", "aux", "fg")  # "fg": TRT's class-agnostic foreground map (use_trt)


def backbone_arguments(cfg: ToCoConfig) -> dict[str, Any]:
    """The architecture of ``cfg``'s ViT as ``models.backbone.create_vit`` arguments (its weights aside)."""
    return dict(img_size=cfg.img_size, patch_size=cfg.patch_size or None, drop_path_rate=cfg.drop_path_rate,
                freeze_pos_embed=cfg.freeze_pos_embed, stem=cfg.stem, stem_output_stride=cfg.stem_output_stride,
                freeze_stem=cfg.freeze_stem, **cfg.backbone_kwargs())


class LargeFOV(nn.Module):
    """DeepLab-LargeFOV head: two dilated 3×3 convs with ReLU, then a 1×1 classifier."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 512, dilation: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(in_dim, hidden_dim, 3, padding=dilation, dilation=dilation)
        self.conv2 = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=dilation, dilation=dilation)
        self.classifier = nn.Conv2d(hidden_dim, out_dim, 1)
        for conv in (self.conv1, self.conv2, self.classifier):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.classifier(x)


class ToCo(nn.Module):
    def __init__(self, cfg: ToCoConfig = ToCoConfig(), backbone: nn.Module | None = None):
        """``backbone``: the ViT (``training/classifier_model.py: build_classifier`` loads its weights); None
        builds a random one, which ``cfg.pretrained`` and ``cfg.stem_weights`` must then not ask to replace (weights
        are loaded outside models/)."""
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        if backbone is None:
            if cfg.pretrained not in ("none", "", None) or (cfg.stem and cfg.stem_weights):
                raise ValueError(f"ToCo(cfg) builds a random backbone; cfg.pretrained={cfg.pretrained!r} and "
                                 f"cfg.stem_weights={cfg.stem_weights!r} are loaded by "
                                 "training.classifier_model.build_classifier")
            backbone = create_vit(cfg.backbone, **backbone_arguments(cfg))
        self.backbone = backbone
        depth = len(self.backbone.blocks)
        if not -depth <= cfg.aux_layer < depth:
            raise ValueError(f"aux_layer {cfg.aux_layer} is outside the backbone's {depth} blocks")
        self.aux_index = cfg.aux_layer % depth
        self.num_prefix_tokens = self.backbone.num_prefix_tokens
        self.has_class_token = getattr(self.backbone, "cls_token", None) is not None
        dim = self.backbone.num_features
        K = cfg.num_classes
        self.classifier = nn.Conv2d(dim, K, 1, bias=False)
        self.aux_classifier = nn.Conv2d(dim, K, 1, bias=False) if cfg.use_aux else None
        self.seg_head = LargeFOV(dim, K + 1, cfg.seg_dim, cfg.seg_dilation) if cfg.use_seg_head else None
        self.proj_head = self.teacher = None
        if cfg.use_ctc:
            if not self.has_class_token:
                raise ValueError(f"backbone {cfg.backbone!r} has no class token; CTC needs one "
                                 "(set use_ctc: false or pick a ViT with a class token)")
            self.proj_head = ProjectionHead(dim, cfg.proj_hidden_dim, cfg.proj_bottleneck_dim, cfg.proj_out_dim,
                                            cfg.proj_norm_last_layer)
            self.teacher = EmaTeacher(self.proj_head, cfg.ema_momentum)
        # Heads on attention scores: only the blocks they read leave the fused attention kernel.
        blocks = self.backbone.blocks
        self.afa_blocks: list[nn.Module] = []
        self.trt_blocks: list[nn.Module] = []
        self.affinity_head = self.reattention = None
        if cfg.use_afa:
            if not 1 <= cfg.afa_layers <= depth:
                raise ValueError(f"afa_layers {cfg.afa_layers} must be in 1..{depth} (the backbone's blocks)")
            self.afa_blocks = list(blocks[depth - cfg.afa_layers:])
            for block in self.afa_blocks:
                attention.capture(block, ("scores",))
            self.affinity_head = AffinityHead(cfg.afa_layers * self.afa_blocks[0].attn.num_heads)
        if cfg.use_trt:
            if not self.has_class_token or depth < 2:
                raise ValueError("TRT needs a backbone with a class token and at least 2 blocks")
            self.trt_blocks = list(blocks[:depth - 1])
            for block in self.trt_blocks:
                attention.capture(block, ("cls",))
            self.reattention = ReAttention(dim, K, blocks[-1].attn.num_heads)

    # ----------------------------------------------------------------------------------------- encoder
    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """One encoder pass: final tokens (B, C, h, w) after the final norm, aux tokens before it, class token.

        With AFA also ``affinity_logits`` (B, N, N) between the N = h·w patch tokens; with TRT ``fg`` (B, 1, h, w)
        in [0, 1] and the re-attention classifier's ``trt_logits`` (B, K).
        """
        final, (aux_tokens,) = self.backbone.forward_intermediates(
            x, indices=[self.aux_index], norm=False, output_fmt="NCHW")  # final: (B, prefix + h*w, C) normed
        B, _, C = final.shape
        h, w = aux_tokens.shape[-2:]
        P = self.num_prefix_tokens
        tokens = final[:, P:].reshape(B, h, w, C).permute(0, 3, 1, 2)  # (B, C, h, w)
        cls_token = final[:, 0] if self.has_class_token else None  # (B, C)
        out = {"tokens": tokens, "aux_tokens": aux_tokens, "cls_token": cls_token}
        if self.affinity_head is not None:
            scores = torch.cat([attention.captured(b, "scores")[:, :, P:, P:] for b in self.afa_blocks], dim=1)
            out["affinity_logits"] = self.affinity_head(scores)  # (B, N, N)
        if self.reattention is not None:
            with torch.no_grad():
                prelim = preliminary_attention([attention.captured(b, "cls_probs") for b in self.trt_blocks], P)
                keep = select_tokens(prelim, self.cfg.trt_theta)
            out["trt_logits"], scores = self.reattention(cls_token, final[:, P:], keep)
            out["fg"] = foreground_map(prelim, scores.detach(), keep, (h, w))
        attention.release(self.afa_blocks + self.trt_blocks)
        return out

    def class_token(self, x: torch.Tensor) -> torch.Tensor:
        """Final (normed) class token only, for the extra CTC views (B, C)."""
        if not self.has_class_token:
            raise ValueError("this backbone has no class token")
        token = self.backbone.forward_features(x)[:, 0]
        attention.release(self.afa_blocks + self.trt_blocks)
        return token

    # ----------------------------------------------------------------------------------------- heads
    def pooled_logits(self, tokens: torch.Tensor, head: str = "final", valid: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """Image logits (B, K) of ``head`` from its token map (B, C, h, w): global max pooling of the features then
        the 1×1 classifier (ToCo), or Adaptive-K pooling of the patch logits (APC). ``valid`` (B, h, w) bool
        keeps padding tokens out (an image without a valid token uses them all)."""
        conv = self._cam_head(head)
        if valid is not None:
            valid = valid | ~valid.flatten(1).any(dim=1)[:, None, None]
        if self.cfg.pooling == "akp":
            patch = F.conv2d(tokens, conv.weight).flatten(2)  # (B, K, N)
            return adaptive_k_pool(patch, self.cfg.akp_ratio, None if valid is None else valid.flatten(1))
        if valid is None:
            return conv(F.adaptive_max_pool2d(tokens, 1)).flatten(1)  # (B, K): global max pooling, then 1×1
        pooled = tokens.float().masked_fill(~valid[:, None], float("-inf")).amax(dim=(-2, -1))  # (B, C)
        return pooled @ conv.weight.flatten(1).float().T  # (B, K)

    def forward(self, x: torch.Tensor, *, with_heads: bool = True, with_seg: bool = True,
                with_proj: bool = False) -> dict[str, torch.Tensor | None]:
        """Logits (B, K), aux logits (B, K), tokens, aux tokens, class token (B, C), seg (B, K+1, h, w).

        ``with_heads=False`` skips the classifiers and the seg head (extra CTC views); ``with_proj`` adds the
        student and teacher projections of the class token (``proj``, ``proj_teacher``), so that a DDP-wrapped
        model reaches every trainable parameter through its forward.
        """
        out = self.encode(x)
        with_seg = with_seg and with_heads and self.seg_head is not None
        with_aux = with_heads and self.aux_classifier is not None
        out["logits"] = self.pooled_logits(out["tokens"], "final") if with_heads else None
        out["aux_logits"] = self.pooled_logits(out["aux_tokens"], "aux") if with_aux else None
        out["seg"] = self.seg_head(out["tokens"]) if with_seg else None
        if with_proj:
            out["proj"] = self.project(out["cls_token"])
            out["proj_teacher"] = self.project_teacher(out["cls_token"])
        return out

    def _cam_head(self, head: str) -> nn.Conv2d:
        if head == "final":
            return self.classifier
        if head == "aux":
            if self.aux_classifier is None:
                raise ValueError("the auxiliary classifier is disabled (use_aux: false)")
            return self.aux_classifier
        if head == "fg":
            raise ValueError("the fg map is not a classifier head")
        raise ValueError(f"unknown CAM head {head!r}; expected one of {HEADS}")

    def head_maps(self, enc: dict[str, torch.Tensor | None], heads: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
        """Raw token-grid maps of an encoding: class heads' CAMs before ReLU (B, K, h, w), TRT's fg (B, 1, h, w)."""
        maps = []
        for name in heads:
            if name == "fg":
                if enc.get("fg") is None:
                    raise ValueError("the fg map needs the TRT head (use_trt: true)")
                maps.append(enc["fg"])
            else:
                source = enc["tokens"] if name == "final" else enc["aux_tokens"]
                maps.append(F.conv2d(source, self._cam_head(name).weight))
        return tuple(maps)

    def cams(self, x: torch.Tensor, head: str | tuple[str, ...] = "final", *, relu: bool = True):
        """CAMs at the token grid: the classifier's 1×1 conv on the unpooled map, (B, K, h, w).

        ``head`` may be a tuple such as ("aux", "final"): one encoder pass, a tuple of maps back. "fg" gives TRT's
        class-agnostic map (B, 1, h, w). With only the aux head the encoder stops after block ``aux_layer``.
        """
        heads = (head,) if isinstance(head, str) else tuple(head)
        for name in heads:
            if name != "fg":
                self._cam_head(name)  # a clear error for a disabled or unknown head
        if all(name == "aux" for name in heads):
            (aux_tokens,) = self.backbone.forward_intermediates(
                x, indices=[self.aux_index], norm=False, output_fmt="NCHW", stop_early=True,
                intermediates_only=True)
            attention.release(self.afa_blocks + self.trt_blocks)
            enc = {"aux_tokens": aux_tokens}
        else:
            enc = self.encode(x)
        cams = self.head_maps(enc, heads)
        if relu:
            cams = tuple(F.relu(cam) for cam in cams)
        return cams[0] if isinstance(head, str) else tuple(cams)

    # ----------------------------------------------------------------------------------------- CTC
    def project(self, cls_token: torch.Tensor) -> torch.Tensor:
        """Student projection (N, proj_out_dim)."""
        if self.proj_head is None:
            raise ValueError("CTC is disabled (use_ctc: false)")
        return self.proj_head(cls_token)

    def project_teacher(self, cls_token: torch.Tensor) -> torch.Tensor:
        """Teacher projection of the detached student class tokens (the encoder is shared), no gradient."""
        if self.teacher is None:
            raise ValueError("CTC is disabled (use_ctc: false)")
        return self.teacher(cls_token)

    def update_teacher(self) -> None:
        if self.teacher is not None:
            self.teacher.update(self.proj_head)

    def token_grid(self, h: int, w: int) -> tuple[int, int]:
        return patch_grid(self.backbone, h, w)


def param_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(backbone params, head params) among trainable ones, for AdamW with lr and 10×lr (METHODS.md §1)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    model = getattr(model, "module", model)  # DDP wrapper
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    backbone, heads = [], []
    for p in model.parameters():
        if p.requires_grad:
            (backbone if id(p) in backbone_ids else heads).append(p)
    return backbone, heads

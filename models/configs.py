"""The hyper-parameters of the models, as typed dataclasses: one definition each, with its range and help text.

Stdlib only (no torch), so that the params schema (``config/schema.py``) holds these classes whole as sections of
``params.yaml`` and ``pipeline/`` can read them without torch. A model is built from its section as it is
(``ToCo(cfg)``, ``DeepLab(cfg)``): nothing copies a field into another config. Defaults are the reference (paper)
values; ``params.yaml`` holds the CPU preset and names every key.

Fields marked ``derived`` come from the data, not from ``params.yaml`` (the class count from the manifest, the
position-embedding grid from the training crop): the stage fills them in with ``dataclasses.replace``, and the
params loader refuses them in a params file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


def param(default: Any = dataclasses.MISSING, *, lo: float | None = None, hi: float | None = None,
          choices: tuple | None = None, help: str = "", derived: bool = False) -> Any:
    """A dataclass field with a documented default and an allowed range or set of values.

    ``lo``/``hi`` are inclusive bounds on numbers (on every element for tuples of numbers); ``help`` is the one
    description of the key (``params.yaml``'s comments are generated from it); ``derived``: set by the stage.
    Lists become tuples (frozen dataclasses stay hashable).
    """
    metadata = {"lo": lo, "hi": hi, "choices": choices, "help": help, "derived": derived}
    if isinstance(default, list):
        default = tuple(default)
    if isinstance(default, dict):
        frozen = dict(default)
        return dataclasses.field(default_factory=lambda: dict(frozen), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def section(cls: type, help: str = "") -> Any:
    """A nested config field: ``cls()`` by default, documented like any other key."""
    return dataclasses.field(default_factory=cls, metadata={"help": help or (cls.__doc__ or "").split("\n")[0]})


POOLINGS = ("gmp", "akp")
DEEPLAB_HEADS = ("v2", "v3plus")
CTC_FORMS = ("fixed", "reference")  # models/losses.py: ctc_loss (the project's) | ctc_loss_reference (the authors')
V2_DILATIONS_OS8 = (6, 12, 18, 24)  # DeepLabV2 (ASPP-L) at output stride 8
V3_DILATIONS_OS16 = (6, 12, 18)  # DeepLabV3/V3+ at output stride 16


@dataclass(frozen=True)
class ThresholdConfig:
    """CAM thresholds of ToCo (METHODS.md §1); VOC values (COCO: bkg 0.45, high 0.65, low 0.25)."""

    bkg: float = param(0.5, lo=0.0, hi=1.0, help="plain rule: class if the max CAM > bkg, else background")
    high: float = param(0.7, lo=0.0, hi=1.0, help="two-threshold rule: class above high (background plane of the "
                                                  "'high' run)")
    low: float = param(0.25, lo=0.0, hi=1.0, help="two-threshold rule: background at or below low (plane of the "
                                                  "'low' run); between the two: ignore")

    def validate(self) -> None:
        if self.low > self.high:
            raise ValueError(f"low {self.low} must not exceed high {self.high}")


@dataclass(frozen=True)
class ParConfig:
    """Pixel-adaptive refinement (AFA/ToCo code's values; models/par.py)."""

    dilations: tuple[int, ...] = param((1, 2, 4, 8, 12, 24), lo=1, help="neighbour dilations (8 neighbours each)")
    iterations: int = param(10, lo=1, hi=100, help="propagation steps")
    w1: float = param(0.3, lo=1e-6, help="temperature of the colour and position terms")
    w2: float = param(0.01, lo=0.0, help="weight of the position term")
    scale: float = param(0.5, lo=0.05, hi=1.0, help="PAR works at this fraction of the input size (ToCo: half)")


ENERGY_MODES = ("exact", "window")


@dataclass(frozen=True)
class CrfEnergyConfig:
    """The dense CRF energy regulariser of the segmentation head (the reference's "rloss", Tang et al. 2018;
    models/energy.py); the reference's values."""

    weight: float = param(0.05, lo=0.0, help="weight of the energy in the total loss; 0 = off (from seg_start_iter, "
                                             "with the seg loss)")
    normaliser: float = param(1e-7, lo=0.0, help="the energy (summed over pixel pairs, per image) times this; the "
                                                 "reference's 1e-7 is for 224x224 pairs (448 px x 0.5): scale it by "
                                                 "1/N^2 for N other pixels to keep its weight against the seg loss")
    sigma_rgb: float = param(15.0, lo=0.01, hi=255.0, help="bilateral kernel colour std (RGB 0..255)")
    sigma_xy: float = param(100.0, lo=0.01, hi=10000.0, help="bilateral kernel position std in px of the training "
                                                             "crop")
    scale: float = param(0.5, lo=0.05, hi=1.0, help="the energy is computed at this fraction of the crop size")
    mode: str = param("exact", choices=ENERGY_MODES, help="exact: every pixel pair (O(N^2), chunked) | window: "
                                                          "pairs on a strided local window")
    window_radius: int = param(24, lo=1, help="window mode: pairs at most this many px apart (rows and columns, at "
                                              "the energy's resolution)")
    window_stride: int = param(3, lo=1, help="window mode: every stride-th offset, weighted by stride^2")


@dataclass(frozen=True)
class ToCoConfig:
    """The ToCo network (METHODS.md §1): a timm ViT with CAM classifiers, a seg head and a CTC projection head."""

    num_classes: int = param(20, lo=1, derived=True, help="K foreground classes (from the manifest)")
    img_size: int = param(448, lo=16, derived=True, help="grid the position embedding is resized to (the crop)")
    backbone: str = param("vit_base_patch16_224", help="timm ViT with forward_intermediates and a class token")
    pretrained: str = param("none", help="ViT weights: none | hub (timm download) | path to .safetensors/.pth")
    patch_size: int = param(0, lo=0, help="patch size override for plain ViTs; 0 = the backbone name's")
    embed_dim: int = param(0, lo=0, help="token width override (small from-scratch models); 0 = the name's")
    depth: int = param(0, lo=0, help="transformer blocks; 0 = the name's")
    num_heads: int = param(0, lo=0, help="attention heads; 0 = the name's")
    dynamic_img_pad: bool = param(True, help="inputs of any size: timm pads them to a patch multiple")
    timm_kwargs: dict[str, Any] = param({}, help="other timm.create_model arguments (e.g. class_token: false)")
    drop_path_rate: float = param(0.0, lo=0.0, hi=1.0, help="stochastic depth rate of the backbone")
    freeze_pos_embed: bool = param(True, help="freeze the interpolated position embedding, as the reference does")
    stem: str = param("", help="timm CNN whose features replace the patch embedding (hybrid ViT); '' = patches")
    stem_weights: str = param("", help="stem weights: a path, pkg:<module>/<file>, or '' = random")
    stem_output_stride: int = param(16, choices=(8, 16, 32), help="token stride of the stem (last stage dilated)")
    freeze_stem: bool = param(False, help="keep the pretrained stem fixed (no backward through the CNN)")
    aux_layer: int = param(-3, help="block whose tokens (before the final norm) feed the auxiliary classifier")
    use_aux: bool = param(True, help="auxiliary classifier on block aux_layer (its CAM labels PTC)")
    use_seg_head: bool = param(True, help="LargeFOV segmentation head trained on online pseudo labels")
    use_ctc: bool = param(True, help="class token contrast: projection head and EMA teacher")
    seg_dim: int = param(512, lo=8, help="hidden channels of the LargeFOV segmentation head")
    seg_dilation: int = param(5, lo=1, help="dilation of the LargeFOV head's convolutions")
    proj_hidden_dim: int = param(2048, lo=8, help="CTC projection MLP hidden width")
    proj_bottleneck_dim: int = param(256, lo=8, help="CTC projection bottleneck width")
    proj_out_dim: int = param(1024, lo=8, help="CTC prototype (weight-normalised output) width")
    proj_norm_last_layer: bool = param(True, help="weight-norm magnitude of the last layer fixed at 1 (DINO)")
    ema_momentum: float = param(0.9, lo=0.0, hi=1.0, help="EMA momentum of the CTC teacher head")
    pooling: str = param("gmp", choices=POOLINGS, help="gmp: global max pooling (ToCo) | akp: APC Adaptive-K")
    akp_ratio: float = param(0.8, lo=0.01, hi=1.0, help="akp: K = patches whose sigmoid is >= ratio x the best's")
    use_afa: bool = param(False, help="AFA affinity head on the raw attention scores of the last afa_layers blocks")
    afa_layers: int = param(2, lo=1, help="last blocks whose attention scores feed the affinity head")
    use_trt: bool = param(False, help="TRT token selection + masked re-attention: a class-agnostic fg map")
    trt_theta: float = param(0.6, lo=0.01, hi=1.0, help="cumulative attention mass of the kept tokens (CUB 0.6)")

    def validate(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if not 0.0 < self.akp_ratio <= 1.0:
            raise ValueError(f"akp_ratio must be in (0, 1], got {self.akp_ratio}")
        if not 0.0 < self.trt_theta <= 1.0:
            raise ValueError(f"trt_theta must be in (0, 1], got {self.trt_theta}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if not 0.0 <= self.ema_momentum <= 1.0:
            raise ValueError(f"ema_momentum must be in [0, 1], got {self.ema_momentum}")
        if self.aux_layer == -1:
            raise ValueError("aux_layer -1 is the last block; the auxiliary head needs an earlier one")
        if self.use_afa and self.depth and self.afa_layers > self.depth:
            raise ValueError(f"afa_layers {self.afa_layers} exceeds depth {self.depth}")

    def backbone_kwargs(self) -> dict[str, Any]:
        """The extra ``timm.create_model`` arguments: the overrides that are set."""
        sizes = {"embed_dim": self.embed_dim, "depth": self.depth, "num_heads": self.num_heads}
        return {**{k: v for k, v in sizes.items() if v}, "dynamic_img_pad": self.dynamic_img_pad, **self.timm_kwargs}


@dataclass(frozen=True)
class ToCoLossConfig:
    """ToCo's losses and online pseudo labels (METHODS.md §1); the reference's VOC values."""

    aux_weight: float = param(1.0, lo=0.0, help="weight of the auxiliary classification loss")
    use_ptc: bool = param(True, help="patch token contrast on the auxiliary CAM's token labels (needs use_aux)")
    ptc_weight: float = param(0.2, lo=0.0, help="weight of PTC")
    ctc_weight: float = param(0.5, lo=0.0, help="weight of CTC (needs model.use_ctc)")
    ctc_temperature: float = param(0.5, lo=1e-3, help="CTC temperature (COCO: 1.0)")
    ctc_form: str = param("fixed", choices=CTC_FORMS, help="fixed: the project's CTC (README) | reference: the ToCo "
                                                            "code's loss exactly")
    seg_weight: float = param(0.1, lo=0.0, help="weight of the segmentation loss (needs model.use_seg_head)")
    seg_start_iter: int = param(2000, lo=0, help="the segmentation (and affinity) losses start after this step")
    local_crops: int = param(8, lo=1, help="local crops per image for CTC")
    local_crop_size: int = param(96, lo=8, help="side of a local crop in px (must fit in the training crop)")
    cam_scales: tuple[float, ...] = param((1.0, 0.5, 1.5), lo=0.1, hi=4.0,
                                          help="CAM scales of the online labels; [1.0] reuses the training pass")
    thresholds: ThresholdConfig = section(ThresholdConfig, "CAM thresholds of the online pseudo labels")
    par: ParConfig = section(ParConfig, "PAR of the online pseudo labels")
    use_pcl: bool = param(False, help="APC patch contrastive loss (signed cosine) on final-CAM token labels")
    pcl_weight: float = param(0.2, lo=0.0, help="weight of the PCL loss")
    afa_weight: float = param(0.1, lo=0.0, help="weight of the AFA affinity loss (needs model.use_afa)")
    afa_radius: int = param(8, lo=1, help="affinity-loss pairs: tokens within this many rows and columns")
    trt_weight: float = param(1.0, lo=0.0, help="weight of TRT's re-attention classifier loss (needs model.use_trt)")
    crf_energy: CrfEnergyConfig = section(CrfEnergyConfig, "dense CRF energy regulariser of the seg head's "
                                                           "softmax (rloss)")


@dataclass(frozen=True)
class DeepLabConfig:
    """A DeepLab segmenter (models/deeplab.py); defaults are DeepLabV2 ResNet-101 at output stride 8 (WSSS papers)."""

    num_classes: int = param(21, lo=2, derived=True, help="K+1: background and the K classes (from the manifest)")
    head: str = param("v2", choices=DEEPLAB_HEADS, help="v2 (ASPP branches summed: the WSSS standard) | v3plus")
    backbone: str = param("resnet101", help="timm CNN built with features_only and a dilated output stride")
    pretrained: str = param("none", help="backbone weights: none | hub | a path | pkg:<module>/<file>")
    output_stride: int = param(8, choices=(8, 16), help="8 or 16: the last stage(s) dilated instead of strided")
    aspp_dilations: tuple[int, ...] = param((), lo=1, help="[] = the head's paper rates, scaled to output_stride")
    aspp_channels: int = param(256, lo=8, help="V3+ ASPP width")
    decoder_channels: int = param(256, lo=8, help="V3+ decoder width")
    low_level_channels: int = param(48, lo=8, help="V3+ projection width of the stride-4 feature")
    aspp_dropout: float = param(0.1, lo=0.0, hi=1.0, help="V3+ dropout after the ASPP projection (V2 has none)")
    aux: bool = param(False, help="auxiliary FCN head on the second-to-last feature (deep supervision)")
    freeze_bn: bool = param(False, help="backbone BatchNorm in eval mode with fixed affine (DeepLabV2's setting)")

    def validate(self) -> None:
        if self.head not in DEEPLAB_HEADS:
            raise ValueError(f"head must be one of {DEEPLAB_HEADS}, got {self.head!r}")
        if self.output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {self.output_stride}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes counts background and needs >= 2, got {self.num_classes}")

    def dilations(self) -> tuple[int, ...]:
        """The ASPP rates: ``aspp_dilations``, else the paper's for ``head``, scaled to ``output_stride``."""
        if self.aspp_dilations:
            return tuple(self.aspp_dilations)
        if self.head == "v2":
            return tuple(d * 8 // self.output_stride for d in V2_DILATIONS_OS8)
        return tuple(d * 16 // self.output_stride for d in V3_DILATIONS_OS16)

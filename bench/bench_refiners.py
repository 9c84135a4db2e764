"""Refinement chains compared on CAM shards that already exist: CAM / pseudo-label mIoU, coverage, s per image.

    python bench/bench_refiners.py --cams data/cams --manifest data/manifest [--images 200] [--threads 1]
        [--chain par+crf --chain feature_walk+par+crf ...] [--set feature_walk.power=4 ...]
    python bench/bench_refiners.py --harder /tmp/harder --classifier data/classifier [--images 64]
    python bench/bench_refiners.py --cams data/cams --manifest data/manifest --upscale 2 \
        --variant max_side=512 --variant max_side=384 --variant "max_side=384 crf.iterations=5"

``--harder DIR`` first writes the harder shapes variant into DIR (``shapes.backgrounds: [clutter, lines]``,
``shapes.clutter: 2``, ``shapes.context_bias: 0.95``, ``--images`` train images), prepares it and dumps its CAMs
with the given trained classifier (``params.yaml``'s ``dump_cams``), then compares the chains on those CAMs: the
classifier did not see such backgrounds, so its CAMs are worse than on its own data (a stand-in for a classifier
trained on the variant, which takes a full ``train_classifier``).

Reads the first ``--images`` rows (spread over the shards: the same rows for every chain) of the CAM shards of a
finished ``dump_cams`` and their manifest rows (ground truth), and runs ``refinement.chain.refine_chunk`` (what the
``refine`` stage runs per batch) with ``params.yaml``'s ``refine`` section and ``refine.methods`` set to each chain.
Per chain:
- ``cam_miou``: the CAMs through the chain's leading CAM-level methods (``superpixel`` / ``feature_walk``; none for
  ``[par, crf]``) labelled by the plain rule at ``refine.thresholds.bkg``: what those methods do to the CAMs alone.
- ``miou`` / ``coverage`` / ``precision`` / ``recall``: the pseudo labels (ignore band, 255 = not counted) against
  the ground truth, as ``metrics/pseudo_labels.json`` computes them.
- ``s/img``: CPU seconds per image of ``refine_chunk`` (the decoded image and CAMs given; shard I/O and PNG encoding,
  which every chain shares, excluded), batches of every chain interleaved so that they share the machine's load;
  ``ratio``: against the first chain.
``--variant "key=value key=value"`` (repeatable): compare settings instead of chains: each variant is
``params.yaml``'s ``refine`` (its own chain) with these overrides on top of ``--set``; ``max_side`` may differ
between variants (each gets the image at its own working size). ``--upscale F``: images and ground truth enlarged
F times (bicubic / nearest) and the CAM rows' sizes with them, a stand-in for photos larger than the embedded set
(160-288 px) to check a working resolution against the full one; upsampled images are smoother than real photos,
so the loss a lower working resolution shows there is a lower bound.
The ``feature_walk`` backbone is built (and its weights read) before timing starts: a pool worker does that once.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from config.schema import load_params  # noqa: E402
from refinement.chain import leading_cam_methods, refine_chunk  # noqa: E402
from shards.cams import decode_cams  # noqa: E402
from shards.images import decode_mask_png, decode_rgb, long_side_size, resize_long  # noqa: E402
from shards.io import ShardSet  # noqa: E402
from shards.manifest import read_classes  # noqa: E402
from shards.metrics import ConfusionMatrix  # noqa: E402

DEFAULT_CHAINS = ("par+crf", "feature_walk+par+crf", "superpixel+par+crf", "feature_walk+superpixel+par+crf")


def load_rows(cams_dir: Path, manifest_dir: Path, images: int, upscale: float = 1.0) -> list[dict]:
    """``images`` rows, taken evenly from every shard: CAMs, image, ground truth (enlarged ``upscale`` times)."""
    names = sorted(ShardSet(cams_dir).index())
    per_shard = -(-images // len(names))
    rows = []
    for name in names:
        cams = pq.read_table(cams_dir / name, columns=["image_id", "height", "width", "cam_height", "cam_width", "classes", "cams"]).to_pylist()
        manifest = pq.read_table(manifest_dir / name, columns=["image_id", "image", "mask"]).to_pylist()
        for cam, row in list(zip(cams, manifest))[:per_shard]:
            if cam["image_id"] != row["image_id"] or not (row["mask"] or {}).get("bytes"):
                raise ValueError(f"{name}: row {cam['image_id']} has no ground truth or is not the manifest's")
            rgb, truth = decode_rgb(row["image"]["bytes"]), decode_mask_png(row["mask"]["bytes"])
            if upscale != 1.0:
                size = (round(cam["width"] * upscale), round(cam["height"] * upscale))
                rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.BICUBIC))
                truth = np.asarray(Image.fromarray(truth).resize(size, Image.NEAREST))
                cam = {**cam, "width": size[0], "height": size[1]}
            rows.append({**cam, "rgb": rgb, "truth": truth})
            if len(rows) == images:
                return rows
    return rows


def make_harder(root: Path, classifier: Path, images: int, params, threads: int) -> tuple[Path, Path]:
    """The harder shapes variant in ``root``: images, manifest, CAMs of ``classifier``; (cams, manifest)."""
    from config.schema import PrepareConfig, RuntimeConfig
    from stages import dump_cams, prepare, shapes

    if classifier is None:
        raise SystemExit("--harder needs --classifier (a train_classifier output folder)")
    cfg = dataclasses.replace(params.shapes, num_train=images, num_val=1, backgrounds=("clutter", "lines"),
                              clutter=2.0, context_bias=0.95)
    if not (root / "cams" / "index.json").exists():
        shapes.run(cfg, root / "shapes", progress=False)
        prepare.run(PrepareConfig(root=str(root / "shapes"), rows_per_shard=32), root / "manifest", progress=False)
        run_params = dataclasses.replace(params, runtime=RuntimeConfig(num_threads=threads),
                                         dump_cams=dataclasses.replace(params.dump_cams, splits=("train",)))
        result = dump_cams.run(run_params, root / "manifest", classifier, root / "cams", root / "cams.json",
                               progress=False)
        print(f"harder variant: {result['images']} images, CAMs in {result['seconds']:.0f} s", file=sys.stderr)
    return root / "cams", root / "manifest"


def override(refine, assignment: str):
    """``refine`` with ``section.key=value`` (or ``key=value``) set, the value parsed as the field's type."""
    path, _, text = assignment.partition("=")
    *sections, key = path.split(".")
    def replace(cfg, keys):
        if not keys:
            field_type = type(getattr(cfg, key))
            value = text.lower() == "true" if field_type is bool else field_type(text)
            return dataclasses.replace(cfg, **{key: value})
        return dataclasses.replace(cfg, **{keys[0]: replace(getattr(cfg, keys[0]), keys[1:])})
    return replace(refine, sections)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cams", type=Path)
    parser.add_argument("--manifest", type=Path)
    parser.add_argument("--harder", type=Path, default=None, help="write the harder variant here and use its CAMs")
    parser.add_argument("--classifier", type=Path, default=None, help="trained classifier folder (with --harder)")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--chain", action="append", default=None, help="methods joined by + (repeatable)")
    parser.add_argument("--set", action="append", default=[], help="refine overrides, e.g. feature_walk.power=4")
    parser.add_argument("--variant", action="append", default=[],
                        help="compare settings: space-separated refine overrides per variant (repeatable)")
    parser.add_argument("--upscale", type=float, default=1.0, help="enlarge images and ground truth this many times")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    refine = params.refine
    if args.harder is not None:
        args.cams, args.manifest = make_harder(args.harder, args.classifier, args.images, params, args.threads)
    elif args.cams is None or args.manifest is None:
        parser.error("give --cams and --manifest, or --harder and --classifier")
    for assignment in args.set:
        refine = override(refine, assignment)
    if args.variant:  # label -> refine params
        runs = {variant: refine for variant in args.variant}
        for variant in args.variant:
            for assignment in variant.split():
                runs[variant] = override(runs[variant], assignment)
    else:
        runs = {c: dataclasses.replace(refine, methods=tuple(c.split("+")) if c else ())
                for c in (args.chain or DEFAULT_CHAINS)}
    names = read_classes(args.manifest)["class_names"]
    num_classes = len(names)
    rows = load_rows(args.cams, args.manifest, args.images, args.upscale)
    device = torch.device("cpu")
    feature_walk = any("feature_walk" in p.methods for p in runs.values())
    if feature_walk:
        from refinement.features import cached_backbone
        cached_backbone(refine.feature_walk, str(device))  # built once per process, outside the timing
    pseudo = {c: ConfusionMatrix(num_classes) for c in runs}
    cams_cm = {c: ConfusionMatrix(num_classes) for c in runs}
    seconds = dict.fromkeys(runs, 0.0)
    feature_seconds, feature_bytes = 0.0, 0
    for start in range(0, len(rows), refine.batch_size):
        batch = rows[start: start + refine.batch_size]
        cams = [decode_cams(r) for r in batch]
        classes = [r["classes"] for r in batch]
        for run, p in runs.items():
            work = [long_side_size(r["height"], r["width"], min(p.max_side, max(r["height"], r["width"])))
                    for r in batch]
            rgbs = [np.array(resize_long(r["rgb"], max(s))) for r, s in zip(batch, work)]
            if feature_walk and run == next(iter(runs)):  # the backbone pass alone, and what storing it would take
                from refinement.features import token_features
                started = time.perf_counter()
                features = token_features(rgbs, refine.feature_walk, device)
                feature_seconds += time.perf_counter() - started
                feature_bytes += sum(2 * f.numel() for f in features)  # as fp16
            chain = p.methods
            started = time.perf_counter()
            out_sizes = [(r["height"], r["width"]) for r in batch]
            results = refine_chunk(rgbs, cams, classes, p, device, out_sizes=out_sizes)
            seconds[run] += time.perf_counter() - started
            plain = dataclasses.replace(p, methods=tuple(leading_cam_methods(list(chain))), ignore_band=False)
            for target, outputs in ((pseudo[run], results), (cams_cm[run], refine_chunk(rgbs, cams, classes, plain,
                                                                                          device, out_sizes=out_sizes))):
                for r, (mask, *_) in zip(batch, outputs):
                    if mask.shape != r["truth"].shape:
                        mask = np.asarray(Image.fromarray(mask).resize((r["width"], r["height"]), Image.NEAREST))
                    target.update(r["truth"], mask)
        print(f"{min(start + refine.batch_size, len(rows))}/{len(rows)} images", file=sys.stderr, flush=True)
    base = seconds[next(iter(runs))] / len(rows)
    print(f"\n{len(rows)} images of {args.cams}, {args.threads} thread(s), overrides {args.set or 'none'}, "
          f"upscale {args.upscale:g}\n")
    print(f"| {'variant' if args.variant else 'chain'} | CAM mIoU | pseudo mIoU | coverage | precision | recall | "
          "s/img | ratio |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    for run, p in runs.items():
        summary, per_img = pseudo[run].summary(names), seconds[run] / len(rows)
        label = f"`{run}`" if args.variant else f"[{', '.join(p.methods)}]"
        print(f"| {label} | {cams_cm[run].summary(names)['miou']:.1f} | {summary['miou']:.1f} | "
              f"{summary['coverage']:.3f} | {summary['precision']:.1f} | {summary['recall']:.1f} | {per_img:.3f} | "
              f"{per_img / base:.2f}x |")
    if feature_bytes:
        index = ShardSet(args.cams).index()
        cam_bytes = sum((args.cams / n).stat().st_size for n in index) / sum(e["rows"] for e in index.values())
        print(f"\nfeature_walk backbone ({refine.feature_walk.backbone} at {refine.feature_walk.image_size} px): "
              f"{feature_seconds / len(rows):.3f} s/img; its features stored as fp16 would take "
              f"{feature_bytes / len(rows) / 1024:.0f} KiB/img, the CAM shards take {cam_bytes / 1024:.0f} KiB/img")


if __name__ == "__main__":
    main()

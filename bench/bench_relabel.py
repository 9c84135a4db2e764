"""Relabel throughput on photos: dump_cams, refine and the whole relabel stage, this checkout vs a baseline revision.

    python bench/bench_relabel.py [--sizes 320x240 500x375] [--images 24] [--classifier data/classifier]
                                  [--baseline REV] [--repeats 1] [--embedded-rows 0]
                                  [--variant "dump_cams.flip=false ..."]

Photos: the real photographs that scikit-image ships (``skimage.data``: astronaut, chelsea, coffee, rocket, the two
views of the stereo motorcycle, the Hubble deep field, immunohistochemistry), cropped (each round a tighter, shifted
crop, every other one mirrored) and resized to each size: ``--images`` distinct untagged JPEGs per size, one
collection, as a user drops them into the inbox.

Baseline: the code and ``params.yaml`` of git revision ``--baseline`` (``git archive`` into a temporary folder), so
"before" is exactly what that revision ships; "after" is this checkout with its own ``params.yaml``. Each variant
runs in a fresh Python process, as ``dvc repro relabel@<name>`` does: ``stages.relabel.run`` on the collection
(prepare, dump_cams, refine, summary, review page), timed per part by the stage itself; "process" adds the
interpreter start and the imports. The variants alternate round by round (``--repeats``), so load on a shared
machine hits both alike; the best round is reported (no CPU seconds: pool workers are children of the forkserver,
not of the variant's process, so rusage misses them).

The two variants' pseudo labels on the photos are compared: the share of images whose tags agree and of pixels
whose label agrees (the photos have no ground truth).

``--embedded-rows N``: quality on the embedded dataset as well: the first N train rows of ``--manifest`` (default
``data/manifest``), dumped and refined by each variant with its default params (train split, ``--classifier``):
CAM mIoU and pseudo-label mIoU / coverage against the ground truth, and the time of each part.

``--variant "section.key=value ..."`` (repeatable): one more "after" variant each, this checkout with those params
changed (e.g. ``dump_cams.flip=false``), compared with the baseline like "after".

``--classifier``: a trained classifier folder (``data/classifier`` after ``make demo``); without one, a
random-weight classifier of the CPU preset's architecture (times as a trained one; its predicted tags are noise).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle:0", "stereo_motorcycle:1",
           "hubble_deep_field", "immunohistochemistry")


def photo_sources() -> list:
    import numpy as np
    import skimage.data

    images = []
    for name in SOURCES:
        base, _, index = name.partition(":")
        image = getattr(skimage.data, base)()
        image = image[int(index)] if index else image
        images.append(np.ascontiguousarray(np.asarray(image)[..., :3]))
    return images


def make_photos(folder: Path, count: int, width: int, height: int) -> list[str]:
    """``count`` distinct JPEG crops of the photos, ``width`` x ``height``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    sources, names = photo_sources(), []
    for i in range(count):
        image, round_ = sources[i % len(sources)], i // len(sources)
        h, w = image.shape[:2]
        crop_h, crop_w = h * (1.0 - 0.12 * (round_ % 6)), w * (1.0 - 0.12 * (round_ % 6))
        if crop_w / crop_h > width / height:
            crop_w = crop_h * width / height
        else:
            crop_h = crop_w * height / width
        top, left = int((h - crop_h) * ((round_ * 0.37) % 1)), int((w - crop_w) * ((round_ * 0.61) % 1))
        photo = Image.fromarray(image[top: top + int(crop_h), left: left + int(crop_w)]).resize((width, height),
                                                                                               Image.BICUBIC)
        if round_ % 2:
            photo = photo.transpose(Image.FLIP_LEFT_RIGHT)
        name = f"photo{i:03d}"
        photo.save(folder / f"{name}.jpg", quality=90)
        names.append(name)
    return names


def random_classifier(folder: Path) -> Path:
    """A random-weight classifier of the CPU preset's architecture with the embedded dataset's classes."""
    sys.path.insert(0, str(ROOT))
    import torch

    from config.schema import load_params
    from synth.shapes import CLASS_NAMES
    from training.checkpoint import save_weights
    from training.classifier_model import build_classifier, config_to_json, toco_config

    names = ["background", *CLASS_NAMES]
    cfg = toco_config(load_params(ROOT / "params.yaml").train_classifier, len(names) - 1)
    torch.manual_seed(0)
    save_weights(build_classifier(cfg), folder, config_to_json(cfg, names))
    return folder


def subset_manifest(source: Path, rows: int, out: Path) -> Path:
    """The first ``rows`` train rows of a manifest as a one-shard manifest (classes and palette kept)."""
    sys.path.insert(0, str(ROOT))
    import shutil

    import pyarrow.parquet as pq

    from shards.io import ShardSet
    from shards.manifest import manifest_files

    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / "classes.json", out / "classes.json")
    table = pq.read_table(manifest_files(source, "train")[0]).slice(0, rows)
    ShardSet(out).write("train-00000.parquet", table, fingerprint=f"bench-subset-{rows}", split="train")
    if (source / "rejects.parquet").exists():
        shutil.copy2(source / "rejects.parquet", out / "rejects.parquet")
    return out


def child(args: argparse.Namespace) -> None:
    """In a fresh process with the variant's code first on the path: one relabel (or embedded) run, as JSON."""
    started = float(os.environ["BENCH_STARTED"])
    sys.path.insert(0, str(args.code))
    os.chdir(args.code)
    import logging

    from config.schema import load_params

    logging.basicConfig(level=logging.WARNING)
    params = with_overrides(args.code / "params.yaml", args.overrides) if args.overrides else \
        load_params(args.code / "params.yaml")
    imported = time.time() - started
    if args.embedded:
        import dataclasses

        from stages import dump_cams, refine

        cfg = dataclasses.replace(params, dump_cams=dataclasses.replace(params.dump_cams, splits=("train",),
                                                                        eval_split="train"),
                                  refine=dataclasses.replace(params.refine, eval_splits=("train",), overlays=0))
        tick = time.perf_counter()
        cams = dump_cams.run(cfg, args.photos, args.classifier, args.out / "cams", args.out / "cams.json",
                             progress=False)
        dump_s = time.perf_counter() - tick
        tick = time.perf_counter()
        pseudo = refine.run(cfg, args.out / "cams", args.photos, args.out / "pseudo", args.out / "pseudo.json",
                            progress=False)
        result = {"images": cams["images"], "dump_cams": dump_s, "refine": time.perf_counter() - tick,
                  "cam_miou": cams["metrics"]["miou"], "cam_best_miou": cams["metrics"]["best_miou"],
                  "miou": pseudo["metrics"]["miou"], "coverage": pseudo["metrics"]["coverage"]}
    else:
        from stages import relabel

        summary = relabel.run(params, "bench", args.photos, args.classifier, args.out, progress=False)
        result = {"images": summary["images"], **summary["timings"], "version": summary["version"]}
    result.update(imports=imported, process=time.time() - started)
    print("BENCH " + json.dumps(result))


def with_overrides(path: Path, overrides: str):
    """The params of ``path`` with ``"section.key=value ..."`` applied (values parsed as YAML), checked by the
    schema."""
    import yaml

    from config.loader import build, read_yaml
    from config.schema import Params

    data = read_yaml(path)
    for item in overrides.split():
        key, sep, value = item.partition("=")
        *path, leaf = key.split(".")
        node = data
        for part in path:
            node = node[part]
        if not sep or leaf not in node:
            raise SystemExit(f"--variant {item!r}: expected section.key=value with a key of params.yaml")
        node[leaf] = yaml.safe_load(value)
    return build(Params, data)


def run_variant(code: Path, images: Path, classifier: Path, out: Path, embedded: bool = False,
                overrides: str = "") -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--code", str(code), "--photos", str(images),
           "--classifier", str(classifier), "--out", str(out), "--overrides", overrides] + \
        (["--embedded"] if embedded else [])
    env = {**os.environ, "BENCH_STARTED": repr(time.time()), "PYTHONPATH": str(code)}
    done = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{code}: variant failed\n{done.stderr[-4000:]}")
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("BENCH "))[6:])


def agreement(before: Path, after: Path) -> dict:
    """Tag and pixel agreement of two versions' pseudo labels of the same images."""
    import pyarrow.parquet as pq

    sys.path.insert(0, str(ROOT))
    from shards.pseudo_labels import read_mask

    def rows(folder: Path) -> dict:
        return {r["image_id"]: r for path in sorted(folder.glob("*/pseudo_labels/*.parquet"))
                for r in pq.read_table(path).to_pylist()}

    a, b = rows(before), rows(after)
    same_tags = sum(a[k]["labels"] == b[k]["labels"] for k in a)
    equal = total = 0
    for key in a:
        mask_a, mask_b = read_mask(a[key]), read_mask(b[key])
        equal, total = equal + int((mask_a == mask_b).sum()), total + mask_a.size
    return {"images": len(a), "same_tags": same_tags, "pixel_agreement": equal / max(1, total)}


def baseline_tree(rev: str, folder: Path) -> Path:
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def rate(images: int, seconds: float) -> str:
    return f"{images / seconds:.2f}" if seconds else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["320x240", "500x375"])
    parser.add_argument("--images", type=int, default=24, help="photos per size")
    parser.add_argument("--classifier", type=Path, default=ROOT / "data" / "classifier")
    parser.add_argument("--baseline", default="af99faf", help="git revision of 'before' (default: the commit this "
                                                             "bench's first RESULTS.md section measured against)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds; the best of each variant is reported")
    parser.add_argument("--embedded-rows", type=int, default=0, help="also dump + refine this many embedded train "
                                                                     "rows per variant (quality and time)")
    parser.add_argument("--manifest", type=Path, default=ROOT / "data" / "manifest")
    parser.add_argument("--variant", action="append", default=[],
                        help='another "after" variant: this checkout with "section.key=value ..." changed')
    parser.add_argument("--overrides", default="", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--embedded", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--code", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--photos", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    sys.path.insert(0, str(ROOT))  # this checkout's config/ and the rest, for the checks and the random classifier
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "before").mkdir()
        variants = {"before": (baseline_tree(args.baseline, tmp / "before"), ""), "after": (ROOT, "")}
        variants.update({f"after {v}": (ROOT, v) for v in args.variant})
        for overrides in args.variant:  # a bad key stops here, before any variant runs
            with_overrides(ROOT / "params.yaml", overrides)
        classifier = args.classifier.resolve() if args.classifier.is_dir() else random_classifier(tmp / "classifier")
        print(f"classifier {classifier}; baseline {args.baseline}; {os.cpu_count()} cores; "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
        print("\n| size | variant | images | dump_cams img/s | refine img/s | stage img/s | process img/s | "
              "process s |\n| --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
        summary = {}
        for size in args.sizes:
            width, height = (int(v) for v in size.split("x"))
            photos = tmp / f"photos-{size}"
            make_photos(photos, args.images, width, height)
            best: dict[str, dict] = {}
            for round_ in range(args.repeats):
                for k, (name, (code, overrides)) in enumerate(variants.items()):
                    out = tmp / f"out-{size}-{k}-{round_}"
                    result = run_variant(code, photos, classifier, out, overrides=overrides)
                    if name not in best or result["process"] < best[name]["process"]:
                        best[name] = {**result, "out": out}
            for name, r in best.items():
                n = r["images"]
                print(f"| {size} | {name} | {n} | {rate(n, r['dump_cams'])} | {rate(n, r['refine'])} | "
                      f"{rate(n, r['total'])} | {rate(n, r['process'])} | {r['process']:.1f} |",
                      flush=True)
            b = best["before"]
            for name in list(variants)[1:]:
                a = best[name]
                summary[size, name] = {"dump_cams": b["dump_cams"] / a["dump_cams"],
                                       "refine": b["refine"] / a["refine"], "stage": b["total"] / a["total"],
                                       "process": b["process"] / a["process"], **agreement(b["out"], a["out"])}
        print("\n| size | variant | dump_cams x | refine x | stage x | process x | same tags | pixel agreement |\n"
              "| --- | --- | --- | --- | --- | --- | --- | --- |")
        for (size, name), s in summary.items():
            print(f"| {size} | {name} | {s['dump_cams']:.2f} | {s['refine']:.2f} | {s['stage']:.2f} | "
                  f"{s['process']:.2f} | {s['same_tags']}/{s['images']} | {100 * s['pixel_agreement']:.2f}% |",
                  flush=True)
        if args.embedded_rows:
            manifest = subset_manifest(args.manifest.resolve(), args.embedded_rows, tmp / "embedded-manifest")
            print(f"\nEmbedded train rows 0-{args.embedded_rows - 1} of {args.manifest}:\n\n| variant | CAM mIoU "
                  "(best) | pseudo-label mIoU | coverage | dump_cams img/s | refine img/s |\n"
                  "| --- | --- | --- | --- | --- | --- |")
            for k, (name, (code, overrides)) in enumerate(variants.items()):
                r = run_variant(code, manifest, classifier, tmp / f"embedded-{k}", embedded=True,
                                overrides=overrides)
                print(f"| {name} | {r['cam_miou']} ({r['cam_best_miou']}) | {r['miou']} | {r['coverage']} | "
                      f"{rate(r['images'], r['dump_cams'])} | {rate(r['images'], r['refine'])} |", flush=True)


if __name__ == "__main__":
    main()

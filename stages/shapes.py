"""DVC stage ``shapes``: generate the embedded procedural dataset in PASCAL VOC layout.

Consumes: the ``shapes`` section of ``params.yaml`` (:class:`synth.shapes.ShapesConfig`); nothing else.
Produces: ``--out`` (default ``data/shapes``) with ``JPEGImages/``, ``SegmentationClass/`` (palette PNG,
255 = ignore band), ``Annotations/`` (VOC XML), ``ImageSets/Segmentation/{train,val}.txt``, ``classes.txt``
and ``generator.json`` (config and counts). ``prepare`` then reads it like any VOC folder.

Not a paper method: a stand-in for PASCAL VOC 2012 (the dataset of ToCo's experiments) that a 2-core CPU
can train on in minutes, with the two things that make VOC hard for weak supervision kept on purpose:
context bias (boats on water, planes in the sky) and occlusion. The output is a pure function of the
config, so the stage needs no resume logic: a killed run leaves only a temporary folder, and a rerun
writes the same bytes.

    python -m stages.shapes --params params.yaml --out data/shapes
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from config.loader import load_section
from config.schema import ShapesConfig
from synth.shapes import write_dataset


def run(cfg: ShapesConfig, out_dir: Path, progress: bool = True) -> dict:
    """Write the dataset to ``out_dir`` (replacing what is there); returns the counts of ``generator.json``."""
    return write_dataset(cfg, Path(out_dir), progress=progress)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    parser.add_argument("--out", type=Path, default=Path("data/shapes"), help="dataset folder to write")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    cfg = load_section(ShapesConfig, args.params, "shapes")
    start = time.perf_counter()
    counts = run(cfg, args.out, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    images = counts["train"] + counts["val"]
    size_mb = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file()) / 2**20
    print(f"shapes: {images} images ({counts['train']} train, {counts['val']} val, {counts['objects']} objects) "
          f"-> {args.out} in {seconds:.1f} s ({images / max(seconds, 1e-9):.0f} images/s, "
          f"{counts['workers']} workers, {size_mb:.1f} MiB)", flush=True)
    return counts


if __name__ == "__main__":
    main()

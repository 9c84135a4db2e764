"""DVC stage ``refine``: CAM shards -> pseudo-label shards (METHODS.md §2 "Refinement", §1 "Online pseudo labels").

Consumes ``data/cams`` (``dump_cams``) and the manifest (images for PAR/CRF colours, ground truth for metrics).
Produces ``data/pseudo_labels/``: one shard per CAM shard, same name and row order (schema in
``shards/pseudo_labels.py``), ``metrics/pseudo_labels.json`` {miou, coverage, precision, recall, per_class} over
``eval_splits`` and overlay PNGs in ``metrics/overlays/``.

The chain (``refinement/chain.py``): CAMs upsampled to the working size (the original size, long side
capped at ``max_side``), background planes at ``high`` and ``low`` (softmax stacks), the refiners of
``methods`` in order (any of ``par``, ``crf``, ``superpixel``, ``feature_walk``, ``random_walk``, ``fg_prior``;
``[]`` = thresholds only), arg-max, ToCo's combination (0 / class / 255). Masks are stored at the original size,
with their per-instance boxes (``boxes``: connected components of each class, ``shards/boxes.py``;
``boxes.min_pixels``, ``boxes.connectivity``) for detection users.

Parallel and resumable: one task per shard in a process pool (``runtime.num_workers``; "forkserver", as forking a
process that runs torch is unsafe); every shard is computed by the same function whatever the pool size, so 1 and
N processes write identical bytes. Shard fingerprint = the shard-deciding params + the CAM and manifest shards'
sha256 + code version + device type; each shard's confusion matrix is kept in the index, so a resumed run still
reports metrics over every shard.

Corrections (``--corrections``, default ``data/corrections/dataset``, written by ``python -m pipeline corrections``;
``shards/corrections.py``): the corrected mask of an image replaces its pseudo mask (``provenance: corrected``,
confidence 1). The fingerprint of a shard holding a corrected image includes that correction's sha256, so importing
corrections reruns only those shards. ``metrics/pseudo_labels.json`` reports all images and, under
``uncorrected``, the images no human corrected. A correction set of another class list, or with corrections of
images that are not in the CAM shards, stops the stage before any work (exit 2).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from config.cli import stage_arguments
from config.schema import Params, load_params_or_exit
from labelling.pseudo_labels import first_cam_row, refine_cams
from refinement.chain import check_methods
from shards.corrections import CORRECTIONS_DIR, DATASET_TARGET, CorrectionError, corrections_of
from shards.manifest import read_classes


def run(params: Params, cams_dir: Path, manifest_dir: Path, out_dir: Path, metrics_path: Path | None = None,
        overlays_dir: Path | None = None, progress: bool = True,
        corrections_dir: Path | None = None) -> dict[str, Any]:
    """The CAM shards as pseudo-label shards; returns {computed, skipped, removed, images, seconds, metrics}."""
    return refine_cams(params, cams_dir, manifest_dir, out_dir, metrics_path, overlays_dir, progress=progress,
                       corrections_dir=corrections_dir)

def main(argv: list[str] | None = None) -> int:
    args = stage_arguments(__doc__, argv, cams="data/cams", manifest="data/manifest", out="data/pseudo_labels",
                           metrics="metrics/pseudo_labels.json", overlays="metrics/overlays",
                           corrections=(f"{CORRECTIONS_DIR}/{DATASET_TARGET}",
                                        "correction set whose masks replace the pseudo masks (absent: none)"))
    params = load_params_or_exit(args.params)
    corrections = Path(args.corrections) if Path(args.corrections).is_dir() else None
    try:
        check_methods(params.refine.methods, first_cam_row(Path(args.cams)), args.cams)
        corrections_of(corrections, read_classes(Path(args.manifest))["class_names"])
    except ValueError as exc:  # CorrectionError is a ValueError too
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        run(params, Path(args.cams), Path(args.manifest), Path(args.out), Path(args.metrics), Path(args.overlays),
            corrections_dir=corrections)
    except CorrectionError as exc:  # raised before any shard is computed
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

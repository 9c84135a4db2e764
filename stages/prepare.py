"""DVC stage ``prepare``: one dataset source in, manifest shards out.

Consumes a dataset source chosen in ``params.yaml`` (``prepare.source``: the embedded ``shapes`` VOC tree, a
``voc`` tree, ``coco`` instances JSON, or a ``folder`` of images with an optional tags CSV). Produces, in the output
folder: ``<split>-NNNNN.parquet`` manifest shards (schema in ``shards/manifest.py``), ``rejects.parquet`` (every
input that could not be taken, with the reason), ``classes.json`` (class names, palette, ignore index) and
``index.json`` (per-shard rows, sha256, fingerprint). Every input image ends in exactly one of manifest and rejects.

Every input file is read once before any decoding (``labelling/ingest.py``): only regular files inside the root,
under ``max_file_bytes`` (``shards/files.py``); byte-identical images after the first are rejected (or noted).

Resumable: the input is cut into chunks of ``rows_per_shard`` records in a fixed order; each chunk's shard carries
a fingerprint of params, code and the chunk's inputs (ids, tags, and the sha256 of each row's image, mask and
annotation files or COCO segmentations). A rerun skips intact shards with a matching fingerprint and removes shards
that no longer belong.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from config.cli import stage_arguments
from config.loader import ParamsError
from config.schema import PrepareConfig, load_params
from labelling.ingest import build_manifest
from shards.io import atomic_write_json
from shards.records import DataError


def run(cfg: PrepareConfig, out_dir: Path, *, progress: bool = True) -> dict[str, Any]:
    """Ingest ``cfg.source`` into manifest shards under ``out_dir``; returns counts per split and rejects."""
    return build_manifest(cfg, out_dir, progress=progress)

def main(argv: list[str] | None = None) -> int:
    args = stage_arguments(__doc__, argv, params=("params.yaml", "params file (section 'prepare')"),
                           out=("data/manifest", "output folder for manifest shards"),
                           metrics=("metrics/prepare.json", "summary JSON for dvc metrics"))
    try:
        params = load_params(args.params)
        summary = run(params.prepare, Path(args.out))
    except (ParamsError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    atomic_write_json(args.metrics, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

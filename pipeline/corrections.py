"""``python -m pipeline corrections <package-or-collection> <folder>``: import corrected masks as a versioned input.

The target is a package folder (``data/export``: the training DAG's pseudo labels; the set ``dataset``) or the name
of a registered collection (its current version's pseudo labels; the set ``<name>``). The masks are validated and
stored by :func:`shards.corrections.import_corrections` in ``data/corrections/<set>/``, which is then ``dvc add``-ed:
the next ``dvc repro`` reruns ``refine`` (only the shards holding a corrected image) or ``relabel@<name>``, and what
depends on them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow.parquet as pq

from pipeline import dvc
from shards.collections import read_collections, read_current
from shards.corrections import DATASET_TARGET, CorrectionError, Target, import_corrections, set_folder
from shards.io import read_metadata
from shards.package import DATA_DIR, INFO_NAME


def _target_from_shards(name: str, shards: list[Path], where: Path) -> Target:
    if not shards:
        raise CorrectionError(f"{where}: no pseudo-label shards to correct")
    meta = read_metadata(shards[0])
    sizes = {}
    for path in shards:
        table = pq.ParquetFile(path).read(columns=["image_id", "width", "height"]).to_pydict()
        sizes.update({i: (w, h) for i, w, h in zip(table["image_id"], table["width"], table["height"])})
    return Target(name, tuple(meta["class_names"]), tuple(tuple(c) for c in meta["palette"]), sizes)


def resolve_target(root: Path, target: str, collections_dir: str) -> Target:
    """A package folder -> the ``dataset`` set; a registered collection name -> its set."""
    path = Path(target) if Path(target).is_absolute() else root / target
    if (path / INFO_NAME).is_file():
        return _target_from_shards(DATASET_TARGET, sorted((path / DATA_DIR).glob("*.parquet")), path)
    if target in read_collections(root):
        current = read_current(root / collections_dir, target)
        if current is None:
            raise CorrectionError(f"collection {target!r} has no relabelled version yet: run it first")
        version = root / collections_dir / target / current["version"]
        return _target_from_shards(target, sorted((version / "pseudo_labels").glob("*.parquet")), version)
    raise CorrectionError(f"{target}: neither a package folder (with {INFO_NAME}) nor a registered collection "
                          f"({read_collections(root) or 'none registered'})")


def run(root: Path, target: str, source: str, collections_dir: str) -> int:
    try:
        resolved = resolve_target(root, target, collections_dir)
        folder = set_folder(root, resolved.name)
        result = import_corrections(Path(source), folder, resolved)
    except CorrectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for where, reason in result["rejects"]:
        print(f"rejected {where}: {reason}", file=sys.stderr)
    print(f"corrections: {len(result['imported'])} masks imported into {folder.relative_to(root)} "
          f"({result['total']} corrected images in the set, {len(result['rejects'])} rejected)")
    if (root / ".dvc").is_dir() and result["imported"]:
        dvc.dvc(["add", str(folder.relative_to(root))], root, on_line=print)
        step = "refine" if resolved.name == DATASET_TARGET else f"relabel@{resolved.name}"
        print(f"next: `dvc repro` reruns {step} for the corrected images, and what depends on it; commit "
              f"{folder.relative_to(root)}.dvc to version them")
    return 0

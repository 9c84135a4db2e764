"""The pseudo-label dataset package: what ``export`` writes and what other segmenters download and verify.

Layout (``PACKAGE_VERSION`` 1)::

    data/export/
        README.md                               dataset card: YAML header + how to use (shards/dataset_card.py)
        package.json                            the same facts for programs: version, classes, palette, splits
        SHA256SUMS                              sha256 of every other file; ``sha256sum -c SHA256SUMS`` checks it
        review.html                             review page: the lowest-label-score rows as thumbnails (shards/review.py)
        data/<split>-00000-of-00002.parquet     pseudo-label rows (schema: shards/pseudo_labels.py)
        voc/JPEGImages/<id>.jpg|.png            optional VOC-style copy: images as stored,
        voc/SegmentationClass/<id>.png          the pseudo masks (palette PNG, 255 = ignore),
        voc/Annotations/<id>.xml                their instance boxes (``boxes``) in VOC detection format
                                                (shards/voc_xml.py: 1-based, inclusive ``bndbox``),
        voc/ImageSets/Segmentation/<split>.txt  the ids of each split,
        voc/classes.txt                         class names, background first,
        voc/labelmap.txt                        names and colours in CVAT's "Segmentation mask 1.1" form
                                                (``name:r,g,b::``), background first, then ``ignored`` for 255
        coco/annotations/instances_<split>.json optional COCO instances (shards/coco.py): one annotation per
                                                connected region of a class (compressed RLE, bbox, area), none
                                                on the ignore band; ``file_name`` is the image's name in
                                                ``voc/JPEGImages/`` (the image root; images stay in the Parquet
                                                rows alone when the VOC folder is off)

Shard names follow the Hugging Face convention ``data/{split}-NNNNN-of-NNNNN.parquet``: ``datasets.load_dataset(
"parquet", data_dir=<package>)`` finds the splits by those names alone, whatever else the folder holds, and the
``huggingface`` schema metadata decodes ``image`` and ``mask`` as images and ``labels`` (and each box's ``label``)
as class names.

Integrity: :func:`verify_package` refuses a package whose version is not ours, a listed file that is missing or
whose sha256 differs (a flipped byte, a truncated download), a shard not listed in ``SHA256SUMS``, and a shard
whose schema version is not ours; every error is a :class:`PackageError` naming the file.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shards.coco import CocoWriter, coco_name
from shards.fingerprint import sha256_file
from shards.images import decode_mask_png
from shards.io import atomic_path, atomic_write_bytes, atomic_write_json, iter_batches, read_metadata
from shards.voc_xml import annotation_xml

PACKAGE_VERSION = 1
INFO_NAME = "package.json"
CARD_NAME = "README.md"
CHECKSUMS_NAME = "SHA256SUMS"
DATA_DIR = "data"
VOC_DIR = "voc"
VOC_IMAGES = f"{VOC_DIR}/JPEGImages"
LABELMAP_NAME = "labelmap.txt"
IGNORE_LABEL = "ignored"  # the 255 band's name in VOC tools (datumaro, hence CVAT)
DEFAULT_CONNECTIVITY = 8  # for shards that do not record refine's boxes.connectivity (written before it was)
_CHECKSUM_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")


class PackageError(ValueError):
    """A package that is not what its checksums and version say; the message names the file."""


def shard_name(split: str, index: int, count: int) -> str:
    return f"{DATA_DIR}/{split}-{index:05d}-of-{count:05d}.parquet"


def source_files(folder: str | Path, split: str) -> list[Path]:
    """The pseudo-label shards of one split (``<split>-NNNNN.parquet``, as ``refine`` names them), in order."""
    return sorted(Path(folder).glob(f"{split}-[0-9][0-9][0-9][0-9][0-9].parquet"))


@contextlib.contextmanager
def atomic_parquet_writer(path: Path, schema: pa.Schema) -> Iterator[pq.ParquetWriter]:
    """A ParquetWriter on a temporary name in ``path``'s folder, ``os.replace``-d into place on success."""
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        yield writer


class _RowStream:
    """Record batches in, tables of exactly the requested row count out (row groups need not match inputs)."""

    def __init__(self, batches: Iterable[pa.RecordBatch]):
        self._batches, self._pending, self._rows = iter(batches), [], 0

    def take(self, rows: int) -> pa.Table:
        while self._rows < rows:
            batch = next(self._batches, None)
            if batch is None:
                break
            self._pending.append(batch.replace_schema_metadata(None))  # shards may differ in producer only
            self._rows += batch.num_rows
        table = pa.Table.from_batches(self._pending) if self._pending else None
        if table is None or table.num_rows < rows:
            raise ValueError(f"expected {rows} more rows, the source shards hold {self._rows}")
        rest = table.slice(rows)
        self._pending, self._rows = rest.to_batches(), rest.num_rows
        return table.slice(0, rows)


def image_extension(data: bytes) -> str:
    """``jpg`` or ``png`` from the stored bytes' signature (the manifest stores only these two)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    raise ValueError(f"image bytes start with {data[:8]!r}: neither JPEG nor PNG")


def write_voc_rows(table: pa.Table, voc_root: Path, class_names: Sequence[str]) -> list[str]:
    """Images, palette masks and box annotations of ``table`` as loose VOC files; returns their paths relative to
    ``voc_root``."""
    if "boxes" not in table.column_names:
        raise ValueError("the pseudo-label shards have no 'boxes' column (written by an older refine); "
                         "run refine again")
    written = []
    for row in table.select(["image_id", "image", "mask", "height", "width", "boxes"]).to_pylist():
        if row["boxes"] is None:
            raise ValueError(f"image {row['image_id']!r}: no boxes in its pseudo-label row; run refine again")
        image = row["image"]["bytes"]
        image_file = f"{row['image_id']}.{image_extension(image)}"
        boxes = [(class_names[b["label"]], (b["x0"], b["y0"], b["x1"], b["y1"])) for b in row["boxes"]]
        annotation = annotation_xml(image_file, row["height"], row["width"], boxes)
        for rel, data in ((f"JPEGImages/{image_file}", image),
                          (f"SegmentationClass/{row['image_id']}.png", row["mask"]["bytes"]),
                          (f"Annotations/{row['image_id']}.xml", annotation)):
            atomic_write_bytes(voc_root / rel, data)
            written.append(rel)
    return written


def write_coco_rows(table: pa.Table, coco: CocoWriter) -> int:
    """The images and mask regions of ``table`` into a split's COCO file; returns the annotations added."""
    added = 0
    columns = ["image_id", "image", "mask", "height", "width", "tag_source", "confidence", "ignore_fraction"]
    columns += [c for c in ("provenance", "label_score") if c in table.column_names]  # older shards lack them
    for row in table.select(columns).to_pylist():
        mask = decode_mask_png(row["mask"]["bytes"])
        if mask.shape != (row["height"], row["width"]):
            raise ValueError(f"image {row['image_id']!r}: its mask is {mask.shape[1]}x{mask.shape[0]} px, the row "
                             f"says {row['width']}x{row['height']}; run refine again")
        confidence = None if row["confidence"] is None else round(row["confidence"], 6)
        provenance = {"tag_source": row["tag_source"], "confidence": confidence,
                      **({"provenance": row["provenance"]} if row.get("provenance") else {}),
                      **({"label_score": round(row["label_score"], 6)} if row.get("label_score") is not None else {})}
        try:
            added += coco.add_image(f"{row['image_id']}.{image_extension(row['image']['bytes'])}", mask,
                                    image_extra={"package_image_id": row["image_id"], **provenance,
                                                 "ignore_fraction": round(row["ignore_fraction"], 6)},
                                    annotation_extra=provenance)
        except ValueError as exc:
            raise ValueError(f"image {row['image_id']!r}: {exc}") from None
    return added


def write_split(sources: Sequence[Path], split: str, out_dir: Path, *, rows_per_shard: int, row_group_size: int,
                voc: bool = False, coco: bool = False, on_rows: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """Re-shard one split's pseudo-label shards into ``out_dir/data``, streaming one row group at a time; with
    ``voc`` and ``coco`` the same rows also go to the VOC folder and the split's COCO file.

    Returns ``{"images", "shards", "files", "ids", "pixels", "ignored_pixels", "coco"}``: ``files`` every path
    written (relative to ``out_dir``), ``pixels`` the per-class pixel totals (classes 0..K), ``ids`` the image ids in
    order, ``coco`` ``{"path", "annotations", "connectivity"}`` of the COCO file (None without ``coco``).
    """
    if not sources:
        raise ValueError(f"split {split!r}: no pseudo-label shards")
    schema = pq.read_schema(sources[0])
    meta = read_metadata(sources[0])
    class_names = meta["class_names"]
    num_classes = len(class_names)
    for path in sources[1:]:
        other = read_metadata(path)
        if not pq.read_schema(path).equals(schema, check_metadata=False) or other["class_names"] != class_names \
                or other.get("boxes") != meta.get("boxes"):
            raise ValueError(f"{path}: schema, classes or box params differ from {sources[0]}")
    total = sum(pq.ParquetFile(p).metadata.num_rows for p in sources)
    count = max(1, math.ceil(total / rows_per_shard))
    stream = _RowStream(iter_batches(sources, batch_size=row_group_size))
    summary: dict[str, Any] = {"images": total, "shards": [], "files": [], "ids": [],
                               "pixels": np.zeros(num_classes, dtype=np.int64), "ignored_pixels": 0, "coco": None}
    # the connectivity refine used for `boxes` (recorded in the shards), so COCO regions and boxes agree
    connectivity = (meta.get("boxes") or {}).get("connectivity", DEFAULT_CONNECTIVITY)
    if coco:
        summary["coco"] = {"path": coco_name(split), "annotations": 0, "connectivity": connectivity}
    info = {"description": f"pseudo labels, split {split}: one annotation per connected region of a class in the "
                           "pseudo mask; ignored pixels are in none", "version": str(PACKAGE_VERSION)}
    with (CocoWriter(out_dir / coco_name(split), class_names, connectivity=connectivity, info=info,
                     ignore_index=meta["ignore_index"]) if coco else contextlib.nullcontext()) as coco_writer:
        _write_shards(stream, split, out_dir, schema, summary, count=count, rows_per_shard=rows_per_shard,
                      row_group_size=row_group_size, class_names=class_names, voc=voc, coco=coco_writer,
                      on_rows=on_rows)
        if coco_writer is not None:
            coco_writer.write()
            summary["files"].append(coco_name(split))
    summary["pixels"] = [int(v) for v in summary["pixels"]]
    return summary


def _write_shards(stream: _RowStream, split: str, out_dir: Path, schema: pa.Schema, summary: dict[str, Any], *,
                  count: int, rows_per_shard: int, row_group_size: int, class_names: Sequence[str], voc: bool,
                  coco: CocoWriter | None, on_rows: Callable[[int], Any] | None) -> None:
    num_classes, total = len(class_names), summary["images"]
    for index in range(count):
        name = shard_name(split, index, count)
        shard_rows = min(rows_per_shard, total - index * rows_per_shard)
        with atomic_parquet_writer(out_dir / name, schema) as writer:
            for start in range(0, shard_rows, row_group_size):
                table = stream.take(min(row_group_size, shard_rows - start)).replace_schema_metadata(schema.metadata)
                if not pc.all(pc.equal(table["split"], split)).as_py():
                    raise ValueError(f"split {split!r}: the source shards hold rows of another split")
                writer.write_table(table, row_group_size=row_group_size)
                pixels = table["pixels"].combine_chunks().flatten().to_numpy().reshape(-1, num_classes)  # (N, K+1)
                area = pc.multiply(table["height"].cast(pa.int64()), table["width"].cast(pa.int64()))
                summary["pixels"] += pixels.sum(axis=0)
                summary["ignored_pixels"] += int(pc.sum(area).as_py()) - int(pixels.sum())
                summary["ids"].extend(table["image_id"].to_pylist())
                if voc:
                    summary["files"] += [f"{VOC_DIR}/{rel}"
                                         for rel in write_voc_rows(table, out_dir / VOC_DIR, class_names)]
                if coco is not None:
                    summary["coco"]["annotations"] += write_coco_rows(table, coco)
                if on_rows is not None:
                    on_rows(table.num_rows)
        summary["shards"].append(name)
        summary["files"].append(name)


def score_summary(out_dir: Path, shards: Sequence[str]) -> dict[str, Any]:
    """The distribution of the rows' ``label_score`` (quantiles and a 10-bin histogram over [0, 1]) and the count of
    corrected rows, for the dataset card."""
    tables = [pq.read_table(Path(out_dir) / name, columns=["label_score", "provenance"]) for name in shards]
    scores = np.concatenate([t["label_score"].to_numpy() for t in tables]) if tables else np.zeros(0)
    corrected = sum(int(pc.sum(pc.equal(t["provenance"], "corrected")).as_py() or 0) for t in tables)
    if not scores.size:
        return {"images": 0, "corrected": corrected}
    quantiles = np.quantile(scores, [0.0, 0.1, 0.25, 0.5, 0.75, 1.0])
    return {"images": int(scores.size), "corrected": corrected,
            **{key: round(float(v), 4) for key, v in zip(("min", "p10", "p25", "median", "p75", "max"), quantiles)},
            "histogram": [int(v) for v in np.histogram(scores, bins=10, range=(0.0, 1.0))[0]]}


def cvat_labelmap(class_names: Sequence[str], palette: Sequence[Sequence[int]], ignore_colour: Sequence[int]) -> str:
    """``labelmap.txt`` as CVAT's "Segmentation mask 1.1" format reads it (datumaro's VOC label map): a
    ``# label:color_rgb:parts:actions`` header, then ``name:r,g,b::`` per class, background first, in the colours
    the mask PNGs are painted with, and last ``ignored`` in the ignore colour. CVAT reads a mask by its colours and
    refuses a colour the label map does not name, so the ignore band needs its line (it arrives as label
    ``ignored``: the pixels for the annotator to decide)."""
    names = [*class_names, IGNORE_LABEL]
    if len(palette) < len(class_names):
        raise ValueError(f"palette: {len(palette)} colours for {len(class_names)} classes")
    colours = [tuple(int(v) for v in colour) for colour in [*palette[:len(class_names)], ignore_colour]]
    if IGNORE_LABEL in class_names:
        raise ValueError(f"class {IGNORE_LABEL!r}: the label map names the ignore band so; rename the class")
    for name in names:
        if ":" in name or name.startswith("#") or name != name.strip() or not name:
            raise ValueError(f"class {name!r}: CVAT's label map cannot hold a name that is empty, contains ':', "
                             "starts with '#' or has outer spaces; rename the class")
    seen: dict[tuple[int, ...], str] = {}
    for name, colour in zip(names, colours):
        if len(colour) != 3 or not all(0 <= v <= 255 for v in colour):
            raise ValueError(f"class {name!r}: colour {list(colour)} is not an RGB triple of 0..255")
        if colour in seen:
            raise ValueError(f"classes {seen[colour]!r} and {name!r} share the colour {list(colour)}: a colour mask "
                             "cannot tell them apart; give the palette distinct colours")
        seen[colour] = name
    lines = [f"{name}:{','.join(map(str, colour))}::" for name, colour in zip(names, colours)]
    return "".join(f"{line}\n" for line in ["# label:color_rgb:parts:actions", *lines])


def write_voc_lists(out_dir: Path, class_names: Sequence[str], ids_by_split: Mapping[str, Sequence[str]], *,
                    palette: Sequence[Sequence[int]], ignore_colour: Sequence[int]) -> list[str]:
    """``ImageSets/Segmentation/<split>.txt``, ``classes.txt`` and ``labelmap.txt`` of the VOC folder; returns the
    paths written."""
    written = []
    for split, ids in ids_by_split.items():
        rel = f"{VOC_DIR}/ImageSets/Segmentation/{split}.txt"
        atomic_write_bytes(out_dir / rel, "".join(f"{i}\n" for i in ids).encode())
        written.append(rel)
    atomic_write_bytes(out_dir / VOC_DIR / "classes.txt", "".join(f"{n}\n" for n in class_names).encode())
    atomic_write_bytes(out_dir / VOC_DIR / LABELMAP_NAME, cvat_labelmap(class_names, palette, ignore_colour).encode())
    return [*written, f"{VOC_DIR}/classes.txt", f"{VOC_DIR}/{LABELMAP_NAME}"]


def is_package(folder: Path) -> bool:
    return (folder / INFO_NAME).is_file()


def remove_stale(out_dir: Path, keep: Iterable[str]) -> list[str]:
    """Delete files under ``out_dir`` that are not in ``keep`` (relative paths), then empty folders."""
    keep, removed = set(keep), []
    for path in sorted(p for p in out_dir.rglob("*") if p.is_file() or p.is_symlink()):
        rel = path.relative_to(out_dir).as_posix()
        if rel not in keep:
            path.unlink()
            removed.append(rel)
    for folder in sorted((p for p in out_dir.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        if not any(folder.iterdir()):
            folder.rmdir()
    return removed


def write_checksums(out_dir: Path) -> dict[str, str]:
    """``SHA256SUMS`` over every file of the package but itself (coreutils format); returns {path: sha256}."""
    sums = {p.relative_to(out_dir).as_posix(): sha256_file(p) for p in sorted(out_dir.rglob("*"))
            if p.is_file() and p.name != CHECKSUMS_NAME}
    atomic_write_bytes(out_dir / CHECKSUMS_NAME, "".join(f"{h}  {rel}\n" for rel, h in sums.items()).encode())
    return sums


def write_info(out_dir: Path, info: Mapping[str, Any]) -> None:
    atomic_write_json(out_dir / INFO_NAME, {"package_version": PACKAGE_VERSION, **info})


# ------------------------------------------------------------------------------------------ reading, verifying


def read_checksums(root: str | Path) -> dict[str, str]:
    path = Path(root) / CHECKSUMS_NAME
    if not path.is_file():
        raise PackageError(f"{path}: missing; not a pseudo-label package, or an incomplete download")
    sums = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = _CHECKSUM_LINE.match(line)
        if not match or match.group(2).startswith("/") or ".." in Path(match.group(2)).parts:
            raise PackageError(f"{path}:{number}: not a '<sha256>  <relative path>' line")
        sums[match.group(2)] = match.group(1)
    return sums


def read_info(root: str | Path) -> dict[str, Any]:
    path = Path(root) / INFO_NAME
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise PackageError(f"{path}: missing; not a pseudo-label package") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PackageError(f"{path}: not valid JSON ({exc})") from None
    if info.get("package_version") != PACKAGE_VERSION:
        raise PackageError(f"{path}: package version {info.get('package_version')!r} is not the supported "
                           f"{PACKAGE_VERSION}; use the project version that wrote it")
    return info


def verify_package(root: str | Path, files: Iterable[str] | None = None) -> dict[str, Any]:
    """Check ``files`` (default: every listed file) against ``SHA256SUMS``; returns ``package.json``.

    ``package.json`` is always checked, and every shard under ``data/`` must be listed (an unlisted shard
    would otherwise be read by ``load_dataset`` unverified).
    """
    root = Path(root)
    sums = read_checksums(root)
    for path in sorted((root / DATA_DIR).glob("*.parquet")):
        if path.relative_to(root).as_posix() not in sums:
            raise PackageError(f"{path}: not listed in {CHECKSUMS_NAME} (a file that is not part of the package)")
    selected = list(sums) if files is None else [INFO_NAME, *files]
    for rel in dict.fromkeys(selected):
        path = root / rel
        if rel not in sums:
            raise PackageError(f"{path}: not listed in {CHECKSUMS_NAME}")
        if not path.is_file():
            raise PackageError(f"{path}: listed in {CHECKSUMS_NAME} but missing (incomplete download?)")
        if sha256_file(path) != sums[rel]:
            raise PackageError(f"{path}: sha256 does not match {CHECKSUMS_NAME} (truncated or modified); "
                               "download the package again")
    info = read_info(root)
    for rel in selected:
        if rel.endswith(".parquet"):
            check_shard(root / rel)
    return info


def check_shard(path: Path) -> dict[str, Any]:
    """The shard's metadata, after checking it is a readable Parquet file of our schema version."""
    try:
        return read_metadata(path)
    except pa.ArrowException as exc:
        raise PackageError(f"{path}: not a readable Parquet file ({exc})") from None
    except ValueError as exc:
        raise PackageError(str(exc)) from None


def open_package(root: str | Path, split: str, *, verify: bool = True) -> tuple[dict[str, Any], list[Path]]:
    """``(package.json, the split's shard paths)``; with ``verify`` their bytes are checked against the sums."""
    root = Path(root)
    info = read_info(root)
    if split not in info["splits"]:
        raise PackageError(f"{root / INFO_NAME}: no split {split!r} (has {sorted(info['splits'])})")
    names = info["splits"][split]["shards"]
    if verify:
        verify_package(root, names)
    else:
        for name in names:
            check_shard(root / name)
    return info, [root / name for name in names]

"""A gallery of pseudo labels as markdown with the pictures inside: what the Prefect UI shows of a relabelled collection.

The Prefect UI renders a markdown artifact's images, ``data:`` URIs included, in any browser that reaches the UI
(checked in tests/pipeline/test_gallery_ui.py), while it refuses ``file://`` links and they mean nothing on another
machine. So the gallery embeds small thumbnails (``shards/review.py``: JPEG image and CAM, palette-PNG masks, long
side ``THUMB_SIDE``): one table row per image, the most doubtful first (lowest ``label_score``), with its image, its
CAM heat map over the image, its pseudo mask, its ground truth only when the collection has any, then its tags and
scores in words. A legend gives each class's colour as a small swatch image (the UI strips inline styles).

About 10 kB of markdown per row; ``orchestration.gallery_images`` sets the row count (default 8).
numpy + PIL + pyarrow only.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from shards.cams import UNLIKE_TRAINING, best_scores
from shards.images import decode_mask_png, encode_mask
from shards.io import read_metadata
from shards.review import _data_uri, cam_rows, thumbnails, worst_rows

SWATCH = 14  # px, side of a legend swatch


def swatch(colour: Sequence[int]) -> str:
    """A data URI of a small square PNG of one colour."""
    buffer = io.BytesIO()
    Image.new("RGB", (SWATCH, SWATCH), tuple(int(v) for v in colour[:3])).save(buffer, format="PNG")
    return _data_uri("image/png", buffer.getvalue())


def legend_markdown(class_names: Sequence[str], palette: Sequence[Sequence[int]], ignore_index: int,
                    per_row: int = 4) -> str:
    """A table of swatches, ``per_row`` classes a row: every class's mask colour, and the ignore colour (the UI lays
    images out as blocks outside tables, so a plain line of swatches would stack one per line)."""
    items = [(f"![{name}]({swatch(palette[k])})", name) for k, name in enumerate(class_names)]
    if ignore_index < len(palette):
        items.append((f"![ignore]({swatch(palette[ignore_index])})", f"ignore ({ignore_index}: not labelled)"))
    lines = ["Colours:", "", "|" + " colour | class |" * per_row, "|" + " --- | --- |" * per_row]
    for start in range(0, len(items), per_row):
        row = items[start: start + per_row]
        row += [("", "")] * (per_row - len(row))
        lines.append("| " + " | ".join(f"{image} | {name}" for image, name in row) + " |")
    return "\n".join(lines)


def truth_thumbnails(manifest_paths: Sequence[Path], image_ids: Sequence[str], palette: Sequence[Sequence[int]],
                     sizes: Mapping[str, tuple[int, int]]) -> dict[str, str]:
    """image_id -> data URI of its ground-truth mask thumbnail, for those of ``image_ids`` that have one."""
    ids, out = sorted(set(image_ids)), {}
    for path in manifest_paths:
        if "mask" not in pq.read_schema(path).names:
            continue
        for row in pq.read_table(path, columns=["image_id", "mask"], filters=[("image_id", "in", ids)]).to_pylist():
            if row["mask"] and row["mask"].get("bytes"):
                h, w = sizes[row["image_id"]]
                mask = np.asarray(Image.fromarray(decode_mask_png(row["mask"]["bytes"])).resize((w, h), Image.NEAREST))
                out[row["image_id"]] = _data_uri("image/png", encode_mask(mask, palette))
    return out


def _names(ids: Sequence[int], class_names: Sequence[str]) -> str:
    return ", ".join(class_names[k] for k in ids) or "–"


def gallery_markdown(version_dir: str | Path, limit: int, title: str, facts: Mapping[str, Any] | None = None) -> str:
    """The gallery of a relabelled version folder (``pseudo_labels/``, ``cams/``, ``manifest/``): ``limit`` rows."""
    folder = Path(version_dir)
    shards = sorted((folder / "pseudo_labels").glob("*.parquet"))
    lines = [f"# Pseudo labels: {title}", ""]
    if not shards or limit <= 0:
        return "\n".join(lines + ["No pseudo labels to show."])
    meta = read_metadata(shards[0])
    class_names, palette, ignore_index = meta["class_names"], meta["palette"], meta["ignore_index"]
    chosen, total = worst_rows(shards, limit)
    cams = cam_rows(sorted((folder / "cams").glob("*.parquet")),
                    [r["image_id"] for r in chosen])
    extra = {row["image_id"]: row for path in sorted((folder / "cams").glob("*.parquet"))
             if {"all_scores", "ood_score"} <= set(pq.read_schema(path).names)
             for row in pq.read_table(path, columns=["image_id", "all_scores", "ood_score"],
                                      filters=[("image_id", "in", [r["image_id"] for r in chosen])]).to_pylist()}
    thumbs = {r["image_id"]: thumbnails(r, palette, cams.get(r["image_id"])) for r in chosen}
    truth = truth_thumbnails(sorted((folder / "manifest").glob("*.parquet")), list(thumbs), palette,
                             {i: t["size"] for i, t in thumbs.items()})
    lines += [f"The {len(chosen)} most doubtful of {total} images (lowest label score first). "
              "Image | CAM over the image | pseudo mask" + (" | ground truth" if truth else "") + ", then what the "
              "classifier said. More rows: `orchestration.gallery_images`; every image: the review page.", ""]
    if facts:
        lines += [" · ".join(f"{k}: {v}" for k, v in facts.items()), ""]
    lines += [legend_markdown(class_names, palette, ignore_index), ""]
    heads = ["image", "CAM", "pseudo mask"] + (["ground truth"] if truth else []) + ["labels"]
    lines += ["| " + " | ".join(heads) + " |", "|" + " --- |" * len(heads)]
    for row in chosen:
        image_id, t = row["image_id"], thumbs[row["image_id"]]
        cam, more = cams.get(image_id) or {}, extra.get(image_id) or {}
        scores = dict(zip(cam.get("classes") or [], cam.get("scores") or []))
        words = [f"**{image_id}**", f"tags ({row['tag_source']}): " + (", ".join(
            f"{class_names[k]} {scores[k]:.2f}" if k in scores else class_names[k] for k in cam.get("classes") or [])
            or "none")]
        if row["tag_source"] == "unknown" and more.get("all_scores"):
            words.append("no known class; best: " + ", ".join(
                f"{name} {score:.2f}" for name, score in best_scores(more["all_scores"], class_names)))
        words.append(f"mask: {_names(row['labels'], class_names)}")
        words.append(f"label score {row['label_score']:.2f}")
        if row.get("object_confidence") is not None:
            words.append(f"object confidence {row['object_confidence']:.2f}")
        if more.get("ood_score") is not None:
            words.append(f"OOD {more['ood_score']:.2f}" + (" (unlike the training images)"
                                                           if more["ood_score"] > UNLIKE_TRAINING else ""))
        cells = [f"![{image_id}]({t['image']})", f"![CAM]({t['cam']})" if t["cam"] else "–",
                 f"![mask]({t['mask']})"]
        if truth:
            cells.append(f"![truth]({truth[image_id]})" if image_id in truth else "no mask")
        lines.append("| " + " | ".join(cells + [" · ".join(words)]) + " |")
    return "\n".join(lines)


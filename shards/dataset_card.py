"""The dataset card (``README.md``) of a pseudo-label package: a YAML header for programs, prose for people.

The header holds the Hugging Face keys (``license``, ``pretty_name``, ``task_categories``, ``configs`` with
the split files, so that ``load_dataset(<package folder>)`` also works) and ours: classes, palette, ignore
index, splits with counts and per-class pixel shares, the quality against ground truth where it was measured,
and the provenance (source, classifier fingerprint, code version, params). Everything comes from
``package.json`` (:mod:`shards.package`), so card and package cannot disagree.
"""

from __future__ import annotations

from typing import Any, Mapping

import yaml


def size_category(images: int) -> str:
    """The Hugging Face ``size_categories`` bucket of a row count."""
    for bound, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M")):
        if images < bound:
            return label
    return "1M<n<10M"


def card_header(info: Mapping[str, Any]) -> dict[str, Any]:
    names = info["class_names"]
    total = sum(s["images"] for s in info["splits"].values())
    return {
        "license": info["license"],
        "pretty_name": info["name"],
        "task_categories": ["image-segmentation"],
        "task_ids": ["semantic-segmentation"],
        "tags": ["pseudo-labels", "weakly-supervised-semantic-segmentation"],
        "size_categories": [size_category(total)],
        "configs": [{"config_name": "default", "data_files": [
            {"split": split, "path": f"data/{split}-*.parquet"} for split in info["splits"]]}],
        "package_version": info["package_version"],
        "class_names": list(names),
        "palette": {name: list(colour) for name, colour in zip(names, info["palette"])},
        "ignore_index": info["ignore_index"],
        "ignore_colour": list(info["ignore_colour"]),
        "splits": {split: {"images": s["images"], "shards": len(s["shards"]),
                           "ignored_pixel_share": s["ignored_pixel_share"],
                           "pixel_share": {name: s["pixel_share"][name] for name in names}}
                   for split, s in info["splits"].items()},
        "voc_folder": info["voc"],
        "coco": info.get("coco"),
        "quality": info["quality"],
        "provenance": info["provenance"],
    }


def _quality_text(quality: Mapping[str, Any] | None) -> str:
    if not quality:
        return "No ground truth was available for these images, so the quality of the pseudo labels is unknown.\n"
    return (f"Measured against ground truth on {quality['gt_images']} images of the split(s) "
            f"{', '.join(quality['splits'])}: **mIoU {quality['miou']} %**, coverage {quality['coverage']} (the share "
            f"of pixels not ignored), precision {quality['precision']} %, recall {quality['recall']} %. mIoU counts "
            "only the pixels the labels do not ignore, so read it together with coverage.\n")


def _score_text(scores: Mapping[str, Any]) -> str:
    """The label-score distribution per split: quantiles and a text histogram (empty without scores)."""
    parts = []
    for split, summary in scores.items():
        if not summary.get("images"):
            continue
        peak = max(summary["histogram"]) or 1
        bars = "\n".join(f"| {i / 10:.1f}-{(i + 1) / 10:.1f} | {n} | {'#' * round(20 * n / peak)} |"
                         for i, n in enumerate(summary["histogram"]))
        parts.append(f"`label_score` of `{split}` ({summary['images']} images, {summary['corrected']} corrected by "
                     f"hand): min {summary['min']}, 10 % {summary['p10']}, 25 % {summary['p25']}, median "
                     f"{summary['median']}, 75 % {summary['p75']}, max {summary['max']}.\n\n"
                     f"| score | images | |\n| --- | --- | --- |\n{bars}\n")
    return "\n".join(parts)


def render_card(info: Mapping[str, Any]) -> str:
    header = yaml.safe_dump(card_header(info), sort_keys=False, allow_unicode=True, width=120,
                            default_flow_style=None)  # short lists (colours, scales) on one line
    names, palette, splits = info["class_names"], info["palette"], info["splits"]
    first = next(iter(splits))
    per_class = (info["quality"] or {}).get("per_class", {})
    class_rows = "\n".join(
        f"| {k} | {name} | `{tuple(palette[k])}` | {100 * splits[first]['pixel_share'][name]:.2f} % | "
        f"{(per_class.get(name) or {}).get('iou', '–')} |" for k, name in enumerate(names))
    split_rows = "\n".join(f"| `{split}` | {s['images']} | {len(s['shards'])} | "
                           f"{100 * s['ignored_pixel_share']:.2f} % |" for split, s in splits.items())
    prov = info["provenance"]
    voc = (f"- `{info['voc']}/`: the same labels as a VOC tree (`JPEGImages/`, `SegmentationClass/` palette PNGs, "
           "`Annotations/` box XMLs, `ImageSets/Segmentation/<split>.txt`, `classes.txt`, and `labelmap.txt`: names "
           "and colours for CVAT's *Segmentation mask 1.1* import, the ignore band as label `ignored`)\n"
           ) if info["voc"] else ""
    coco, correct = info.get("coco"), []
    if info["voc"]:
        correct.append(f"in CVAT, import the zipped `{info['voc']}/` folder into a project as *Segmentation mask 1.1*")
    if coco:
        root = (f"`file_name` is the image's name in `{coco['image_root']}/`" if coco["image_root"] else
                "the images are in the Parquet rows only (the VOC folder was not exported)")
        connectivity = "/".join(sorted({str(c["connectivity"]) for c in coco["splits"].values()}))
        coco = (f"- `coco/annotations/instances_<split>.json`: COCO instances (splits "
                f"{', '.join(coco['splits'])}): one annotation per connected region of a class in the mask "
                f"({connectivity}-connected), `segmentation` a compressed RLE, `bbox`, `area`, `iscrowd` 0, and the "
                "row's `tag_source`, `provenance`, `confidence` and `label_score`; categories 1..K are the mask "
                f"values, background is none and ignored pixels are in no annotation; {root}\n")
        correct.append("upload a split's COCO file as *COCO 1.0* to a CVAT task that holds its images")
    else:
        coco = ""
    correct.append("in Label Studio, load each mask's class regions as brush (`BrushLabels`) pre-annotations")
    correct = f"To correct the labels by hand: {'; or '.join(correct)}.\n"
    review = (f"- `{info['review']}`: a review page to open in a browser: thumbnails of the lowest-label-score "
              "images and their masks, sortable and filterable by class\n") if info.get("review") else ""
    return f"""---
{header}---

# {info['name']}

Pixel-level pseudo labels made from image-level tags (a ToCo classifier's CAMs refined by
{' + '.join(info['methods']) or 'thresholds'}). Mask values: 0 = background, 1..{len(names) - 1} = the classes
below, {info['ignore_index']} = ignore (pixels the pipeline was not sure of: leave them out of the loss, e.g.
`CrossEntropyLoss(ignore_index={info['ignore_index']})`).

## Splits

| split | images | shards | ignored pixels |
| --- | --- | --- | --- |
{split_rows}

## Classes

Pixel share in `{first}` (of all pixels; the rest is ignored) and IoU against ground truth where measured.

| id | name | colour | pixel share | IoU % |
| --- | --- | --- | --- | --- |
{class_rows}

## Quality

{_quality_text(info['quality'])}
{_score_text(info.get('label_scores') or {})}
## Load it

```python
from datasets import load_dataset
ds = load_dataset("parquet", data_dir="path/to/this/folder")   # splits: {', '.join(splits)}
row = ds["{first}"][0]          # row["image"], row["mask"]: PIL images; numpy.array(row["mask"]) = class ids
names = ds["{first}"].features["labels"].feature.names
```

Columns: `image_id`, `split`, `image`, `mask`, `labels` (class ids present), `tag_source` (given | predicted),
`provenance` (pseudo | corrected: a human's mask), `height`, `width`, `ignore_fraction`, `confidence` (mean max-class
probability over the labelled pixels), `label_score` (confidence x labelled share: sort by it, lowest first, to
review the doubtful masks), `pixels` (pixel count per class id), `boxes` (for detection:
one box per connected region of a class in the mask, `{{label, x0, y0, x1, y1, pixels}}`, 0-based pixel coordinates
with `x1`, `y1` exclusive; regions too small to be objects are left out).

## Files

- `data/<split>-NNNNN-of-NNNNN.parquet`: the rows, {info['row_group_size']} rows per row group
{voc}{coco}{review}- `package.json`: this card's facts for programs; `SHA256SUMS`: check with `sha256sum -c SHA256SUMS`

{correct}
## Provenance

Source `{prov['source'].get('source')}` at `{prov['source'].get('root')}`; classifier fingerprint
`{prov['classifier_fingerprint']}`; refine code version `{prov['code_version']}`, params fingerprint
`{prov['params_fingerprint']}`. The params of every stage are in the header above.

## Licence

`{info['license']}`. The images keep the licence of their source; the masks are derived from them.
"""

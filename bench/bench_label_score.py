"""How well ``label_score`` ranks pseudo masks: Spearman's rho with the true per-image IoU.

    python bench/bench_label_score.py [--pseudo data/pseudo_labels] [--manifest data/manifest] [--splits train val]

Reads a refined project's pseudo-label shards and the manifest's ground truth (run it after ``make demo``). For every
image with ground truth and provenance ``pseudo``: its IoU, the mean over the classes present in the ground truth or
the pseudo mask (background included) of |P & G| / |P | G|, counted over the pixels the ground truth labels (not
255); pixels the pseudo mask ignores (255) belong to no class, so a mask that leaves an object unlabelled scores low.
Prints, as JSON, Spearman's rho of that IoU with ``label_score`` and with its two factors (``confidence``,
``1 - ignore_fraction``), and the mean IoU of the worst and best tenth by ``label_score``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shards.images import decode_mask_png  # noqa: E402
from shards.records import IGNORE_INDEX  # noqa: E402


def image_iou(pseudo: np.ndarray, truth: np.ndarray) -> float:
    """Mean IoU over the classes in either mask, on the pixels the ground truth labels."""
    valid = truth != IGNORE_INDEX
    p, g = pseudo[valid], truth[valid]
    classes = sorted((set(np.unique(g).tolist()) | set(np.unique(p).tolist())) - {IGNORE_INDEX})
    ious = [np.logical_and(p == k, g == k).sum() / max(np.logical_or(p == k, g == k).sum(), 1) for k in classes]
    return float(np.mean(ious)) if ious else float("nan")


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their mean rank."""
    order = np.argsort(values, kind="mergesort")
    ranked = np.empty(len(values))
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranked[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranked


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = ranks(np.asarray(x, float)), ranks(np.asarray(y, float))
    return float(np.corrcoef(rx, ry)[0, 1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pseudo", default="data/pseudo_labels")
    parser.add_argument("--manifest", default="data/manifest")
    parser.add_argument("--splits", nargs="+", default=["train", "val"])
    args = parser.parse_args(argv)
    pseudo_dir, manifest_dir = Path(args.pseudo), Path(args.manifest)
    rows = []
    for path in sorted(pseudo_dir.glob("*.parquet")):
        if path.name.rsplit("-", 1)[0] not in args.splits:
            continue
        truth = {r["image_id"]: r["mask"] for r in pq.read_table(manifest_dir / path.name,
                                                                 columns=["image_id", "mask"]).to_pylist()}
        for row in pq.read_table(path, columns=["image_id", "mask", "provenance", "confidence", "label_score",
                                                "ignore_fraction"]).to_pylist():
            gt = truth.get(row["image_id"])
            if row["provenance"] != "pseudo" or not gt or not gt.get("bytes"):
                continue
            iou = image_iou(decode_mask_png(row["mask"]["bytes"]), decode_mask_png(gt["bytes"]))
            rows.append((iou, row["label_score"], row["confidence"], 1.0 - row["ignore_fraction"]))
    if len(rows) < 3:
        print(f"error: {len(rows)} images with ground truth in {pseudo_dir}", file=sys.stderr)
        return 2
    data = np.asarray([r for r in rows if not np.isnan(r[0])])
    iou, score = data[:, 0], data[:, 1]
    tenth = max(1, len(data) // 10)
    by_score = np.argsort(score, kind="mergesort")
    print(json.dumps({
        "images": len(data), "splits": args.splits, "mean_iou": round(float(iou.mean()), 4),
        "spearman": {"label_score": round(spearman(score, iou), 4), "confidence": round(spearman(data[:, 2], iou), 4),
                     "labelled_share": round(spearman(data[:, 3], iou), 4)},
        "mean_iou_worst_tenth": round(float(iou[by_score[:tenth]].mean()), 4),
        "mean_iou_best_tenth": round(float(iou[by_score[-tenth:]].mean()), 4),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m pipeline summary``: the headline figure of each stage, in a few readable lines.

``make demo`` ends with it (``dvc metrics show`` prints every key of every metrics file: a table hundreds of columns
wide). It reads the stages' metrics files under ``metrics/`` and the package's ``package.json``; a stage that has not
run yet is listed as such.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _pct(value: Any) -> str:
    return "-" if value is None else f"{float(value):.1f}"


def _prepare(m: dict[str, Any]) -> str:
    splits = " + ".join(f"{n} {split}" for split, n in m["images"].items())
    return f"{splits} images from {m['inputs']} inputs, {m['rejects']} rejected (data/manifest/rejects.parquet)"


def _classifier(m: dict[str, Any]) -> str:
    return (f"val F1 {m['f1']:.3f} (precision {m['precision']:.3f}, recall {m['recall']:.3f}); CAM mIoU "
            f"{_pct(m.get('cam_miou'))} at threshold {m.get('cam_threshold')}; {m.get('seconds_per_step', 0):.2f} "
            f"s/step over {m.get('iterations')} steps")


def _cams(m: dict[str, Any]) -> str:
    return (f"{m['split']} CAM mIoU {_pct(m['miou'])} at {m['threshold']}, best {_pct(m['best_miou'])} at "
            f"{m['best_threshold']} ({m['images']} images)")


def _pseudo(m: dict[str, Any]) -> str:
    text = (f"pseudo-label mIoU {_pct(m['miou'])} at coverage {m['coverage']} (precision {_pct(m.get('precision'))}, "
            f"recall {_pct(m.get('recall'))}; {'+'.join(m.get('methods') or []) or 'thresholds'}; "
            f"{m.get('gt_images')} images with ground truth)")
    if m.get("corrected_images"):
        un = m.get("uncorrected") or {}
        text += (f"; {m['corrected_images']} corrected by hand, the other {un.get('gt_images')}: mIoU "
                 f"{_pct(un.get('miou'))} at {un.get('coverage')}")
    return text


def _segmenter(m: dict[str, Any]) -> str:
    return (f"{m['split']} mIoU {_pct(m['miou'])} single scale, {_pct(m.get('miou_ms_flip'))} multi-scale + flip, "
            f"{_pct(m.get('miou_ms_flip_crf'))} with the CRF too ({m['images']} images)")


def _package(m: dict[str, Any]) -> str:
    splits = ", ".join(f"{split} {s['images']}" for split, s in m["splits"].items())
    extras = [name for name, present in (("VOC folder", m.get("voc")), ("COCO JSON", m.get("coco")),
                                          ("review.html", m.get("review"))) if present]
    return f"data/export: {splits} images; {', '.join(extras) or 'Parquet only'}"


STAGES: list[tuple[str, str, Callable[[dict[str, Any]], str]]] = [
    ("prepare", "metrics/prepare.json", _prepare),
    ("train_classifier", "metrics/classifier.json", _classifier),
    ("dump_cams", "metrics/cams.json", _cams),
    ("refine", "metrics/pseudo_labels.json", _pseudo),
    ("export", "data/export/package.json", _package),
    ("evaluate", "metrics/segmenter.json", _segmenter),
]


def summary_lines(root: str | Path) -> list[str]:
    """One line per stage: its name and headline figures (or why there are none)."""
    root = Path(root)
    width = max(len(name) for name, _, _ in STAGES)
    lines = []
    for name, rel, describe in STAGES:
        metrics = _read(root / rel)
        if metrics is None:
            text = f"not run yet ({rel} missing)"
        else:
            try:
                text = describe(metrics)
            except (KeyError, TypeError, ValueError) as exc:
                text = f"{rel}: unexpected content ({type(exc).__name__}: {exc})"
        lines.append(f"{name:<{width}}  {text}")
    return lines


def main(root: str | Path) -> int:
    print("\n".join(summary_lines(root)))
    print("(every figure: `dvc metrics show`; the plots: `dvc plots show`; how they compare: bench/RESULTS.md)")
    return 0

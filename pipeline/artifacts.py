"""What a run shows in the Prefect UI, built from the stages' JSON summaries and metrics (never from tensors).

Every run publishes: a markdown summary (counts, rejects, timings, which classifier and params), a per-class table,
links to overlay images and to the review page (``review.html``, shards/review.py), a rejects table and a progress
artifact. The builders are plain functions (markdown text,
table rows) so that they can be tested without a server; ``publish_*`` hand them to Prefect.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from shards.fingerprint import classifier_fingerprint
from shards.review import REVIEW_NAME


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _table(rows: Iterable[tuple[str, Any]]) -> str:
    return "| | |\n| --- | --- |\n" + "\n".join(f"| {k} | {_fmt(v)} |" for k, v in rows)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# -- one collection ----------------------------------------------------------------------------------------------
def collection_markdown(name: str, status: str, current: dict[str, Any] | None, folder: Path,
                        repro_seconds: float | None = None) -> str:
    """The summary of one collection's relabelling (``status``: relabelled | up to date | skipped: ...)."""
    lines = [f"# Collection `{name}`: {status}", ""]
    summary = (current or {}).get("summary")
    if not summary:
        return "\n".join(lines + ["No pseudo labels yet."])
    p = summary.get("params", {})
    t = summary.get("timings", {})
    metrics = summary.get("metrics", {})
    rows = [
        ("version", f"`{summary['version']}` in `{folder / summary['version']}`"),
        ("classifier", f"`{summary['classifier']}`"),
        ("labelling params", f"`{summary['params_fingerprint']}`"),
        ("images", f"{summary['images']} labelled of {summary['inputs']} inputs"),
        ("rejects", summary["rejects"]),
        ("tags", f"{summary['predicted']} predicted by the classifier, {summary['given']} given"),
        ("mean confidence", metrics.get("mean_confidence")),
        ("mean ignore fraction", metrics.get("mean_ignore_fraction")),
        ("mIoU / coverage (where masks exist)", f"{_fmt(metrics.get('miou'))} / {_fmt(metrics.get('coverage'))}"),
        ("timings (s)", ", ".join(f"{k} {t[k]}" for k in ("prepare", "dump_cams", "refine", "total") if k in t)
         + (f"; dvc repro {repro_seconds}" if repro_seconds is not None else "")),
        ("dump_cams", f"image_size {p.get('dump_cams', {}).get('image_size')}, scales "
                      f"{_fmt(p.get('dump_cams', {}).get('scales'))}, predict_threshold "
                      f"{p.get('dump_cams', {}).get('predict_threshold')}"),
        ("refine", f"methods {_fmt(p.get('refine', {}).get('methods'))}, high "
                   f"{p.get('refine', {}).get('thresholds', {}).get('high')}, "
                   f"low {p.get('refine', {}).get('thresholds', {}).get('low')}"),
    ]
    review = summary.get("review")
    if review:
        rows.append(("review page", f"`{folder / summary['version'] / review['file']}`: the {review['rows']} "
                                    "lowest-confidence images; open the file in a browser"))
    lines.append(_table(rows))
    if summary.get("reject_rows"):
        lines += ["", "## Rejects", "", "| image | path | reason |", "| --- | --- | --- |"]
        lines += [f"| {r['image_id']} | {r['path']} | {r['reason']} |" for r in summary["reject_rows"]]
    return "\n".join(lines)


def class_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: _fmt(v) if isinstance(v, float) else v for k, v in row.items()} for row in summary["per_class"]]


def image_rows(summary: dict[str, Any], limit: int) -> list[dict[str, Any]]:
    """The ``limit`` most doubtful images (``per_image`` is sorted by ``label_score``, lowest first)."""
    return [{"image": r["image_id"], "label_score": r.get("label_score"), "tags": " ".join(r["tags"]),
             "tag_source": r["tag_source"], "scores": _fmt(r["scores"]), "confidence": r["confidence"],
             "ignore_fraction": r["ignore_fraction"]}
            for r in summary["per_image"][:limit]]


def reject_rows(summary: dict[str, Any], collection: str | None = None) -> list[dict[str, Any]]:
    return [{**({"collection": collection} if collection else {}), "image": r["image_id"], "path": r["path"],
             "reason": r["reason"]} for r in summary.get("reject_rows", [])]


def publish_collection(name: str, status: str, current: dict[str, Any] | None, folder: Path,
                       rows_limit: int, repro_seconds: float | None = None) -> None:
    key = artifact_key("relabel", name)
    create_markdown_artifact(collection_markdown(name, status, current, folder, repro_seconds),
                             key=f"{key}-summary", description=f"relabel {name}: {status}")
    summary = (current or {}).get("summary")
    if not summary:
        return
    create_table_artifact(class_rows(summary), key=f"{key}-classes",
                          description=f"{name} {summary['version']}: images, predicted tags and pixels per class")
    create_table_artifact(reject_rows(summary) or [{"image": "", "path": "", "reason": "no rejects"}],
                          key=f"{key}-rejects", description=f"{name}: inputs that could not be taken")
    create_table_artifact(image_rows(summary, rows_limit), key=f"{key}-tags",
                          description=f"{name}: tags behind the pseudo labels (first {rows_limit} images)")
    publish_overlays(folder / summary["version"] / "overlays", key, f"{name} {summary['version']}")
    if summary.get("review"):
        publish_review(folder / summary["version"] / summary["review"]["file"], key, f"{name} {summary['version']}")


def review_markdown(page: Path, title: str) -> str:
    """A link to a review page, with its path in words: browsers refuse ``file://`` links on an http page (the
    Prefect UI), so the reader may have to paste the path into the address bar."""
    page = Path(page).resolve()
    return (f"# Review page: {title}\n\n"
            "The lowest-confidence images as thumbnails (image | pseudo mask | CAM), their tags, tag source, "
            "confidence and ignored share; sortable, filterable by class. One self-contained HTML file, no server.\n\n"
            f"Path: `{page}`\n\n"
            "Browsers do not open `file://` links from the Prefect UI (an http page): copy the path above into the "
            f"address bar, or open the file from a file manager.\n\n[{page.name}]({page.as_uri()})")


def publish_review(page: Path, key: str, title: str) -> None:
    """A markdown artifact (``<key>-review``) and a link artifact pointing at ``page``, when it exists."""
    page = Path(page).resolve()
    if not page.is_file():
        return
    create_markdown_artifact(review_markdown(page, title), key=f"{key}-review", description=f"review page: {title}")
    create_link_artifact(page.as_uri(), link_text=f"review page {title}",
                         description=f"{title}: review page (open the file in a browser: {page})")


def publish_overlays(folder: Path, key: str, title: str) -> None:
    paths = sorted(Path(folder).glob("*.png"))
    if not paths:
        return
    links = "\n".join(f"- [{p.stem}]({p.resolve().as_uri()})" for p in paths)
    create_markdown_artifact(f"# Overlays: {title}\n\nimage | CAM | pseudo mask | ground truth\n\n{links}",
                             key=f"{key}-overlays", description=f"{len(paths)} overlay PNGs")
    for path in paths:
        create_link_artifact(path.resolve().as_uri(), link_text=f"overlay {path.stem}",
                             description=f"{title}: image | CAM | pseudo mask | ground truth")


# -- the training DAG ----------------------------------------------------------------------------------------------
def produce_markdown(root: Path, results: list[dict[str, Any]], params: dict[str, Any]) -> str:
    """The summary of a ``produce`` run: what each stage did and the metrics DVC tracks."""
    metrics = {name: read_json(root / "metrics" / f"{name}.json") or {}
               for name in ("prepare", "classifier", "cams", "pseudo_labels", "segmenter")}
    classifier = root / "data" / "classifier"
    fingerprint = classifier_fingerprint(classifier) if (classifier / "model.safetensors").exists() else None
    lines = ["# produce: the training DAG", "", "| stage | ran | seconds |", "| --- | --- | --- |"]
    lines += [f"| {r['target']} | {'yes' if r['ran'] else 'up to date'} | {r['seconds']} |" for r in results]
    prepared = metrics["prepare"]
    rows = [
        ("images", prepared.get("images")), ("rejects", prepared.get("rejects")),
        ("classifier", f"`{fingerprint}`" if fingerprint else "not trained"),
        ("classifier F1 / CAM mIoU", f"{_fmt(metrics['classifier'].get('f1'))} / "
                                     f"{_fmt(metrics['classifier'].get('cam_miou'))}"),
        ("CAM mIoU (best)", f"{_fmt(metrics['cams'].get('miou'))} ({_fmt(metrics['cams'].get('best_miou'))})"),
        ("pseudo-label mIoU / coverage", f"{_fmt(metrics['pseudo_labels'].get('miou'))} / "
                                         f"{_fmt(metrics['pseudo_labels'].get('coverage'))}"),
        ("segmenter mIoU", metrics["segmenter"].get("miou")),
        ("params", ", ".join(f"{k} `{v}`" for k, v in params.items())),
    ]
    return "\n".join(lines + ["", _table(rows)])


def produce_class_rows(root: Path) -> list[dict[str, Any]]:
    pseudo = (read_json(root / "metrics" / "pseudo_labels.json") or {}).get("per_class", {})
    cams = (read_json(root / "metrics" / "cams.json") or {}).get("per_class", {})
    rows = []
    for name in dict.fromkeys([*cams, *pseudo]):
        cam, label = cams.get(name) or {}, pseudo.get(name) or {}
        rows.append({"class": name, "cam_iou": cam.get("iou") if isinstance(cam, dict) else cam,
                     "pseudo_iou": label.get("iou"), "precision": label.get("precision"),
                     "recall": label.get("recall")})
    return rows


def publish_produce(root: Path, results: list[dict[str, Any]], params: dict[str, Any],
                    rejects: list[dict[str, Any]]) -> None:
    create_markdown_artifact(produce_markdown(root, results, params), key="produce-summary",
                             description="stages run, metrics, classifier and params")
    classes = produce_class_rows(root)
    if classes:
        create_table_artifact(classes, key="produce-classes", description="CAM and pseudo-label IoU per class")
    create_table_artifact(rejects or [{"image": "", "path": "", "reason": "no rejects"}], key="produce-rejects",
                          description="inputs prepare could not take")
    publish_overlays(root / "metrics" / "overlays", "produce", "pseudo labels")
    publish_review(root / "data" / "export" / REVIEW_NAME, "produce", "the exported package")

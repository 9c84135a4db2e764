"""What a run shows in the Prefect UI, built from the stages' JSON summaries and metrics (never from tensors).

Every run publishes: a markdown summary (warnings first, then counts, rejects, timings, which classifier and params),
a per-class table, a per-image table, a gallery (markdown with embedded thumbnails of the most doubtful images and a
colour legend, shards/gallery.py: the Prefect UI shows its pictures in any browser that reaches the UI), the path
of the review page (``review.html``, shards/review.py), a rejects table and a progress artifact. The builders are
plain functions (markdown text,
table rows) so that they can be tested without a server; ``publish_*`` hand them to Prefect.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from shards.fingerprint import classifier_fingerprint
from shards.gallery import gallery_markdown
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
    lines += [f"> **Warning**: {w}\n" for w in summary.get("warnings", [])]
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
        ("no known class", f"{summary.get('no_known_class', 0)} (no class scored above predict_threshold; "
                           f"refine.no_known_class: {summary.get('no_known_class_param', 'ignore')})"),
        ("unlike the training images", f"{summary.get('unlike_training', 0)} of {summary.get('ood_scored', 0)} "
                                       "images with an OOD score (above 1)"),
        ("mean object confidence", f"{_fmt(summary.get('mean_object_confidence'))} over the pixels labelled with a "
                                   f"class ({summary.get('without_objects', 0)} images have none)"),
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
    unknown = summary.get("no_known_class_rows") or []
    if unknown:
        lines += ["", "## No known class", "", "| image | best scores | OOD score | row |", "| --- | --- | --- | --- |"]
        lines += [f"| {r['image_id']} | {', '.join(f'{c} {s:.2f}' for c, s in r['best_scores'])} | "
                  f"{_fmt(r['ood_score'])} | {r['row']} |" for r in unknown]
    return "\n".join(lines)


def class_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: _fmt(v) if isinstance(v, float) else v for k, v in row.items()} for row in summary["per_class"]]


def image_rows(summary: dict[str, Any], limit: int) -> list[dict[str, Any]]:
    """The ``limit`` most doubtful images (``per_image`` is sorted by ``label_score``, lowest first)."""
    return [{"image": r["image_id"], "label_score": r.get("label_score"), "tags": " ".join(r["tags"]),
             "tag_source": r["tag_source"], "scores": _fmt(r["scores"]), "mask": " ".join(r.get("labels", [])),
             "object_confidence": r.get("object_confidence"), "ood_score": r.get("ood_score"),
             "ignore_fraction": r["ignore_fraction"]}
            for r in summary["per_image"][:limit]]


def reject_rows(summary: dict[str, Any], collection: str | None = None) -> list[dict[str, Any]]:
    return [{**({"collection": collection} if collection else {}), "image": r["image_id"], "path": r["path"],
             "reason": r["reason"]} for r in summary.get("reject_rows", [])]


def publish_collection(name: str, status: str, current: dict[str, Any] | None, folder: Path,
                       rows_limit: int, repro_seconds: float | None = None, gallery_images: int = 8) -> None:
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
    publish_gallery(folder / summary["version"], key, f"{name} {summary['version']}", gallery_images)
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


def publish_gallery(folder: Path, key: str, title: str, images: int) -> None:
    """The gallery artifact (``<key>-gallery``) of the shard folders under ``folder`` (shards/gallery.py)."""
    if images <= 0 or not any((Path(folder) / "pseudo_labels").glob("*.parquet")):
        return
    create_markdown_artifact(gallery_markdown(folder, images, title), key=f"{key}-gallery",
                             description=f"{title}: thumbnails of the most doubtful images (up to {images})")


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
                    rejects: list[dict[str, Any]], gallery_images: int = 8) -> None:
    create_markdown_artifact(produce_markdown(root, results, params), key="produce-summary",
                             description="stages run, metrics, classifier and params")
    classes = produce_class_rows(root)
    if classes:
        create_table_artifact(classes, key="produce-classes", description="CAM and pseudo-label IoU per class")
    create_table_artifact(rejects or [{"image": "", "path": "", "reason": "no rejects"}], key="produce-rejects",
                          description="inputs prepare could not take")
    publish_gallery(root / "data", "produce", "the training DAG's pseudo labels", gallery_images)
    publish_review(root / "data" / "export" / REVIEW_NAME, "produce", "the exported package")

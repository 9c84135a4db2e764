"""Prefect flows: ``produce`` (the training DAG), ``relabel`` (one collection), ``relabel_inbox`` (the schedule).

A task runs one ``dvc repro --single-item <stage>`` in a subprocess and streams its log into the Prefect logger;
DVC is the cache (``cache_policy=NO_CACHE``). A retried task runs the same ``dvc repro`` again, and the stages
resume (per shard, or from the last training checkpoint) rather than restart. Nothing here touches a tensor: the
artifacts are built from the stages' JSON summaries and metrics (pipeline/artifacts.py).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from config.loader import load_section, read_yaml
from config.schema import OrchestrationConfig
from pipeline import artifacts, dvc
from pipeline.collections import collection_lock, inbox_folders, register, workspace_lock
from shards.collections import COLLECTIONS_FILE, read_collections, read_current
from shards.fingerprint import classifier_fingerprint
from shards.io import iter_rows

RELABEL_PARTS = ("prepare", "dump_cams", "refine")  # the tqdm bars of one relabel@<name> run, in order


def settings(root: Path) -> OrchestrationConfig:
    return load_section(OrchestrationConfig, Path(root) / "params.yaml", "orchestration")


class Progress:
    """A progress artifact fed from tqdm bars in the stage's output: ``span`` maps 0-100 % of a part to the whole."""

    def __init__(self, artifact_id: UUID | None, span: tuple[float, float] = (0.0, 100.0),
                 parts: tuple[str, ...] = (), every_s: float = 2.0):
        self.id, self.span, self.parts, self.every_s, self.last = artifact_id, span, parts, every_s, 0.0

    def __call__(self, description: str, percent: int) -> None:
        if self.id is None or time.monotonic() - self.last < self.every_s:
            return
        part = self.parts.index(description) if description in self.parts else 0
        fraction = (part + percent / 100) / max(1, len(self.parts))
        self.set(self.span[0] + fraction * (self.span[1] - self.span[0]))

    def set(self, value: float) -> None:
        if self.id is not None:
            self.last = time.monotonic()
            update_progress_artifact(self.id, round(min(100.0, max(0.0, value)), 1))


@task(cache_policy=NO_CACHE, task_run_name="dvc repro {target}")
def repro_stage(target: str, root: str, progress_id: UUID | None = None, span: tuple[float, float] = (0.0, 100.0),
                parts: tuple[str, ...] = ()) -> dict[str, Any]:
    """``dvc repro --single-item <target>`` with its output in this task's log (workspace lock held)."""
    logger = get_run_logger()
    with workspace_lock(Path(root)):
        result = dvc.repro(target, root, on_line=logger.info, on_progress=Progress(progress_id, span, parts))
    logger.info("%s: %s in %.1f s", target, "ran" if result["ran"] else "up to date", result["seconds"])
    return result


@task(cache_policy=NO_CACHE, task_run_name="dvc push")
def push(root: str, targets: list[str]) -> bool:
    """``dvc push`` of ``targets``; skipped, with a log line, when no remote is configured."""
    logger = get_run_logger()
    if not dvc.has_remote(root):
        logger.info("no DVC remote configured (dvc remote add -d ...): push skipped")
        return False
    with workspace_lock(Path(root)):
        dvc.dvc(["push", *targets], root, on_line=logger.info)
    return True


def _with_retries(cfg: OrchestrationConfig):
    return repro_stage.with_options(retries=cfg.retries, retry_delay_seconds=cfg.retry_delay_s)


@flow(name="produce", log_prints=True)
def produce(root: str = ".", stages: list[str] | None = None) -> dict[str, Any]:
    """The training DAG, one task per DVC stage in dependency order (default: every stage but relabel@*)."""
    root_path = Path(root).resolve()
    cfg = settings(root_path)
    with workspace_lock(root_path):
        order = stages or dvc.stage_order(root_path)
    logger = get_run_logger()
    logger.info("produce: %s", " -> ".join(order))
    progress = create_progress_artifact(0.0, key="produce-progress", description="stages of the training DAG")
    results = []
    for i, stage in enumerate(order):
        span = (100.0 * i / len(order), 100.0 * (i + 1) / len(order))
        results.append(_with_retries(cfg)(stage, str(root_path), progress, span))
        Progress(progress).set(span[1])
    raw = read_yaml(root_path / "params.yaml")
    params = {section: hashlib.sha256(json.dumps(raw.get(section), sort_keys=True).encode()).hexdigest()[:12]
              for section in ("prepare", "train_classifier", "dump_cams", "refine")}
    rejects_path = root_path / "data" / "manifest" / "rejects.parquet"
    rejects = [{"image": r["image_id"], "split": r["split"], "path": r["path"], "reason": r["reason"]}
               for r in iter_rows([rejects_path])] if rejects_path.exists() else []
    artifacts.publish_produce(root_path, results, params, rejects, cfg.gallery_images)
    return {"stages": results, "rejects": len(rejects)}


@flow(name="relabel", flow_run_name="relabel {name}", log_prints=True)
def relabel(name: str, root: str = ".", lock_wait_s: float | None = None, push_after: bool | None = None
            ) -> dict[str, Any]:
    """Relabel one registered collection with the current classifier (``dvc repro relabel@<name>``).

    A run that finds another run relabelling the same collection waits ``lock_wait_s`` (default
    ``orchestration.lock_wait_s``) and then skips, saying so in its log and summary artifact.
    """
    root_path = Path(root).resolve()
    cfg = settings(root_path)
    logger = get_run_logger()
    folder = root_path / cfg.collections_dir / name
    wait = cfg.lock_wait_s if lock_wait_s is None else lock_wait_s
    if name not in read_collections(root_path):
        raise ValueError(f"{name!r} is not a registered collection ({COLLECTIONS_FILE}): "
                         f"python -m pipeline register <path> --name {name}")
    key = artifacts.artifact_key("relabel", name)
    progress = create_progress_artifact(0.0, key=f"{key}-progress", description=f"relabel {name}")
    with collection_lock(root_path, name, timeout=wait) as acquired:
        if not acquired:
            status = f"skipped: another run is relabelling {name} (waited {wait:g} s)"
            logger.warning("%s", status)
            artifacts.publish_collection(name, status, read_current(folder.parent, name), folder,
                                         cfg.summary_rows, gallery_images=cfg.gallery_images)
            Progress(progress).set(100.0)
            return {"collection": name, "status": "skipped", "rejects": [], "pushed": False}
        _track_inbox_changes(root_path, cfg, [name])
        result = _with_retries(cfg)(f"relabel@{name}", str(root_path), progress, (0.0, 100.0), RELABEL_PARTS)
    Progress(progress).set(100.0)
    current = read_current(folder.parent, name)
    status = "relabelled" if result["ran"] else "up to date"
    artifacts.publish_collection(name, status, current, folder, cfg.summary_rows, result["seconds"],
                                 gallery_images=cfg.gallery_images)
    pushed = False
    if cfg.push if push_after is None else push_after:
        pushed = push(str(root_path), [f"{cfg.inbox}/{name}.dvc", f"relabel@{name}"])
    summary = (current or {}).get("summary") or {}
    return {"collection": name, "status": status, "version": summary.get("version"),
            "images": summary.get("images"), "predicted": summary.get("predicted"),
            "rejects": summary.get("reject_rows", []), "pushed": pushed}


def _track_inbox_changes(root: Path, cfg: OrchestrationConfig, names: list[str]) -> None:
    """``dvc add`` the collections whose folders changed since registering (new images are DVC inputs too)."""
    logger = get_run_logger()
    with workspace_lock(root):
        changed = dvc.status([f"{cfg.inbox}/{n}.dvc" for n in names], root)
    for target in changed:
        logger.info("%s: files added or changed since registering; dvc add", target)
        with workspace_lock(root):
            dvc.dvc(["add", target.removesuffix(".dvc")], root, on_line=logger.info)


@flow(name="relabel-inbox", log_prints=True)
def relabel_inbox(root: str = ".") -> dict[str, Any]:
    """Register new inbox folders, relabel every collection without pseudo labels for the current classifier and
    params (what ``dvc status`` reports as changed), then ``dvc push``."""
    root_path = Path(root).resolve()
    cfg = settings(root_path)
    logger = get_run_logger()
    classifier = root_path / "data" / "classifier"
    if not (classifier / "model.safetensors").exists():
        raise FileNotFoundError(f"{classifier}: no classifier; run the produce flow (or dvc repro / dvc pull) first")
    progress = create_progress_artifact(0.0, key="relabel-inbox-progress", description="collections relabelled")
    registered = read_collections(root_path)
    for name in inbox_folders(root_path, cfg.inbox):
        if name in registered:
            continue
        try:
            register(root_path, None, name, cfg.inbox, log=logger.info)
        except ValueError as exc:
            logger.warning("inbox folder %r not registered: %s", name, exc)
    names = read_collections(root_path)
    _track_inbox_changes(root_path, cfg, names)
    with workspace_lock(root_path):
        stale = dvc.status([f"relabel@{n}" for n in names], root_path)
    todo = [n for n in names if f"relabel@{n}" in stale]
    fingerprint = classifier_fingerprint(classifier)
    logger.info("classifier %s: %d of %d collections need relabelling%s", fingerprint[:12], len(todo), len(names),
                f": {', '.join(todo)}" if todo else "; nothing to do")
    results, failed = [], []
    for i, name in enumerate(todo):
        state = relabel(name, str(root_path), push_after=False, return_state=True)
        if state.is_completed():
            results.append(state.result())
        else:  # one broken collection does not hold the others back; the run fails at the end
            logger.error("relabel %s: %s", name, state.message)
            failed.append(name)
            results.append({"collection": name, "status": f"failed: {state.message}", "rejects": []})
        Progress(progress).set(100.0 * (i + 1) / len(todo))
    Progress(progress).set(100.0)
    pushed = False
    relabelled = [r["collection"] for r in results if r["status"] == "relabelled"]
    if relabelled and cfg.push:
        pushed = push(str(root_path), [t for n in relabelled for t in (f"{cfg.inbox}/{n}.dvc", f"relabel@{n}")])
    _publish_inbox(root_path, cfg, fingerprint, names, results, pushed)
    if failed:
        raise RuntimeError(f"relabelling failed for {', '.join(failed)} (see their flow runs)")
    return {"collections": names, "relabelled": relabelled,
            "skipped": [r["collection"] for r in results if r["status"] == "skipped"],
            "rejects": sum(len(r["rejects"]) for r in results if "rejects" in r), "pushed": pushed}


def _publish_inbox(root: Path, cfg: OrchestrationConfig, fingerprint: str, names: list[str],
                   results: list[dict[str, Any]], pushed: bool) -> None:
    by_name = {r["collection"]: r for r in results}
    lines = ["# relabel-inbox", "", f"classifier `{fingerprint}`; {len(results)} of {len(names)} collections "
             f"needed relabelling; dvc push: {'done' if pushed else 'no'}", "",
             "| collection | this run | version | images | predicted tags | rejects |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name in names:
        current = read_current(root / cfg.collections_dir, name) or {}
        summary = current.get("summary") or {}
        status = by_name.get(name, {}).get("status", "up to date")
        lines.append(f"| {name} | {status} | `{summary.get('version', '–')}` | {summary.get('images', '–')} | "
                     f"{summary.get('predicted', '–')} | {summary.get('rejects', '–')} |")
    create_markdown_artifact("\n".join(lines), key="relabel-inbox-summary", description="collections of this run")
    rejects = [{"collection": r["collection"], "image": x["image_id"], "path": x["path"], "reason": x["reason"]}
               for r in results for x in r.get("rejects", [])]
    create_table_artifact(rejects or [{"collection": "", "image": "", "path": "", "reason": "no rejects"}],
                          key="relabel-inbox-rejects", description="inputs this run could not take")

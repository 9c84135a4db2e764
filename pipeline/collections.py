"""Registering image collections, finding new ones in the inbox, and the locks that keep runs apart.

Registering a collection: its images are copied (from any fsspec-readable path: a local folder, ``s3://``,
``memory://``...) into ``<inbox>/<name>/`` unless already there, ``dvc add`` makes the folder a DVC input
(``<inbox>/<name>.dvc``), and the name is added to ``collections.yaml``, which gives it a ``relabel@<name>`` stage.

Locks (``fcntl.flock`` on files under ``.dvc/tmp/locks/``, released when a process dies):
- one per collection: a second run on a collection that a run is relabelling waits ``lock_wait_s`` and then skips,
  saying so;
- one per workspace around every ``dvc`` call that writes (DVC allows one ``dvc repro`` per workspace: its own
  lock fails after 3 s, this one queues).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Callable, Iterator

from pipeline import dvc
from shards.collections import check_name, name_from_path, read_collections, write_collections
from shards.readers.folder import IMAGE_EXTENSIONS

LOCK_DIR = Path(".dvc") / "tmp" / "locks"


@contextlib.contextmanager
def file_lock(path: Path, *, timeout: float | None = None, poll_s: float = 0.5) -> Iterator[bool]:
    """Hold an exclusive lock on ``path``; yields False when ``timeout`` seconds pass first (None = wait forever)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(poll_s)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def collection_lock(root: Path, name: str, timeout: float) -> contextlib.AbstractContextManager[bool]:
    return file_lock(Path(root) / LOCK_DIR / f"collection-{name}.lock", timeout=timeout)


def workspace_lock(root: Path) -> contextlib.AbstractContextManager[bool]:
    return file_lock(Path(root) / LOCK_DIR / "workspace.lock")


def has_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.rglob("*") if p.is_file())


def inbox_folders(root: Path, inbox: str) -> list[str]:
    """Names of the sub-folders of the inbox that hold images (hidden ones skipped)."""
    folder = Path(root) / inbox
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and has_images(p))


def copy_into(source: str, target: Path) -> int:
    """Copy the files of a folder at any fsspec URL or path into ``target``; returns the number of files."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(source)
    if not fs.isdir(path):
        raise ValueError(f"{source}: not a folder")
    count = 0
    for file in fs.find(path):
        relative = file[len(path.rstrip("/")) + 1:]
        if not relative or any(part.startswith(".") for part in relative.split("/")):
            continue
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(file, str(destination))
        count += 1
    return count


def register(root: Path, source: str | None, name: str | None, inbox: str,
             log: Callable[[str], None] = print) -> str:
    """Register a collection (a folder already in the inbox when ``source`` is None); returns its name."""
    root = Path(root).resolve()
    name = check_name(name or name_from_path(source or ""))
    target = root / inbox / name
    if source is not None and Path(source).resolve() != target.resolve():
        if target.exists() and any(target.iterdir()):
            raise ValueError(f"{target} already exists: choose another --name")
        count = copy_into(source, target)
        log(f"copied {count} files from {source} into {target.relative_to(root)}")
    if not target.is_dir() or not has_images(target):
        raise ValueError(f"{target}: no images to relabel")
    with workspace_lock(root):
        dvc.dvc(["add", str(target.relative_to(root))], root, on_line=log)
        names = read_collections(root)
        if name not in names:
            write_collections(root, [*names, name])
    log(f"registered collection {name!r}: stage relabel@{name}")
    return name


def track_changes(root: Path, inbox: str, name: str, log: Callable[[str], None] = print) -> None:
    """``dvc add`` the collection folder again, so that files dropped in since registering are DVC inputs."""
    target = Path(inbox) / name
    changed = dvc.status([f"{target}.dvc"], root)
    if changed:
        log(f"{target}: new or changed files, updating {target}.dvc")
        dvc.dvc(["add", str(target)], root, on_line=log)

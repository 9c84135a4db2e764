"""Image collections: the registry file, their names, versions, and the ``orchestration`` params section.

A *collection* is a folder of images (with an optional ``tags.csv``) under the inbox, ``data/inbox/<name>/``,
tracked by DVC (``data/inbox/<name>.dvc``) and listed in ``collections.yaml``; ``dvc.yaml`` gives each listed name
a ``relabel@<name>`` stage. Its pseudo labels go to ``data/collections/<name>/<version>/``, where ``version`` is
``<classifier fingerprint>-<params fingerprint>`` (12 hex digits each; shards/fingerprint.py): a new classifier or new labelling params
make a new folder beside the old ones, never an overwrite. ``data/collections/<name>/current.json`` names the
version the last run produced.

Torch-free (stdlib + yaml): the stage (``stages/relabel.py``) and the orchestration (``pipeline/``) share it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from shards.io import atomic_write_bytes

COLLECTIONS_FILE = "collections.yaml"  # named in dvc.yaml's `vars`; kept at the repository root
CURRENT_FILE = "current.json"
SUMMARY_FILE = "summary.json"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")  # a DVC stage key and a Prefect artifact key part
HEADER = ("# Registered image collections: `python -m pipeline register <path>` or a folder dropped into the inbox\n"
          "# (orchestration.inbox). dvc.yaml gives each name a relabel@<name> stage. Written by pipeline/; sorted.\n")


def check_name(name: str) -> str:
    """A collection name: lowercase letters, digits, ``_`` and ``-`` (a DVC stage key and an artifact key)."""
    if not NAME_PATTERN.match(name):
        raise ValueError(f"collection name {name!r}: use 1-63 lowercase letters, digits, '_' or '-' "
                         f"(starting with a letter or digit)")
    return name


def name_from_path(path: str) -> str:
    """A collection name suggested by a folder path or URL: ``/x/My Photos/`` -> ``my-photos``."""
    base = path.rstrip("/").rsplit("/", 1)[-1].split(":")[-1]
    return re.sub(r"[^a-z0-9_-]+", "-", base.lower()).strip("-_")[:63] or "collection"


def read_collections(root: str | Path) -> list[str]:
    """The registered names, from ``collections.yaml`` (absent file: none)."""
    path = Path(root) / COLLECTIONS_FILE
    if not path.exists():
        return []
    data = yaml.safe_load(path.read_text()) or {}
    names = data.get("collections") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: 'collections' must be a list of names")
    return [check_name(n) for n in names]


def write_collections(root: str | Path, names: list[str]) -> None:
    body = yaml.safe_dump({"collections": sorted(set(names))}, default_flow_style=False)
    atomic_write_bytes(Path(root) / COLLECTIONS_FILE, (HEADER + body).encode())


def version_name(classifier: str, params_fingerprint: str) -> str:
    return f"{classifier[:12]}-{params_fingerprint[:12]}"


def read_current(collections_dir: str | Path, name: str) -> dict[str, Any] | None:
    """``current.json`` of a collection plus its version's ``summary.json`` (``None`` before the first run)."""
    folder = Path(collections_dir) / name
    path = folder / CURRENT_FILE
    if not path.exists():
        return None
    current = json.loads(path.read_text())
    summary = folder / current["version"] / SUMMARY_FILE
    return {**current, "summary": json.loads(summary.read_text()) if summary.exists() else None}

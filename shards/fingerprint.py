"""Fingerprints for resume: params + code version + inputs -> one hex digest.

A stage records the fingerprint beside every shard or checkpoint it writes; a restart reuses only work whose
fingerprint matches, so a changed param, a code edit or a changed input never resumes stale state.

The code version is a hash of the source files of the packages a stage runs (not ``git describe``: uncommitted
edits must count, and a fresh clone must give the same value as the working copy it came from).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

from shards.params import to_dict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _canonical(obj: Any) -> bytes:
    return json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":"), default=str).encode()


def hash_params(params: Any) -> str:
    return hashlib.sha256(_canonical(params)).hexdigest()


def code_version(packages: Iterable[str] = ("shards", "models", "stages")) -> str:
    """sha256 over the ``*.py`` files of the given top-level packages (path + content, sorted)."""
    digest = hashlib.sha256()
    for package in sorted(packages):
        folder = PROJECT_ROOT / package
        for path in sorted(folder.rglob("*.py")):
            digest.update(str(path.relative_to(PROJECT_ROOT)).encode())
            digest.update(b"\0")
            digest.update(path.read_bytes())
    return digest.hexdigest()


def hash_inputs(paths: Iterable[str | Path]) -> str:
    """Hash input files; a folder that holds a shard ``index.json`` is hashed by that index (cheap and exact)."""
    digest = hashlib.sha256()
    for raw in paths:
        path = Path(raw)
        index = path / "index.json"
        if path.is_dir() and index.exists():
            files = [index]
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
        elif path.exists():
            files = [path]
        else:
            raise FileNotFoundError(f"fingerprint input {path} does not exist")
        for file in files:
            digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
            digest.update(b"\0")
            with open(file, "rb") as handle:
                while block := handle.read(1 << 20):
                    digest.update(block)
    return digest.hexdigest()


def fingerprint(params: Any, *, code: str | None = None, inputs: Iterable[str | Path] = (),
                extra: Any = None) -> str:
    """One digest of params, code version and inputs (and anything else that decides the output)."""
    parts = {
        "params": hash_params(params),
        "code": code if code is not None else code_version(),
        "inputs": hash_inputs(inputs),
        "extra": hash_params(extra),
    }
    return hashlib.sha256(_canonical(parts)).hexdigest()[:32]

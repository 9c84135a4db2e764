"""Fingerprints for resume: params + code version + inputs -> one hex digest.

A stage records the fingerprint beside every shard or checkpoint it writes; a restart reuses only work whose
fingerprint matches, so a changed param, a code edit or a changed input never resumes stale state.

The code version is a hash of the source files a stage imports (its import closure; not ``git describe``: uncommitted
edits must count, and a fresh clone must give the same value as the working copy it came from).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def to_dict(obj: Any) -> Any:
    """A dataclass as plain JSON-able data (tuples become lists), for fingerprints and provenance."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _canonical(obj: Any) -> bytes:
    return json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":"), default=str).encode()


def hash_params(params: Any) -> str:
    return hashlib.sha256(_canonical(params)).hexdigest()


CODE_FOLDERS = ("config", "labelling", "models", "parallel", "refinement", "shards", "stages", "synth", "training")


def module_path(name: str) -> Path | None:
    """The source file of project module ``name`` (a package's ``__init__.py``), or None when it is not ours."""
    if name.split(".")[0] not in CODE_FOLDERS:
        return None
    base = PROJECT_ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported_names(path: Path, package: str) -> frozenset[str]:
    """Module names imported anywhere in ``path`` (function-level imports too: they are code the module runs)."""
    stat = path.stat()
    return _parsed_imports(str(path), stat.st_mtime_ns, stat.st_size, package)


@functools.lru_cache(maxsize=1024)
def _parsed_imports(path: str, mtime_ns: int, size: int, package: str) -> frozenset[str]:
    """``_imported_names`` of one version of a file (its mtime and size in the key): a relabel run's three stages
    share most of their closures, and parsing them took ~1 s per stage."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(Path(path).read_text(encoding="utf-8"), filename=path)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(p for p in [*parts, node.module or ""] if p)
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return frozenset(names)


def import_closure(module: str) -> list[Path]:
    """Every project source file that ``module`` imports, directly or not, itself and package ``__init__``s
    included, sorted. The code deps of a DVC stage, and what its resume fingerprint hashes."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py too
            prefix = ".".join(parts[:i])
            path = module_path(prefix)
            if path is None or prefix in seen:
                continue
            seen[prefix] = path
            package = prefix if path.name == "__init__.py" else prefix.rpartition(".")[0]
            todo.extend(_imported_names(path, package))
    return sorted(set(seen.values()))


def code_version(module: str) -> str:
    """sha256 over the source files of ``module``'s import closure (path + content): an edit to code the module
    does not import leaves it unchanged."""
    digest = hashlib.sha256()
    for path in import_closure(module):
        digest.update(str(path.relative_to(PROJECT_ROOT)).encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def classifier_fingerprint(folder: str | Path) -> str:
    """A trained classifier's identity (``train_classifier``'s ``model.safetensors`` + ``config.json``): the
    ``model_fingerprint`` of the CAM and pseudo-label shards made with it, and the first half of a relabelled
    collection's version name (shards/collections.py)."""
    digest = hashlib.sha256()
    for name in ("model.safetensors", "config.json"):
        digest.update(sha256_file(Path(folder) / name).encode())
    stats = Path(folder) / "feature_stats.safetensors"  # the OOD scores' reference (training/feature_stats.py)
    if stats.is_file():
        digest.update(sha256_file(stats).encode())
    return digest.hexdigest()[:32]


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


def fingerprint(params: Any, *, code: str, inputs: Iterable[str | Path] = (),
                extra: Any = None) -> str:
    """One digest of params, code version and inputs (and anything else that decides the output)."""
    parts = {
        "params": hash_params(params),
        "code": code,
        "inputs": hash_inputs(inputs),
        "extra": hash_params(extra),
    }
    return hashlib.sha256(_canonical(parts)).hexdigest()[:32]

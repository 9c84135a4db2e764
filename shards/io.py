"""Parquet shard sets: atomic writes, a per-set index for resume, streaming reads.

A *shard set* is a folder of Parquet files plus ``index.json``::

    data/manifest/
        train-00000.parquet  train-00001.parquet  val-00000.parquet  rejects.parquet
        index.json   {"schema_version": 1, "shards": {"train-00000.parquet":
                      {"rows": 256, "sha256": "...", "fingerprint": "...", "split": "train"}, ...}}

Every shard is written to a temporary name in the same folder, flushed, then ``os.replace``-d into place, and only
then recorded in the index (itself replaced atomically, under a file lock so that two processes writing different
shards of one set cannot lose each other's entries). A restart skips exactly the shards whose recorded fingerprint
matches and whose file still hashes to the recorded sha256.

Reads stream record batches (``pyarrow.parquet.ParquetFile.iter_batches``): memory is bounded by the batch, never
by the dataset.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from shards.fingerprint import sha256_file
from shards.records import IGNORE_INDEX

SCHEMA_VERSION = 1
META_KEY = b"wsss"  # our schema-metadata key: JSON with schema_version, class_names, palette, producer...
INDEX_NAME = "index.json"


_PAUSE_AFTER = os.environ.get("WSSS_PAUSE_AFTER", "")  # test hook of pause_point: read once, at import
_DURABLE_WRITES: dict[str, int] = {}


def pause_point(kind: str) -> None:
    """Test hook, a no-op unless ``WSSS_PAUSE_AFTER=<kind>:<N>`` is set: right after this process has durably
    written its N-th ``kind`` (``checkpoint``: ``training.checkpoint.save_checkpoint``; ``shard``:
    ``ShardSet.write``, once the shard is in the index), it sends itself SIGSTOP. A test then SIGKILLs the stopped
    process at exactly that point, instead of racing a running one (tests/stages/test_train_*.py). Counts are per
    process (each pool worker counts its own shards)."""
    if not _PAUSE_AFTER.startswith(f"{kind}:"):
        return
    _DURABLE_WRITES[kind] = _DURABLE_WRITES.get(kind, 0) + 1
    if _DURABLE_WRITES[kind] == int(_PAUSE_AFTER.partition(":")[2]):
        os.kill(os.getpid(), signal.SIGSTOP)


_UMASK = os.umask(0o022)  # read the process umask (the call sets one, so set it straight back)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[str]:
    """A temporary name in ``path``'s folder to write to; fsync-ed and ``os.replace``-d onto ``path`` on success,
    removed on any error, so ``path`` holds the old file or the complete new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a written file gets the mode open() would give it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def with_metadata(schema: pa.Schema, meta: Mapping[str, Any], extra: Mapping[bytes, bytes] | None = None) -> pa.Schema:
    """Attach our JSON metadata (schema version, classes, palette, producer) to a schema."""
    payload = {"schema_version": SCHEMA_VERSION, **meta}
    merged = dict(schema.metadata or {})
    merged[META_KEY] = json.dumps(payload, sort_keys=True).encode()
    if extra:
        merged.update(extra)
    return schema.with_metadata(merged)


def dataset_metadata(kind: str, class_names: Iterable[str], palette: Iterable[Iterable[int]],
                     producer: Mapping[str, Any], ignore_index: int = IGNORE_INDEX, **extra: Any) -> dict[str, Any]:
    """The metadata every class-carrying shard shares (DESIGN.md §4); ``class_names`` starts with background."""
    return {"kind": kind, "class_names": list(class_names), "palette": [list(c) for c in palette],
            "ignore_index": ignore_index, **extra, "producer": dict(producer)}


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Our metadata of a shard file (reads only the footer)."""
    schema = pq.read_schema(path)
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise ValueError(f"{path}: not a shard of this pipeline (no {META_KEY.decode()!r} schema metadata)")
    meta = json.loads(raw)
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema version {meta.get('schema_version')} is not the supported {SCHEMA_VERSION}")
    return meta


def write_table_atomic(table: pa.Table, path: str | Path, *, row_group_size: int = 64) -> str:
    """Write ``table`` to ``path`` atomically; returns the file's sha256."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd")
        digest = sha256_file(tmp)
    return digest


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".index.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ShardSet:
    """A folder of Parquet shards with an index of (rows, sha256, fingerprint) per shard."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    # -- index ------------------------------------------------------------------------------------------
    def index(self) -> dict[str, dict[str, Any]]:
        path = self.folder / INDEX_NAME
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: corrupt shard index ({exc}); delete the folder to start over") from None
        return dict(data.get("shards", {}))

    def _update_index(self, name: str, entry: Mapping[str, Any] | None) -> None:
        with _locked(self.folder):
            shards = self.index()
            if entry is None:
                shards.pop(name, None)
            else:
                shards[name] = dict(entry)
            atomic_write_json(self.folder / INDEX_NAME, {"schema_version": SCHEMA_VERSION, "shards": shards})

    def is_done(self, name: str, fingerprint: str, *, verify: bool = True) -> bool:
        """True when ``name`` was written with ``fingerprint`` and the file is intact."""
        entry = self.index().get(name)
        path = self.folder / name
        if not entry or entry.get("fingerprint") != fingerprint or not path.exists():
            return False
        return not verify or sha256_file(path) == entry.get("sha256")

    def write(self, name: str, table: pa.Table, *, fingerprint: str, row_group_size: int = 64,
              **extra: Any) -> dict[str, Any]:
        digest = write_table_atomic(table, self.folder / name, row_group_size=row_group_size)
        entry = {"rows": table.num_rows, "sha256": digest, "fingerprint": fingerprint, **extra}
        self._update_index(name, entry)
        pause_point("shard")
        return entry

    def prune(self, keep: Iterable[str]) -> list[str]:
        """Delete shards (files and index entries) not in ``keep``: no stale shard survives a param change."""
        keep = set(keep)
        removed = []
        for name in list(self.index()):
            if name not in keep:
                self._update_index(name, None)
                removed.append(name)
        for path in self.folder.glob("*.parquet"):
            if path.name not in keep:
                path.unlink()
                if path.name not in removed:
                    removed.append(path.name)
        for tmp in self.folder.glob(".*.tmp"):  # leftovers of a killed writer
            tmp.unlink(missing_ok=True)
        return sorted(removed)

    # -- reading ----------------------------------------------------------------------------------------
    def files(self, prefix: str = "") -> list[Path]:
        return sorted(p for p in self.folder.glob(f"{prefix}*.parquet") if not p.name.startswith("."))

    def verify(self) -> None:
        """Raise ValueError naming the first shard whose bytes do not match the index."""
        for name, entry in sorted(self.index().items()):
            path = self.folder / name
            if not path.exists():
                raise ValueError(f"{path}: listed in {INDEX_NAME} but missing")
            if sha256_file(path) != entry.get("sha256"):
                raise ValueError(f"{path}: sha256 does not match {INDEX_NAME} (truncated or modified)")


def iter_batches(paths: Iterable[str | Path], *, columns: list[str] | None = None,
                 batch_size: int = 64) -> Iterator[pa.RecordBatch]:
    """Stream record batches over several shard files in order."""
    for path in paths:
        with pq.ParquetFile(path) as handle:
            yield from handle.iter_batches(batch_size=batch_size, columns=columns)


def iter_rows(paths: Iterable[str | Path], *, columns: list[str] | None = None,
              batch_size: int = 64) -> Iterator[dict[str, Any]]:
    """Stream rows as dicts; memory holds one batch at a time."""
    for batch in iter_batches(paths, columns=columns, batch_size=batch_size):
        yield from batch.to_pylist()


def count_rows(paths: Iterable[str | Path]) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in paths)

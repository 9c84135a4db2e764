"""Reading untrusted source files: only regular files, under a size cap, inside the dataset root.

Every byte ``prepare`` (and ``relabel``) takes from a dataset goes through :func:`read_source_file`:

- a path that is not a regular file once links are followed (a FIFO, a socket, a device such as ``/dev/zero``, a
  folder) is refused *before* it is read: ``not a regular file (fifo)``. The file is opened non-blocking and
  checked again on the open descriptor, so a FIFO swapped in after the listing cannot hang the stage;
- a file over ``max_bytes`` is refused on its size, never read whole;
- a path whose real location (links resolved) is outside the dataset root is refused (``link leaves the dataset
  root``) unless the caller allows it (``prepare.links_outside_root``).

:func:`classify` gives the same verdict without reading, for listing a folder source: each entry is an image to
read, or the reason it is a reject row.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from shards.records import RejectError

_KINDS = ((stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
          (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "folder"))


def file_kind(mode: int) -> str:
    """``"regular"`` or what else a ``st_mode`` is (``fifo``, ``socket``, ``character device``...)."""
    if stat.S_ISREG(mode):
        return "regular"
    return next((name for test, name in _KINDS if test(mode)), "special file")


def inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether ``path``'s real location (every link resolved) is ``root``'s real location or under it."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def check_location(path: str | os.PathLike, root: str | os.PathLike | None, allow_outside: bool) -> None:
    """Raise :class:`RejectError` when ``path`` resolves outside ``root`` (and that is not allowed)."""
    if root is None or allow_outside or inside(path, root):
        return
    raise RejectError(f"link leaves the dataset root ({path} -> {os.path.realpath(path)}; "
                      "prepare.links_outside_root allows it)")


def size_reason(size: int, max_bytes: int) -> str | None:
    if size > max_bytes:
        return f"file of {size} bytes exceeds prepare.max_file_bytes={max_bytes}"
    return None


def read_source_file(path: str | os.PathLike, *, max_bytes: int, root: str | os.PathLike | None = None,
                     allow_outside: bool = False, what: str = "file") -> bytes:
    """The bytes of one source file, or :class:`RejectError` with the reason (see the module docstring)."""
    check_location(path, root, allow_outside)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        try:
            kind = file_kind(os.stat(path).st_mode)
        except OSError:
            kind = "regular"
        if kind != "regular":  # a socket cannot be opened at all (ENXIO)
            raise RejectError(f"{what} is not a regular file ({kind})") from None
        if os.path.islink(path) and not os.path.exists(path):
            raise RejectError(f"{what} is a broken link (-> {os.readlink(path)})") from None
        raise RejectError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        kind = file_kind(info.st_mode)
        if kind != "regular":
            raise RejectError(f"{what} is not a regular file ({kind})")
        reason = size_reason(info.st_size, max_bytes)
        if reason:
            raise RejectError(f"{what} {reason}")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:  # grew while being read
                raise RejectError(f"{what} grew past prepare.max_file_bytes={max_bytes} while being read")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise RejectError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def classify(path: Path, root: Path, *, max_bytes: int, allow_outside: bool) -> str | None:
    """Why the file at ``path`` (a non-folder entry of a listing) cannot be an input, or ``None`` if it can."""
    if not allow_outside and not inside(path, root):
        return "link leaves the dataset root"
    try:
        info = os.stat(path)
    except OSError:
        if os.path.islink(path):
            return "broken link"
        return "cannot stat the file"
    kind = file_kind(info.st_mode)
    if kind != "regular":
        return f"not a regular file ({kind})"
    return size_reason(info.st_size, max_bytes)

"""A pool target for tests/parallel/test_prestart.py: each import appends its process id to a marker file."""

import os
from pathlib import Path

_MARKER = os.environ.get("WSSS_TEST_PRESTART_MARKER")
if _MARKER:
    with Path(_MARKER).open("a") as marker:
        marker.write(f"{os.getpid()}\n")


def square(x: int) -> tuple[int, int]:
    """x squared, and the process that forked this worker."""
    return x * x, os.getppid()

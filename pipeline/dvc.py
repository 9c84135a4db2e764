"""DVC from the orchestration layer: subprocess calls with streamed output, the DAG order, status, push.

DVC owns lineage and caching (DESIGN.md §5): Prefect tasks call these functions, which run ``dvc`` in a
subprocess with the project's virtual environment first on ``PATH`` (the stages' ``python`` is the project's), in a
process group that ends with it (:func:`dvc`).
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import yaml

PROGRESS = re.compile(r"^(?P<desc>[\w@.-]+):\s+(?P<pct>\d{1,3})%\|")  # a tqdm bar: "refine:  45%|####  | 9/20"


class DvcError(RuntimeError):
    """A dvc command that failed; the message holds the command and the tail of its output."""


def tool_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def dvc(args: list[str], root: str | Path, *, on_line: Callable[[str], None] | None = None,
        on_progress: Callable[[str, int], None] | None = None, check: bool = True,
        progress_every_s: float = 5.0, grace_s: float = 2.0) -> tuple[int, str]:
    """Run ``dvc <args>`` in ``root``; every output line goes to ``on_line`` as it comes.

    tqdm redraws (carriage returns) are not lines: a bar goes to ``on_progress(description, percent)`` and to
    ``on_line`` at most every ``progress_every_s`` seconds, and at 100 %. Returns (exit code, whole output).

    ``dvc`` runs in a process group of its own, which ends with it: once ``dvc`` has exited, its output is read for
    ``grace_s`` more seconds, then whatever is left of the group (a stage's orphaned worker holding the output pipe
    open) is killed, so a dead stage always ends its task and leaves nothing running. An exception here (Ctrl-C, a
    Prefect cancellation) terminates the group too.
    """
    cmd = [sys.executable, "-m", "dvc", *args]
    proc = subprocess.Popen(cmd, cwd=root, env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, errors="replace", start_new_session=True)
    assert proc.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
    reader.start()
    output, last_bar = [], 0.0
    try:
        for raw in _lines_until_done(proc, lines, grace_s, on_line):
            line = raw.rstrip()
            if not line:
                continue
            output.append(line)
            bar = PROGRESS.match(line.strip())
            if bar:
                percent = int(bar["pct"])
                if on_progress is not None:
                    on_progress(bar["desc"], percent)
                if time.monotonic() - last_bar < progress_every_s and percent < 100:
                    continue
                last_bar = time.monotonic()
            if on_line is not None:
                on_line(line)
    finally:
        _end_group(proc)
        reader.join(timeout=1.0)
        if not reader.is_alive():  # else a process outside the group holds the pipe: leave the daemon thread be
            proc.stdout.close()
    code = proc.wait()
    text = "\n".join(output)
    if check and code != 0:
        raise DvcError(f"dvc {' '.join(args)} failed with exit code {code}:\n" + "\n".join(output[-40:]))
    return code, text


def _pump(stream, lines: queue.Queue) -> None:
    """Reader thread: the subprocess's lines (universal newlines: "\\r" ends a line too), then None at EOF."""
    try:
        for raw in stream:
            lines.put(raw)
    except (OSError, ValueError):  # closed under us
        pass
    lines.put(None)


def _lines_until_done(proc: subprocess.Popen, lines: queue.Queue, grace_s: float,
                      on_line: Callable[[str], None] | None) -> Iterator[str]:
    """The lines of ``proc``'s output until EOF, or until ``grace_s`` after it exited (then its group is killed)."""
    exited_at = killed_at = None
    while True:
        try:
            raw = lines.get(timeout=0.2)
        except queue.Empty:
            if proc.poll() is None:
                continue
            now = time.monotonic()
            exited_at = exited_at or now
            if killed_at is None and now - exited_at > grace_s:
                killed_at = now
                if _kill_group(proc.pid, signal.SIGKILL) and on_line is not None:
                    on_line(f"(killed processes left behind by dvc (exit code {proc.returncode}), which held its "
                            "output open)")
            elif killed_at is not None and now - killed_at > 5.0:  # someone outside the group holds the pipe
                return
            continue
        if raw is None:
            return
        yield raw


def _kill_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to process group ``pgid``; False if the group is gone."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _end_group(proc: subprocess.Popen) -> None:
    """Terminate what is left of ``proc``'s process group: SIGTERM to a running dvc (10 s to stop), SIGKILL to
    the rest."""
    if proc.poll() is None and _kill_group(proc.pid, signal.SIGTERM):
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    _kill_group(proc.pid, signal.SIGKILL)
    proc.wait()


def repro(target: str, root: str | Path, *, single_item: bool = True, **kw) -> dict[str, object]:
    """``dvc repro [--single-item] <target>``; returns {ran: bool, seconds}."""
    started = time.perf_counter()
    args = ["repro", *(["--single-item"] if single_item else []), target]
    _, text = dvc(args, root, **kw)
    return {"target": target, "ran": f"Running stage '{target}'" in text,
            "seconds": round(time.perf_counter() - started, 2)}


def status(targets: list[str], root: str | Path) -> dict[str, object]:
    """``dvc status --json`` of ``targets`` (stage names or .dvc files): what changed, by target; {} = clean."""
    if not targets:
        return {}
    _, text = dvc(["status", "--json", *targets], root)
    start = text.find("{")
    return json.loads(text[start:]) if start >= 0 else {}


def has_remote(root: str | Path) -> bool:
    _, text = dvc(["remote", "list"], root)
    return bool(text.strip())


def stage_order(root: str | Path, include: Callable[[str], bool] = lambda name: "@" not in name) -> list[str]:
    """The stages of ``dvc.yaml`` in dependency order (``dvc dag --dot``; ties in ``dvc.yaml`` order).

    ``foreach`` entries (``relabel@<name>``) are left out by default: they are not part of the training DAG.
    """
    _, dot = dvc(["dag", "--dot"], root)
    nodes = re.findall(r'^\s*"([^"]+)";\s*$', dot, flags=re.M)
    edges = re.findall(r'^\s*"([^"]+)"\s*->\s*"([^"]+)";?\s*$', dot, flags=re.M)
    file_order = list((yaml.safe_load((Path(root) / "dvc.yaml").read_text()) or {}).get("stages", {}))
    rank = {name: (file_order.index(name.split("@")[0]) if name.split("@")[0] in file_order else len(file_order), name)
            for name in nodes}
    parents: dict[str, set[str]] = {name: set() for name in nodes}
    for upstream, downstream in edges:
        parents.setdefault(downstream, set()).add(upstream)
        parents.setdefault(upstream, set())
        rank.setdefault(upstream, (len(file_order), upstream))
        rank.setdefault(downstream, (len(file_order), downstream))
    ordered, done = [], set()
    while len(done) < len(parents):
        ready = sorted((n for n in parents if n not in done and parents[n] <= done), key=lambda n: rank[n])
        if not ready:
            raise DvcError(f"dvc dag has a cycle among {sorted(set(parents) - done)}")
        ordered.append(ready[0])
        done.add(ready[0])
    return [name for name in ordered if include(name)]

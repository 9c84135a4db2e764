"""The one parallel map of the project: shard work in-process, in a process pool, or on a Dask cluster.

Every stage that fans out (``dump_cams``, ``refine``, ``evaluate``, the ``shapes`` generator) calls
:func:`map_tasks` with a ``"module:function"`` target and a list of picklable tasks, and gets ``(task index,
result)`` pairs back as tasks finish. The engine follows ``runtime`` (DESIGN.md §5, "Scale-out uses existing
engines"):

- one worker, or one task: in this process, in order;
- ``runtime.executor: pool`` (default): a ``concurrent.futures`` process pool started by "forkserver" (forking a
  process that already runs torch threads is unsafe); the server imports the target's module once and every
  worker forks from it. The server and the workers die with the stage (Linux ``PR_SET_PDEATHSIG``), so a killed
  stage leaves no worker writing behind it;
- ``runtime.dask_address`` set, or ``executor: dask`` with more than one worker: a ``distributed`` client on that
  scheduler or on a ``LocalCluster`` of ``num_workers`` processes that lives for the call (``dask scheduler`` +
  ``dask worker <address>`` started in a checkout of this repository, so that the targets import and ``data/`` is
  the same shared folder).

A killed stage leaves no pool process behind: its forkserver gets SIGKILL when the stage dies
(``parallel/forkserver_guard.py``), and each worker SIGTERM when the forkserver dies (tests/stages/test_kill_hygiene.py).

Targets are named, not passed: a stage run as ``python -m stages.refine`` defines its functions in ``__main__``,
which a worker cannot import. Each task is computed by the same function whatever the engine, so results are
byte-identical (with the same torch threads per worker: ``runtime.num_threads``, else cores / workers).

An ``init`` target (``"module:function"`` with ``init_args``) runs once per worker before its first task (and once
here for the in-process path): it loads what every task of the worker shares, such as a model.

Dask is imported inside the functions: the GPU path and a machine without dask never import it.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import dataclasses
import importlib
import multiprocessing
import os
import signal
import sys
from typing import Any, Callable, Iterator, Sequence

_INITIALISED: set[tuple[str, tuple]] = set()  # per process: init targets already run (Dask workers keep state)


def resolve(target: str) -> Callable[..., Any]:
    """``"module:function"`` -> the function."""
    module_name, _, function = target.partition(":")
    return getattr(importlib.import_module(module_name), function)


def _importable(task: Any, module_name: str) -> Any:
    """A dataclass task of a module run as ``__main__`` (``python -m stages.refine``), rebuilt as the same class of the
    importable module, so that a worker can unpickle it."""
    cls = type(task)
    if cls.__module__ != "__main__" or not dataclasses.is_dataclass(task):
        return task
    twin = getattr(importlib.import_module(module_name), cls.__name__)
    return twin(**{f.name: getattr(task, f.name) for f in dataclasses.fields(task)})


def use_dask(runtime: Any) -> bool:
    """Dask for shard work: an address is given, or the executor asks for it with more than one worker."""
    return bool(runtime.dask_address) or (runtime.executor == "dask" and runtime.num_workers > 1)


def worker_threads(runtime: Any, workers: int | None = None) -> int:
    """Torch threads per worker: ``num_threads``, else the cores shared by the workers (0 on a remote cluster)."""
    if runtime.num_threads:
        return runtime.num_threads
    if runtime.dask_address:
        return 0
    return max(1, (os.cpu_count() or 1) // max(1, workers or runtime.num_workers))


PARENT_PID_ENV = "WSSS_POOL_PARENT_PID"  # the stage process that started the pool's forkserver


def die_with_parent(sig: int = signal.SIGTERM, expected_parent: int | None = None) -> None:
    """Linux: the kernel sends ``sig`` to this process when the process that started it dies; if that parent is
    already gone (``expected_parent`` is not our parent any more), exit now."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # 1 = PR_SET_PDEATHSIG
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)


def _die_with_parent() -> None:
    die_with_parent(signal.SIGTERM)


def _setup_worker(module: str, threads: int, init: str | None, init_args: tuple) -> None:
    """In a worker, before any task: die with the parent, import the target's module, set torch threads (when the
    module uses torch), run the init target once."""
    _die_with_parent()
    importlib.import_module(module)
    if threads and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    if init and (init, init_args) not in _INITIALISED:
        resolve(init)(*init_args)
        _INITIALISED.add((init, init_args))


def _call(target: str, task: Any, threads: int, init: str | None, init_args: tuple) -> Any:
    """On a Dask worker: the worker set-up (once), then the task."""
    _setup_worker(target.partition(":")[0], threads, init, init_args)
    return resolve(target)(task)


@contextlib.contextmanager
def dask_client(runtime: Any) -> Iterator[Any]:
    from distributed import Client, LocalCluster

    if runtime.dask_address:
        with Client(runtime.dask_address) as client:
            yield client
        return
    with LocalCluster(n_workers=runtime.num_workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        yield client


def _forkserver(target: str) -> Any:
    """The forkserver context, its server set to preload ``target``'s module (if it is not running yet).

    The server imports torch once and workers fork from it. It must die with this process: each worker holds the
    server's "parent alive" pipe open (Python passes it to every child), so the server never sees the stage's death
    by itself, and the workers (PR_SET_PDEATHSIG) die only with the server: parallel/forkserver_guard.py."""
    context = multiprocessing.get_context("forkserver")
    os.environ[PARENT_PID_ENV] = str(os.getpid())
    context.set_forkserver_preload(["parallel.forkserver_guard", target.partition(":")[0]])
    return context


def will_pool(tasks: int, runtime: Any, workers: int | None = None) -> bool:
    """Whether :func:`map_tasks` would start the process pool for ``tasks`` tasks."""
    workers = runtime.num_workers if workers is None else workers
    return workers > 1 and tasks > 1 and not use_dask(runtime)


def prestart(target: str) -> None:
    """Start the pool's forkserver now, without waiting for it: it imports ``target``'s module (torch and the rest,
    seconds of start-up) while this process does other work, and the next :func:`map_tasks` pool forks its workers
    at once. Call it only where a pool will follow (:func:`will_pool`): the server costs a core while it imports."""
    _forkserver(target)
    from multiprocessing import forkserver

    forkserver.ensure_running()


def map_tasks(target: str, tasks: Sequence[Any], runtime: Any, *, workers: int | None = None,
              init: str | None = None, init_args: tuple = ()) -> Iterator[tuple[int, Any]]:
    """``(task index, result)`` of ``target(task)`` over ``tasks``, in completion order.

    ``runtime`` is the ``runtime`` params section (``num_workers``, ``num_threads``, ``executor``,
    ``dask_address``); ``workers`` overrides ``runtime.num_workers`` for the pool.
    """
    workers = runtime.num_workers if workers is None else workers
    tasks = [_importable(task, target.partition(":")[0]) for task in tasks]
    if len(tasks) > 1 and use_dask(runtime):
        yield from _map_dask(target, tasks, runtime, init, init_args)
        return
    if not will_pool(len(tasks), runtime, workers):
        if init:
            resolve(init)(*init_args)
        function = resolve(target)
        for i, task in enumerate(tasks):
            yield i, function(task)
        return
    threads = worker_threads(runtime, workers)
    context = _forkserver(target)
    function = resolve(target)
    with cf.ProcessPoolExecutor(min(workers, len(tasks)), mp_context=context, initializer=_setup_worker,
                                initargs=(target.partition(":")[0], threads, init, init_args)) as pool:
        futures = {pool.submit(function, task): i for i, task in enumerate(tasks)}
        try:
            for future in cf.as_completed(futures):
                yield futures[future], future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _map_dask(target: str, tasks: Sequence[Any], runtime: Any, init: str | None,
              init_args: tuple) -> Iterator[tuple[int, Any]]:
    from distributed import as_completed

    threads = worker_threads(runtime)
    with dask_client(runtime) as client:
        futures = [client.submit(_call, target, task, threads, init, init_args, pure=False) for task in tasks]
        index = {future.key: i for i, future in enumerate(futures)}
        for future in as_completed(futures):
            yield index[future.key], future.result()

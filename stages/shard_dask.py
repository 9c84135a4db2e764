"""Shard work of ``dump_cams`` and ``refine`` on a Dask cluster (DESIGN.md §5 "Scale-out uses existing engines").

Used when ``runtime.dask_address`` names a scheduler (``dask scheduler`` + ``dask worker <address>`` started in a
checkout of this repository, so that ``stages`` imports and ``data/`` is the same shared folder), or when
``runtime.executor`` is ``dask`` and ``runtime.num_workers`` > 1: then a ``distributed.LocalCluster`` of that many
worker processes lives for the stage's run. Every shard is computed by the same function as in a single process,
so the shards are byte-identical whatever the engine (with the same torch threads per worker:
``runtime.num_threads``, else cores / workers).

Dask is imported inside the functions: the GPU path and a machine without dask never import it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

from stages.params import DumpCamsParams, RuntimeConfig


def use_dask(runtime: RuntimeConfig) -> bool:
    """Dask for shard work: an address is given, or the executor asks for it with more than one worker."""
    return bool(runtime.dask_address) or (runtime.executor == "dask" and runtime.num_workers > 1)


def worker_threads(runtime: RuntimeConfig) -> int:
    """Torch threads per worker: ``num_threads``, else the cores shared by a local cluster's workers (0: leave)."""
    if runtime.num_threads:
        return runtime.num_threads
    return 0 if runtime.dask_address else max(1, (os.cpu_count() or 1) // runtime.num_workers)


@contextlib.contextmanager
def dask_client(runtime: RuntimeConfig) -> Iterator[Any]:
    from distributed import Client, LocalCluster

    if runtime.dask_address:
        with Client(runtime.dask_address) as client:
            yield client
        return
    with LocalCluster(n_workers=runtime.num_workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        yield client


def call(target: str, task_type: str, values: tuple, threads: int) -> Any:
    """On a worker: rebuild the task and run ``module:function`` on it.

    The task travels as its field values: a stage run as ``python -m stages.refine`` defines its task class in
    ``__main__``, which a worker cannot import.
    """
    if threads:
        import torch

        torch.set_num_threads(threads)
    module_name, function = target.split(":")
    module = importlib.import_module(module_name)
    return getattr(module, function)(getattr(module, task_type)(*values))


def map_shards(target: str, tasks: Sequence[Any], runtime: RuntimeConfig) -> Iterator[tuple[int, Any]]:
    """``(task index, result)`` of ``module:function`` over dataclass ``tasks``, in completion order."""
    from distributed import as_completed

    threads = worker_threads(runtime)
    with dask_client(runtime) as client:
        futures = []
        for task in tasks:
            values = tuple(getattr(task, f.name) for f in dataclasses.fields(task))
            futures.append(client.submit(call, target, type(task).__name__, values, threads, pure=False))
        index = {future.key: i for i, future in enumerate(futures)}
        for future in as_completed(futures):
            yield index[future.key], future.result()


@dataclasses.dataclass(frozen=True)
class CamShardTask:
    path: str
    classifier_dir: str
    params: DumpCamsParams
    device: str


_MODELS: dict[tuple[str, str, str], Any] = {}  # per worker process: the classifier, loaded once, not per shard


def dump_cam_shard(task: CamShardTask) -> list[dict[str, Any]]:
    """CAM rows of one manifest shard (``dump_cams.dump_shard``), computed on a worker."""
    from tqdm import tqdm

    from shards.collections import classifier_fingerprint
    from stages import dump_cams
    from stages import runtime as rt
    from stages.classifier_model import load_classifier

    env = rt.setup_runtime(task.device)
    key = (task.classifier_dir, classifier_fingerprint(task.classifier_dir), str(env.device))
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = load_classifier(task.classifier_dir, env.device)[0]
    return dump_cams.dump_shard(_MODELS[key], Path(task.path), task.params, env, tqdm(disable=True))


def dump_cams_on_dask(paths: Sequence[Path], classifier_dir: Path, p: DumpCamsParams, runtime: RuntimeConfig
                      ) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """``(index into paths, CAM rows)`` as shards finish; the stage writes the shards itself."""
    tasks = [CamShardTask(str(Path(path).resolve()), str(Path(classifier_dir).resolve()), p, runtime.device)
             for path in paths]
    yield from map_shards("stages.shard_dask:dump_cam_shard", tasks, runtime)

"""dump_cams and refine shards on Dask are byte-identical to the in-process / process-pool runs."""

import pytest

pytest.importorskip("pydensecrf.densecrf")
pytest.importorskip("distributed")

from config.schema import DumpCamsParams, Params, RefineParams, RuntimeConfig  # noqa: E402
from parallel.shard_map import use_dask  # noqa: E402
from stages import dump_cams, refine  # noqa: E402
from tests.stages.test_dump_cams import build_inputs, shard_hashes  # noqa: E402


def params(**runtime) -> Params:
    return Params(runtime=RuntimeConfig(num_threads=1, **runtime),
                  dump_cams=DumpCamsParams(splits=("train", "val"), eval_split="val", scales=(1.0, 0.5)),
                  refine=RefineParams(overlays=0))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("dask")
    manifest, classifier = build_inputs(root)
    dump_cams.run(params(num_workers=1), manifest, classifier, root / "cams", progress=False)
    refine.run(params(num_workers=2), root / "cams", manifest, root / "pseudo", progress=False)  # process pool
    return root, manifest, classifier


def test_the_executor_choice():
    assert not use_dask(RuntimeConfig(num_workers=4))
    assert not use_dask(RuntimeConfig(executor="dask", num_workers=1))
    assert use_dask(RuntimeConfig(executor="dask", num_workers=2))
    assert use_dask(RuntimeConfig(dask_address="tcp://127.0.0.1:8786"))


def test_refine_on_a_local_dask_cluster_equals_the_process_pool(reference, tmp_path):
    root, manifest, _ = reference
    result = refine.run(params(num_workers=2, executor="dask"), root / "cams", manifest, tmp_path, progress=False)
    assert len(result["computed"]) == 3
    assert shard_hashes(tmp_path) == shard_hashes(root / "pseudo")


def test_dump_cams_on_a_dask_address_equals_the_single_process_run(reference, tmp_path):
    from distributed import LocalCluster

    root, manifest, classifier = reference
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        result = dump_cams.run(params(dask_address=cluster.scheduler_address), manifest, classifier, tmp_path,
                               progress=False)
    assert len(result["computed"]) == 3 and result["images"] == 12
    assert shard_hashes(tmp_path) == shard_hashes(root / "cams")


def test_the_stages_import_without_dask_or_prefect():
    """The GPU machine has torch and no dask or prefect: the stages import dask only inside the Dask path."""
    import subprocess
    import sys

    code = ("import sys\nfor name in ('dask', 'distributed', 'prefect', 'prefect_dask'): sys.modules[name] = None\n"
            "import stages.dump_cams, stages.refine, stages.relabel, parallel.shard_map\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]

"""Helpers of the pipeline tests: a trained tiny project with an inbox, and reads through the Prefect API."""

from pathlib import Path

from conftest import copy_project
from tests.collection_inputs import make_collection


def relabel_project(trained: Path, dest: Path, collections: dict[str, int]) -> Path:
    """A private copy of the session's trained project ``trained`` (git + DVC, tiny params, its classifier in
    data/classifier) with inbox folders of ``collections`` {name: number of images}, each with one broken file."""
    project = copy_project(trained, dest)
    for seed, (name, count) in enumerate(collections.items()):
        make_collection(project / "data" / "inbox" / name, count, seed=seed)
    return project


def artifacts_of(flow_run_ids) -> list:
    """The artifacts of these flow runs, read through the API of the current settings."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=list(flow_run_ids))))


def flow_runs_named(name: str) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[name])))


def subflow_runs(parent_ids) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=list(parent_ids))))


def wait_for(check, timeout: float, what: str, poll_s: float = 1.0, proc=None, log=None):
    """Poll ``check()`` until it returns something truthy; a clear error naming ``what`` otherwise."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(poll_s)
    tail = Path(log).read_text()[-3000:] if log is not None and Path(log).exists() else ""
    raise AssertionError(f"{what} not ready after {timeout:.0f} s\n{tail}")


def server_healthy(api_url: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
        return response.status == 200

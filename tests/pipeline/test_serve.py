"""The served deployments end to end on a real Prefect server: `python -m pipeline server` and `python -m pipeline
serve` in subprocesses, both taking the server's URL from the project's params (orchestration.api_url), no
PREFECT_API_URL given; runs read back through the API. One run is triggered with `run_deployment`, one is created by
the server's scheduler (no trigger at all)."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from conftest import free_port, merge, tool_env
from tests.pipeline.helpers import artifacts_of, relabel_project, server_healthy, subflow_runs, wait_for

pytestmark = pytest.mark.slow
pytest.importorskip("pydensecrf.densecrf")

DEPLOYMENT = "relabel-inbox/relabel-inbox"
SERVE_LEAD_S = 25  # from starting `serve` to the first cron tick: serve registers its deployments in ~6-12 s


def start(cmd, cwd, env, log: Path) -> subprocess.Popen:
    handle = open(log, "w")
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the group this test started: the process and its flow-run children
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def set_orchestration(project: Path, **values) -> None:
    path = project / "params.yaml"
    path.write_text(yaml.safe_dump(merge(yaml.safe_load(path.read_text()), {"orchestration": values}),
                                   sort_keys=False))


@contextlib.contextmanager
def project_server(project: Path, tmp_path: Path):
    """`python -m pipeline server` for ``project``, its api_url on a free loopback port; yields (api URL, env of the
    project's commands: a temporary PREFECT_HOME, no telemetry, no PREFECT_API_URL)."""
    api = f"http://127.0.0.1:{free_port()}/api"
    set_orchestration(project, api_url=api)
    env = {**tool_env(), "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1"}
    env.pop("PREFECT_API_URL", None)
    server = start([sys.executable, "-m", "pipeline", "server"], project, env, tmp_path / "server.log")
    try:
        wait_for(lambda: server_healthy(api), 90, "prefect server", proc=server, log=tmp_path / "server.log")
        yield api, env
    finally:
        stop(server)


@contextlib.contextmanager
def client_settings(api: str, monkeypatch):
    """This process's prefect client on ``api`` (prefect is imported here, after the environment is set)."""
    monkeypatch.setenv("PREFECT_API_URL", api)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}):
        yield


def read_deployment():
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(DEPLOYMENT)


def errors_in(log: Path) -> str:
    """The server log's ERROR lines and exception lines: what its scheduler service said, if it failed."""
    lines = log.read_text().splitlines() if log.exists() else []
    return "\n".join(line for line in lines if "ERROR" in line or re.match(r"^\w+(\.\w+)*(Error|Exception):", line))


def test_served_deployment_runs_on_trigger_and_publishes_artifacts(trained_project, tmp_path, monkeypatch):
    project = relabel_project(trained_project.root, tmp_path / "project", {"street": 3})
    with project_server(project, tmp_path) as (api, env):
        serve = start([sys.executable, "-m", "pipeline", "serve"], project, env, tmp_path / "serve.log")
        try:
            with client_settings(api, monkeypatch):
                from prefect.deployments import run_deployment

                served = wait_for(read_deployment, 90, "served deployment", proc=serve, log=tmp_path / "serve.log")
                assert served.schedules and served.schedules[0].schedule.cron == "*/30 * * * *"
                flow_run = run_deployment(DEPLOYMENT, timeout=300, poll_interval=2)
                assert flow_run.state.is_completed(), (flow_run.state, (tmp_path / "serve.log").read_text()[-4000:])
                children = subflow_runs([flow_run.id])
                assert [run.name for run in children] == ["relabel street"]
                artifacts = {a.key: a for a in artifacts_of([flow_run.id, *[c.id for c in children]]) if a.key}
        finally:
            stop(serve)
    for key in ("relabel-inbox-summary", "relabel-inbox-rejects", "relabel-inbox-progress", "relabel-street-summary",
                "relabel-street-classes", "relabel-street-tags", "relabel-street-gallery"):
        assert key in artifacts, sorted(artifacts)
    assert "broken" in json.dumps(artifacts["relabel-inbox-rejects"].data)
    assert (project / "data/collections/street/current.json").exists()


def look_in_the_ui(api: str, run_id, gallery_id) -> dict | None:
    """Open the gallery artifact in a headless Chromium from the project's UI and count its rendered images (None
    without chromium). With ``WSSS_SCREENSHOTS=<folder>`` also save the scheduled run's page and the gallery there
    (how docs/prefect-scheduled-run.png and docs/prefect-gallery.png are made)."""
    import time

    from tests.browser import chromium_paths, headless_chromium

    if chromium_paths() is None or gallery_id is None:
        return None
    ui = api.removesuffix("/api")
    shots = os.environ.get("WSSS_SCREENSHOTS")
    with headless_chromium(1400, 1000) as driver:
        if shots:
            driver.get(f"{ui}/runs/flow-run/{run_id}")
            time.sleep(6)  # the single-page app renders after its API calls
            driver.save_screenshot(str(Path(shots) / "prefect-scheduled-run.png"))
        driver.get(f"{ui}/artifacts/artifact/{gallery_id}")
        deadline = time.monotonic() + 30
        counts = {"images": 0, "broken": 0}
        while time.monotonic() < deadline:
            images = driver.execute_script(
                "return Array.from(document.querySelectorAll('img')).filter(i => i.src.startsWith('data:'))"
                ".map(i => [i.complete, i.naturalWidth])")
            counts = {"images": len(images), "broken": sum(1 for done, width in images if done and not width)}
            if images and all(done for done, _ in images):
                break
            time.sleep(1)
        if shots:
            driver.save_screenshot(str(Path(shots) / "prefect-gallery.png"))
    return counts


def test_schedule_creates_a_run_that_relabels_the_inbox(trained_project, tmp_path, monkeypatch):
    """No trigger: the server's scheduler service must create the run from the deployment's cron (once a minute, at a
    second ~SERVE_LEAD_S ahead; a 6-field cron's last field is seconds), and the served process must run it."""
    project = relabel_project(trained_project.root, tmp_path / "project", {"street": 3})
    with project_server(project, tmp_path) as (api, env):
        fire = (datetime.now(UTC) + timedelta(seconds=SERVE_LEAD_S)).second
        set_orchestration(project, relabel_cron=f"* * * * * {fire}")
        serve = start([sys.executable, "-m", "pipeline", "serve"], project, env, tmp_path / "serve.log")
        try:
            with client_settings(api, monkeypatch):
                from prefect import get_client
                from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

                served = wait_for(read_deployment, 90, "served deployment", proc=serve, log=tmp_path / "serve.log")
                assert [s.schedule.cron for s in served.schedules] == [f"* * * * * {fire}"]

                def runs():
                    with get_client(sync_client=True) as client:
                        return client.read_flow_runs(flow_run_filter=FlowRunFilter(
                            deployment_id=FlowRunFilterDeploymentId(any_=[served.id])))

                def first_run_final():
                    first = min(runs(), key=lambda run: run.expected_start_time)
                    return first if first.state.is_final() else None

                # a minute and a margin: a deployment registered after its first tick gets the next one
                try:
                    wait_for(runs, SERVE_LEAD_S + 75, "a scheduled flow run", proc=serve, poll_s=2)
                except AssertionError as exc:
                    raise AssertionError(f"{str(exc).strip()}: the scheduler created no run; server errors:\n"
                                         f"{errors_in(tmp_path / 'server.log')[-4000:]}") from None
                run = wait_for(first_run_final, 240, "the scheduled run to finish", proc=serve, poll_s=2,
                               log=tmp_path / "serve.log")
                with get_client(sync_client=True) as client:
                    history = client.read_flow_run_states(run.id)
                children = subflow_runs([run.id])
                gallery = [a for a in artifacts_of([c.id for c in children]) if a.key == "relabel-street-gallery"]
                shown = look_in_the_ui(api, run.id, gallery[0].id if gallery else None)
        finally:
            stop(serve)
    assert run.state.is_completed(), (run.state, (tmp_path / "serve.log").read_text()[-4000:])
    # made by the deployment's schedule, not by a person or a trigger
    assert run.auto_scheduled and run.created_by is not None
    assert (run.created_by.type, run.created_by.id) == ("SCHEDULE", served.schedules[0].id)
    assert (history[0].type.value, history[0].name) == ("SCHEDULED", "Scheduled")
    assert run.expected_start_time.second == fire
    assert [(c.name, c.state.type.value) for c in children] == [("relabel street", "COMPLETED")]
    assert len(gallery) == 1 and "data:image/jpeg;base64," in gallery[0].data and "Colours:" in gallery[0].data
    if shown is not None:  # a browser shows the gallery's thumbnails from the UI's page (chromium present)
        assert shown["images"] >= 3 * 3 and shown["broken"] == 0, shown  # image, CAM, mask of 3 images + swatches
    assert (project / "data/collections/street/current.json").exists()

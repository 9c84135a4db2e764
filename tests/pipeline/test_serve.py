"""The served deployment end to end: a real `prefect server start`, `python -m pipeline serve` in a subprocess, a run
triggered with `run_deployment`, its state and artifacts read back through the API."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port, tool_env
from tests.pipeline.helpers import artifacts_of, relabel_project, server_healthy, subflow_runs, wait_for

pytestmark = pytest.mark.slow
pytest.importorskip("pydensecrf.densecrf")


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


def test_served_deployment_runs_on_trigger_and_publishes_artifacts(trained_project, tmp_path, monkeypatch):
    project = relabel_project(trained_project.root, tmp_path / "project", {"street": 3})
    api = f"http://127.0.0.1:{free_port()}/api"
    env = {**tool_env(), "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1"}
    env.pop("PREFECT_API_URL", None)
    port = api.rsplit(":", 1)[1].split("/")[0]
    server = start([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                    port], tmp_path, env, tmp_path / "server.log")
    serve = None
    try:
        wait_for(lambda: server_healthy(api), 90, "prefect server", proc=server, log=tmp_path / "server.log")
        serve = start([sys.executable, "-m", "pipeline", "serve"], project, {**env, "PREFECT_API_URL": api},
                      tmp_path / "serve.log")
        monkeypatch.setenv("PREFECT_API_URL", api)
        from prefect import get_client
        from prefect.deployments import run_deployment
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: api}):
            def deployment():
                with get_client(sync_client=True) as client:
                    return client.read_deployment_by_name("relabel-inbox/relabel-inbox")

            served = wait_for(deployment, 90, "served deployment", proc=serve, log=tmp_path / "serve.log")
            assert served.schedules and served.schedules[0].schedule.cron == "*/30 * * * *"
            flow_run = run_deployment("relabel-inbox/relabel-inbox", timeout=300, poll_interval=2)
            assert flow_run.state.is_completed(), (flow_run.state, (tmp_path / "serve.log").read_text()[-4000:])
            children = subflow_runs([flow_run.id])
            assert [run.name for run in children] == ["relabel street"]
            artifacts = {a.key: a for a in artifacts_of([flow_run.id, *[c.id for c in children]]) if a.key}
    finally:
        if serve is not None:
            stop(serve)
        stop(server)
    for key in ("relabel-inbox-summary", "relabel-inbox-rejects", "relabel-inbox-progress", "relabel-street-summary",
                "relabel-street-classes", "relabel-street-tags", "relabel-street-overlays"):
        assert key in artifacts, sorted(artifacts)
    assert "broken" in json.dumps(artifacts["relabel-inbox-rejects"].data)
    assert (project / "data/collections/street/current.json").exists()

"""Serve the deployments against the project's Prefect server (``make server``, at ``orchestration.api_url``).

``relabel-inbox`` (``orchestration.deployment``) runs on ``orchestration.relabel_cron``; ``produce`` and
``relabel`` (one collection, by name) are served beside it without a schedule, to be run from the UI or with
``prefect deployment run``. The process stays in the foreground and runs each flow run in a subprocess.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from config.schema import OrchestrationConfig


def use_project_server(cfg: OrchestrationConfig) -> str:
    """The API URL of the project's Prefect server: ``PREFECT_API_URL`` when set, else ``orchestration.api_url``.

    Exported as ``PREFECT_API_URL``, before prefect is imported (its settings read the environment once): without
    it, a prefect client starts a throwaway temporary server and the runs never reach the UI.
    """
    if not os.environ.get("PREFECT_API_URL"):
        os.environ["PREFECT_API_URL"] = cfg.api_url
    return os.environ["PREFECT_API_URL"]


def server_answers(api_url: str, timeout: float = 5.0) -> bool:
    """Whether a Prefect server answers ``GET <api_url>/health``."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def server_command(api_url: str) -> list[str]:
    """``prefect server start`` on the host and port of ``api_url`` (``http://HOST:PORT/api``)."""
    url = urllib.parse.urlsplit(api_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"orchestration.api_url: {api_url!r} is not an http://HOST:PORT/api URL")
    return ["prefect", "server", "start", "--host", url.hostname, "--port", str(url.port or 4200)]


def serve(root: Path, cfg: OrchestrationConfig) -> None:
    """Build the three deployments and serve them until interrupted (Ctrl-C pauses the schedule)."""
    from prefect import serve as prefect_serve

    from pipeline.flows import produce, relabel, relabel_inbox

    parameters = {"root": str(Path(root).resolve())}
    prefect_serve(
        relabel_inbox.to_deployment(name=cfg.deployment, cron=cfg.relabel_cron, parameters=parameters,
                                    tags=["wsss", "relabel"],
                                    description="Register new inbox folders, relabel the collections without pseudo "
                                                "labels for the current classifier, dvc push."),
        produce.to_deployment(name="produce", parameters=parameters, tags=["wsss", "train"],
                              description="The training DAG, one task per DVC stage."),
        relabel.to_deployment(name="relabel", parameters=parameters, tags=["wsss", "relabel"],
                              description="Relabel one registered collection (parameter: name)."),
    )

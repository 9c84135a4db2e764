"""Serve the deployments against a running Prefect server (``prefect server start --host 127.0.0.1``).

``relabel-inbox`` (``orchestration.deployment``) runs on ``orchestration.relabel_cron``; ``produce`` and
``relabel`` (one collection, by name) are served beside it without a schedule, to be run from the UI or with
``prefect deployment run``. The process stays in the foreground and runs each flow run in a subprocess.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

from config.schema import OrchestrationConfig


def check_server(api_url: str, timeout: float = 5.0) -> None:
    """A clear error when no Prefect server answers at ``api_url`` (``flow.serve`` needs a real one)."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as response:
            if response.status == 200:
                return
    except (urllib.error.URLError, OSError):
        pass
    raise SystemExit(f"error: no Prefect server at {api_url}. Start one in another terminal:\n"
                     f"  prefect server start --host 127.0.0.1\n(or set PREFECT_API_URL / orchestration.api_url)")


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

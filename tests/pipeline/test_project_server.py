"""The commands that talk to Prefect use the project's server (PREFECT_API_URL, else orchestration.api_url) and stop
with one clear line when none answers there, instead of starting a throwaway temporary server.

`python -m pipeline server` starting at api_url, and `serve` finding it without PREFECT_API_URL, are covered end to
end by tests/pipeline/test_serve.py.
"""

import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, free_port, tool_env
from pipeline.serve import server_command


def params_with_api_url(folder, api_url: str):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["orchestration"]["api_url"] = api_url
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return folder


def pipeline_command(root, *args, env_api_url: str | None = None) -> subprocess.CompletedProcess:
    env = tool_env()
    env.pop("PREFECT_API_URL", None)
    if env_api_url is not None:
        env["PREFECT_API_URL"] = env_api_url
    return subprocess.run([sys.executable, "-m", "pipeline", "--root", str(root), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", [["serve"], ["produce"], ["relabel", "street"], ["inbox"]])
def test_no_server_at_api_url_is_one_clear_error(tmp_path, command):
    api_url = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    proc = pipeline_command(params_with_api_url(tmp_path, api_url), *command)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and api_url in lines[0] and "make server" in lines[0], proc.stderr
    assert proc.stdout == ""


def test_prefect_api_url_in_the_environment_wins(tmp_path):
    params_url, env_url = (f"http://127.0.0.1:{free_port()}/api" for _ in range(2))
    proc = pipeline_command(params_with_api_url(tmp_path, params_url), "inbox", env_api_url=env_url)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert env_url in proc.stderr and params_url not in proc.stderr


def test_server_command_takes_host_and_port_from_api_url():
    assert server_command("http://127.0.0.1:4310/api")[-4:] == ["--host", "127.0.0.1", "--port", "4310"]
    assert server_command("http://127.0.0.1/api")[-1] == "4200"
    with pytest.raises(ValueError, match="api_url"):
        server_command("127.0.0.1:4200")

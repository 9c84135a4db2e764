"""pipeline/dvc.py: a stage that dies with a child still holding its output ends the task, and leaves nothing."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.dvc import DvcError, dvc, tool_env

# The stage starts a grandchild that keeps the stage's stdout open for 10 minutes, writes a marker, then fails, the
# way a stage's orphaned pool worker used to (issue 14, row 13).
STAGE = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open("child.pid", "w").write(str(child.pid))
print("stage failing", flush=True)
sys.exit(3)
"""


@pytest.fixture
def project(tmp_path) -> Path:
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, env=tool_env(), check=True)
    (tmp_path / "stage.py").write_text(STAGE)
    (tmp_path / "dvc.yaml").write_text("stages:\n  fails:\n    cmd: python stage.py\n    deps: [stage.py]\n"
                                       "    outs: [out.txt]\n")
    return tmp_path


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_failed_stage_ends_its_task_and_its_orphans_die(project):
    started = time.monotonic()
    seen = []
    with pytest.raises(DvcError, match="exit code") as failure:
        dvc(["repro", "fails"], project, on_line=seen.append, grace_s=1.0)
    elapsed = time.monotonic() - started
    assert elapsed < 120, elapsed  # the child sleeps for 600 s: reading to end-of-file would hang that long
    assert "stage failing" in str(failure.value)
    child = int((project / "child.pid").read_text())
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child), "the stage's orphan outlived the task"
    assert any("killed processes left behind" in line for line in seen), seen


def test_a_clean_run_returns_its_output(project):
    (project / "stage.py").write_text("open('out.txt', 'w').write('ok')\nprint('stage done')\n")
    code, text = dvc(["repro", "fails"], project)
    assert code == 0 and "stage done" in text and (project / "out.txt").read_text() == "ok"
    assert os.path.exists(project / "dvc.lock")

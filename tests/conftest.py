import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from shards.fingerprint import CODE_FOLDERS

ROOT = Path(__file__).resolve().parent.parent
PROJECT_FILES = ["dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", *CODE_FOLDERS, "pipeline"]
PROJECT_FILES.append("collections.yaml")  # dvc.yaml reads it (vars): the relabel@<collection> stages
PROJECT_FILES.append("data/corrections/README.md")  # keeps data/corrections, a dependency of refine and relabel

# A tiny preset of every stage: the whole DAG on CPU in well under a minute.
TINY = {
    "shapes": {"num_train": 24, "num_val": 8, "min_side": 64, "max_side": 96},
    "prepare": {"rows_per_shard": 16},
    "dump_cams": {"image_size": 64, "cam_size": 32, "predict_size": 64, "workers": 1},
    "train_classifier": {
        "model": {"stem": "", "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2, "seg_dim": 16,
                  "proj_hidden_dim": 32, "proj_bottleneck_dim": 16, "proj_out_dim": 32},
        "loss": {"local_crops": 2, "local_crop_size": 24, "seg_start_iter": 2},
        "augment": {"crop_size": 48, "base_size": 64},
        "optim": {"batch_size": 4, "iterations": 4, "warmup_iters": 1},
        "loop": {"eval_every": 2, "eval_images": 2, "checkpoint_every": 2, "log_every": 1},
        "eval_size": 64, "eval_cam_scales": [1.0],
    },
    # a 0.3M-parameter backbone with random weights: a training step takes a few hundredths of a second
    "train_segmenter": {
        "model": {"backbone": "mobilenetv3_small_050", "pretrained": "none", "aspp_channels": 16,
                  "decoder_channels": 16, "low_level_channels": 8},
        "augment": {"crop_size": 48},
        "optim": {"batch_size": 4, "iterations": 4},
        "epochs": 0.0,  # exactly optim.iterations steps, whatever the test's image count
        "loop": {"eval_every": 2, "eval_images": 2, "checkpoint_every": 2, "log_every": 1},
    },
    "evaluate": {"scales": [1.0, 0.75], "overlays": 2, "confusion_rows": 100},
}


def merge(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` merged in, nested sections key by key (in place; returns ``base``)."""
    for key, value in overrides.items():
        if isinstance(value, dict) and value and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def tiny_params(overrides: dict | None = None) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    return merge(merge(params, TINY), overrides or {})


def make_project(dest: Path, params: dict) -> Path:
    """A copy of the project (code, dvc.yaml, params) in a fresh git repository with DVC initialised."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    (dest / ".dvc").mkdir(exist_ok=True)
    shutil.copy2(ROOT / ".dvc/config", dest / ".dvc/config")
    shutil.copy2(ROOT / ".dvc/.gitignore", dest / ".dvc/.gitignore")
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "-c", "user.email=t@example.invalid", "-c", "user.name=t", "commit", "-qm", "init"], dest)
    return dest


def tool_env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(DVC_NO_ANALYTICS="1", DO_NOT_TRACK="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.invalid",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.invalid")
    return env


def free_port() -> int:
    """A free TCP port on the loopback interface (for a server or a torchrun rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(cmd, cwd, check=True, timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=tool_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc


@dataclasses.dataclass(frozen=True)
class TrainedProject:
    root: Path  # read it, never change it: other tests share it (copy_project for a private copy)
    repro_stdout: str  # the output of the `dvc repro` that built it


def copy_project(src: Path, dest: Path) -> Path:
    """A private copy of a project: code, data, git history, DVC cache (``.dvc/cache``) and local remote. The cache
    links are copies (DVC's default cache.type on this file system), so the copy shares no file with ``src``;
    ``symlinks=True`` keeps any link as a link rather than copying its target."""
    shutil.copytree(src, dest, symlinks=True)
    return dest


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory) -> TrainedProject:
    """The tiny project after one `dvc repro` of the whole DAG, built once per session and shared.

    Tests that only read it (metrics, `dvc status`, a no-op `dvc repro`) use it directly; tests that change
    anything (params, `dvc exp run`, relabel) use ``trained_copy`` or ``copy_project``.
    """
    root = make_project(tmp_path_factory.mktemp("trained") / "project", tiny_params())
    return TrainedProject(root, run(["dvc", "repro"], root).stdout)


@pytest.fixture
def trained_copy(trained_project, tmp_path) -> Path:
    """A private copy of the session's trained project, to change at will."""
    return copy_project(trained_project.root, tmp_path / "project")


def kill_when_paused(cmd, point: str, *, cwd, log: Path, env: dict | None = None) -> None:
    """Run ``cmd`` with ``WSSS_PAUSE_AFTER=<point>`` (the test hook ``shards.io.pause_point``): it stops itself
    right after that durable write (``checkpoint:2``: its 2nd checkpoint; ``shard:1``: its 1st shard), and is
    SIGKILLed there. Deterministic: the kill lands at that point, not wherever a polling loop catches the run."""
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, cwd=cwd, env={**(env or tool_env()), "WSSS_PAUSE_AFTER": point},
                                stdout=handle, stderr=subprocess.STDOUT)
    try:
        _, status = os.waitpid(proc.pid, os.WUNTRACED)  # returns once the child is stopped (or has ended)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if not os.WIFSTOPPED(status):
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by waitpid above
        raise AssertionError(f"{' '.join(map(str, cmd[:4]))} ended ({proc.returncode}) before {point}:\n"
                             f"{Path(log).read_text()[-3000:]}")
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def group_processes(pgid: int) -> list[str]:
    """The live (not zombie) processes of process group ``pgid``: ``"pid cmdline"`` each, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(stat[2]) == pgid and stat[0] != "Z":
            found.append(f"{entry} {cmdline[:120]}")
    return found


def file_states(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` (hidden temporaries included) with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def kill_midway(cmd, out: Path, *, cwd, log: Path, shards: int = 1, settle_s: float = 1.5, workers: bool = True,
                env: dict | None = None) -> dict:
    """Run a pool stage in a process group of its own, SIGKILL its main process once ``shards`` shards are in
    ``out``'s index (its workers are busy with the next ones), and check the process hygiene (issue 14): within
    5 s no process of the group is left, and no file under ``out`` changes after that. Returns the files then."""
    from shards.io import ShardSet

    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env or tool_env(), stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        while len(ShardSet(out).index()) < shards:
            assert proc.poll() is None, f"ended ({proc.returncode}) before {shards} shards:\n{log.read_text()[-3000:]}"
            time.sleep(0.02)
        assert not workers or group_processes(proc.pid)[1:], "the stage runs no worker process: nothing to test"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 5
    while group_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not group_processes(proc.pid), f"processes outlived the killed stage: {group_processes(proc.pid)}"
    before = file_states(out)
    time.sleep(settle_s)
    assert file_states(out) == before, "files changed after the stage was gone"
    return before


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One Prefect test server for the session (tests/pipeline): temporary PREFECT_HOME, no telemetry.

    Test modules import prefect inside their tests, after this fixture has set the environment it reads.
    """
    os.environ.update(PREFECT_HOME=str(tmp_path_factory.mktemp("prefect-home")), DO_NOT_TRACK="1",
                      PREFECT_SERVER_ANALYTICS_ENABLED="false")
    os.environ.pop("PREFECT_API_URL", None)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield

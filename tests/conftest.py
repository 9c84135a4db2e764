import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shards.fingerprint import CODE_FOLDERS

ROOT = Path(__file__).resolve().parent.parent
PROJECT_FILES = ["dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", *CODE_FOLDERS, "pipeline"]
PROJECT_FILES.append("collections.yaml")  # dvc.yaml reads it (vars): the relabel@<collection> stages

# A tiny preset of every stage: the whole DAG on CPU in well under a minute.
TINY = {
    "shapes": {"num_train": 24, "num_val": 8, "min_side": 64, "max_side": 96},
    "prepare": {"rows_per_shard": 16},
    "dump_cams": {"image_size": 64, "cam_size": 32, "predict_size": 64},
    "train_classifier": {
        "model": {"stem": "", "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2, "seg_dim": 16,
                  "proj_hidden_dim": 32, "proj_bottleneck_dim": 16, "proj_out_dim": 32},
        "loss": {"local_crops": 2, "local_crop_size": 24, "seg_start_iter": 2},
        "augment": {"crop_size": 48, "base_size": 64},
        "optim": {"batch_size": 4, "iterations": 4, "warmup_iters": 1},
        "eval_every": 2, "eval_images": 2, "checkpoint_every": 2, "log_every": 1, "eval_size": 64,
        "eval_cam_scales": [1.0],
    },
    # a 0.3M-parameter backbone with random weights: a training step takes a few hundredths of a second
    "train_segmenter": {
        "model": {"backbone": "mobilenetv3_small_050", "pretrained": "none", "aspp_channels": 16,
                  "decoder_channels": 16, "low_level_channels": 8},
        "augment": {"crop_size": 48},
        "optim": {"batch_size": 4, "iterations": 4},
        "eval_every": 2, "eval_images": 2, "checkpoint_every": 2, "log_every": 1,
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


def run(cmd, cwd, check=True, timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=tool_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc


@pytest.fixture
def project(tmp_path):
    return make_project(tmp_path / "project", tiny_params())


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

"""A SIGKILLed shard stage leaves no process behind and no write after its death (issue 14, row 13).

Python's forkserver passes its "parent alive" pipe to every pool worker, so the server never saw the stage die and
the workers (dying with the server) lived on, writing shards and holding the stage's output open. Each test starts a
stage in a process group of its own, kills its main process while its workers are busy, and checks the group is
empty within seconds and nothing under the output folder changes afterwards; then a rerun finishes the job.
"""

import subprocess
import sys

import pytest
import torch
import yaml

pytest.importorskip("pydensecrf.densecrf")

from config.schema import PrepareConfig, ShapesConfig  # noqa: E402
from conftest import ROOT, kill_midway, tiny_params, tool_env  # noqa: E402
from models.toco import ToCo  # noqa: E402
from shards.io import ShardSet  # noqa: E402
from shards.manifest import read_classes  # noqa: E402
from stages import dump_cams, prepare, shapes  # noqa: E402
from tests.collection_inputs import TINY_CLASSIFIER  # noqa: E402
from training.checkpoint import save_weights  # noqa: E402
from training.classifier_model import config_to_json, toco_config  # noqa: E402

pytestmark = pytest.mark.slow
CAMS = {"splits": ["train", "val"], "eval_split": "val", "image_size": 128, "cam_size": 64, "predict_size": 96}


def write_params(folder, **runtime) -> str:
    raw = tiny_params()
    raw["runtime"].update(num_threads=1, **runtime)
    raw["dump_cams"].update(CAMS)
    path = folder / f"params-{'-'.join(map(str, runtime.values())) or 'default'}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """24 + 4 shapes images in 2-image shards (14 shards: workers stay busy), a tiny random ToCo, its CAMs."""
    root = tmp_path_factory.mktemp("hygiene")
    shapes.run(ShapesConfig(num_train=24, num_val=4, min_side=96, max_side=160), root / "shapes", progress=False)
    prepare.run(PrepareConfig(root=str(root / "shapes"), rows_per_shard=2), root / "manifest", progress=False)
    names = read_classes(root / "manifest")["class_names"]
    cfg = toco_config(TINY_CLASSIFIER, len(names) - 1)
    torch.manual_seed(0)
    save_weights(ToCo(cfg), root / "classifier", config_to_json(cfg, names))
    subprocess.run(dump_cams_cmd(root, write_params(root), root / "cams"), cwd=ROOT, env=tool_env(), check=True,
                   capture_output=True)
    return root


def dump_cams_cmd(root, params, out):
    return [sys.executable, "-m", "stages.dump_cams", "--params", params, "--manifest", str(root / "manifest"),
            "--classifier", str(root / "classifier"), "--out", str(out), "--metrics", str(out) + ".json"]


def refine_cmd(root, params, out):
    return [sys.executable, "-m", "stages.refine", "--params", params, "--cams", str(root / "cams"), "--manifest",
            str(root / "manifest"), "--out", str(out), "--metrics", str(out) + ".json", "--overlays",
            str(out) + "-overlays"]


def finish(cmd, out):
    done = subprocess.run(cmd, cwd=ROOT, env=tool_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(ShardSet(out).index()) == 14


def test_refine_pool_workers_die_with_the_stage(inputs, tmp_path):
    out = tmp_path / "pseudo"
    cmd = refine_cmd(inputs, write_params(tmp_path, num_workers=2), out)
    left = kill_midway(cmd, out, cwd=ROOT, log=tmp_path / "killed.log")
    assert 1 <= sum(name.endswith(".parquet") and not name.startswith(".") for name in left) < 14
    finish(cmd, out)


def test_dump_cams_dies_whole_in_process(inputs, tmp_path):
    out = tmp_path / "cams"
    cmd = dump_cams_cmd(inputs, write_params(tmp_path), out)
    kill_midway(cmd, out, cwd=ROOT, log=tmp_path / "killed.log", workers=False)
    finish(cmd, out)

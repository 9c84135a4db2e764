"""The DAG under the real `dvc repro`, on the tiny preset, in a temporary git repository."""

import json

import pyarrow.parquet as pq
import pytest

from conftest import run

pytestmark = pytest.mark.slow


def test_dvc_repro_runs_every_stage_then_is_a_no_op(project):
    out = run(["dvc", "repro"], project)
    for stage in ("shapes", "prepare", "train_classifier"):
        assert f"Running stage '{stage}'" in out.stdout, out.stdout[-2000:]
    prepared = json.loads((project / "metrics/prepare.json").read_text())
    assert prepared["images"] == {"train": 24, "val": 8} and prepared["rejects"] == 0
    assert pq.read_table(project / "data/manifest/train-00000.parquet").num_rows == 16
    classifier = json.loads((project / "metrics/classifier.json").read_text())
    assert {"f1", "cam_miou", "cam_threshold"} <= set(classifier)
    assert (project / "data/classifier/model.safetensors").exists()
    shown = run(["dvc", "metrics", "show", "--json"], project).stdout
    assert "cam_miou" in shown and "rejects" in shown

    again = run(["dvc", "repro"], project)
    assert "Running stage" not in again.stdout
    status = run(["dvc", "status", "--json"], project).stdout
    assert json.loads(status) == {}


def test_changing_a_prepare_param_reruns_prepare_and_what_follows_only(project):
    run(["dvc", "repro"], project)
    out = run(["dvc", "exp", "run", "-S", "prepare.rows_per_shard=8"], project)
    assert "Running stage 'shapes'" not in out.stdout
    assert "Running stage 'prepare'" in out.stdout

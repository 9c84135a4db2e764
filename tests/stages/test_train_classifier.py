"""train_classifier: schedule, data order, resume after SIGKILL equals an uninterrupted run, DDP, ablations."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, tiny_params, tool_env
from safetensors.torch import load_file

from conftest import free_port, kill_when_paused
from config.loader import build
from config.schema import OptimConfig, Params, PrepareConfig
from shards.manifest import manifest_files
from shards.sampling import RowIndex
from stages import prepare, shapes
from training.loop import batches, lr_factor


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    params = build(Params, tiny_params())
    shapes.run(params.shapes, root / "shapes", progress=False)
    prepare.run(PrepareConfig(root=str(root / "shapes"), rows_per_shard=8), root / "manifest", progress=False)
    return root / "manifest"


def write_params(path: Path, train_overrides: dict) -> Path:
    params = tiny_params({"train_classifier": train_overrides})
    path.write_text(yaml.safe_dump(params))
    return path


def stage_cmd(params: Path, manifest: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "stages.train_classifier", "--params", str(params), "--manifest", str(manifest),
            "--out", str(out / "model"), "--checkpoints", str(out / "ckpt"), "--metrics", str(out / "m.json"),
            "--live", ""]


def test_warmup_then_poly_schedule():
    p = OptimConfig(iterations=100, warmup_iters=10, warmup_ratio=0.1, poly_power=1.0)
    assert lr_factor(0, p) == pytest.approx(0.1)
    assert lr_factor(5, p) == pytest.approx(0.55)
    assert lr_factor(10, p) == pytest.approx(1.0)
    assert lr_factor(55, p) == pytest.approx(0.5)
    assert lr_factor(100, p) == 0.0


def test_batches_are_deterministic_disjoint_across_ranks_and_resumable(manifest):
    index = RowIndex(manifest_files(manifest, "train"))
    rows = np.arange(len(index))
    take = lambda start, rank, world, n: [b for _, b in zip(range(n), batches(  # noqa: E731
        rows, index, seed=0, batch=3, start=start, rank=rank, world=world))]
    full = take(0, 0, 1, 10)
    assert take(4, 0, 1, 6) == full[4:]  # resuming at micro-step 4 continues the same order
    r0, r1 = take(0, 0, 2, 4), take(0, 1, 2, 4)
    seen0 = {k for b in r0 for k in b}
    assert not seen0 & {k for b in r1 for k in b}  # ranks never share a sample within an epoch
    epoch0 = [row for b in take(0, 0, 1, 8) for e, row in b if e == 0]
    assert sorted(epoch0) == list(range(len(index)))  # an epoch visits every row once


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_weights_of_an_uninterrupted_run(manifest, tmp_path):
    params = write_params(tmp_path / "params.yaml", {"optim": {"iterations": 12},
                                                      "loop": {"checkpoint_every": 4, "eval_every": 1000}})
    clean = tmp_path / "clean"
    subprocess.run(stage_cmd(params, manifest, clean), cwd=ROOT, env=tool_env(), check=True, capture_output=True)

    killed = tmp_path / "killed"
    kill_when_paused(stage_cmd(params, manifest, killed), "checkpoint:2", cwd=ROOT, log=tmp_path / "killed.log")
    assert torch.load(next((killed / "ckpt").glob("*/last.pt")), weights_only=True)["step"] == 8  # 2nd of every 4
    assert not (killed / "model").exists()
    resumed = subprocess.run(stage_cmd(params, manifest, killed), cwd=ROOT, env=tool_env(), capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "at step 8" in resumed.stderr
    a = load_file(clean / "model/model.safetensors")
    b = load_file(killed / "model/model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_changed_params_never_resume_stale_state(manifest, tmp_path):
    out = tmp_path / "run"
    first = write_params(tmp_path / "a.yaml", {"optim": {"iterations": 4},
                                               "loop": {"checkpoint_every": 2, "eval_every": 1000}})
    subprocess.run(stage_cmd(first, manifest, out), cwd=ROOT, env=tool_env(), check=True, capture_output=True)
    second = write_params(tmp_path / "b.yaml", {"optim": {"iterations": 4, "lr": 1e-3},
                                                "loop": {"checkpoint_every": 2, "eval_every": 1000}})
    proc = subprocess.run(stage_cmd(second, manifest, out), cwd=ROOT, env=tool_env(), capture_output=True, text=True)
    assert proc.returncode == 0 and "resuming from" not in proc.stderr
    assert len(list((out / "ckpt").iterdir())) == 1  # the stale fingerprint's folder is gone


@pytest.mark.slow
def test_two_process_ddp_with_gloo(manifest, tmp_path):
    params = write_params(tmp_path / "params.yaml", {"optim": {"iterations": 4, "batch_size": 2},
                                                      "loop": {"checkpoint_every": 2, "eval_every": 1000}})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", *stage_cmd(params, manifest, tmp_path)[2:]]
    proc = subprocess.run(cmd, cwd=ROOT, env={**tool_env(), "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "model/model.safetensors").exists() and (tmp_path / "m.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("switches", [
    {"model": {"use_ctc": False, "use_aux": False, "use_seg_head": False}, "loss": {"use_ptc": False}},  # ViT-CAM
    {"model": {"use_ctc": False}},
    {"loss": {"use_ptc": False}},
])
def test_ablation_switches_train(manifest, tmp_path, switches):
    params = write_params(tmp_path / "params.yaml", {**switches, "optim": {"iterations": 2},
                                                      "loop": {"eval_every": 1000}})
    proc = subprocess.run(stage_cmd(params, manifest, tmp_path), cwd=ROOT, env=tool_env(), capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = load_file(tmp_path / "model/model.safetensors")
    model = switches.get("model", {})
    assert any(k.startswith("aux_classifier") for k in state) == model.get("use_aux", True)
    assert any(k.startswith("proj_head") for k in state) == model.get("use_ctc", True)

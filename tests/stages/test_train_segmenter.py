"""train_segmenter: paired augmentation, the masked loss, resume after SIGKILL equals an uninterrupted run, DDP."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, tiny_params, tool_env
from safetensors.torch import load_file

from config.schema import AugmentConfig
from conftest import free_port, kill_when_paused
from training.segmenter_model import load_segmenter
from training.transforms import augment_pair
from stages.train_segmenter import masked_cross_entropy
from tests.segmenter_inputs import write_manifest, write_pseudo_labels


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("segmenter")
    manifest = write_manifest(root)
    return write_pseudo_labels(manifest, root / "pseudo_labels"), manifest


def write_params(path: Path, overrides: dict) -> Path:
    params = tiny_params({"train_segmenter": overrides})
    path.write_text(yaml.safe_dump(params))
    return path


def stage_cmd(params: Path, inputs, out: Path) -> list[str]:
    pseudo, manifest = inputs
    return [sys.executable, "-m", "stages.train_segmenter", "--params", str(params), "--pseudo-labels", str(pseudo),
            "--manifest", str(manifest), "--out", str(out / "model"), "--checkpoints", str(out / "ckpt"),
            "--live", str(out / "live")]


@pytest.mark.parametrize("seed", range(4))
def test_paired_augmentation_keeps_image_and_mask_aligned(seed):
    rng = np.random.default_rng(seed)
    mask = np.zeros((40, 56), np.uint8)
    mask[5:20, 10:40] = 2
    mask[25:, :8] = 1
    mask[0] = 255
    rgb = np.repeat((mask * 50)[..., None], 3, axis=2).astype(np.uint8)  # the colour encodes the label
    cfg = AugmentConfig(crop_size=64, base_size=0, scale_range=(1.0, 1.0), jitter=0.0)
    crop, labels = augment_pair(rgb, mask, cfg, rng)
    assert crop.shape == (64, 64, 3) and labels.shape == (64, 64)
    padded = labels == 255
    assert padded.sum() >= 64 * 64 - 40 * 56  # the padding is ignored
    keep = ~padded
    np.testing.assert_array_equal(crop[..., 0][keep], labels[keep] * 50)  # flips and crops move both together
    scaled, scaled_labels = augment_pair(rgb, mask, AugmentConfig(32, 80, (0.5, 2.0), 0.3), rng)
    assert scaled.shape == (32, 32, 3) and set(np.unique(scaled_labels)) <= {0, 1, 2, 255}  # nearest: no new ids


def test_masked_loss_ignores_255_and_survives_an_all_ignored_batch():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 4))
    target[0] = 255
    expected = torch.nn.functional.cross_entropy(logits, target, ignore_index=255)
    torch.testing.assert_close(masked_cross_entropy(logits, target), expected)
    empty = masked_cross_entropy(logits, torch.full((2, 4, 4), 255))
    empty.backward()
    assert float(empty.detach()) == 0.0 and torch.isfinite(logits.grad).all()


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_weights_of_an_uninterrupted_run(inputs, tmp_path):
    params = write_params(tmp_path / "params.yaml", {"optim": {"iterations": 12},
                                                      "loop": {"checkpoint_every": 4, "eval_every": 1000},
                                                      "model": {"aux": True}, "augment": {"jitter": 0.2}})
    clean = tmp_path / "clean"
    subprocess.run(stage_cmd(params, inputs, clean), cwd=ROOT, env=tool_env(), check=True, capture_output=True)

    killed = tmp_path / "killed"
    kill_when_paused(stage_cmd(params, inputs, killed), "checkpoint:2", cwd=ROOT, log=tmp_path / "killed.log")
    assert torch.load(next((killed / "ckpt").glob("*/last.pt")), weights_only=True)["step"] == 8  # 2nd of every 4
    assert not (killed / "model").exists()
    resumed = subprocess.run(stage_cmd(params, inputs, killed), cwd=ROOT, env=tool_env(), capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "at step 8" in resumed.stderr
    a = load_file(clean / "model/model.safetensors")
    b = load_file(killed / "model/model.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("aux_head") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    model, config = load_segmenter(clean / "model")
    assert config["class_names"][0] == "background" and config["deeplab"]["pretrained"] == "none"
    assert model(torch.randn(1, 3, 40, 56))["out"].shape == (1, len(config["class_names"]), 40, 56)
    assert (clean / "live/plots/metrics/train/loss_total.tsv").exists()

    # changed params never resume stale state, and the stale fingerprint's folder is pruned
    other = write_params(tmp_path / "other.yaml", {"optim": {"iterations": 4, "lr": 0.02},
                                                   "loop": {"eval_every": 1000}})
    proc = subprocess.run(stage_cmd(other, inputs, killed), cwd=ROOT, env=tool_env(), capture_output=True, text=True)
    assert proc.returncode == 0 and "resuming from" not in proc.stderr
    assert len(list((killed / "ckpt").iterdir())) == 1


@pytest.mark.slow
def test_two_process_ddp_with_gloo_and_val_curve(inputs, tmp_path):
    params = write_params(tmp_path / "params.yaml", {"optim": {"iterations": 4, "batch_size": 2, "optimizer": "adamw",
                                                                "lr": 1e-3}})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", *stage_cmd(params, inputs, tmp_path)[2:]]
    proc = subprocess.run(cmd, cwd=ROOT, env={**tool_env(), "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "model/model.safetensors").exists()
    config = json.loads((tmp_path / "model/config.json").read_text())
    assert config["params"]["optim"]["optimizer"] == "adamw"
    curve = (tmp_path / "live/plots/metrics/val/miou.tsv").read_text().splitlines()
    assert curve[0].split("\t") == ["step", "miou"] and len(curve) == 3  # eval_every 2 of 4 steps


def test_schedule_from_epochs_scales_with_the_data():
    from config.schema import OptimConfig, SegmenterParams

    fixed = SegmenterParams(optim=OptimConfig(iterations=200, batch_size=8))
    assert fixed.iterations(1000) == fixed.iterations(50_000) == 200  # epochs 0: optim.iterations
    p = dataclasses.replace(fixed, epochs=4.0)
    assert p.iterations(1000) == 500 and p.iterations(10_001) == 5001  # ceil(4 x images / 8)
    assert p.iterations(1000, processes=2) == 250  # crops per step grow with the processes
    assert p.iterations(100) == 200  # never below optim.iterations
    accum = dataclasses.replace(p, optim=OptimConfig(iterations=1, batch_size=8, grad_accum=2))
    assert accum.iterations(1000) == 250


def test_the_shipped_schedule_is_200_steps_on_the_embedded_set_and_grows_with_the_data():
    from config.schema import load_params

    params = load_params(ROOT / "params.yaml")
    p = params.train_segmenter
    embedded = params.shapes.num_train
    assert p.iterations(embedded) == p.optim.iterations == 200  # the README's make demo figures: 200 steps
    assert p.iterations(10_582) > 10 * p.optim.iterations  # PASCAL VOC's train_aug: a longer run, no edit
    assert p.iterations(300) == p.optim.iterations  # a small set keeps the floor

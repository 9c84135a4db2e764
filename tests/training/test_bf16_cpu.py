"""The GPU's bf16 path on the CPU (WSSS_CPU_BF16, training/runtime.py): a full ToCo training step with every loss on
and a dump_cams batch under CPU bf16 autocast, so that dtype errors show in the test suite and not first on a GPU."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from config.schema import DumpCamsParams, OptimConfig
from labelling.cams import cams_for_batch
from models.configs import ParConfig, ToCoConfig, ToCoLossConfig
from models.toco import ToCo, param_groups
from shards.cams import decode_cams
from training import runtime as rt
from training.loop import accumulate, lr_factor, make_optimizer, step_optimizer
from training.toco_step import ToCoTrainer

K, S = 3, 64


def tiny_toco() -> ToCo:
    torch.manual_seed(0)
    return ToCo(ToCoConfig(backbone="vit_tiny_patch16_224", num_classes=K, img_size=S, patch_size=8, embed_dim=32,
                           depth=4, num_heads=2, seg_dim=16, proj_hidden_dim=64, proj_bottleneck_dim=16,
                           proj_out_dim=24))


def bf16_cpu() -> rt.Runtime:
    return rt.Runtime(torch.device("cpu"), 0, 1, cpu_bf16=True)


def test_the_env_switch_turns_cpu_autocast_to_bf16(monkeypatch):
    monkeypatch.delenv(rt.CPU_BF16_ENV, raising=False)
    plain = rt.setup_runtime("cpu")
    with plain.autocast(True):
        assert not torch.is_autocast_enabled("cpu")
    assert plain.precision(True) == "fp32"
    monkeypatch.setenv(rt.CPU_BF16_ENV, "1")
    forced = rt.setup_runtime("cpu")
    assert forced.cpu_bf16 and forced.precision(True) == "bf16" and forced.precision(False) == "fp32"
    with forced.autocast(True):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with forced.autocast(False):  # the bf16 param off: fp32 even when forced
        assert not torch.is_autocast_enabled("cpu")


def test_a_full_toco_step_under_cpu_bf16():
    """aux, PTC, CTC (the reference form), multi-scale online CAMs, PAR pseudo labels and the seg head (after
    seg_start_iter): finite fp32 losses, bf16 network outputs, finite fp32 gradients everywhere, and a step."""
    env = bf16_cpu()
    model = tiny_toco()
    loss_cfg = ToCoLossConfig(seg_start_iter=1, local_crops=2, local_crop_size=16, cam_scales=(1.0, 0.5),
                              ctc_form="reference", par=ParConfig(dilations=(1, 2), iterations=2))
    trainer = ToCoTrainer(model, loss_cfg)
    optim = OptimConfig(batch_size=2, iterations=10, warmup_iters=2)
    optimizer = make_optimizer(*param_groups(model), optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, optim))
    generator = torch.Generator().manual_seed(0)
    g = torch.Generator().manual_seed(1)
    valid = torch.ones(2, S, S, dtype=torch.bool)
    valid[1, :, 40:] = False  # padding on the right of image 1
    batch = {"image": torch.randn(2, 3, S, S, generator=g), "valid": valid,
             "labels": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])}
    outputs = []
    model.register_forward_hook(lambda module, args, out: outputs.append(out))

    def losses_of(b):
        return trainer(b["image"], b["valid"], b["labels"], step=1, generator=generator)

    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    losses, seen = accumulate(trainer, iter([batch]), optim, env, True, losses_of)
    assert seen == 2
    for name in ("cls", "aux", "ptc", "ctc", "seg", "total"):
        assert losses[name].dtype == torch.float32 and torch.isfinite(losses[name]), name
        assert losses[name] > 0, name  # every loss of the paper's recipe ran
    out = outputs[0]  # the training pass of both global views
    assert out["logits"].shape == (4, K)
    for key in ("logits", "aux_logits", "seg"):
        assert out[key].dtype == torch.bfloat16, key  # autocast really ran the network's heads in bf16
    assert out["tokens"].dtype == out["cls_token"].dtype == torch.float32  # after the final LayerNorm (fp32 op)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    without = [name for name, p in trainable.items() if p.grad is None]
    assert without == []
    for name, p in trainable.items():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
    for head in ("classifier", "aux_classifier", "seg_head", "proj_head", "backbone.blocks.0"):
        assert any(p.grad.abs().sum() > 0 for n, p in trainable.items() if n.startswith(head)), head
    step_optimizer(optimizer, scheduler)
    model.update_teacher()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(before[n], p) for n, p in trainable.items())


def png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_cam_dump_batch_under_cpu_bf16_matches_fp32():
    model = tiny_toco().eval()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(2):
        rgb = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        rgb[10:30, 20 + 10 * i:44 + 10 * i] = (250, 30, 30)  # an object, so the CAM is not flat
        rows.append({"image_id": f"im{i}", "split": "train", "image": {"bytes": png(rgb)}, "tags": [1, 3],
                     "height": 48, "width": 64})
    p = DumpCamsParams(scales=(1.0, 0.5), image_size=64, pad_multiple=16, cam_size=32, predict_size=0, bf16=True)
    bf16 = cams_for_batch(model, rows, p, bf16_cpu())
    fp32 = cams_for_batch(model, rows, p, rt.Runtime(torch.device("cpu"), 0, 1))
    for a, b in zip(bf16, fp32):
        ca, cb = decode_cams(a), decode_cams(b)
        assert ca.shape == cb.shape == (2, 24, 32)
        assert np.isfinite(ca).all() and ca.min() >= 0 and ca.max() <= 1
        assert (ca.reshape(2, -1).max(axis=1) > 0.5).all()  # normalised to 1 before the resize to cam_size
        assert np.abs(ca - cb).mean() < 0.05  # bf16 rounding, not a different map
        assert a["scores"] == pytest.approx(b["scores"], abs=0.05)

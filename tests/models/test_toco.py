"""models/toco.py and models/ctc.py: shapes, one encoder pass, head wiring, param groups, EMA, CTC views."""

import pytest
import torch
import torch.nn.functional as F

from models.cam import multiscale_cam
from models.ctc import EmaTeacher, ProjectionHead, ViewAugConfig, augment_view, region_from_labels, sample_local_crops
from models.toco import ToCo, ToCoConfig, param_groups
from shards.records import IGNORE_INDEX

K = 3


def tiny_cfg(**kw):
    base = dict(backbone="vit_tiny_patch16_224", num_classes=K, img_size=32, patch_size=8,
                embed_dim=32, depth=4, num_heads=2, seg_dim=16,
                proj_hidden_dim=64, proj_bottleneck_dim=16, proj_out_dim=24)
    base.update(kw)
    return ToCoConfig(**base)


def tiny_toco(**kw):
    torch.manual_seed(0)
    return ToCo(tiny_cfg(**kw)).eval()


def count_encoder_passes(model):
    seen = []
    model.backbone.patch_embed.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    return seen


def test_defaults_follow_methods():
    cfg = ToCoConfig()
    assert (cfg.backbone, cfg.img_size, cfg.aux_layer, cfg.seg_dim, cfg.seg_dilation) == (
        "vit_base_patch16_224", 448, -3, 512, 5)
    assert (cfg.proj_hidden_dim, cfg.proj_bottleneck_dim, cfg.proj_out_dim, cfg.ema_momentum) == (2048, 256, 1024, 0.9)
    assert cfg.freeze_pos_embed and cfg.use_aux and cfg.use_ctc and cfg.use_seg_head


def test_forward_shapes_and_one_pass():
    model = tiny_toco()
    passes = count_encoder_passes(model)
    out = model(torch.randn(2, 3, 32, 48))
    assert passes == [2]
    assert out["logits"].shape == out["aux_logits"].shape == (2, K)
    assert out["tokens"].shape == out["aux_tokens"].shape == (2, 32, 4, 6)
    assert out["cls_token"].shape == (2, 32)
    assert out["seg"].shape == (2, K + 1, 4, 6)


def test_tokens_are_final_normed_and_aux_prenorm():
    model = tiny_toco()
    x = torch.randn(2, 3, 32, 32)
    captured = {}
    model.backbone.blocks[1].register_forward_hook(lambda m, a, o: captured.setdefault("aux", o))  # block -3 of 4
    with torch.no_grad():
        out = model(x)
        features = model.backbone.forward_features(x)  # (B, 1 + 16, C) after the final norm
    aux = captured["aux"][:, 1:].reshape(2, 4, 4, 32).permute(0, 3, 1, 2)
    torch.testing.assert_close(out["aux_tokens"], aux)
    torch.testing.assert_close(out["tokens"], features[:, 1:].reshape(2, 4, 4, 32).permute(0, 3, 1, 2))
    torch.testing.assert_close(out["cls_token"], features[:, 0])
    torch.testing.assert_close(out["cls_token"], model.class_token(x))
    # Classifier: global max pooling, then the bias-free 1×1 conv.
    manual = out["tokens"].amax(dim=(2, 3)) @ model.classifier.weight[:, :, 0, 0].T
    torch.testing.assert_close(out["logits"], manual)
    # CAM: the same conv on the unpooled map.
    cam = torch.einsum("kc,bchw->bkhw", model.classifier.weight[:, :, 0, 0], out["tokens"]).relu()
    torch.testing.assert_close(model.cams(x), cam)


def test_cams_heads_share_one_pass():
    model = tiny_toco()
    passes = count_encoder_passes(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        aux, final = model.cams(x, ("aux", "final"))
        aux_only = model.cams(x, "aux")  # stops early after block -3
    assert passes == [2, 2]
    torch.testing.assert_close(aux, aux_only)
    assert final.shape == (2, K, 4, 4)
    with pytest.raises(ValueError, match="unknown CAM head"):
        model.cams(x, "cls")


def test_multiscale_cam_batches_flips():
    model = tiny_toco()
    passes = count_encoder_passes(model)
    with torch.no_grad():
        aux, final = multiscale_cam(model, torch.randn(2, 3, 32, 32), (1.0, 0.5, 1.5), head=("aux", "final"))
    assert passes == [4, 4, 4]  # one pass of 2B images per scale, both heads from it
    assert aux.shape == final.shape == (2, K, 32, 32)


def test_no_class_token_needs_ctc_off():
    kwargs = dict(class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="no class token"):
        tiny_toco(timm_kwargs=kwargs)
    model = tiny_toco(timm_kwargs=kwargs, use_ctc=False)
    out = model(torch.randn(1, 3, 32, 32))
    assert out["cls_token"] is None and out["tokens"].shape == (1, 32, 4, 4)


def test_optional_heads_off():
    model = tiny_toco(use_aux=False, use_seg_head=False, use_ctc=False)
    out = model(torch.randn(1, 3, 32, 32))
    assert out["aux_logits"] is None and out["seg"] is None
    with pytest.raises(ValueError, match="auxiliary classifier is disabled"):
        model.cams(torch.randn(1, 3, 32, 32), "aux")


def test_param_groups_partition_trainable_params():
    model = tiny_toco()
    backbone, heads = param_groups(model)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert not {id(p) for p in backbone} & {id(p) for p in heads}
    assert {id(p) for p in backbone} | {id(p) for p in heads} == trainable
    assert {id(p) for p in backbone} == {id(p) for p in model.backbone.parameters() if p.requires_grad}
    assert id(model.backbone.pos_embed) not in trainable  # frozen, as in the reference
    assert not {id(p) for p in model.teacher.parameters()} & trainable
    assert id(model.classifier.weight) in {id(p) for p in heads}


def test_bf16_autocast_cpu():
    model = tiny_toco()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 32, 32))
        proj = model.project(out["cls_token"])
    for value in (out["logits"], out["aux_logits"], out["seg"], proj):
        assert torch.isfinite(value.float()).all()


def test_hybrid_conv_stem_backbone():
    cfg = tiny_cfg(backbone="vit_tiny_r_s16_p8_224", patch_size=2,
                   embed_dim=32, depth=4, num_heads=2)
    torch.manual_seed(0)
    model = ToCo(cfg).eval()
    stride = model.backbone.patch_embed.feat_ratio()
    out = model(torch.randn(1, 3, 64, 32))
    assert out["tokens"].shape[-2:] == (64 // stride, 32 // stride) == model.token_grid(64, 32)
    assert out["seg"].shape[1] == K + 1


# ---------------------------------------------------------------------------------------------- CTC pieces
def test_projection_head_and_ema_teacher():
    torch.manual_seed(0)
    head = ProjectionHead(8, 16, 4, 6)
    gain = head.last_layer.parametrizations.weight.original0
    assert not gain.requires_grad and torch.all(gain == 1)
    x = torch.randn(5, 8)
    assert head(x).shape == (5, 6)
    teacher = EmaTeacher(head, momentum=0.9)
    before = [p.clone() for p in teacher.parameters()]
    with torch.no_grad():
        for p in head.parameters():
            p.add_(1.0)
    teacher.update(head)
    for old, new, student in zip(before, teacher.parameters(), head.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * student)
        assert not new.requires_grad
    y = teacher(x.requires_grad_())
    assert not y.requires_grad


def test_model_teacher_uses_detached_tokens():
    model = tiny_toco().train()
    out = model(torch.randn(2, 3, 32, 32))
    student, teacher = model.project(out["cls_token"]), model.project_teacher(out["cls_token"])
    torch.testing.assert_close(student, teacher)  # the EMA copy starts equal
    assert student.requires_grad and not teacher.requires_grad
    model.update_teacher()
    views = model(torch.randn(3, 3, 16, 16), with_heads=False, with_proj=True)
    assert views["logits"] is None and views["seg"] is None
    assert views["proj"].shape == views["proj_teacher"].shape == (3, 24)


def coordinate_images(B, H, W):
    rows = torch.arange(H).view(1, H, 1).expand(B, H, W).float()
    cols = torch.arange(W).view(1, 1, W).expand(B, H, W).float()
    return torch.stack([rows, cols, torch.arange(B).view(B, 1, 1).expand(B, H, W).float()], 1)  # (B, 3, H, W)


def test_local_crops_centres_and_flags():
    B, H, W, size, n = 2, 40, 48, 16, 6
    regions = torch.full((B, H, W), 2, dtype=torch.uint8)
    regions[0, :20] = 0  # image 0: top half background
    regions[1, :, 30:] = 1  # image 1: right part uncertain
    crops, positive = sample_local_crops(coordinate_images(B, H, W), regions, n, size,
                                         generator=torch.Generator().manual_seed(0))
    assert crops.shape == (B * n, 3, size, size) and positive.shape == (B * n,)
    tops, lefts = crops[:, 0, 0, 0].long(), crops[:, 1, 0, 0].long()
    # Contiguous windows from the right image, inside the image.
    torch.testing.assert_close(crops[:, 0, :, 0] - tops[:, None], torch.arange(size).float().expand(B * n, -1))
    assert torch.equal(crops[:, 2, 0, 0].long(), torch.arange(B).repeat_interleave(n))
    assert (tops >= 0).all() and (tops <= H - size).all() and (lefts <= W - size).all()
    centres = regions[torch.arange(B).repeat_interleave(n), tops + size // 2, lefts + size // 2]
    assert (centres <= 1).all()  # background or uncertain
    expected = torch.stack([regions[b, t:t + size, l:l + size].float().mean() > 0.2
                            for b, t, l in zip(torch.arange(B).repeat_interleave(n), tops, lefts)])
    assert torch.equal(positive, expected)
    assert len(set(zip(tops[:n].tolist(), lefts[:n].tolist()))) == n  # without replacement
    again = sample_local_crops(coordinate_images(B, H, W), regions, n, size,
                               generator=torch.Generator().manual_seed(0))[0]
    torch.testing.assert_close(crops, again)


def test_local_crops_fall_back_when_all_foreground():
    regions = torch.full((1, 32, 32), 2)
    crops, positive = sample_local_crops(torch.rand(1, 3, 32, 32), regions, 4, 16)
    assert crops.shape == (4, 3, 16, 16) and positive.all()
    background = torch.zeros((1, 32, 32), dtype=torch.long)
    assert not sample_local_crops(torch.rand(1, 3, 32, 32), background, 4, 16)[1].any()


def test_region_from_labels():
    labels = torch.tensor([[0, 3, 255, 1]])
    assert region_from_labels(labels, ignore_index=IGNORE_INDEX).tolist() == [[0, 2, 1, 2]]


def test_augment_view_properties():
    torch.manual_seed(0)
    images = torch.rand(4, 3, 24, 24)
    gen = torch.Generator().manual_seed(1)
    out = augment_view(images, size=20, generator=gen)
    assert out.shape == (4, 3, 20, 20) and out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(out, augment_view(images, size=20, generator=torch.Generator().manual_seed(1)))
    identity = ViewAugConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0, jitter_p=0, grayscale_p=0, blur_p=0,
                             solarize_p=0)
    torch.testing.assert_close(augment_view(images, identity), images)
    flipped = augment_view(images, ViewAugConfig(**{**identity.__dict__, "flip_p": 1.0}))
    torch.testing.assert_close(flipped, images.flip(-1))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    normalised = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(augment_view(normalised, identity, mean=mean, std=std), normalised)
    blurred = augment_view(images, ViewAugConfig(**{**identity.__dict__, "blur_p": 1.0}))
    assert blurred.std() < images.std()
    solarised = augment_view(images, ViewAugConfig(**{**identity.__dict__, "solarize_p": 1.0}))
    torch.testing.assert_close(solarised, torch.where(images >= 0.5, 1 - images, images))
    assert F.mse_loss(augment_view(images, generator=gen), images) > 0

"""models/deeplab.py: output shapes at stride 8/16 for V2 and V3+, ASPP rates, in-memory weights, frozen BN.

Reading weight files: tests/training/test_weights.py.
"""

import pytest
import timm
import torch

from models.deeplab import DeepLab, DeepLabConfig, SummedASPP, create_features, load_features_weights, param_groups

K = 3  # classes, background included
SMALL = "mobilenetv3_small_050"  # 0.3M parameters: features at strides 2..32, dilatable


def tiny(head="v3plus", output_stride=16, backbone=SMALL, seed=0, **kw) -> DeepLab:
    torch.manual_seed(seed)
    return DeepLab(DeepLabConfig(num_classes=K, head=head, backbone=backbone, output_stride=output_stride,
                                 aspp_channels=16, decoder_channels=16, low_level_channels=8, **kw))


@pytest.mark.parametrize("head", ["v2", "v3plus"])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_logits_at_input_size_for_both_heads_and_strides(head, output_stride):
    model = tiny(head, output_stride, aux=True).eval()
    for h, w in ((64, 64), (48, 80)):
        out = model(torch.randn(2, 3, h, w))
        assert set(out) == {"out", "aux"}
        assert out["out"].shape == out["aux"].shape == (2, K, h, w)
    feats = model.backbone(torch.randn(1, 3, 64, 64))
    assert feats[-1].shape[-1] == 64 // output_stride  # the last stages are dilated, not strided
    assert set(tiny(head, output_stride).eval()(torch.randn(1, 3, 32, 32))) == {"out"}


def test_aspp_rates_follow_the_papers_and_the_stride():
    assert DeepLabConfig(head="v2", output_stride=8).dilations() == (6, 12, 18, 24)
    assert DeepLabConfig(head="v2", output_stride=16).dilations() == (3, 6, 9, 12)
    assert DeepLabConfig(head="v3plus", output_stride=16).dilations() == (6, 12, 18)
    assert DeepLabConfig(head="v3plus", output_stride=8).dilations() == (12, 24, 36)
    assert DeepLabConfig(head="v2", aspp_dilations=(2, 4)).dilations() == (2, 4)
    with pytest.raises(ValueError, match="output_stride"):
        DeepLabConfig(output_stride=32).validate()
    with pytest.raises(ValueError, match="head"):
        DeepLabConfig(head="v3").validate()


def test_v2_head_sums_dilated_branches_straight_to_classes():
    torch.manual_seed(0)
    head = SummedASPP(8, K, (1, 2, 3, 4))
    x = torch.randn(2, 8, 9, 9)
    torch.testing.assert_close(head(x), sum(branch(x) for branch in head.branches))
    assert all(branch.dilation == (d, d) and branch.out_channels == K
               for branch, d in zip(head.branches, (1, 2, 3, 4)))


def test_weights_by_name_and_whole_network_by_order():
    torch.manual_seed(1)
    full = timm.create_model(SMALL, pretrained=False)
    # another implementation's export: other names, same order and shapes
    renamed = {f"_{i:03d}.{k.replace('.', '_')}": v.clone() for i, (k, v) in enumerate(full.state_dict().items())}
    own = create_features(SMALL, 16, state=renamed, source="renamed.pth").state_dict()
    for key in ("conv_stem.weight", "bn1.running_var", "blocks.1.0.conv_pw.weight"):
        torch.testing.assert_close(own[key], full.state_dict()[key])
    torch.manual_seed(5)
    reloaded = create_features(SMALL, 16, state=own).state_dict()
    for key in own:
        torch.testing.assert_close(reloaded[key], own[key])
    broken = dict(own)
    broken.pop("conv_stem.weight")
    with pytest.raises(ValueError, match="tensors"):
        load_features_weights(timm.create_model(SMALL, features_only=True), SMALL, broken, "broken.pth")


def test_the_given_backbone_is_used_and_weights_are_not_read_here():
    features = create_features(SMALL, 16)
    model = DeepLab(DeepLabConfig(num_classes=K, backbone=SMALL, output_stride=16, aspp_channels=16,
                                  decoder_channels=16, low_level_channels=8), features)
    assert model.backbone.module is features
    with pytest.raises(ValueError, match="build_segmenter"):  # training/weights.py reads files, not models/
        tiny(pretrained="weights.pth")


def test_input_renormalised_to_the_backbone_convention():
    model = tiny(backbone="tf_efficientnet_lite0")  # TF EfficientNets expect mean = std = 0.5
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    pixels = torch.rand(1, 3, 4, 4)
    x = (pixels - mean) / std
    torch.testing.assert_close(x * model.backbone.scale + model.backbone.shift, (pixels - 0.5) / 0.5)


def test_frozen_batchnorm_and_param_groups():
    model = tiny(head="v2", backbone="resnet10t", freeze_bn=True).train()
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training and not m.weight.requires_grad for m in bns)
    before = bns[0].running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(bns[0].running_mean, before)  # statistics stay fixed
    backbone, heads = param_groups(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in backbone} | {id(p) for p in heads} == {id(p) for p in trainable}
    assert not {id(p) for p in backbone} & {id(p) for p in heads}
    assert {id(p) for p in heads} == {id(p) for p in model.head.parameters()}


def test_a_few_steps_fit_a_toy_mask():
    model = tiny().train()
    x = torch.randn(2, 3, 32, 32)
    target = torch.zeros(2, 32, 32, dtype=torch.long)
    target[:, 8:24, 8:24] = 1
    target[:, :4] = 255  # ignored
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(x)["out"], target, ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]

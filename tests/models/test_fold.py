"""BatchNorm folded into convolutions: same outputs, only BatchNorms fed by a convolution alone are folded."""

import timm
import torch
from torch import nn

from models.fold import conv_bn_pairs, fold_batchnorm


class Net(nn.Module):
    """conv -> BN -> ReLU and conv -> BN (foldable); a BN after a pool (not); ``shared``: conv2's output also feeds a
    residual sum outside any module, which folding bn2 into conv2 would change."""

    def __init__(self, shared: bool = False):
        super().__init__()
        self.shared = shared
        self.conv1, self.bn1, self.act = nn.Conv2d(3, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.pool, self.bn3 = nn.AvgPool2d(2), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.act(self.bn1(self.conv1(x)))
        z = self.conv2(y)
        y = self.bn2(z) + (z if self.shared else y)
        return self.bn3(self.pool(y))


def randomised(net: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return net.eval()


def test_batchnorms_fed_by_a_convolution_are_folded_and_outputs_stay():
    net, x, y = randomised(Net()), torch.randn(2, 3, 16, 16), torch.randn(1, 3, 12, 20)
    reference, other = net(x), net(y)
    pairs, _ = conv_bn_pairs(net, x)
    assert pairs == [("conv1", "bn1"), ("conv2", "bn2")]  # bn3 follows a pool
    assert fold_batchnorm(net, x) == 2
    assert not isinstance(net.bn1, nn.BatchNorm2d) and isinstance(net.bn3, nn.BatchNorm2d)
    torch.testing.assert_close(net(x), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net(y), other, rtol=1e-5, atol=1e-5)  # not only the traced example


def test_a_timm_cnn_with_batchnormact_folds_every_batchnorm():
    net = randomised(timm.create_model("mobilenetv3_small_050", pretrained=False, features_only=True))
    x, y = torch.randn(1, 3, 64, 64), torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        reference, other = net(x), net(y)
        count = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
        assert fold_batchnorm(net, x) == count > 10
        assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
        for folded, expected in [*zip(net(x), reference), *zip(net(y), other)]:
            torch.testing.assert_close(folded, expected, rtol=1e-4, atol=1e-4)


def test_a_fold_that_would_change_the_output_is_undone():
    net, x = randomised(Net(shared=True)), torch.randn(2, 3, 16, 16)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    reference = net(x)
    assert fold_batchnorm(net, x) < 0  # the hooks pair conv2 with bn2; the check sees the residual change: undone
    assert isinstance(net.bn1, nn.BatchNorm2d) and isinstance(net.bn2, nn.BatchNorm2d)
    assert net.conv1.bias is not None and net.conv2.bias is None
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert torch.equal(net(x), reference)

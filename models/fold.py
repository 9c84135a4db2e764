"""BatchNorm folded into the convolution before it, for inference (a frozen CNN stem in ``dump_cams``).

In eval mode BatchNorm is an affine map per channel, y = (x - mean) / sqrt(var + eps) * gamma + beta, so a
convolution followed by it equals one convolution with weight W * s and bias (b - mean) * s + beta,
s = gamma / sqrt(var + eps). On CPU the separate BatchNorm is a full read and write of every activation: with the
EfficientNet-Lite0 stem at 384 px it is ~25% of the CAM dump's time (bench/RESULTS.md section 12). Folding changes
outputs by float rounding only (~1e-6 relative).

Which BatchNorm follows which convolution is found by running the module once on an example input and matching
tensors: a BatchNorm whose input *is* the output of a Conv2d (the same tensor object) and of no other module is
folded into it. Registration order is not trusted (a module may define its layers in any order). A BatchNorm that
adds more than an activation after the affine map (anything but ``nn.BatchNorm2d`` and timm's ``BatchNormAct2d``)
is left alone. Outputs are checked on the example after folding, and a fold that changed them is undone.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import BatchNormAct2d
from torch import nn



class _AfterNorm(nn.Module):
    """What a folded ``BatchNormAct2d`` still does after its affine map: dropout (identity in eval), activation."""

    def __init__(self, drop: nn.Module, act: nn.Module):
        super().__init__()
        self.drop, self.act = drop, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def _foldable(bn: nn.Module) -> bool:
    return (type(bn) is nn.BatchNorm2d or isinstance(bn, BatchNormAct2d)) and bn.track_running_stats \
        and bn.running_mean is not None and not bn.training


def conv_bn_pairs(module: nn.Module, example: torch.Tensor, run=None) -> tuple[list[tuple[str, str]], Any]:
    """(conv name, BatchNorm name) of every BatchNorm fed directly by a convolution, found by one forward pass
    of ``run(module, example)`` (default ``module(example)``), and that pass's output."""
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # id(conv output) -> (conv name, the tensor kept alive)
    consumers: dict[int, int] = {}  # id(conv output) -> modules that took it as first input
    pairs: list[tuple[str, str]] = []
    hooks = []
    names = {m: n for n, m in module.named_modules()}

    def after_conv(conv, _inputs, output):
        produced[id(output)] = (names[conv], output)

    def before_any(mod, inputs):
        if inputs and isinstance(inputs[0], torch.Tensor) and id(inputs[0]) in produced:
            consumers[id(inputs[0])] = consumers.get(id(inputs[0]), 0) + 1
            if isinstance(mod, nn.BatchNorm2d):
                pairs.append((produced[id(inputs[0])][0], names[mod], id(inputs[0])))

    for mod in module.modules():
        if isinstance(mod, nn.Conv2d):
            hooks.append(mod.register_forward_hook(after_conv))
        if not list(mod.children()) or isinstance(mod, nn.BatchNorm2d):  # leaves (and BatchNormAct2d)
            hooks.append(mod.register_forward_pre_hook(before_any))
    try:
        with torch.no_grad():
            output = (run or _call)(module, example)
    finally:
        for hook in hooks:
            hook.remove()
    return [(conv, bn) for conv, bn, key in pairs if consumers[key] == 1], output


def _call(module: nn.Module, example: torch.Tensor):
    return module(example)


def _tensors(output) -> list[torch.Tensor]:
    """The tensors of a forward's output (a tensor, or dicts / tuples / lists of them), in a fixed order."""
    if isinstance(output, torch.Tensor):
        return [output.float()]
    if isinstance(output, dict):
        return [t for key in sorted(output, key=str) for t in _tensors(output[key])]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    return []


def _set(module: nn.Module, name: str, child: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, leaf, child)


@torch.no_grad()
def fold_batchnorm(module: nn.Module, example: torch.Tensor, run=None) -> int:
    """Fold every eval-mode BatchNorm fed only by a Conv2d into it, in place; returns the number folded.

    ``module`` must be in eval mode and is for inference afterwards (its BatchNorms are gone). ``example``: an
    input it accepts (any small size), with ``run(module, example)`` the forward to trace when it is not
    ``module(example)``. The output of ``run`` on ``example`` is compared before and after: when folding changed it
    beyond float rounding (a forward that also reads a convolution's output outside a module, which the hooks do
    not see), everything is put back and the negative count of the pairs found is returned (the caller says so).
    """
    pairs, before = conv_bn_pairs(module, example, run)
    undo = []  # (conv, weight, bias, BatchNorm name, BatchNorm)
    for conv_name, bn_name in pairs:
        conv, bn = module.get_submodule(conv_name), module.get_submodule(bn_name)
        if not _foldable(bn) or conv.weight.shape[0] != bn.num_features:
            continue
        undo.append((conv, conv.weight.detach().clone(), conv.bias, bn_name, bn))
        scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
        shift = (bn.bias if bn.affine else torch.zeros_like(bn.running_mean)) - bn.running_mean * scale
        bias = shift if conv.bias is None else conv.bias * scale + shift
        conv.weight.mul_(scale.view(-1, *([1] * (conv.weight.dim() - 1))))
        conv.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        _set(module, bn_name, _AfterNorm(bn.drop, bn.act) if isinstance(bn, BatchNormAct2d) else nn.Identity())
    after = (run or _call)(module, example)
    for reference, value in zip(_tensors(before), _tensors(after), strict=True):
        if not torch.allclose(value, reference, rtol=1e-3, atol=1e-4 * max(1.0, reference.abs().max().item())):
            for conv, weight, bias, bn_name, bn in reversed(undo):
                conv.weight.copy_(weight)
                conv.bias = bias
                _set(module, bn_name, bn)
            return -len(undo)
    return len(undo)

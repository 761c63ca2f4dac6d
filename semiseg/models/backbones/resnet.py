"""ResNets with detectron2 parameter names, so official Mask2Former / Mask DINO R50 weights load as is.

Names: `stem.conv1.weight`, `stem.conv1.norm.{weight,bias,running_mean,running_var}`,
`res2.0.conv1.weight`, `res2.0.conv1.norm.*`, `res2.0.shortcut.weight`, `res2.0.shortcut.norm.*`, ...
`res5.2.conv3.norm.*`. The architecture is torchvision's ResNet-50/101 (stride in the 3x3 conv,
`stride_in_1x1=False`, which is what detectron2's `R-50.pkl` converted from torchvision needs);
`stride_in_1x1=True` gives detectron2's MSRA variant.

`tiny_resnet` is a small network of basic blocks (16/32/64/128 channels, one block per stage) for
CPU tests and the demo; it trains from scratch, so its default norm is plain BatchNorm.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from semiseg.models.backbones.base import STAGES, Backbone, Conv2dNorm, freeze_modules, strip_prefix
from semiseg.models.frozen_bn import FrozenBatchNorm2d
from semiseg.weights import load_weights_into

NORM_LAYERS: dict[str, Callable[[int], nn.Module]] = {
    "frozen_bn": FrozenBatchNorm2d,
    "bn": nn.BatchNorm2d,
    "syncbn": nn.SyncBatchNorm,
}


class BasicBlock(nn.Module):
    """Two 3x3 convs and a residual. x: [B, C_in, H, W] -> [B, C_out, H / stride, W / stride]"""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: Callable[[int], nn.Module]):
        super().__init__()
        self.conv1 = Conv2dNorm(in_channels, out_channels, 3, norm, stride=stride)
        self.conv2 = Conv2dNorm(out_channels, out_channels, 3, norm)
        self.shortcut = (Conv2dNorm(in_channels, out_channels, 1, norm, stride=stride)
                         if stride != 1 or in_channels != out_channels else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu_(self.conv1(x)))
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu_(out + identity)


class BottleneckBlock(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand, and a residual.

    x: [B, C_in, H, W] -> [B, C_out, H / stride, W / stride]; the stride sits in the first 1x1 conv
    when `stride_in_1x1`, else in the 3x3 conv (torchvision).
    """

    def __init__(self, in_channels: int, bottleneck_channels: int, out_channels: int, stride: int,
                 norm: Callable[[int], nn.Module], stride_in_1x1: bool):
        super().__init__()
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = Conv2dNorm(in_channels, bottleneck_channels, 1, norm, stride=stride_1x1)
        self.conv2 = Conv2dNorm(bottleneck_channels, bottleneck_channels, 3, norm, stride=stride_3x3)
        self.conv3 = Conv2dNorm(bottleneck_channels, out_channels, 1, norm)
        self.shortcut = (Conv2dNorm(in_channels, out_channels, 1, norm, stride=stride)
                         if stride != 1 or in_channels != out_channels else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu_(out + identity)


class Stem(nn.Module):
    """Conv (stride 2) + ReLU + 3x3 max pool (stride 2). x: [B, 3, H, W] -> [B, C, H/4, W/4]"""

    def __init__(self, out_channels: int, kernel_size: int, norm: Callable[[int], nn.Module]):
        super().__init__()
        self.conv1 = Conv2dNorm(3, out_channels, kernel_size, norm, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu_(self.conv1(x)), kernel_size=3, stride=2, padding=1)


class ResNet(Backbone):
    """A stem and four stages `res2..res5` of residual blocks (see the module docstring for names)."""

    def __init__(self, stem: Stem, stages: list[nn.Sequential], out_channels: list[int]):
        super().__init__(dict(zip(STAGES, out_channels)))
        self.stem = stem
        for name, stage in zip(STAGES, stages):
            self.add_module(name, stage)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = {}
        x = self.stem(x)
        for name in STAGES:
            x = getattr(self, name)(x)
            features[name] = x
        return features

    def freeze(self, freeze_at: int) -> None:
        freeze_modules([self.stem, *(getattr(self, name) for name in STAGES)][:freeze_at])

    def load_pretrained(self, state_dict: Mapping[str, torch.Tensor], source: str | Path) -> None:
        """Accepts detectron2 names (`R-50.pkl`, a Mask2Former checkpoint's `backbone.*`) or torchvision names."""
        state_dict = strip_prefix(state_dict, "backbone.")
        if "layer1.0.conv1.weight" in state_dict:
            state_dict = torchvision_to_detectron2_names(state_dict)
        load_weights_into(self, state_dict, source)


_TORCHVISION_RENAMES = [
    (re.compile(r"^conv1\."), "stem.conv1."),
    (re.compile(r"^bn1\."), "stem.conv1.norm."),
    (re.compile(r"^layer(\d)\.(\d+)\.conv(\d)\."), lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}."),
    (re.compile(r"^layer(\d)\.(\d+)\.bn(\d)\."), lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm."),
    (re.compile(r"^layer(\d)\.(\d+)\.downsample\.0\."), lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut."),
    (re.compile(r"^layer(\d)\.(\d+)\.downsample\.1\."), lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.norm."),
]


def torchvision_to_detectron2_names(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a torchvision ResNet state dict (`layer1.0.bn1.weight`) to detectron2 names
    (`res2.0.conv1.norm.weight`); the classifier `fc.*` is dropped, unknown names are kept."""
    renamed = {}
    for name, value in state_dict.items():
        if name.startswith("fc."):
            continue
        for pattern, replacement in _TORCHVISION_RENAMES:
            new_name, count = pattern.subn(replacement, name)
            if count:
                name = new_name
                break
        renamed[name] = value
    return renamed


def _init_conv_weights(model: nn.Module) -> None:
    """He (fan-out) init of every conv, as detectron2's c2_msra_fill and torchvision."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


def build_bottleneck_resnet(depths: tuple[int, int, int, int], norm: str, stride_in_1x1: bool = False) -> ResNet:
    """ResNet-50 (depths 3,4,6,3) / ResNet-101 (3,4,23,3): channels 256/512/1024/2048 at strides 4..32."""
    norm_layer = NORM_LAYERS[norm]
    stem = Stem(64, kernel_size=7, norm=norm_layer)
    stages, out_channels = [], []
    in_channels = 64
    for index, depth in enumerate(depths):
        bottleneck = 64 * 2 ** index
        out = bottleneck * 4
        blocks = [BottleneckBlock(in_channels if b == 0 else out, bottleneck, out, stride=2 if b == 0 and index else 1,
                                  norm=norm_layer, stride_in_1x1=stride_in_1x1) for b in range(depth)]
        stages.append(nn.Sequential(*blocks))
        out_channels.append(out)
        in_channels = out
    model = ResNet(stem, stages, out_channels)
    _init_conv_weights(model)
    return model


def build_tiny_resnet(norm: str = "bn", widths: tuple[int, int, int, int] = (16, 32, 64, 128)) -> ResNet:
    """A fast network of basic blocks, one per stage, with `widths` channels at strides 4..32."""
    norm_layer = NORM_LAYERS[norm]
    stem = Stem(widths[0], kernel_size=3, norm=norm_layer)
    stages = []
    in_channels = widths[0]
    for index, width in enumerate(widths):
        stages.append(nn.Sequential(BasicBlock(in_channels, width, stride=2 if index else 1, norm=norm_layer)))
        in_channels = width
    model = ResNet(stem, stages, list(widths))
    _init_conv_weights(model)
    return model


def torchvision_resnet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """Download torchvision's original ImageNet weights (IMAGENET1K_V1, as detectron2's R-50.pkl)."""
    import torchvision

    return getattr(torchvision.models, name)(weights="IMAGENET1K_V1").state_dict()

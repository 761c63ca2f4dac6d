"""What every backbone provides, and the conv + norm layer the backbones share."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from semiseg.models.frozen_bn import freeze_batchnorm

FEATURE_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
STAGES = tuple(FEATURE_STRIDES)
IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)


class Backbone(nn.Module, ABC):
    """A network that maps a normalised image batch to four feature maps.

    forward(x: [B, 3, H, W]) -> {"res2": [B, C2, H/4, W/4], "res3": [B, C3, H/8, W/8],
                                 "res4": [B, C4, H/16, W/16], "res5": [B, C5, H/32, W/32]}
    Attributes:
      out_channels:      {"res2": C2, ..., "res5": C5}
      strides:           {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
      size_divisibility: inputs are padded by the caller to a multiple of this (32)
      pixel_mean/std:    RGB normalisation (0..255 scale) the pretrained weights expect
    """

    size_divisibility = 32

    def __init__(self, out_channels: dict[str, int], pixel_mean: tuple[float, float, float] = IMAGENET_MEAN_255,
                 pixel_std: tuple[float, float, float] = IMAGENET_STD_255):
        super().__init__()
        self.out_channels = dict(out_channels)
        self.strides = dict(FEATURE_STRIDES)
        self.pixel_mean = tuple(pixel_mean)
        self.pixel_std = tuple(pixel_std)

    @abstractmethod
    def freeze(self, freeze_at: int) -> None:
        """detectron2's FREEZE_AT: 0 = nothing, 1 = the stem, k >= 2 = the stem and res2..res{k}."""

    @abstractmethod
    def load_pretrained(self, state_dict: Mapping[str, torch.Tensor], source: str | Path) -> None:
        """Copy pretrained weights (any of the naming schemes the backbone knows) into the backbone."""

    def no_weight_decay_keywords(self) -> tuple[str, ...]:
        """Substrings of parameter names that should get no weight decay (position tables, tokens)."""
        return ()


def timm_pixel_stats(net: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """RGB mean and std (0..255 scale) that a timm model's pretrained weights expect (ImageNet if unknown)."""
    cfg = getattr(net, "pretrained_cfg", {})
    mean = cfg.get("mean", (0.485, 0.456, 0.406))
    std = cfg.get("std", (0.229, 0.224, 0.225))
    return tuple(255.0 * m for m in mean), tuple(255.0 * s for s in std)


def freeze_modules(modules: list[nn.Module]) -> None:
    """Stop gradients of `modules` and turn their batch norms into FrozenBatchNorm2d."""
    for module in modules:
        module.requires_grad_(False)
        freeze_batchnorm(module)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad [B, C, H, W] at the bottom/right so that H and W are multiples of `multiple`."""
    pad_h = -x.shape[-2] % multiple
    pad_w = -x.shape[-1] % multiple
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix` with it removed, or all entries when none start with it.

    Lets a whole detector checkpoint (`backbone.*`, `sem_seg_head.*`) initialise just the backbone.
    """
    inner = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return inner if inner else dict(state_dict)


class Conv2dNorm(nn.Conv2d):
    """A bias-free convolution followed by its normalisation, kept as the child `norm`.

    detectron2's layout, so the parameters are named `conv1.weight`, `conv1.norm.weight`, ...
    x: [B, C_in, H, W] -> [B, C_out, H / stride, W / stride]
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, norm: Callable[[int], nn.Module],
                 stride: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
        self.norm = norm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))

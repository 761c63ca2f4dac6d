"""Input normalisation shared by the meta-architectures."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)


def backbone_pixel_stats(backbone: nn.Module, mean: tuple[float, float, float] | None,
                         std: tuple[float, float, float] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """[3, 1, 1] mean and std on the 0..255 scale: the config's when given, else the backbone's
    (`pixel_mean`/`pixel_std` of semiseg backbones: ImageNet, or 0.5 for timm's plain ViTs)."""
    mean = mean if mean is not None else getattr(backbone, "pixel_mean", IMAGENET_MEAN_255)
    std = std if std is not None else getattr(backbone, "pixel_std", IMAGENET_STD_255)
    return torch.tensor(mean, dtype=torch.float32).view(3, 1, 1), torch.tensor(std, dtype=torch.float32).view(3, 1, 1)


def normalize_and_pad(images: torch.Tensor, image_sizes: Sequence[tuple[int, int]], pixel_mean: torch.Tensor,
                      pixel_std: torch.Tensor, size_divisibility: int) -> torch.Tensor:
    """[B, 3, H, W] 0..255 -> normalised float, zero outside each image, padded to `size_divisibility`.

    pixel_mean / pixel_std: [3, 1, 1] on the model's device. Zeroing after normalising matches
    detectron2, which pads the normalised images with 0.
    """
    x = (images.to(pixel_mean.device, torch.float32) - pixel_mean) / pixel_std
    h, w = x.shape[-2:]
    sizes = torch.as_tensor(image_sizes, device=x.device).view(-1, 2)
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    valid = (ys < sizes[:, 0, None, None]) & (xs < sizes[:, 1, None, None])
    x = x * valid[:, None]
    pad_h, pad_w = (-h) % size_divisibility, (-w) % size_divisibility
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x

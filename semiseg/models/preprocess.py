"""Input normalisation shared by the meta-architectures."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


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

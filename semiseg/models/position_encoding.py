"""2-D sine positional encoding of a feature map (DETR / Mask2Former flavour).

Coordinates are 1-based pixel counts normalised by the (valid) extent and scaled to (0, 2*pi];
`num_pos_feats` sin/cos features encode y, the next `num_pos_feats` encode x.
"""
from __future__ import annotations

import math

import torch


def sine_position_encoding(
    batch_size: int,
    height: int,
    width: int,
    num_pos_feats: int,
    device: torch.device | str | None = None,
    temperature: float = 10000.0,
    scale: float = 2 * math.pi,
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Normalised sine encoding -> [B, 2 * num_pos_feats, H, W] float32.

    padding_mask: optional [B, H, W] bool, True on padded pixels; the coordinates then count only
    valid pixels and are normalised by the valid extent (like the reference with a mask).
    """
    if padding_mask is None:
        valid = torch.ones(batch_size, height, width, dtype=torch.float32, device=device)
    else:
        valid = (~padding_mask).to(torch.float32)
    y_embed = valid.cumsum(1)
    x_embed = valid.cumsum(2)
    eps = 1e-6
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale

    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=valid.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos_x = x_embed[..., None] / dim_t  # [B, H, W, F]
    pos_y = y_embed[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


"""Swin Transformer backbones: timm's layers run with detectron2 / Mask2Former semantics.

Mask2Former's Swin (the Swin-for-detection code) differs from timm's classification forward in
two ways that matter for arbitrary image sizes, and this module follows Mask2Former:
- every block keeps its window size and shift (no shrinking to small feature maps);
- a feature map is zero-padded to a multiple of the window *before* the cyclic shift, and the
  shift mask is built on the padded map.
Each stage output gets its own LayerNorm (`norm0..norm3`), as in Mask2Former.

Parameter names are the official Swin names with timm's stage layout (`patch_embed.*`,
`layers.{s}.blocks.{b}.attn.qkv.weight`, `layers.{s}.downsample.*` for s >= 1, `norm{s}.*`):
official / Mask2Former checkpoints put the patch merging at the *end* of stage s, and
`load_pretrained` moves it to the start of stage s+1 (timm's converter).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from semiseg.models.backbones.base import (STAGES, Backbone, freeze_modules, pad_to_multiple, strip_prefix,
                                           timm_pixel_stats)
from semiseg.weights import load_weights_into

if TYPE_CHECKING:  # timm is imported when a Swin is built: importing it takes seconds
    from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock

# Mask2Former's Swin variants: T/S with 7x7 windows (224 pretraining), B/L with 12x12 windows (384).
SWIN_MODELS = {
    "swin_tiny": "swin_tiny_patch4_window7_224",
    "swin_small": "swin_small_patch4_window7_224",
    "swin_base": "swin_base_patch4_window12_384",
    "swin_large": "swin_large_patch4_window12_384",
}
SWIN_DROP_PATH_RATE = 0.3  # Mask2Former's MODEL.SWIN.DROP_PATH_RATE for every variant


def _window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """[B, H, W, C] (H, W multiples of the window) -> [B * nW, wh * ww, C], windows row-major per image."""
    b, h, w, c = x.shape
    wh, ww = window
    x = x.view(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, c)


def _window_merge(windows: torch.Tensor, window: tuple[int, int], batch: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `_window_partition`: [B * nW, wh * ww, C] -> [B, H, W, C]."""
    wh, ww = window
    x = windows.view(batch, h // wh, w // ww, wh, ww, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, h, w, -1)


def shifted_window_mask(h: int, w: int, window: tuple[int, int], shift: tuple[int, int],
                        device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [nW, N, N] (N = wh * ww) for shifted windows on a padded (h, w) map.

    After the cyclic shift, a window may hold tokens from up to 3 x 3 regions that were not
    neighbours; tokens of different regions must not attend to each other (-100, as Swin).
    """
    def band(size: int, win: int, sft: int) -> torch.Tensor:
        index = torch.arange(size, device=device)
        return (index >= size - win).long() + (index >= size - sft).long()

    region = band(h, window[0], shift[0])[:, None] * 3 + band(w, window[1], shift[1])[None, :]
    region = _window_partition(region[None, :, :, None], window).squeeze(-1)  # [nW, N]
    different = region[:, None, :] != region[:, :, None]
    return torch.zeros(different.shape, device=device, dtype=dtype).masked_fill(different, -100.0)


def swin_block_forward(block: SwinTransformerBlock, x: torch.Tensor) -> torch.Tensor:
    """One Swin block (timm parameters) with pad-then-shift windows. x: [B, H, W, C] -> [B, H, W, C]"""
    b, h, w, c = x.shape
    window, shift = tuple(block.window_size), tuple(block.shift_size)
    shortcut = x
    x = block.norm1(x)
    x = F.pad(x, (0, 0, 0, -w % window[1], 0, -h % window[0]))
    hp, wp = x.shape[1:3]
    mask = None
    if any(shift):
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        mask = shifted_window_mask(hp, wp, window, shift, x.device, x.dtype)
    x = block.attn(_window_partition(x, window), mask=mask)
    x = _window_merge(x, window, b, hp, wp)
    if any(shift):
        x = torch.roll(x, shifts=shift, dims=(1, 2))
    x = shortcut + block.drop_path1(x[:, :h, :w])
    return x + block.drop_path2(block.mlp(block.norm2(x)))


class SwinBackbone(Backbone):
    """Swin stages as res2..res5 (channels C, 2C, 4C, 8C; C = 96/96/128/192 for T/S/B/L).

    forward(x: [B, 3, H, W]) -> {"res2": [B, C, H/4, W/4], ..., "res5": [B, 8C, H/32, W/32]};
    H and W are padded up to a multiple of 32 first.
    """

    def __init__(self, net: SwinTransformer):
        channels = [info["num_chs"] for info in net.feature_info]
        super().__init__(dict(zip(STAGES, channels)), *timm_pixel_stats(net))
        self.patch_embed = net.patch_embed
        self.layers = net.layers
        for index, width in enumerate(channels):
            self.add_module(f"norm{index}", nn.LayerNorm(width))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.patch_embed(pad_to_multiple(x, self.size_divisibility))  # [B, H/4, W/4, C]
        features = {}
        for index, (name, stage) in enumerate(zip(STAGES, self.layers)):
            x = stage.downsample(x)
            for block in stage.blocks:
                x = swin_block_forward(block, x)
            features[name] = getattr(self, f"norm{index}")(x).permute(0, 3, 1, 2).contiguous()
        return features

    def freeze(self, freeze_at: int) -> None:
        """1 = patch embedding; k >= 2 = patch embedding and the first k - 1 stages."""
        freeze_modules([self.patch_embed, *self.layers][:freeze_at])

    def load_pretrained(self, state_dict: Mapping[str, torch.Tensor], source: str | Path) -> None:
        """Accepts official Swin / Mask2Former (`backbone.*`) names, timm names, or this module's names.

        ImageNet checkpoints lack the per-stage output norms `norm0..norm3`, which keep their init.
        """
        from timm.models.swin_transformer import checkpoint_filter_fn as timm_swin_checkpoint_filter

        state_dict = timm_swin_checkpoint_filter(strip_prefix(state_dict, "backbone."), self)
        load_weights_into(self, state_dict, source, may_be_missing=[f"norm{i}." for i in range(4)])

    def no_weight_decay_keywords(self) -> tuple[str, ...]:
        return ("relative_position_bias_table", "absolute_pos_embed")


def build_swin(name: str, drop_path_rate: float | None = None, download: bool = False) -> SwinBackbone:
    """A Swin backbone for one of `SWIN_MODELS`, randomly initialised unless `download`."""
    import timm

    net = timm.create_model(
        SWIN_MODELS[name], pretrained=download, num_classes=0, always_partition=True, strict_img_size=False,
        drop_path_rate=SWIN_DROP_PATH_RATE if drop_path_rate is None else drop_path_rate,
    )
    return SwinBackbone(net)

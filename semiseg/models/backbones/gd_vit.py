"""Guided Distillation's ViT adapters (DINOv2, DeiT), reproduced exactly so its checkpoints load and run.

Where `vit.py` builds a ViTDet simple feature pyramid, Guided Distillation's adapters
(`DinoV2BaseBackbone`, `DeiTBaseBackbone`; facts in ../shared/reference/official-checkpoints/README.md
§3.3-3.4) do this to the normalised input x [B, 3, H, W] (padded to a multiple of 32):
1. resize x with legacy nearest interpolation: DINOv2 to (H + 14 - H % 14, W + 14 - W % 14), which
   always adds 1-14 px; DeiT to (H - H % 16, W - W % 16);
2. run the ViT on it, with the body's own position-embedding resampling: DINOv2 bicubic with
   `scale_factor = (grid + 0.1) / 37` (kept as is for a square 37 x 37 grid), DeiT bilinear to the
   grid, the class token's entry unchanged;
3. reshape the patch tokens to [B, D, h, w] and, per level res2..res5 (stride s = 4..32),
   nearest-resize them to (H / s, W / s) and apply a 1x1 conv to 128 / 256 / 512 / 1024 channels.

Parameter names are Guided Distillation's: the ViT under `model.*` (timm names, which are the
DINOv2 hub's), the neck under `convs.{0..3}`.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from semiseg.models.backbones.base import STAGES, Backbone, freeze_modules, pad_to_multiple, strip_prefix
from semiseg.weights import load_weights_into

if TYPE_CHECKING:  # timm is imported when a ViT is built: importing it takes seconds
    from timm.models.vision_transformer import VisionTransformer

# backbone name -> (timm model, adapter kind)
GD_VIT_MODELS = {
    "gd_dinov2_base": ("vit_base_patch14_dinov2", "dinov2"),
    "gd_dinov2_large": ("vit_large_patch14_dinov2", "dinov2"),
    "gd_deit_base": ("deit_base_patch16_384", "deit"),
}
NECK_CHANNELS = {"res2": 128, "res3": 256, "res4": 512, "res5": 1024}
STRIDES = (4, 8, 16, 32)
DINOV2_OFFSET = 0.1  # DINOv2's interpolate_offset


class GDViTAdapter(Backbone):
    """A timm ViT `net` with Guided Distillation's input resizing and 1x1-conv neck (`kind`: "dinov2" or "deit").

    forward(x: [B, 3, H, W]) -> {"res2": [B, 128, H/4, W/4], ..., "res5": [B, 1024, H/32, W/32]}
    (H, W padded up to a multiple of 32 first).
    """

    def __init__(self, net: VisionTransformer, kind: str):
        if kind not in ("dinov2", "deit"):
            raise ValueError(f"unknown Guided Distillation adapter {kind!r}")
        super().__init__(dict(NECK_CHANNELS))  # ImageNet mean / std, as Guided Distillation's configs
        net.patch_embed.strict_img_size = False
        self.model = net
        self.convs = nn.ModuleList(nn.Conv2d(net.embed_dim, c, 1) for c in NECK_CHANNELS.values())
        self.kind = kind

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = pad_to_multiple(x, self.size_divisibility)
        h, w = x.shape[-2:]
        patch = self.model.patch_embed.patch_size[0]
        if self.kind == "dinov2":
            size = (h + patch - h % patch, w + patch - w % patch)
        else:
            size = (h - h % patch, w - w % patch)
        tokens = self._patch_tokens(F.interpolate(x, size=size))  # legacy nearest, as the adapters
        return {name: conv(F.interpolate(tokens, size=(h // s, w // s)))
                for name, conv, s in zip(STAGES, self.convs, STRIDES)}

    def _patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H', W'] -> patch tokens after the final norm, [B, D, H'/p, W'/p]."""
        net = self.model
        patch = net.patch_embed.patch_size[0]
        grid = (x.shape[-2] // patch, x.shape[-1] // patch)
        tokens = net.patch_embed(x)  # [B, N, D]
        tokens = torch.cat([net.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = net.norm(net.blocks(net.norm_pre(tokens + self._position_embedding(grid))))
        return tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], -1, *grid)

    def _position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """The stored [1, 1 + M*M, D] position embedding resampled to `grid` (h, w) as the adapter does."""
        stored = self.model.pos_embed
        side = int(round((stored.shape[1] - 1) ** 0.5))
        if self.kind == "dinov2" and grid == (side, side):
            return stored
        patches = stored[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
        if self.kind == "dinov2":
            scale = ((grid[0] + DINOV2_OFFSET) / side, (grid[1] + DINOV2_OFFSET) / side)
            patches = F.interpolate(patches, scale_factor=scale, mode="bicubic", align_corners=False,
                                    antialias=False)
        else:
            patches = F.interpolate(patches, size=grid, mode="bilinear", align_corners=False, antialias=False)
        patches = patches.to(stored.dtype).flatten(2).transpose(1, 2)
        return torch.cat([stored[:, :1], patches], dim=1)

    def freeze(self, freeze_at: int) -> None:
        """k >= 1: the whole ViT (the neck stays trainable)."""
        if freeze_at >= 1:
            freeze_modules([self.model])

    def load_pretrained(self, state_dict: Mapping[str, torch.Tensor], source: str | Path) -> None:
        """This module's names (`model.*`, `convs.*`, possibly under `backbone.`), or a plain timm /
        DINOv2 hub ViT, which initialises `model` only."""
        state_dict = strip_prefix(state_dict, "backbone.")
        if any(name.startswith("model.") for name in state_dict):
            load_weights_into(self, state_dict, source)
        else:
            load_weights_into(self.model, {k: v for k, v in state_dict.items() if k != "mask_token"}, source)

    def no_weight_decay_keywords(self) -> tuple[str, ...]:
        return ("pos_embed", "cls_token")


def build_gd_vit(name: str, drop_path_rate: float | None = None, download: bool = False) -> GDViTAdapter:
    """A Guided Distillation ViT adapter for one of `GD_VIT_MODELS`, randomly initialised unless `download`."""
    import timm

    timm_name, kind = GD_VIT_MODELS[name]
    net = timm.create_model(timm_name, pretrained=download, num_classes=0, drop_path_rate=drop_path_rate or 0.0)
    return GDViTAdapter(net, kind)

"""Plain ViT and DINOv2 backbones (timm) with a ViTDet simple feature pyramid.

A plain ViT yields one stride-16 map; the simple feature pyramid (Li et al., ViTDet) turns it into
res2..res5: two / one 2x2 transposed convs for strides 4 / 8, the map itself for 16, a 2x2 max
pool for 32, each followed by a 1x1 and a 3x3 conv with channel LayerNorm.

DINOv2 has 14x14 patches. The input (padded to a multiple of 32) is resized bilinearly from
(H, W) to (14 H / 16, 14 W / 16), so the patch grid is exactly the stride-16 grid (H/16, W/16) of
the padded image and every pyramid level has the size the rest of the model expects; position
embeddings are interpolated to the grid by timm (`dynamic_img_size`).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from semiseg.models.backbones.base import (STAGES, Backbone, Conv2dNorm, freeze_modules, pad_to_multiple, strip_prefix,
                                           timm_pixel_stats)
from semiseg.weights import load_weights_into

if TYPE_CHECKING:  # timm is imported when a ViT is built: importing it takes seconds
    from timm.models.vision_transformer import VisionTransformer

# timm model and default stochastic depth: ViTDet's 0.1 (B) / 0.4 (L); DINOv2 as released (0).
VIT_MODELS = {
    "vit_small": ("vit_small_patch16_224", 0.1),
    "vit_base": ("vit_base_patch16_224", 0.1),
    "vit_large": ("vit_large_patch16_224", 0.4),
    "dinov2_small": ("vit_small_patch14_dinov2", 0.0),
    "dinov2_base": ("vit_base_patch14_dinov2", 0.0),
    "dinov2_large": ("vit_large_patch14_dinov2", 0.0),
}
FEATURE_STRIDE = 16


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of each pixel. x: [B, C, H, W] -> [B, C, H, W]"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _projection(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [Conv2dNorm(in_channels, out_channels, 1, LayerNorm2d),
            Conv2dNorm(out_channels, out_channels, 3, LayerNorm2d)]


class SimpleFeaturePyramid(nn.Module):
    """x: [B, C, H/16, W/16] -> {"res2": [B, D, H/4, W/4], ..., "res5": [B, D, H/32, W/32]}"""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        c = in_channels
        self.simfp_2 = nn.Sequential(
            nn.ConvTranspose2d(c, c // 2, 2, stride=2), LayerNorm2d(c // 2), nn.GELU(),
            nn.ConvTranspose2d(c // 2, c // 4, 2, stride=2), *_projection(c // 4, out_channels))
        self.simfp_3 = nn.Sequential(nn.ConvTranspose2d(c, c // 2, 2, stride=2), *_projection(c // 2, out_channels))
        self.simfp_4 = nn.Sequential(*_projection(c, out_channels))
        self.simfp_5 = nn.Sequential(nn.MaxPool2d(2, stride=2), *_projection(c, out_channels))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"res2": self.simfp_2(x), "res3": self.simfp_3(x), "res4": self.simfp_4(x), "res5": self.simfp_5(x)}


class ViTBackbone(Backbone):
    """A timm ViT (`net`, last block + final norm) followed by a `SimpleFeaturePyramid` (`pyramid`).

    forward(x: [B, 3, H, W]) -> {"res2": [B, D, H/4, W/4], ..., "res5": [B, D, H/32, W/32]}
    with D = `pyramid_channels`; H and W are padded up to a multiple of 32 first.
    """

    def __init__(self, net: VisionTransformer, pyramid_channels: int = 256):
        super().__init__({name: pyramid_channels for name in STAGES}, *timm_pixel_stats(net))
        self.net = net
        self.pyramid = SimpleFeaturePyramid(net.embed_dim, pyramid_channels)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = pad_to_multiple(x, self.size_divisibility)
        grid_h, grid_w = x.shape[-2] // FEATURE_STRIDE, x.shape[-1] // FEATURE_STRIDE
        patch_h, patch_w = self.net.patch_embed.patch_size
        if (patch_h, patch_w) != (FEATURE_STRIDE, FEATURE_STRIDE):
            x = F.interpolate(x, size=(grid_h * patch_h, grid_w * patch_w), mode="bilinear", align_corners=False)
        (tokens,) = self.net.forward_intermediates(x, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True)
        return self.pyramid(tokens)  # tokens: [B, C, H/16, W/16]

    def freeze(self, freeze_at: int) -> None:
        """1 = patch embedding, class/register tokens and position embedding; k >= 2 = the whole ViT
        (the feature pyramid stays trainable)."""
        if freeze_at >= 2:
            freeze_modules([self.net])
        elif freeze_at == 1:
            freeze_modules([self.net.patch_embed])
            for name in ("cls_token", "reg_token", "pos_embed"):
                if isinstance(getattr(self.net, name, None), nn.Parameter):
                    getattr(self.net, name).requires_grad_(False)

    def load_pretrained(self, state_dict: Mapping[str, torch.Tensor], source: str | Path) -> None:
        """Accepts this module's names (`net.*`, `pyramid.*`, possibly under `backbone.`) or a timm /
        original DINOv2 ViT checkpoint, which initialises `net` only (position embeddings resampled)."""
        from timm.models.vision_transformer import checkpoint_filter_fn as timm_vit_checkpoint_filter

        state_dict = strip_prefix(state_dict, "backbone.")
        if any(name.startswith("net.") for name in state_dict):
            load_weights_into(self, state_dict, source)
        else:
            load_weights_into(self.net, timm_vit_checkpoint_filter(state_dict, self.net), source)

    def no_weight_decay_keywords(self) -> tuple[str, ...]:
        return ("pos_embed", "cls_token", "reg_token")


def build_vit(name: str, pyramid_channels: int = 256, drop_path_rate: float | None = None,
              img_size: int | None = None, download: bool = False) -> ViTBackbone:
    """A ViT / DINOv2 backbone for one of `VIT_MODELS`, randomly initialised unless `download`.

    img_size: the grid its position embeddings are stored for (timm's default when None).
    """
    import timm

    timm_name, default_drop_path = VIT_MODELS[name]
    extra = {} if img_size is None else {"img_size": img_size}
    net = timm.create_model(
        timm_name, pretrained=download, num_classes=0, dynamic_img_size=True,
        drop_path_rate=default_drop_path if drop_path_rate is None else drop_path_rate, **extra,
    )
    return ViTBackbone(net, pyramid_channels)

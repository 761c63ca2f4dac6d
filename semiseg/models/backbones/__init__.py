"""Backbones: an image batch -> res2..res5 feature maps at strides 4, 8, 16, 32.

`build_backbone(BackboneConfig(...))` returns a `Backbone` (see `base.py` for its contract):
- `tiny_resnet`: a small basic-block ResNet for CPU tests and the demo (trained from scratch);
- `resnet50`, `resnet101`: torchvision's ResNets with detectron2 parameter names (`resnet.py`);
- `swin_{tiny,small,base,large}`: timm Swin with Mask2Former's semantics (`swin.py`);
- `vit_{small,base,large}`, `dinov2_{small,base,large}`: timm ViTs + a simple feature pyramid (`vit.py`);
- `gd_dinov2_{base,large}`, `gd_deit_base`: Guided Distillation's ViT adapters, exactly (`gd_vit.py`).
Pretrained weights come from a local file (`weights`); downloading needs the explicit `download=True`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from semiseg.errors import ConfigError
from semiseg.models.backbones.base import Backbone
from semiseg.models.backbones.gd_vit import GD_VIT_MODELS, build_gd_vit
from semiseg.models.backbones.resnet import build_bottleneck_resnet, build_tiny_resnet, torchvision_resnet_state_dict
from semiseg.models.backbones.swin import SWIN_MODELS, build_swin
from semiseg.models.backbones.vit import VIT_MODELS, build_vit
from semiseg.weights import load_checkpoint_file

RESNET_DEPTHS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
BACKBONE_NAMES = ("tiny_resnet", *RESNET_DEPTHS, *SWIN_MODELS, *VIT_MODELS, *GD_VIT_MODELS)


@dataclass
class BackboneConfig:
    """Which backbone, its normalisation, initial weights and frozen part.

    name:             see BACKBONE_NAMES
    norm:             ResNets only: "frozen_bn", "bn" or "syncbn"; None = "frozen_bn" for
                      resnet50/101 (pretrained statistics kept, detectron2's default) and "bn" for
                      tiny_resnet (trained from scratch). A randomly initialised FrozenBN ResNet
                      has identity norms: give it weights or use "bn".
    weights:          local weights file (.pkl / .pth / .safetensors), or `semiseg:tiny_resnet_pretext`
                      (shipped, tiny_resnet only; docs/pretrained.md); None = random init
    freeze_at:        detectron2's FREEZE_AT: 0 = nothing frozen, 1 = stem, k = stem + res2..res{k}
                      (Swin: patch embedding + first k-1 stages; ViT: k >= 2 freezes the whole ViT)
    stride_in_1x1:    ResNet-50/101 only: stride in the first 1x1 conv (MSRA weights) instead of
                      the 3x3 conv (torchvision weights, Mask2Former's `STRIDE_IN_1X1: False`)
    download:         fetch the standard ImageNet / DINOv2 weights through torchvision / timm
    drop_path_rate:   Swin / ViT stochastic depth; None = 0.3 for Swin (Mask2Former), 0.1 for
                      ViT-S/B, 0.4 for ViT-L (ViTDet), 0 for DINOv2
    img_size:         ViT / DINOv2: image size of the stored position embeddings (None = timm's)
    pyramid_channels: ViT / DINOv2: channels of every simple-feature-pyramid level
    """

    name: str = "resnet50"
    norm: Literal["frozen_bn", "bn", "syncbn"] | None = None
    weights: Path | None = None
    freeze_at: int = 0
    stride_in_1x1: bool = False
    download: bool = False
    drop_path_rate: float | None = None
    img_size: int | None = None
    pyramid_channels: int = 256


def _check(cfg: BackboneConfig) -> None:
    if cfg.name not in BACKBONE_NAMES:
        raise ConfigError(f"backbone.name: unknown backbone {cfg.name!r}; choose one of {', '.join(BACKBONE_NAMES)}")
    if not 0 <= cfg.freeze_at <= 5:
        raise ConfigError(f"backbone.freeze_at: {cfg.freeze_at} is outside 0..5 (0 = nothing frozen, 5 = all)")
    if cfg.norm is not None and cfg.norm not in ("frozen_bn", "bn", "syncbn"):
        raise ConfigError(f"backbone.norm: unknown norm {cfg.norm!r}; choose frozen_bn, bn or syncbn")
    if cfg.norm is not None and not (cfg.name == "tiny_resnet" or cfg.name in RESNET_DEPTHS):
        raise ConfigError(f"backbone.norm: only ResNets take a norm; {cfg.name} uses LayerNorm (leave it unset)")
    if cfg.weights is not None and cfg.download:
        raise ConfigError("backbone: set either weights (a local file) or download=true, not both")
    if cfg.download and cfg.name == "tiny_resnet":
        raise ConfigError("backbone.download: tiny_resnet has no pretrained weights")


def build_backbone(cfg: BackboneConfig) -> Backbone:
    """The backbone `cfg` describes, with its weights loaded and its first stages frozen."""
    _check(cfg)
    if cfg.name == "tiny_resnet":
        model = build_tiny_resnet(cfg.norm or "bn")
    elif cfg.name in RESNET_DEPTHS:
        model = build_bottleneck_resnet(RESNET_DEPTHS[cfg.name], cfg.norm or "frozen_bn", cfg.stride_in_1x1)
        if cfg.download:
            model.load_pretrained(torchvision_resnet_state_dict(cfg.name), f"torchvision {cfg.name}")
    elif cfg.name in SWIN_MODELS:
        model = build_swin(cfg.name, cfg.drop_path_rate, download=cfg.download)
    elif cfg.name in GD_VIT_MODELS:
        model = build_gd_vit(cfg.name, cfg.drop_path_rate, download=cfg.download)
    else:
        model = build_vit(cfg.name, cfg.pyramid_channels, cfg.drop_path_rate, cfg.img_size, download=cfg.download)
    if cfg.weights is not None:
        model.load_pretrained(load_checkpoint_file(cfg.weights), cfg.weights)
    model.freeze(cfg.freeze_at)
    return model


__all__ = ["BACKBONE_NAMES", "Backbone", "BackboneConfig", "build_backbone"]

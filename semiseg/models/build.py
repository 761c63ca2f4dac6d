"""Build the meta-architecture a `ModelConfig` describes (Mask2Former or Mask DINO, backbone weights from its config)."""
from __future__ import annotations

import dataclasses

from torch import nn

from semiseg.errors import ConfigError
from semiseg.models.backbones import build_backbone
from semiseg.models.registry import META_ARCHITECTURES
from semiseg.weights import load_pretrained_model


def build_model(model_cfg, num_classes: int, load_pretrained: bool = True) -> nn.Module:
    """The model `model_cfg` describes: a random head on `model_cfg.backbone` (pretrained when it names
    weights), or all of it from `model_cfg.weights` when set.

    model_cfg: `semiseg.config.ModelConfig`; num_classes: number of object classes K.
    load_pretrained: False when the whole model's weights are loaded right after (a saved
    checkpoint), so the pretrained files named in its config need not exist on this machine.
    """
    if num_classes < 1:
        raise ConfigError(f"model: num_classes must be >= 1, got {num_classes}")
    backbone_cfg = model_cfg.backbone
    if not load_pretrained:
        backbone_cfg = dataclasses.replace(backbone_cfg, weights=None, download=False)
    if model_cfg.arch not in META_ARCHITECTURES:
        raise ConfigError(f"model.arch={model_cfg.arch!r}: expected one of {', '.join(META_ARCHITECTURES)}")
    head_cfg = dataclasses.replace(model_cfg.head, num_classes=num_classes)
    model = META_ARCHITECTURES[model_cfg.arch].model(head_cfg, build_backbone(backbone_cfg))
    model.task = model_cfg.segmentation_task
    if load_pretrained and model_cfg.weights is not None:
        load_pretrained_model(model, model_cfg.weights, num_classes)
    return model

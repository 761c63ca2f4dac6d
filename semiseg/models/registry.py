"""The meta-architectures a config may name (`model.arch`), each with its model and config class.

Config, CLI, demo and builder read this table; backbones have theirs (`backbones.BACKBONE_NAMES`).
A new meta-architecture is one entry here, one config section in `semiseg.config.ModelConfig`,
and a model that passes `tests/test_protocol.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

from semiseg.models.mask2former import Mask2Former, Mask2FormerConfig
from semiseg.models.maskdino import MaskDINO, MaskDINOConfig


@dataclass(frozen=True)
class MetaArchitectureSpec:
    """model: the `nn.Module` class, built as `model(config, backbone)`; config: its config section's class."""

    model: type
    config: type


META_ARCHITECTURES = {
    "mask2former": MetaArchitectureSpec(Mask2Former, Mask2FormerConfig),
    "maskdino": MetaArchitectureSpec(MaskDINO, MaskDINOConfig),
}

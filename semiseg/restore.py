"""Rebuild a trained model from a semiseg weights file: its embedded config, then its weights.

Used by `semiseg.load` (inference), `semiseg eval` and the demo's overlays.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from semiseg.config import Config, config_from_dict
from semiseg.errors import CheckpointError, ConfigError
from semiseg.models.build import build_model
from semiseg.weights import WeightsInfo, describe_layout, load_weights_into, read_weights


def load_trained_model(path: Path, cfg: Config | None, device: torch.device) -> tuple[nn.Module, Config, WeightsInfo]:
    """Rebuild a model from a weights file: its embedded config (or `cfg`), then its weights."""
    tensors, info = read_weights(path)
    if cfg is None:
        if info.config is None:
            raise CheckpointError(f"{path}: has no embedded semiseg config (e.g. a converted official checkpoint); "
                                  f"pass --config; it looks like {describe_layout(tensors)}")
        cfg = config_from_dict(info.config, source=f"{path} (embedded config)")
    num_classes = len(info.class_names) or cfg.model.num_classes
    if num_classes < 1:
        raise ConfigError(f"{path}: unknown number of classes: set model.num_classes in the config")
    model = build_model(cfg.model, num_classes, load_pretrained=False)
    try:
        load_weights_into(model, tensors, path, strict=True)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; the file looks like {describe_layout(tensors)}") from None
    return model.to(device).eval(), cfg, info

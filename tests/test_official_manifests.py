"""The official checkpoints' layouts: after semiseg's conversion, each fits the matching semiseg model
with every name and shape (built on the meta device: nothing is allocated).

The manifests in tests/goldens/official_manifests are copies of
../shared/reference/official-checkpoints/manifests (its README: `{name: shape}` of the full-size
official checkpoints, written by the official code at the commits listed there)."""
import json
from pathlib import Path

import pytest
import torch

from semiseg.config import load_config
from semiseg.models.build import build_model
from semiseg.weights import select_model_weights

MANIFESTS = Path(__file__).resolve().parent / "goldens" / "official_manifests"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def manifest_state(name: str) -> dict[str, torch.Tensor]:
    """The manifest as a state dict of meta tensors with the official names and shapes."""
    shapes = json.loads((MANIFESTS / f"{name}.json").read_text())
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}


def model_shapes(config: str) -> dict[str, tuple[int, ...]]:
    cfg = load_config(CONFIGS / config)
    with torch.device("meta"):
        model = build_model(cfg.model, 80, load_pretrained=False)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("manifest, which, config", [
    ("mask2former_coco_instance_r50", "auto", "coco_mask2former_r50.yaml"),
    ("guided_distillation_coco_instance_r50_stage1", "teacher", "coco_mask2former_r50.yaml"),
    ("guided_distillation_coco_instance_r50_stage2", "teacher", "coco_mask2former_r50.yaml"),
    ("guided_distillation_coco_instance_r50_stage2", "student", "coco_mask2former_r50.yaml"),
])
def test_converted_official_layout_fits_the_model_exactly(manifest, which, config):
    weights, taken = select_model_weights(manifest_state(manifest), which, source=manifest)
    assert taken == ("model" if which == "auto" else which)
    assert {k: tuple(v.shape) for k, v in weights.items()} == model_shapes(config)

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
from semiseg.weights import describe_layout, select_model_weights

MANIFESTS = Path(__file__).resolve().parent / "goldens" / "official_manifests"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def manifest_state(name: str) -> dict[str, torch.Tensor]:
    """The manifest as a state dict of meta tensors with the official names and shapes."""
    shapes = json.loads((MANIFESTS / f"{name}.json").read_text())
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}


def model_shapes(config: str, overrides: tuple[str, ...] = ()) -> dict[str, tuple[int, ...]]:
    cfg = load_config(CONFIGS / config, ["model.backbone.weights=null", *overrides])
    with torch.device("meta"):
        model = build_model(cfg.model, 80, load_pretrained=False)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("manifest, which, config, overrides", [
    ("mask2former_coco_instance_r50", "auto", "coco_mask2former_r50.yaml", ()),
    ("mask2former_coco_instance_swin_t", "auto", "coco_mask2former_swin_t.yaml", ()),
    ("mask2former_coco_instance_swin_s", "auto", "coco_mask2former_swin_t.yaml", ("model.backbone.name=swin_small",)),
    ("mask2former_coco_instance_swin_b_384_in21k", "auto", "coco_mask2former_swin_t.yaml",
     ("model.backbone.name=swin_base",)),
    ("mask2former_coco_instance_swin_l_384_in21k_200q", "auto", "coco_mask2former_swin_l.yaml", ()),
    ("maskdino_coco_instance_r50_3s_dowsample1_2048", "auto", "coco_maskdino_r50.yaml", ()),
    ("maskdino_coco_instance_swin_l_4s_dowsample1_2048", "auto", "coco_maskdino_swin_l.yaml", ()),
    ("guided_distillation_coco_instance_r50_stage1", "teacher", "coco_mask2former_r50.yaml", ()),
    ("guided_distillation_coco_instance_r50_stage2", "teacher", "coco_mask2former_r50.yaml", ()),
    ("guided_distillation_coco_instance_r50_stage2", "student", "coco_mask2former_r50.yaml", ()),
    ("guided_distillation_coco_instance_dinov2_vitb14_stage1", "teacher", "coco_gd_dinov2_base.yaml", ()),
    ("guided_distillation_coco_instance_dinov2_vitb14_stage2", "student", "coco_gd_dinov2_base.yaml", ()),
    ("guided_distillation_coco_instance_dinov2_vitl14_stage1", "teacher", "coco_gd_dinov2_large.yaml", ()),
    ("guided_distillation_coco_instance_deit_base_patch16_384_stage1", "teacher", "coco_gd_deit_base.yaml", ()),
])
def test_converted_official_layout_fits_the_model_exactly(manifest, which, config, overrides):
    weights, taken = select_model_weights(manifest_state(manifest), which, source=manifest)
    assert taken == ("model" if which == "auto" else which)
    assert {k: tuple(v.shape) for k, v in weights.items()} == model_shapes(config, overrides)
    suggested = describe_layout(weights)  # what a failed load names as the config to use
    assert f"configs/{config}" in suggested and all(o in suggested for o in overrides), suggested


def test_cityscapes_presets_fit_a_cityscapes_checkpoint_layout():
    """No official Cityscapes manifest is available: its layout is derived from the official COCO R50
    Guided Distillation one by the two documented differences of the Cityscapes configs (8 classes,
    so 9 class rows with "no object"; SyncBN in the backbone, whose BatchNorm also saves
    num_batches_tracked)."""
    state = manifest_state("guided_distillation_coco_instance_r50_stage2")
    for key in [k for k in state if k.endswith(("class_embed.weight", "class_embed.bias", "empty_weight"))]:
        state[key] = torch.empty((9, *state[key].shape[1:]), device="meta")
    for key in [k for k in state if ".backbone." in k
                and k.endswith(".running_mean")]:
        state[key.replace(".running_mean", ".num_batches_tracked")] = torch.empty((), device="meta")
    weights, _ = select_model_weights(state, "student", source="cityscapes layout")
    cfg = load_config(CONFIGS / "cityscapes_gd_r50.yaml", ["model.backbone.weights=null"])
    with torch.device("meta"):
        model = build_model(cfg.model, 8, load_pretrained=False)
    assert {k: tuple(v.shape) for k, v in weights.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert "configs/cityscapes_mask2former_r50.yaml" in describe_layout(weights)  # stage 1; stage 2 adds `semi:`

"""Tiny models in the official layouts, run by the official code (tests/goldens/{mask2former_swin_tiny,
gd_dinov2_tiny, gd_deit_tiny}: copies of ../shared/reference/official-checkpoints/goldens, whose README
gives their configs): a Mask2Former with the official Swin, and Guided Distillation stage-1
checkpoints with its DINOv2 and DeiT adapters. Converted by semiseg, each gives the official backbone
features, pixel decoder maps and predictions of every decoder layer within 1e-4."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from semiseg.models.backbones.base import Backbone
from semiseg.models.backbones.gd_vit import GDViTAdapter
from semiseg.models.backbones.swin import SwinBackbone
from semiseg.models.mask2former import Mask2Former, Mask2FormerConfig
from semiseg.weights import load_weights_into, select_model_weights

GOLDENS = Path(__file__).resolve().parent / "goldens"


def golden_backbone(name: str) -> Backbone:
    """The goldens' tiny backbones (README §4): Swin C=32, depths 1-1-2-1, window 7; ViTs D=64, 2 blocks, 2 heads."""
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    if name == "mask2former_swin_tiny":
        return SwinBackbone(SwinTransformer(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=7,
                                            num_classes=0, always_partition=True, strict_img_size=False))
    vit = dict(embed_dim=64, depth=2, num_heads=2, num_classes=0, qkv_bias=True)
    if name == "gd_dinov2_tiny":
        return GDViTAdapter(VisionTransformer(img_size=518, patch_size=14, init_values=1.0, **vit), "dinov2")
    return GDViTAdapter(VisionTransformer(img_size=384, patch_size=16, **vit), "deit")


@pytest.mark.parametrize("name", ["mask2former_swin_tiny", "gd_dinov2_tiny", "gd_deit_tiny"])
def test_converted_official_model_reproduces_the_golden_outputs(name):
    golden = GOLDENS / name
    weights, taken = select_model_weights(load_file(golden / "weights.safetensors"), source=name)
    assert taken == ("model" if name.startswith("mask2former") else "teacher")  # GD stage 1: modelTeacher.*
    head = Mask2FormerConfig(num_classes=5, hidden_dim=32, num_queries=10, nheads=8, dim_feedforward=64,
                             dec_layers=4, enc_layers=2, conv_dim=32, mask_dim=32, test_topk=10)
    model = Mask2Former(head, golden_backbone(name)).eval()
    load_weights_into(model, weights, name, strict=True)
    inputs, expected = load_file(golden / "inputs.safetensors"), load_file(golden / "outputs.safetensors")
    sizes = [tuple(int(v) for v in s) for s in inputs["image_sizes"]]
    with torch.no_grad():
        x = model.normalize(inputs["images_raw"], sizes)
        torch.testing.assert_close(x, inputs["images"], rtol=0, atol=1e-5)
        features = model.backbone(x)
        outputs = model.sem_seg_head(features)
        extra = {k: model.backbone(v) for k, v in inputs.items() if k.startswith("extra_")}
    got = {f"backbone.{k}": v for k, v in features.items()}
    got["pixel_decoder.mask_features"] = outputs["mask_features"]
    got.update({f"pixel_decoder.multi_scale_features.{i}": f for i, f in enumerate(outputs["multi_scale_features"])})
    got.update({k: outputs[k] for k in ("pred_logits", "pred_masks")})
    for i, aux in enumerate(outputs["aux_outputs"]):
        got.update({f"aux_outputs.{i}.{k}": aux[k] for k in ("pred_logits", "pred_masks")})
    for key, features in extra.items():  # backbone-only inputs of unusual sizes (672 x 32, 416 x 32): res5 recorded
        got[f"{key.removesuffix('.images')}.backbone.res5"] = features["res5"]
    missing = sorted(k for k in got if k not in expected)
    assert not missing, missing
    for key, value in got.items():
        torch.testing.assert_close(value, expected[key], rtol=1e-4, atol=1e-4, msg=key)

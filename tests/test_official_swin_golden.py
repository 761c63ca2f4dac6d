"""A tiny Mask2Former with the official Swin, saved in the official layout and run by the official code
(tests/goldens/mask2former_swin_tiny, a copy of ../shared/reference/official-checkpoints/goldens;
its README there): converted by semiseg, it gives the official backbone features, pixel decoder
maps and predictions of every decoder layer within 1e-4."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from semiseg.models.backbones.swin import SwinBackbone
from semiseg.models.mask2former import Mask2Former, Mask2FormerConfig
from semiseg.weights import load_weights_into, select_model_weights

GOLDEN = Path(__file__).resolve().parent / "goldens" / "mask2former_swin_tiny"


def official_tiny_model() -> Mask2Former:
    """The golden's config (cfg_MODEL in its config.json): Swin C=32, depths 1-1-2-1, window 7; head 32 wide."""
    from timm.models.swin_transformer import SwinTransformer

    swin = SwinTransformer(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=7, num_classes=0,
                           always_partition=True, strict_img_size=False, drop_path_rate=0.0)
    head = Mask2FormerConfig(num_classes=5, hidden_dim=32, num_queries=10, nheads=8, dim_feedforward=64,
                             dec_layers=4, enc_layers=2, conv_dim=32, mask_dim=32, test_topk=10)
    return Mask2Former(head, SwinBackbone(swin)).eval()


def test_converted_official_swin_mask2former_reproduces_the_golden_outputs():
    weights, _ = select_model_weights(load_file(GOLDEN / "weights.safetensors"), source="golden")
    model = official_tiny_model()
    load_weights_into(model, weights, "golden", strict=True)
    inputs, expected = load_file(GOLDEN / "inputs.safetensors"), load_file(GOLDEN / "outputs.safetensors")
    sizes = [tuple(int(v) for v in s) for s in inputs["image_sizes"]]
    with torch.no_grad():
        x = model.normalize(inputs["images_raw"], sizes)
        torch.testing.assert_close(x, inputs["images"], rtol=0, atol=1e-5)
        features = model.backbone(x)
        outputs = model.sem_seg_head(features)
    got = {f"backbone.{k}": v for k, v in features.items()}
    got["pixel_decoder.mask_features"] = outputs["mask_features"]
    got.update({f"pixel_decoder.multi_scale_features.{i}": f for i, f in enumerate(outputs["multi_scale_features"])})
    got.update({k: outputs[k] for k in ("pred_logits", "pred_masks")})
    for i, aux in enumerate(outputs["aux_outputs"]):
        got.update({f"aux_outputs.{i}.{k}": aux[k] for k in ("pred_logits", "pred_masks")})
    for name, value in got.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-4, msg=name)

"""Numerical parity of our Mask DINO head with the official implementation (golden tensors).

`tests/goldens/maskdino/` holds tensors produced by the official code (IDEA-Research/MaskDINO
3831d85) on CPU with a tiny config (see its README): weights, backbone features, targets, the
eval- and train-mode outputs, the DN random draws, the criterion's point draws, matcher indices,
every loss term and gradients. The golden backbone features are fed straight into our head; the
random draws are injected (DN noise, point coordinates). Tolerances are the README's.
"""
from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from semiseg.models import box_ops
from semiseg.models.mask2former_criterion import dice_loss, sigmoid_bce_loss
from semiseg.models.deform_attn import ms_deform_attn_core
from semiseg.models.denoising import DenoisingNoise
from semiseg.models.maskdino import MaskDINO, MaskDINOConfig
from semiseg.models.maskdino_criterion import SetPoints, sigmoid_focal_loss
from semiseg.models.maskdino_decoder import encoder_output_proposals, sine_embedding_of_positions
from semiseg.models.matcher import pairwise_dice, pairwise_sigmoid_bce
from semiseg.models.position_encoding import sine_position_encoding
from semiseg.structures import Instances

GOLDENS = Path(__file__).parent / "goldens" / "maskdino"
SETS = ["l3_high2low_mask2box", "l4_low2high_mask2box", "l4_low2high_nobox"]
MATCHED_TAGS = ["final", "aux0", "aux1", "aux2", "interm"]
DN_TAGS = ["dn_final", "dn_aux0", "dn_aux1", "dn_aux2"]
FEATURES = {"res2": (16, 4), "res3": (24, 8), "res4": (40, 16), "res5": (64, 32)}


def close(actual, expected, atol=1e-4, rtol=1e-4):
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


class FeatureShapes(nn.Module):
    """Stands in for the backbone: the goldens give its features directly."""

    def __init__(self):
        super().__init__()
        self.out_channels = {k: c for k, (c, _) in FEATURES.items()}
        self.strides = {k: s for k, (_, s) in FEATURES.items()}


@cache
def golden(name: str) -> dict:
    """Everything of one golden set (weights and inputs may come from a sibling folder)."""
    folder = GOLDENS / name
    cfg = json.loads((folder / "config.json").read_text())
    source = folder / cfg["weights_and_inputs_from"]
    return {
        "cfg": cfg["cfg"]["MODEL"],
        "weights": {k: v.float() for k, v in load_file(source / "weights.safetensors").items()},
        "inputs": load_file(source / "inputs.safetensors"),
        "eval": load_file(folder / "eval_outputs.safetensors"),
        "train": load_file(folder / "train_outputs.safetensors"),
        "losses": load_file(folder / "losses.safetensors"),
        "grads": load_file(folder / "grads.safetensors"),
    }


def build(name: str) -> MaskDINO:
    """Our model with the golden set's config and weights (strict load of sem_seg_head.*)."""
    official = golden(name)["cfg"]
    md, head = official["MaskDINO"], official["SEM_SEG_HEAD"]
    cfg = MaskDINOConfig(
        num_classes=head["NUM_CLASSES"], hidden_dim=md["HIDDEN_DIM"], num_queries=md["NUM_OBJECT_QUERIES"],
        nheads=md["NHEADS"], dim_feedforward=md["DIM_FEEDFORWARD"], dec_layers=md["DEC_LAYERS"],
        enc_layers=head["TRANSFORMER_ENC_LAYERS"], enc_dim_feedforward=head["DIM_FEEDFORWARD"],
        conv_dim=head["CONVS_DIM"], mask_dim=head["MASK_DIM"],
        transformer_in_features=tuple(head["DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES"]),
        total_num_feature_levels=head["TOTAL_NUM_FEATURE_LEVELS"], feature_order=head["FEATURE_ORDER"],
        initialize_box_type=md["INITIALIZE_BOX_TYPE"], dn=md["DN"], dn_num=md["DN_NUM"],
        dn_noise_scale=md["DN_NOISE_SCALE"], class_weight=md["CLASS_WEIGHT"], mask_weight=md["MASK_WEIGHT"],
        dice_weight=md["DICE_WEIGHT"], box_weight=md["BOX_WEIGHT"], giou_weight=md["GIOU_WEIGHT"],
        train_num_points=md["TRAIN_NUM_POINTS"], oversample_ratio=md["OVERSAMPLE_RATIO"],
        importance_sample_ratio=md["IMPORTANCE_SAMPLE_RATIO"])
    model = MaskDINO(cfg, FeatureShapes())
    weights = golden(name)["weights"]
    model.sem_seg_head.load_state_dict({k.removeprefix("sem_seg_head."): v for k, v in weights.items()}, strict=True)
    return model


def features(name: str) -> dict[str, torch.Tensor]:
    inputs = golden(name)["inputs"]
    return {k: inputs[f"features.{k}"].clone() for k in FEATURES}


def targets(name: str) -> list[Instances]:
    inputs = golden(name)["inputs"]
    return [Instances.from_masks(inputs[f"targets.{b}.labels"], inputs[f"targets.{b}.masks"]) for b in range(2)]


def dn_noise(name: str) -> DenoisingNoise:
    train = golden(name)["train"]
    return DenoisingNoise(train["dn_in.rand.label_p"], train["dn_in.rand.new_label"], train["dn_in.rand.box"])


def recorded_points(name: str) -> dict[str, SetPoints]:
    losses = golden(name)["losses"]
    points = {tag: SetPoints([losses[f"points.matcher.{tag}.img{b}"] for b in range(2)],
                             losses[f"points.loss.{tag}.coords"]) for tag in MATCHED_TAGS}
    points.update({tag: SetPoints(None, losses[f"points.loss.{tag}.coords"]) for tag in DN_TAGS})
    return points


def train_forward(name: str) -> tuple[MaskDINO, dict, dict[str, torch.Tensor]]:
    """Train-mode forward with the recorded DN noise; returns the model, outputs and the input features."""
    model = build(name).train()
    feats = {k: v.requires_grad_() for k, v in features(name).items()}
    denoising = model.denoising_queries(targets(name), noise=dn_noise(name))
    return model, model.sem_seg_head(feats, denoising), feats


# ---------------------------------------------------------------- unit functions


@pytest.fixture(scope="module")
def unit():
    return load_file(GOLDENS / "unit_functions.safetensors")


def test_unit_box_functions(unit):
    close(box_ops.inverse_sigmoid(unit["inverse_sigmoid.x"]), unit["inverse_sigmoid.y"], atol=1e-5, rtol=1e-6)
    xyxy = box_ops.masks_to_boxes_inclusive(unit["mask2box.masks"])
    assert torch.equal(xyxy, unit["mask2box.xyxy"])
    h, w = unit["mask2box.masks"].shape[-2:]
    anchors = box_ops.inverse_sigmoid(box_ops.box_xyxy_to_cxcywh(xyxy) / torch.tensor([w, h, w, h]))
    close(anchors, unit["mask2box.ref_unsigmoid"], atol=1e-5, rtol=1e-6)
    close(box_ops.generalized_box_iou(unit["giou.boxes1_xyxy"], unit["giou.boxes2_xyxy"]), unit["giou.out"],
          atol=1e-6, rtol=1e-6)


def test_unit_position_embeddings(unit):
    close(sine_embedding_of_positions(unit["sine_embed.pos4"]), unit["sine_embed.out4"], atol=1e-5, rtol=1e-5)
    close(sine_embedding_of_positions(unit["sine_embed.pos2"]), unit["sine_embed.out2"], atol=1e-5, rtol=1e-5)
    b, _, h, w = unit["pos_embed_sine.x"].shape
    close(sine_position_encoding(b, h, w, 32), unit["pos_embed_sine.out"], atol=1e-5, rtol=1e-5)


def test_unit_encoder_proposals_mark_border_tokens_invalid(unit):
    assert not unit["proposals.padding_mask"].any()  # Mask DINO never pads: the function takes no mask
    shapes = [tuple(s) for s in unit["proposals.spatial_shapes"].tolist()]
    memory, proposals = encoder_output_proposals(unit["proposals.memory"], shapes)
    expected = unit["proposals.output_proposals"]
    assert torch.equal(torch.isinf(proposals), torch.isinf(expected)) and torch.isinf(expected).any()
    finite = torch.isfinite(expected)
    close(proposals[finite], expected[finite], atol=1e-5, rtol=1e-5)
    close(memory, unit["proposals.output_memory"], atol=0, rtol=0)


def test_unit_deformable_attention_core(unit):
    shapes = [tuple(s) for s in unit["msda_core.spatial_shapes"].tolist()]
    out = ms_deform_attn_core(unit["msda_core.value"], shapes, unit["msda_core.sampling_locations"],
                              unit["msda_core.attention_weights"])
    close(out, unit["msda_core.out"], atol=1e-5, rtol=1e-5)


def test_unit_losses(unit):
    focal = sigmoid_focal_loss(unit["focal.logits"], unit["focal.targets"], 3.0)
    num_queries = unit["focal.logits"].shape[1]  # the official helper averages over queries; its criterion
    close(focal / num_queries, unit["focal.loss_num_boxes_3"], atol=0, rtol=1e-5)  # multiplies back by Q
    logits, labels = unit["point_losses.logits"], unit["point_losses.labels"]
    close(sigmoid_bce_loss(logits, labels, 3.0), unit["point_losses.sigmoid_ce_num_masks_3"], atol=0, rtol=1e-5)
    close(dice_loss(logits, labels, 3.0), unit["point_losses.dice_num_masks_3"], atol=0, rtol=1e-5)
    close(pairwise_sigmoid_bce(logits, labels[:3]), unit["point_losses.batch_sigmoid_ce"], atol=1e-6, rtol=1e-5)
    close(pairwise_dice(logits, labels[:3]), unit["point_losses.batch_dice"], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- the head


@pytest.mark.parametrize("name", SETS)
def test_targets_match_the_golden_boxes(name):
    inputs = golden(name)["inputs"]
    for b, target in enumerate(targets(name)):
        normalised = box_ops.normalized_cxcywh(target.boxes, target.image_size)
        close(normalised, inputs[f"targets.{b}.boxes"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", SETS)
def test_encoder(name):
    model = build(name).eval()
    ev = golden(name)["eval"]
    with torch.no_grad():
        mask_features, multi_scale = model.sem_seg_head.pixel_decoder(features(name))
    assert len(multi_scale) == len(golden(name)["eval"]["encoder.spatial_shapes"])
    for level, x in enumerate(multi_scale):
        close(x, ev[f"multi_scale.{level}"])
    close(mask_features, ev["mask_features"])


@pytest.mark.parametrize("name", SETS)
def test_eval_outputs(name):
    model = build(name).eval()
    ev = golden(name)["eval"]
    predictor = model.sem_seg_head.predictor
    with torch.no_grad():
        out = model.sem_seg_head(features(name))
        memory, shapes = predictor.flatten_memory(out["multi_scale_features"])
        selected = predictor.select_queries(memory, shapes, out["mask_features"])
    assert shapes == [tuple(s) for s in ev["decoder_in.spatial_shapes"].tolist()]
    assert torch.equal(selected.topk_indices, ev["enc.topk_indices"])
    close(selected.anchors, ev["decoder_in.refpoints_unsigmoid"])
    close(selected.content, ev["decoder_in.tgt"])
    for key in ("pred_logits", "pred_boxes"):
        close(out[key], ev[key])
        close(out["interm_outputs"][key], ev[f"interm.{key}"])
        for i, aux in enumerate(out["aux_outputs"]):
            close(aux[key], ev[f"aux.{i}.{key}"])
    close(out["pred_masks"], ev["pred_masks"], atol=1e-3)
    close(out["interm_outputs"]["pred_masks"], ev["interm.pred_masks"], atol=1e-3)
    assert all(aux["pred_masks"] is None for aux in out["aux_outputs"])  # eval: only the last layer's masks
    assert out["dn_outputs"] is None


@pytest.mark.parametrize("name", SETS)
def test_train_outputs_with_recorded_denoising_noise(name):
    _, out, _ = train_forward(name)
    tr = golden(name)["train"]
    dn = out["denoising"]
    assert (dn.num_groups, dn.group_size) == (int(tr["dn_in.scalar"]), int(tr["dn_in.single_pad"]))
    close(dn.content, tr["dn_in.input_query_label"], atol=1e-6)
    close(dn.anchors, tr["dn_in.input_query_bbox"], atol=1e-5)
    assert torch.equal(dn.attn_mask, tr["decoder_in.tgt_mask"])
    for prefix, part in (("match", out), ("dn_out", out["dn_outputs"])):
        for key in ("pred_logits", "pred_boxes", "pred_masks"):
            atol = 1e-3 if key == "pred_masks" else 1e-4
            close(part[key], tr[f"{prefix}.{key}"], atol=atol)
            for i, aux in enumerate(part["aux_outputs"]):
                close(aux[key], tr[f"{prefix}.aux.{i}.{key}"], atol=atol)


@pytest.mark.parametrize("name", SETS)
def test_matcher_indices_and_costs(name):
    model, out, _ = train_forward(name)
    losses = golden(name)["losses"]
    sets = {"final": out, "interm": out["interm_outputs"]}
    sets.update({f"aux{i}": aux for i, aux in enumerate(out["aux_outputs"])})
    matcher = model.criterion.matcher
    gts = targets(name)
    with torch.no_grad():
        for tag, outputs in sets.items():
            coords = [losses[f"points.matcher.{tag}.img{b}"] for b in range(2)]
            indices = matcher(outputs, gts, coords=coords)
            for b, (src, tgt) in enumerate(indices):
                assert src.tolist() == losses[f"indices.{tag}.img{b}.src"].tolist(), (tag, b)
                assert tgt.tolist() == losses[f"indices.{tag}.img{b}.tgt"].tolist(), (tag, b)
                cost = matcher.cost_matrix(outputs["pred_logits"][b], outputs["pred_masks"][b], gts[b],
                                           pred_boxes=outputs["pred_boxes"][b], coords=coords[b])
                close(cost, losses[f"matcher.{tag}.img{b}.cost"], atol=1e-4, rtol=1e-5)
    for b, (src, tgt) in enumerate(out["denoising"].indices([len(t) for t in gts])):
        assert src.tolist() == losses[f"indices.dn_final.img{b}.src"].tolist()
        assert tgt.tolist() == losses[f"indices.dn_final.img{b}.tgt"].tolist()


@pytest.mark.parametrize("name", SETS)
def test_every_loss_term_and_the_gradients(name):
    model, out, feats = train_forward(name)
    losses = golden(name)["losses"]
    grads = golden(name)["grads"]
    ours = model.criterion(out, targets(name), points=recorded_points(name))
    expected = {k.removeprefix("loss_weighted."): v for k, v in losses.items() if k.startswith("loss_weighted.")}
    assert sorted(ours) == sorted(expected)
    for key, value in expected.items():
        close(ours[key], value, atol=1e-6, rtol=1e-5)
    total = sum(ours.values())
    close(total, losses["loss_total"], atol=0, rtol=1e-5)

    total.backward()
    for k, x in feats.items():
        reference = grads[f"grad.features.{k}"]
        assert (x.grad - reference).norm() <= 1e-4 * reference.norm(), k
    params = dict(model.sem_seg_head.named_parameters(remove_duplicate=False))  # tied tensors under every name
    checked = 0
    for key, norm in grads.items():
        if not key.startswith("grad_norm."):
            continue
        name_ = key.removeprefix("grad_norm.sem_seg_head.")
        grad = params[name_].grad
        assert grad is not None, name_
        full = grads.get(f"grad.sem_seg_head.{name_}")
        if full is not None:
            assert (grad - full).norm() <= 1e-4 * full.norm() + 1e-12, name_
        else:
            assert abs(grad.double().norm() - norm.double()) <= 1e-4 * norm.double() + 1e-12, name_
        checked += 1
    assert checked == len({id(p) for p in params.values()})  # every unique parameter was compared

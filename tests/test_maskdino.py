"""Mask DINO behaviour beyond parity: training with denoising on CPU, edge batches, inference,
box AP, checkpoint conversion and pseudo-label evidence (tiny backbone and head)."""
from __future__ import annotations

import pickle

import pytest
import safetensors.torch
import torch
from maskdino_helpers import (DEC_LAYERS, DN_NUM, NUM_CLASSES, NUM_QUERIES, SIZE, painted_images, rect_instances,
                              tiny_model)

from semiseg.errors import ConfigError
from semiseg.evaluation import CocoEvaluator
from semiseg.models.box_ops import box_cxcywh_to_xyxy
from semiseg.models.denoising import DenoisingNoise, build_denoising_queries, denoising_attn_mask
from semiseg.models.maskdino import MaskDINOConfig
from semiseg.semi.pseudo_labels import ThresholdFilter
from semiseg.structures import Instances
from semiseg.weights import convert_checkpoint, load_weights_into


def batch() -> tuple[torch.Tensor, list[tuple[int, int]], list[Instances]]:
    targets = [rect_instances([(0, 4, 6, 30, 28), (2, 36, 30, 60, 60)]),
               rect_instances([(1, 10, 10, 50, 40)])]
    return painted_images(targets), [(SIZE, SIZE)] * 2, targets


def loss_keys(dec_layers: int, dn: bool = True) -> set[str]:
    suffixes = [""] + [f"_{i}" for i in range(dec_layers)] + ["_interm"]
    if dn:
        suffixes += ["_dn"] + [f"_dn_{i}" for i in range(dec_layers)]
    return {f"loss_{k}{s}" for k in ("ce", "mask", "dice", "bbox", "giou") for s in suffixes}


# ---------------------------------------------------------------- denoising


def test_attention_mask_isolates_groups_and_hides_dn_from_matching_queries():
    mask = denoising_attn_mask(num_groups=3, group_size=2, num_queries=3, device=torch.device("cpu"))
    blocked = {r: [c for c in range(9) if mask[r, c]] for r in range(9)}
    assert blocked[0] == blocked[1] == [2, 3, 4, 5]
    assert blocked[2] == blocked[3] == [0, 1, 4, 5]
    assert blocked[4] == blocked[5] == [0, 1, 2, 3]
    assert blocked[6] == blocked[7] == blocked[8] == [0, 1, 2, 3, 4, 5]


def test_denoising_layout_and_noise_by_hand():
    label_enc = torch.nn.Embedding(NUM_CLASSES, 8)
    labels = [torch.tensor([0, 2]), torch.tensor([1])]
    boxes = [torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.2, 0.3, 0.1, 0.1]]), torch.tensor([[0.6, 0.4, 0.5, 0.5]])]
    # 3 objects x 10 groups (20 // 2): flip copy 0 to class 1 only; box offsets all +1 (rand 1.0) for copy 0
    label_p = torch.full((30,), 0.9)
    label_p[0] = 0.1
    box = torch.full((30, 4), 0.5)
    box[0] = 1.0
    dn = build_denoising_queries(labels, boxes, label_enc, num_queries=4, dn_num=20, noise_scale=0.4,
                                 noise=DenoisingNoise(label_p, torch.tensor([1]), box))
    assert (dn.num_groups, dn.group_size, dn.num_queries) == (10, 2, 20)
    assert dn.content.shape == (2, 20, 8) and dn.anchors.shape == (2, 20, 4) and dn.attn_mask.shape == (24, 24)
    # image 0 slot 0 = object 0 with its label flipped to 1 and its box moved by (+w/2, +h/2, +w, +h) * 0.4
    torch.testing.assert_close(dn.content[0, 0], label_enc.weight[1])
    torch.testing.assert_close(dn.anchors[0, 0].sigmoid(), torch.tensor([0.54, 0.58, 0.28, 0.56]))
    # other copies keep their label and box (rand 0.5 -> offset 0)
    torch.testing.assert_close(dn.content[0, 3], label_enc.weight[2])
    torch.testing.assert_close(dn.anchors[1, 2].sigmoid(), boxes[1][0])
    # image 1 has one object: slot 1 of every group is empty (content 0, box 0.5)
    assert torch.equal(dn.content[1, 1::2], torch.zeros(10, 8)) and torch.equal(dn.anchors[1, 1::2], torch.zeros(10, 4))
    src, tgt = dn.indices([2, 1])[1]
    assert src.tolist() == list(range(0, 20, 2)) and tgt.tolist() == [0] * 10


def test_random_denoising_noise_stays_within_the_documented_bounds():
    label_enc = torch.nn.Embedding(NUM_CLASSES, 4)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.3]]).repeat(2, 1)
    dn = build_denoising_queries([torch.tensor([0, 1])], [boxes], label_enc, num_queries=2, dn_num=100,
                                 noise_scale=0.4, generator=torch.Generator().manual_seed(0))
    noised = dn.anchors[0].sigmoid()
    assert dn.num_groups == 50
    assert ((noised[:, :2] - 0.5).abs() <= torch.tensor([0.2, 0.3]) * 0.2 + 1e-5).all()
    assert ((noised[:, 2:] / torch.tensor([0.2, 0.3]) - 1).abs() <= 0.4 + 1e-4).all()
    flipped = (dn.content[0] != label_enc.weight[torch.tensor([0, 1]).repeat(50)]).any(-1).float().mean()
    assert 0.02 < flipped < 0.3  # relabelled with probability 0.2, sometimes to the same class


def test_no_denoising_without_objects_or_with_more_than_dn_num():
    label_enc = torch.nn.Embedding(NUM_CLASSES, 4)
    empty = [torch.zeros(0, dtype=torch.long)] * 2
    assert build_denoising_queries(empty, [torch.zeros(0, 4)] * 2, label_enc, 5, 100, 0.4) is None
    many = [torch.zeros(101, dtype=torch.long)]
    assert build_denoising_queries(many, [torch.full((101, 4), 0.5)], label_enc, 5, 100, 0.4) is None


# ---------------------------------------------------------------- training


def test_training_with_denoising_on_cpu_reduces_the_loss():
    model = tiny_model().train()
    images, sizes, targets = batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    totals = []
    for _ in range(8):
        outputs = model(images, sizes, targets)
        losses = model.loss(outputs, targets)
        assert set(losses) == loss_keys(DEC_LAYERS)
        assert all(torch.isfinite(v) for v in losses.values())
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    assert outputs["denoising"].num_groups == DN_NUM // 2
    assert outputs["dn_outputs"]["pred_logits"].shape == (2, DN_NUM, NUM_CLASSES)
    assert losses["loss_mask_dn"] > 0 and losses["loss_bbox_dn_0"] > 0
    assert totals[-1] < 0.8 * totals[0]


def test_matching_outputs_do_not_depend_on_denoising_queries():
    model = tiny_model().train()
    images, sizes, targets = batch()
    with_dn = model(images, sizes, targets)
    model.cfg.dn = "no"
    without = model(images, sizes, targets)
    assert with_dn["denoising"] is not None and without["denoising"] is None
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        torch.testing.assert_close(with_dn[key], without[key], atol=1e-5, rtol=1e-5)


def test_a_batch_without_objects_trains_and_keeps_every_parameter_in_the_graph():
    model = tiny_model().train()
    images, sizes, _ = batch()
    targets = [Instances.empty(SIZE, SIZE), Instances.empty(SIZE, SIZE)]
    outputs = model(images, sizes, targets)
    assert outputs["denoising"] is None
    losses = model.loss(outputs, targets)
    assert set(losses) == loss_keys(DEC_LAYERS)
    assert all(losses[k] == 0 for k in losses if "_dn" in k or "mask" in k or "bbox" in k or "giou" in k)
    assert losses["loss_ce"] > 0  # every query is a negative
    sum(losses.values()).backward()
    predictor = model.sem_seg_head.predictor
    assert predictor.label_enc.weight.grad is not None  # the zero-weight term reaches label_enc
    assert all(p.grad is not None for p in predictor.parameters())


def test_more_objects_than_dn_num_trains_without_denoising():
    model = tiny_model(dn_num=4).train()
    images, sizes, _ = batch()
    rects = [(i % NUM_CLASSES, 2 + 12 * (i % 5), 2 + 12 * (i // 5), 10 + 12 * (i % 5), 10 + 12 * (i // 5))
             for i in range(5)]
    targets = [rect_instances(rects), rect_instances(rects[:2])]
    outputs = model(images, sizes, targets)
    assert outputs["denoising"] is None  # 4 // 5 = 0 groups, as in the reference
    losses = model.loss(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_ce_dn"] == 0 and losses["loss_bbox"] > 0
    sum(losses.values()).backward()


def test_training_under_bfloat16_autocast_gives_finite_float32_losses():
    model = tiny_model().train()
    images, sizes, targets = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(images, sizes, targets)
        losses = model.loss(outputs, targets)
    assert outputs["pred_boxes"].dtype == torch.float32  # box refinement runs in float32
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_training_needs_targets_for_denoising():
    model = tiny_model().train()
    images, sizes, _ = batch()
    with pytest.raises(ValueError, match="needs the targets"):
        model(images, sizes)


def test_denoising_from_pseudo_labels_at_mask_resolution():
    """Pseudo-labels live on the 1/4 mask canvas with boxes derived from the masks; DN normalises
    their boxes by that canvas, so they land where the full-resolution objects are."""
    teacher, student = tiny_model(seed=1).eval(), tiny_model(seed=2).train()
    images, sizes, targets = batch()
    with torch.no_grad():
        candidates = teacher.pseudo_label_candidates(teacher(images, sizes))
    assert candidates.is_object.all() and candidates.boxes.shape == (2, NUM_QUERIES, 4)
    pseudo = ThresholdFilter(score_threshold=0.0, min_area=0.0)(candidates, sizes)
    assert sum(len(p) for p in pseudo) > 0
    outputs = student(images, sizes, pseudo)
    assert outputs["denoising"] is not None
    losses = student.loss(outputs, pseudo)
    assert all(torch.isfinite(v) for v in losses.values())
    # a quarter-resolution copy of a ground truth (edges on the 4-pixel grid) gives the same DN boxes
    aligned = [rect_instances([(0, 4, 8, 32, 28), (2, 36, 32, 60, 60)])]
    small = [Instances.from_masks(t.labels, t.masks[:, ::4, ::4]) for t in aligned]
    torch.manual_seed(5)
    full = student.denoising_queries(aligned)
    torch.manual_seed(5)
    quarter = student.denoising_queries(small)
    torch.testing.assert_close(full.anchors.sigmoid(), quarter.anchors.sigmoid(), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- inference


def test_predict_scales_box_head_boxes_to_the_original_image():
    logits = torch.full((1, 3, NUM_CLASSES), -8.0)
    logits[0, 1, 2] = 4.0
    masks = torch.full((1, 3, 8, 12), -5.0)
    masks[0, 1] = 5.0  # constant, so resizing keeps every pixel at 5
    boxes = torch.tensor([[[0.5, 0.5, 0.1, 0.1], [0.25, 0.5, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]])
    outputs = {"pred_logits": logits, "pred_masks": masks, "pred_boxes": boxes, "padded_size": (32, 48)}
    model = tiny_model(test_topk=2)
    (result,) = model.predict(outputs, image_sizes=[(24, 40)], orig_sizes=[(48, 80)])
    assert result.labels.tolist()[0] == 2 and len(result) == 2
    # padded canvas 32 x 48 holds a 24 x 40 image shown at 48 x 80: x scale 48 / 40 * 80, y scale 32 / 24 * 48
    expected = box_cxcywh_to_xyxy(boxes[0, 1]) * torch.tensor([96.0, 64.0, 96.0, 64.0])
    torch.testing.assert_close(result.boxes[0], expected)
    assert result.masks.shape == (2, 48, 80)
    assert result.masks[0].all() and not result.masks[1].any()
    torch.testing.assert_close(result.scores[0], torch.sigmoid(torch.tensor(4.0)) * torch.sigmoid(torch.tensor(5.0)))


def test_box_ap_is_measured_on_the_box_head_boxes():
    images, sizes, targets = batch()
    gt = {"images": [{"id": 1, "height": SIZE, "width": SIZE}],
          "categories": [{"id": c + 1, "name": str(c)} for c in range(NUM_CLASSES)],
          "annotations": [{"id": i + 1, "image_id": 1, "category_id": int(label) + 1, "iscrowd": 0,
                           "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                           "area": float((x1 - x0) * (y1 - y0)),
                           "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]}
                          for i, (label, (x0, y0, x1, y1)) in enumerate(zip(targets[0].labels, targets[0].boxes.tolist()))]}
    # outputs whose box head is exact but whose masks are empty: box AP 100, mask AP 0
    norm = torch.tensor([SIZE, SIZE, SIZE, SIZE], dtype=torch.float32)
    xyxy = targets[0].boxes / norm
    cxcywh = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1)
    logits = torch.full((1, 2, NUM_CLASSES), -9.0)
    logits[0, torch.arange(2), targets[0].labels] = 5.0
    outputs = {"pred_logits": logits, "pred_masks": torch.full((1, 2, 16, 16), -3.0),
               "pred_boxes": cxcywh[None], "padded_size": (SIZE, SIZE)}
    (prediction,) = tiny_model().predict(outputs, [(SIZE, SIZE)], [(SIZE, SIZE)])
    evaluator = CocoEvaluator(gt)
    evaluator.add(1, prediction)
    metrics = evaluator.evaluate()
    assert metrics["bbox"]["AP"] == pytest.approx(100.0)
    assert metrics["segm"]["AP"] == pytest.approx(0.0)


def test_pseudo_label_candidates_are_sigmoid_scores_and_mask_canvas_boxes():
    model = tiny_model().eval()
    images, sizes, _ = batch()
    with torch.no_grad():
        outputs = model(images, sizes)
    candidates = model.pseudo_label_candidates(outputs)
    torch.testing.assert_close(candidates.class_probs, outputs["pred_logits"].sigmoid())
    assert candidates.is_object.all()
    assert candidates.mask_logits.shape == (2, NUM_QUERIES, SIZE // 4, SIZE // 4)
    expected = box_cxcywh_to_xyxy(outputs["pred_boxes"]) * (SIZE // 4)
    torch.testing.assert_close(candidates.boxes, expected)


# ---------------------------------------------------------------- checkpoints and config


def test_official_named_checkpoint_converts_and_loads_strictly(tmp_path):
    official = tiny_model(seed=1).eval()
    state = official.state_dict()
    assert "sem_seg_head.predictor._bbox_embed.layers.0.weight" in state
    assert "sem_seg_head.predictor.decoder.bbox_embed.1.layers.0.weight" in state  # tied copies, as official
    assert "sem_seg_head.predictor.decoder.norm.weight" in state and "criterion.empty_weight" in state
    pkl = tmp_path / "maskdino_r50.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in state.items()}}, f)
    weights = safetensors.torch.load_file(convert_checkpoint(pkl, tmp_path / "converted.safetensors"))
    fresh = tiny_model(seed=2).eval()
    images, sizes, _ = batch()
    with torch.no_grad():
        before = fresh(images, sizes)["pred_boxes"]
        load_weights_into(fresh, weights, "checkpoint", strict=True)
        after, reference = fresh(images, sizes), official(images, sizes)
    assert not torch.equal(before, reference["pred_boxes"])
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        assert torch.equal(after[key], reference[key])


@pytest.mark.parametrize("overrides, message", [
    (dict(initialize_box_type="boxes"), "initialize_box_type"),
    (dict(total_num_feature_levels=2), "total_num_feature_levels"),
    (dict(dn="full"), "dn must be"),
    (dict(conv_dim=40), "conv_dim"),
])
def test_invalid_config_is_a_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        MaskDINOConfig(**overrides)


def test_too_few_encoder_tokens_for_the_queries_is_explained():
    model = tiny_model(num_queries=200).eval()
    images, sizes, _ = batch()
    with pytest.raises(ValueError, match="fewer than num_queries"):
        model(images, sizes)

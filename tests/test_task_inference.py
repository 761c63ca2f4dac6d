"""Panoptic and semantic post-processing: agreement with transformers' Mask2FormerImageProcessor, the
reference's rules by hand, and what `predict` returns per task for both meta-architectures."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from transformers import Mask2FormerImageProcessor

from semiseg.config import ModelConfig
from semiseg.models.build import build_model
from semiseg.models.segmentation_task import panoptic_inference, semantic_inference
from semiseg.structures import Instances, PanopticSegmentation

SIZE = 384  # transformers resizes the mask logits to 384 x 384 before anything else


def test_semantic_matches_transformers():
    torch.manual_seed(0)
    logits, masks = torch.randn(2, 10, 6), torch.randn(2, 10, SIZE, SIZE)
    expected = Mask2FormerImageProcessor().post_process_semantic_segmentation(
        SimpleNamespace(class_queries_logits=logits, masks_queries_logits=masks), target_sizes=[(SIZE, SIZE)] * 2)
    for b in range(2):
        ours = semantic_inference(logits[b].softmax(-1)[:, :-1], masks[b].sigmoid())
        assert torch.equal(ours, expected[b])


def _tiling_queries(seed: int):
    """Near-binary masks that cover every pixel (where transformers and the reference agree), high scores."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.full((8, SIZE, SIZE), -12.0)
    masks[0] = 12.0  # a stuff-like query covering everything, lowest score
    for q in range(1, 8):
        y, x = torch.randint(0, SIZE - 100, (2,), generator=g).tolist()
        masks[q, y:y + 100, x:x + 100] = 12.0
    logits = torch.full((8, 5), -4.0)
    for q, label in enumerate([3, 0, 1, 2, 0, 1, 3, 2]):  # 4 classes + "no object"
        logits[q, label] = 4.0 + 0.1 * q  # distinct scores
    return logits, masks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_panoptic_matches_transformers(seed):
    logits, masks = _tiling_queries(seed)
    expected = Mask2FormerImageProcessor().post_process_panoptic_segmentation(
        SimpleNamespace(class_queries_logits=logits[None], masks_queries_logits=masks[None]), threshold=0.8,
        overlap_mask_area_threshold=0.8, label_ids_to_fuse=set(), target_sizes=[(SIZE, SIZE)])[0]
    scores, labels = logits.softmax(-1).max(-1)
    keep = (labels != 4) & (scores > 0.8)
    ours = panoptic_inference(scores[keep], labels[keep], masks[keep].sigmoid(), (), 0.8)
    assert torch.equal(ours.segment_ids, expected["segmentation"].to(torch.int32))
    assert [(s.id, s.label) for s in ours.segments] == [(s["id"], s["label_id"]) for s in expected["segments_info"]]
    assert len(ours.segments) >= 3


def test_panoptic_rules_by_hand():
    mask_probs = torch.zeros(4, 4, 6)
    mask_probs[0, :, :3] = 0.9  # stuff class 2, left half
    mask_probs[1, :, 3:] = 0.9  # stuff class 2 again, right half: joins segment 1
    mask_probs[2, 1:3, 1:3] = 0.95  # thing class 0 over the middle, wins there
    mask_probs[3, :, :] = 0.6  # thing class 1 everywhere but beaten nearly everywhere: dropped (overlap)
    scores = torch.tensor([0.9, 0.85, 0.99, 0.5])
    labels = torch.tensor([2, 2, 0, 1])
    result = panoptic_inference(scores, labels, mask_probs, {2}, 0.6)
    assert [(s.id, s.label, s.is_thing) for s in result.segments] == [(1, 2, False), (2, 0, True)]
    expected = torch.ones(4, 6, dtype=torch.int32)
    expected[1:3, 1:3] = 2
    assert torch.equal(result.segment_ids, expected)
    # at 0.8 the left stuff query keeps 8 of its 12 pixels: dropped, its pixels stay void
    result = panoptic_inference(scores, labels, mask_probs, {2}, 0.8)
    expected[:, :3] = torch.tensor([[0, 0, 0], [0, 2, 2], [0, 2, 2], [0, 0, 0]])
    assert [(s.id, s.label) for s in result.segments] == [(1, 2), (2, 0)]
    assert torch.equal(result.segment_ids, expected)
    empty = panoptic_inference(torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, 4, 6), {2}, 0.8)
    assert empty.segments == [] and int(empty.segment_ids.abs().sum()) == 0


@pytest.mark.parametrize("arch", ["mask2former", "maskdino"])
@pytest.mark.parametrize("task", ["instance", "panoptic", "semantic"])
def test_predict_returns_the_task_type(arch, task):
    cfg = ModelConfig(arch=arch, task=task, stuff_classes=(2,))
    cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, name="tiny_resnet", weights=None))
    head = dataclasses.replace(cfg.head, hidden_dim=32, conv_dim=32, mask_dim=32, num_queries=6, dec_layers=2,
                               enc_layers=1, dim_feedforward=64, enc_dim_feedforward=64, nheads=2,
                               object_mask_threshold=0.0)
    cfg = dataclasses.replace(cfg, **{arch: head})
    torch.manual_seed(0)
    model = build_model(cfg, 3).eval()
    images = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        results = model.predict(model(images, [(64, 64), (48, 60)]), [(64, 64), (48, 60)], [(64, 64), (96, 120)])
    expected_type = {"instance": Instances, "panoptic": PanopticSegmentation, "semantic": torch.Tensor}[task]
    assert all(isinstance(r, expected_type) for r in results)
    if task == "semantic":
        assert results[1].shape == (96, 120) and results[1].max() < 3
    if task == "panoptic":
        model.cfg = dataclasses.replace(model.cfg, object_mask_threshold=1.0)  # nothing kept: all void
        with torch.no_grad():
            (nothing,) = model.predict(model(images, [(64, 64)] * 2), [(64, 64)] * 2, [(64, 64)] * 2)[:1]
        assert nothing.segments == [] and not nothing.segment_ids.any()
        assert results[1].segment_ids.shape == (96, 120)
        ids = set(results[1].segment_ids.unique().tolist()) - {0}
        assert ids == {s.id for s in results[1].segments} and len(ids) > 0
        assert all(s.is_thing == (s.label != 2) for s in results[1].segments)

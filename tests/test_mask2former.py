"""Mask2Former behaviour beyond parity: instance inference, predict, training on CPU, pseudo-label evidence."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from semiseg.errors import ConfigError
from semiseg.models.backbones.resnet import build_tiny_resnet
from semiseg.models.mask2former_inference import instance_inference
from semiseg.models.mask2former import Mask2Former, Mask2FormerConfig
from semiseg.structures import Instances, masks_to_boxes

NUM_CLASSES, NUM_QUERIES = 3, 6


def tiny_model(seed: int = 0, **overrides) -> Mask2Former:
    torch.manual_seed(seed)
    cfg = Mask2FormerConfig(num_classes=NUM_CLASSES, hidden_dim=32, num_queries=NUM_QUERIES, nheads=4,
                            dim_feedforward=64, dec_layers=4, enc_layers=1, enc_dim_feedforward=64, conv_dim=32,
                            mask_dim=32, train_num_points=64, test_topk=10, **overrides)
    return Mask2Former(cfg, build_tiny_resnet(norm="bn"))


def box_masks(h: int, w: int, boxes: list[tuple[int, int, int, int]]) -> torch.Tensor:
    masks = torch.zeros(len(boxes), h, w, dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        masks[i, y0:y1, x0:x1] = True
    return masks


def test_instance_inference_on_constant_masks_by_hand():
    logits = torch.tensor([[2.0, -9.0, -9.0, 1.0],  # query 0: class 0
                           [-9.0, -9.0, 3.0, 0.0],  # query 1: class 2, but its mask is empty
                           [0.0, 0.5, 1.0, 5.0]])   # query 2: "no object", then class 2
    masks = torch.stack([torch.full((4, 6), 2.0), torch.full((4, 6), -1.0), torch.full((4, 6), 0.5)])
    result = instance_inference(logits, masks, padded_size=(16, 24), image_size=(12, 20), orig_size=(30, 50), topk=3)
    probs = logits.softmax(-1)
    # the three largest class probabilities among the 3 x 3 (query, class) pairs
    assert result.labels.tolist() == [2, 0, 2]
    assert result.masks.shape == (3, 30, 50)
    assert not result.masks[0].any() and result.masks[1].all() and result.masks[2].all()
    expected = torch.stack([probs[1, 2] * 0.0, probs[0, 0] * torch.sigmoid(torch.tensor(2.0)),
                            probs[2, 2] * torch.sigmoid(torch.tensor(0.5))])
    torch.testing.assert_close(result.scores, expected)
    torch.testing.assert_close(result.boxes, torch.tensor([[0.0, 0, 0, 0], [0, 0, 50, 30], [0, 0, 50, 30]]))


def test_instance_inference_matches_reference_order_on_random_outputs():
    g = torch.Generator().manual_seed(0)
    q, k = 5, 4
    logits, masks = torch.randn(q, k + 1, generator=g), torch.randn(q, 8, 12, generator=g) * 3
    padded, image, orig = (32, 48), (27, 40), (40, 61)
    result = instance_inference(logits, masks, padded, image, orig, topk=7)
    # the reference resizes every query's mask first, then picks the top (query, class) pairs
    full = F.interpolate(masks[None], size=padded, mode="bilinear", align_corners=False)[:, :, :27, :40]
    full = F.interpolate(full, size=orig, mode="bilinear", align_corners=False)[0]
    probs = logits.softmax(-1)[:, :-1]
    pairs = sorted(((probs[i, c].item(), i, c) for i in range(q) for c in range(k)), reverse=True)[:7]
    assert result.labels.tolist() == [c for _, _, c in pairs]
    for n, (p, i, _) in enumerate(pairs):
        binary = full[i] > 0
        assert torch.equal(result.masks[n], binary)
        mean_inside = full[i].sigmoid()[binary].mean().item() if binary.any() else 0.0
        assert result.scores[n].item() == pytest.approx(p * mean_inside, rel=1e-5, abs=1e-7)


def test_predict_gives_original_size_masks_with_matching_boxes():
    model = tiny_model().eval()
    images = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)
    image_sizes, orig_sizes = [(64, 90), (50, 70)], [(128, 180), (45, 63)]
    with torch.no_grad():
        outputs = model(images, image_sizes)
    assert outputs["padded_size"] == (64, 96)
    predictions = model.predict(outputs, image_sizes, orig_sizes)
    for pred, (h, w) in zip(predictions, orig_sizes):
        assert len(pred) == 10 and pred.masks.shape == (10, h, w) and pred.masks.dtype == torch.bool
        assert torch.equal(pred.boxes, masks_to_boxes(pred.masks))
        assert ((pred.scores >= 0) & (pred.scores <= 1)).all()
        assert ((pred.labels >= 0) & (pred.labels < NUM_CLASSES)).all()


def test_forward_ignores_whatever_lies_in_the_padding():
    model = tiny_model().eval()
    clean = torch.randint(0, 256, (1, 3, 64, 96), dtype=torch.uint8)
    clean[:, :, 40:] = 0
    clean[:, :, :, 70:] = 0
    noisy = clean.clone()
    noisy[:, :, 40:] = 255
    noisy[:, :, :, 70:] = 7
    with torch.no_grad():
        clean_out, noisy_out = model(clean, [(40, 70)]), model(noisy, [(40, 70)])
    torch.testing.assert_close(noisy_out["pred_masks"], clean_out["pred_masks"])
    torch.testing.assert_close(noisy_out["pred_logits"], clean_out["pred_logits"])


def test_unpadded_input_is_padded_to_size_divisibility():
    model = tiny_model().eval()
    with torch.no_grad():
        outputs = model(torch.randint(0, 256, (1, 3, 50, 70), dtype=torch.uint8), [(50, 70)])
    assert outputs["padded_size"] == (64, 96) and outputs["pred_masks"].shape[-2:] == (16, 24)


def test_training_step_gives_finite_gradients_everywhere():
    model = tiny_model().train()
    images = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)
    targets = [Instances.from_masks(torch.tensor([0, 2]), box_masks(64, 96, [(5, 5, 30, 40), (40, 10, 90, 60)])),
               Instances.from_masks(torch.tensor([1]), box_masks(64, 96, [(10, 20, 50, 60)]))]
    losses = model.loss(model(images, [(64, 96), (64, 96)]), targets)
    assert len(losses) == 3 * 4 and all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has non-finite gradients"


def test_images_without_targets_train():
    model = tiny_model().train()
    images = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)
    one_empty = [Instances.empty(64, 96), Instances.from_masks(torch.tensor([1]), box_masks(64, 96, [(0, 0, 20, 20)]))]
    losses = model.loss(model(images, [(64, 96)] * 2), one_empty)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())

    model.zero_grad()
    all_empty = [Instances.empty(64, 96), Instances.empty(64, 96)]
    losses = model.loss(model(images, [(64, 96)] * 2), all_empty)
    assert losses["loss_mask"] == 0 and losses["loss_dice"] == 0 and losses["loss_ce"] > 0
    sum(losses.values()).backward()
    grad = model.sem_seg_head.predictor.class_embed.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_targets_at_quarter_resolution_are_accepted():
    model = tiny_model().train()
    images = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)
    full = Instances.from_masks(torch.tensor([0]), box_masks(64, 96, [(8, 8, 40, 32)]))
    quarter = Instances.from_masks(torch.tensor([2]), box_masks(16, 24, [(2, 2, 10, 8)]))  # pseudo-label canvas
    losses = model.loss(model(images, [(64, 96)] * 2), [full, quarter])
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())


def test_pseudo_label_candidates():
    model = tiny_model().eval()
    with torch.no_grad():
        outputs = model(torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8), [(64, 96)] * 2)
    cand = model.pseudo_label_candidates(outputs)
    assert cand.class_probs.shape == (2, NUM_QUERIES, NUM_CLASSES)
    assert cand.is_object.shape == (2, NUM_QUERIES) and cand.is_object.dtype == torch.bool
    assert cand.mask_logits.shape == (2, NUM_QUERIES, 16, 24) and cand.boxes is None
    probs = outputs["pred_logits"].softmax(-1)
    torch.testing.assert_close(cand.class_probs, probs[..., :-1])
    assert torch.equal(cand.is_object, probs.argmax(-1) != NUM_CLASSES)


def test_config_errors_are_reported_together():
    with pytest.raises(ConfigError, match="conv_dim must be a multiple of 32.*deform_attn_backend"):
        Mask2FormerConfig(conv_dim=48, nheads=8, deform_attn_backend="cuda")


def test_num_masks_is_all_reduced_when_distributed(tmp_path):
    import torch.distributed as dist

    from semiseg.models.mask2former_criterion import average_num_masks

    targets = [Instances.from_masks(torch.tensor([0, 1]), box_masks(8, 8, [(0, 0, 2, 2), (3, 3, 5, 5)])),
               Instances.empty(8, 8)]
    assert average_num_masks([Instances.empty(8, 8)], torch.device("cpu")) == 1.0  # clamped
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        assert average_num_masks(targets, torch.device("cpu")) == 2.0
    finally:
        dist.destroy_process_group()

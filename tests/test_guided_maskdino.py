"""Guided Distillation with the real tiny Mask DINO on CPU: sigmoid-score pseudo-labels with boxes,
denoising queries built from them, and the edge batches (no pseudo-label, more than `dn_num`).

Reuses the synthetic dataset and split of tests/test_guided.py (its module-scoped `data` fixture,
whose Mask2Former teacher serves the box-head error test) and adds a stage-1 Mask DINO teacher
(one supervised iteration).
"""
import json
import math

import pytest
import torch

from semiseg.config import Config, apply_overrides
from semiseg.training import train
from semiseg.errors import ConfigError
from semiseg.models.protocol import PseudoLabelCandidates
from semiseg.semi.pseudo_labels import ThresholdFilter
from gd_helpers import TINY, built, equal_states, gd_config, weights_of
from maskdino_helpers import SIZE, painted_images, rect_instances, tiny_model

MASKDINO = ["model.arch=maskdino", "model.maskdino.hidden_dim=32", "model.maskdino.conv_dim=32",
            "model.maskdino.mask_dim=32", "model.maskdino.nheads=4", "model.maskdino.dec_nheads=4",
            "model.maskdino.dim_feedforward=64", "model.maskdino.enc_dim_feedforward=64",
            "model.maskdino.enc_layers=1", "model.maskdino.dec_layers=2", "model.maskdino.num_queries=8",
            "model.maskdino.total_num_feature_levels=3", "model.maskdino.dn_num=16",
            "model.maskdino.train_num_points=128", "model.maskdino.test_topk=10"]


@pytest.fixture(scope="module")
def teacher(data):
    """A stage-1 Mask DINO checkpoint (one supervised iteration on the labeled split)."""
    out = data["root"] / "stage1_maskdino"
    train(apply_overrides(Config(), TINY + MASKDINO + [
        f"data.train_ann={data['labeled_ann']}", f"data.train_images={data['train_images']}",
        f"train.output_dir={out}", "solver.max_iter=1"]))
    return out / "checkpoints" / "last"


def md_config(data, teacher, out, *overrides) -> Config:
    """Stage 2 with Mask DINO (score threshold 0, so that the barely trained teacher gives pseudo-labels)."""
    return gd_config(data, out, *MASKDINO, f"semi.teacher_weights={teacher}", *overrides)


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_maskdino_student_trains_on_pseudo_labels_with_box_and_denoising_terms(data, teacher, tmp_path):
    run = train(md_config(data, teacher, tmp_path / "run", "solver.max_iter=3", "semi.burn_in_iter=100"))
    last = run / "checkpoints" / "last"
    teacher0 = weights_of(teacher, "model")
    assert equal_states(weights_of(last, "teacher"), teacher0)  # frozen during burn-in
    student = weights_of(last, "student")
    assert not torch.equal(student["sem_seg_head.predictor.class_embed.weight"],
                           teacher0["sem_seg_head.predictor.class_embed.weight"])
    records = metrics(run)
    assert [r["iteration"] for r in records] == [1, 2, 3]
    for r in records:
        supervised = {k for k in r if k.startswith("loss_") and not k.endswith("_unsup")}
        assert {k for k in r if k.endswith("_unsup")} == {k + "_unsup" for k in supervised}
        for term in ("ce", "mask", "bbox", "giou", "ce_interm", "bbox_interm", "ce_dn", "bbox_dn", "mask_dn_1"):
            assert r[f"loss_{term}_unsup"] > 0, term  # pseudo-labels made DN queries and box targets
        assert r["loss"] == pytest.approx(sum(v for k, v in r.items() if k.startswith("loss_")), rel=1e-5)


def test_box_source_head_uses_the_teacher_box_head(data, teacher, tmp_path):
    trainer = built(md_config(data, teacher, tmp_path / "run", "semi.pseudo_labels.box_source=head",
                              "semi.pseudo_labels.nms_iou=0.9"))
    assert trainer.pseudo_labeler.box_source == "head" and trainer.pseudo_labeler.nms_iou == 0.9
    batch = trainer.next_batch("unlabeled")
    pseudo = trainer.make_pseudo_labels(batch)
    with torch.no_grad():
        candidates = trainer.teacher.pseudo_label_candidates(trainer.teacher(batch.images, batch.image_sizes))
    from_masks = ThresholdFilter(score_threshold=0.0, min_area=0.0, nms_iou=0.9)(candidates, batch.image_sizes)
    assert [len(p) for p in pseudo] == [len(p) for p in from_masks] and sum(len(p) for p in pseudo) > 0
    head_boxes = torch.cat([p.boxes for p in pseudo])
    assert not torch.allclose(head_boxes, torch.cat([p.boxes for p in from_masks]))
    height, width = pseudo[0].image_size
    assert (head_boxes >= 0).all() and (head_boxes[:, 0::2] <= width).all() and (head_boxes[:, 1::2] <= height).all()
    losses = trainer.forward_losses()
    assert losses["loss_bbox_unsup"] > 0 and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_box_source_head_with_mask2former_is_a_config_error(data, tmp_path):
    trainer = built(gd_config(data, tmp_path / "run", "semi.pseudo_labels.box_source=head"))
    with pytest.raises(ConfigError, match="box_source=head needs a model with a box head"):
        trainer.forward_losses()


def test_a_batch_without_pseudo_labels_trains(data, teacher, tmp_path):
    run = train(md_config(data, teacher, tmp_path / "run", "solver.max_iter=2",
                          "semi.pseudo_labels.score_threshold=1.0"))
    for r in metrics(run):
        assert r["loss_ce_unsup"] > 0  # every query is a negative
        assert all(r[f"loss_{k}_unsup"] == 0 for k in ("mask", "bbox", "giou", "ce_dn", "bbox_dn"))


def test_more_pseudo_labels_than_dn_num_trains_without_unlabeled_denoising(data, teacher, tmp_path):
    # 8 queries, threshold 0, no NMS: every image gets 8 pseudo-instances, more than dn_num 4 -> 0 groups
    run = train(md_config(data, teacher, tmp_path / "run", "solver.max_iter=1", "model.maskdino.dn_num=4",
                          "semi.pseudo_labels.nms_iou=1.0"))
    (r,) = metrics(run)
    assert r["loss_ce_dn_unsup"] == 0 and r["loss_bbox_unsup"] > 0 and math.isfinite(r["loss"])


def test_maskdino_resume_after_burn_in_matches_an_uninterrupted_run(data, teacher, tmp_path):
    common = ["semi.burn_in_iter=2", "semi.ema_decay=0.5"]
    straight = train(md_config(data, teacher, tmp_path / "straight", "solver.max_iter=4", *common))
    chained = tmp_path / "chained"
    train(md_config(data, teacher, chained, "solver.max_iter=1", *common))  # stops during burn-in
    train(md_config(data, teacher, chained, "solver.max_iter=3", *common), resume=True)  # stops after it
    train(md_config(data, teacher, chained, "solver.max_iter=4", *common), resume=True)
    for name in ("student", "teacher"):
        assert equal_states(weights_of(straight / "checkpoints" / "last", name),
                            weights_of(chained / "checkpoints" / "last", name)), name
    assert not equal_states(weights_of(chained / "checkpoints" / "last", "teacher"), weights_of(teacher, "model"))


def test_pseudo_labels_give_the_student_the_ground_truth_box_targets():
    """A teacher that sees two ground-truth rectangles exactly (1/4-resolution masks, box head = the
    boxes / 4): its pseudo-labels, with either box source, build the same denoising queries and the
    same denoising box losses as the ground truth on the full-resolution canvas."""
    student = tiny_model(dn_noise_scale=0.0).train()  # no noise: DN queries are the target boxes themselves
    gt = rect_instances([(0, 4, 8, 32, 28), (2, 36, 32, 60, 60)])  # edges on the 4-pixel grid
    candidates = PseudoLabelCandidates(
        class_probs=torch.nn.functional.one_hot(gt.labels, 3)[None].float() * 0.9,
        is_object=torch.ones(1, 2, dtype=torch.bool),
        mask_logits=torch.where(gt.masks[None, :, ::4, ::4], 8.0, -8.0),
        boxes=gt.boxes[None] / 4)
    images, sizes = painted_images([gt, gt]), [(SIZE, SIZE)] * 2  # two images: BatchNorm in training mode
    expected = student.loss(student(images, sizes, [gt, gt]), [gt, gt])
    for box_source in ("mask", "head"):
        (pseudo,) = ThresholdFilter(box_source=box_source)(candidates, sizes[:1])
        assert pseudo.image_size == (SIZE // 4, SIZE // 4) and pseudo.labels.tolist() == [0, 2]
        torch.testing.assert_close(student.denoising_queries([pseudo]).anchors,
                                   student.denoising_queries([gt]).anchors)
        losses = student.loss(student(images, sizes, [pseudo, pseudo]), [pseudo, pseudo])
        for term in ("loss_bbox_dn", "loss_giou_dn", "loss_bbox_dn_0", "loss_giou_dn_0"):
            torch.testing.assert_close(losses[term], expected[term])


def test_unmatched_weight_reaches_the_loss_of_the_unlabeled_batch_only(data, teacher, tmp_path):
    trainer = built(md_config(data, teacher, tmp_path / "run", "semi.unmatched_weight=0.25"))
    calls = []
    loss = trainer.model.loss
    trainer.model.loss = lambda outputs, targets, **kwargs: calls.append(kwargs) or loss(outputs, targets, **kwargs)
    trainer.forward_losses()
    assert calls == [{}, {"unmatched_weight": 0.25}]  # labeled batch: the reference loss


def test_pseudo_masks_upsampled_to_the_input_canvas_train_every_unlabeled_term(data, teacher, tmp_path):
    trainer = built(md_config(data, teacher, tmp_path / "run", "semi.burn_in_iter=100",
                              "semi.pseudo_labels.mask_upsampling=4"))
    made = []
    upsampled = trainer.pseudo_labeler

    def recording(candidates, image_sizes):
        made.append((candidates, upsampled(candidates, image_sizes)))
        return made[-1][1]

    trainer.pseudo_labeler = recording
    torch.manual_seed(0)
    losses = trainer.forward_losses()
    (candidates, pseudo), = made
    assert trainer.pseudo_label_count > 0
    assert all(p.image_size == tuple(4 * n for n in candidates.mask_logits.shape[-2:]) for p in pseudo)
    for term in ("mask", "dice", "bbox", "giou", "mask_dn_1"):
        assert losses[f"loss_{term}_unsup"].item() > 0, term
    assert all(torch.isfinite(v) for v in losses.values())

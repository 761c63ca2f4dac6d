"""PQ and mIoU: hand-built cases and agreement with torchmetrics' implementations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex
from torchmetrics.detection import PanopticQuality

from semiseg.panoptic_quality import image_pq_stats, summarize_pq
from semiseg.semantic_metrics import IGNORE, confusion_matrix, summarize_confusion


def pq(gt_ids, gt_segments, pred_ids, pred_segments, num_classes=2, is_thing=(True, False)):
    stats = image_pq_stats(np.asarray(gt_ids), gt_segments, np.asarray(pred_ids), pred_segments, num_classes)
    return summarize_pq(stats, list(is_thing), [f"c{k}" for k in range(num_classes)]), stats


def test_pq_perfect_and_partial_overlap():
    gt = np.zeros((10, 10), int)
    gt[:, :5] = 1  # thing, class 0, 50 px
    gt[:, 5:] = 2  # stuff, class 1
    result, _ = pq(gt, {1: (0, False), 2: (1, False)}, gt, {1: 0, 2: 1})
    assert result["PQ"] == pytest.approx(100) and result["PQ_th"] == pytest.approx(100)
    pred = np.zeros((10, 10), int)
    pred[:, :3] = 1  # 30 of the 50 thing pixels: IoU 0.6
    result, stats = pq(gt, {1: (0, False), 2: (1, False)}, pred, {1: 0})
    assert stats[:, 0].tolist() == [1, 0, 0, pytest.approx(0.6)]  # tp, fp, fn, iou
    assert stats[:, 1].tolist() == [0, 0, 1, 0]  # the stuff segment was missed
    assert result["PQ_th"] == pytest.approx(60) and result["SQ_th"] == pytest.approx(60)
    assert result["RQ_th"] == pytest.approx(100) and result["PQ_st"] == 0 and result["PQ"] == pytest.approx(30)


def test_pq_low_iou_is_a_false_positive_and_a_false_negative():
    gt = np.full((10, 10), 2)
    gt[:, :5] = 1
    segments = {1: (0, False), 2: (1, False)}
    pred = np.zeros((10, 10), int)
    pred[:, 3:8] = 1  # IoU 20 / 80 with segment 1
    _, stats = pq(gt, segments, pred, {1: 0})
    assert stats[:3, 0].tolist() == [0, 1, 1]
    _, stats = pq(gt, segments, pred, {1: 1})  # class 1: IoU 30 / 70 with segment 2, not a match either
    assert stats[:3, 0].tolist() == [0, 0, 1] and stats[:3, 1].tolist() == [0, 1, 1]


def test_pq_void_is_left_out_of_the_union_and_can_excuse_a_prediction():
    gt = np.zeros((10, 10), int)
    gt[:, :4] = 1  # 40 px; columns 4.. are void
    pred = np.zeros((10, 10), int)
    pred[:, :6] = 1  # 40 on the segment + 20 on void: IoU 40 / (60 + 40 - 40 - 20) = 1
    _, stats = pq(gt, {1: (0, False)}, pred, {1: 0})
    assert stats[0, 0] == 1 and stats[3, 0] == pytest.approx(1.0)
    pred[:] = 0
    pred[:, 6:] = 2  # entirely on void: ignored, not a false positive
    _, stats = pq(gt, {1: (0, False)}, pred, {2: 0})
    assert stats[:3, 0].tolist() == [0, 0, 1]


def test_pq_crowd_regions_excuse_predictions_of_their_class_only():
    gt = np.zeros((10, 10), int)
    gt[:, :] = 3
    gt[:, :6] = 5  # a crowd region of class 0
    pred = np.zeros((10, 10), int)
    pred[:, 1:5] = 1
    _, stats = pq(gt, {3: (1, False), 5: (0, True)}, pred, {1: 0})
    assert stats[:3, 0].tolist() == [0, 0, 0]  # not matched to the crowd, not a false positive, crowd no FN
    _, stats = pq(gt, {3: (1, False), 5: (0, True)}, pred, {1: 1})  # another class on the crowd: counted
    assert stats[1, 1] == 1


def test_pq_rejects_ids_without_a_segment():
    with pytest.raises(ValueError, match="not in the segment list"):
        image_pq_stats(np.zeros((2, 2), int), {}, np.ones((2, 2), int), {}, 2)


def _random_panoptic(rng, height, width, things, stuffs):
    """A random panoptic map: per pixel (class, instance); void class 99 somewhere."""
    classes = np.full((height, width), 99)
    instances = np.zeros((height, width), int)
    for _ in range(rng.integers(3, 8)):
        y, x = rng.integers(0, height - 4), rng.integers(0, width - 4)
        h, w = rng.integers(4, height // 2), rng.integers(4, width // 2)
        label = int(rng.choice(things + stuffs))
        classes[y:y + h, x:x + w] = label
        instances[y:y + h, x:x + w] = 0 if label in stuffs else rng.integers(1, 4)
    return classes, instances


def _to_segments(classes, instances, stuffs):
    """(class, instance) maps -> (id map, {id: class}) with one segment per stuff class."""
    ids = np.zeros(classes.shape, int)
    segments = {}
    for key in sorted({(int(c), int(i)) for c, i in zip(classes.ravel(), instances.ravel())}):
        if key[0] == 99:
            continue
        segment_id = len(segments) + 1
        ids[(classes == key[0]) & (instances == key[1])] = segment_id
        segments[segment_id] = key[0]
    return ids, segments


def test_pq_agrees_with_torchmetrics():
    """Where the two rules coincide: void ground truth, every pixel predicted."""
    rng = np.random.default_rng(0)
    things, stuffs = [0, 1, 2], [3, 4]
    metric = PanopticQuality(things=set(things), stuffs=set(stuffs), allow_unknown_preds_category=True,
                             return_sq_and_rq=True)
    total = np.zeros((4, 5))
    for _ in range(12):
        gt_c, gt_i = _random_panoptic(rng, 24, 32, things, stuffs)
        pr_c, pr_i = gt_c.copy(), gt_i.copy()
        if rng.random() < 0.8:  # a perturbed copy of the truth, or an unrelated map
            pr_c[rng.integers(0, 20):, : rng.integers(5, 30)] = rng.choice(things + stuffs)
            pr_i[pr_c != gt_c] = 0
        else:
            pr_c, pr_i = _random_panoptic(rng, 24, 32, things, stuffs)
        pr_c[pr_c == 99] = 3  # torchmetrics also leaves ground truth under unpredicted pixels out; panopticapi does not
        gt_ids, gt_seg = _to_segments(gt_c, gt_i, stuffs)
        pr_ids, pr_seg = _to_segments(pr_c, pr_i, stuffs)
        total += image_pq_stats(gt_ids, {k: (v, False) for k, v in gt_seg.items()}, pr_ids, pr_seg, 5)
        metric.update(torch.from_numpy(np.stack([pr_c, pr_i], -1))[None], torch.from_numpy(np.stack([gt_c, gt_i], -1))[None])
    ours = summarize_pq(total, [True] * 3 + [False] * 2, list("abcde"))
    theirs = metric.compute()  # [PQ, SQ, RQ]
    assert ours["PQ"] == pytest.approx(float(theirs[0]) * 100, abs=1e-3)
    assert ours["SQ"] == pytest.approx(float(theirs[1]) * 100, abs=1e-3)
    assert ours["RQ"] == pytest.approx(float(theirs[2]) * 100, abs=1e-3)


def test_semantic_metrics_by_hand_and_against_torchmetrics():
    truth = np.array([[0, 0, 1, IGNORE], [2, 2, 1, 1]])
    pred = np.array([[0, 1, 1, 2], [2, 2, 2, 1]])
    confusion = confusion_matrix(truth, pred, 3)
    assert confusion.tolist() == [[1, 1, 0], [0, 2, 1], [0, 0, 2]]
    result = summarize_confusion(confusion, ["a", "b", "c"])
    assert result["per_class"] == pytest.approx({"a": 50.0, "b": 50.0, "c": 200 / 3})
    assert result["pACC"] == pytest.approx(500 / 7) and result["mACC"] == pytest.approx((50 + 200 / 3 + 100) / 3)

    rng = np.random.default_rng(1)
    truth = rng.integers(0, 6, (4, 20, 20))
    truth[rng.random(truth.shape) < 0.1] = IGNORE
    pred = np.where(rng.random(truth.shape) < 0.6, np.where(truth == IGNORE, 0, truth), rng.integers(0, 6, truth.shape))
    confusion = sum(confusion_matrix(t, p, 6) for t, p in zip(truth, pred))
    result = summarize_confusion(confusion, list("abcdef"))
    t, p = torch.from_numpy(truth), torch.from_numpy(pred)
    miou = MulticlassJaccardIndex(num_classes=6, ignore_index=IGNORE, average="macro")(p, t)
    pacc = MulticlassAccuracy(num_classes=6, ignore_index=IGNORE, average="micro")(p, t)
    assert result["mIoU"] == pytest.approx(float(miou) * 100, abs=1e-4)
    assert result["pACC"] == pytest.approx(float(pacc) * 100, abs=1e-4)


def test_semantic_metrics_leave_out_absent_classes():
    result = summarize_confusion(confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 2), int), 3), list("abc"))
    assert result["mIoU"] == 100 and math.isnan(result["per_class"]["b"])

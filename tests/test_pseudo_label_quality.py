"""benchmarks/pseudo_label_quality.py: the ground truth at a stride and the one-to-one matching it counts with."""
import numpy as np
import torch
from pycocotools import mask as mask_api

from benchmark_scripts import benchmark_script
from semiseg.data.records import Annotation


def rle(mask: np.ndarray) -> dict:
    return mask_api.encode(np.asfortranarray(mask.astype(np.uint8)))


def test_truth_at_stride_pools_to_the_padded_canvas_and_leaves_out_crowds():
    h, w = 20, 24
    box = np.zeros((h, w), bool)
    box[4:12, 8:16] = True  # 8 x 8 pixels on the 4-pixel grid
    crowd = np.ones((h, w), bool)
    annotations = [Annotation(2, rle(box)), Annotation(1, rle(crowd), iscrowd=True)]
    with benchmark_script("pseudo_label_quality") as script:
        labels, quarter = script.truth_at_stride(annotations, h, w, (32, 32), 4)
        _, full = script.truth_at_stride(annotations, h, w, (32, 32), 1)
    assert labels.tolist() == [2]
    expected = torch.zeros(1, 8, 8, dtype=torch.bool)
    expected[0, 1:3, 2:4] = True
    assert torch.equal(quarter, expected)
    assert full.shape == (1, 32, 32) and full[0, :h, :w].numpy().tolist() == box.tolist()
    assert not full[0, h:].any() and not full[0, :, w:].any()


def test_matching_is_one_to_one_in_order_and_the_iou_bar_decides():
    truth = torch.zeros(2, 10, 10, dtype=torch.bool)
    truth[0, :5, :5] = True
    truth[1, 5:, 5:] = True
    loose = truth[1].clone()
    loose[5:, 3:5] = True  # 25 of 35 pixels: IoU 0.71 with truth 1
    predictions = torch.stack([truth[0], truth[0], loose])
    with benchmark_script("pseudo_label_quality") as script:
        assert script.greedy_matches(predictions, truth) == [0, -1, 1]  # the duplicate is wrong
        assert script.greedy_matches(predictions, truth, 0.75) == [0, -1, -1]
        assert script.greedy_matches(predictions, truth[:0]) == [-1, -1, -1]

import torch

from semiseg.structures import Instances, masks_to_boxes


def test_masks_to_boxes_is_tight_and_handles_empty_masks():
    masks = torch.zeros(3, 10, 12, dtype=torch.bool)
    masks[0, 2:5, 3:7] = True
    masks[1, 9, 11] = True
    boxes = masks_to_boxes(masks)
    assert boxes.tolist() == [[3, 2, 7, 5], [11, 9, 12, 10], [0, 0, 0, 0]]


def test_instances_indexing_keeps_fields_aligned():
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[1, 1:3, 1:3] = True
    inst = Instances.from_masks(torch.tensor([3, 1]), masks, scores=torch.tensor([0.2, 0.9]))
    kept = inst[inst.scores > 0.5]
    assert len(kept) == 1 and kept.labels.tolist() == [1] and kept.boxes.tolist() == [[1, 1, 3, 3]]
    assert kept.image_size == (4, 4)

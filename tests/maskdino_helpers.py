"""A tiny Mask DINO and painted rectangle scenes, shared by the Mask DINO tests."""
from __future__ import annotations

import torch

from semiseg.models.backbones.resnet import build_tiny_resnet
from semiseg.models.maskdino import MaskDINO, MaskDINOConfig
from semiseg.structures import Instances

NUM_CLASSES, NUM_QUERIES, DEC_LAYERS, DN_NUM = 3, 12, 2, 20
SIZE = 64


def tiny_model(seed: int = 0, **overrides) -> MaskDINO:
    torch.manual_seed(seed)
    settings = dict(num_classes=NUM_CLASSES, hidden_dim=32, num_queries=NUM_QUERIES, nheads=4, dec_nheads=4,
                    dim_feedforward=64, dec_layers=DEC_LAYERS, enc_layers=1, enc_dim_feedforward=64, conv_dim=32,
                    mask_dim=32, dn_num=DN_NUM, train_num_points=64, test_topk=10)
    settings.update(overrides)
    return MaskDINO(MaskDINOConfig(**settings), build_tiny_resnet(norm="bn"))


def rect_instances(rects: list[tuple[int, int, int, int, int]], size: int = SIZE) -> Instances:
    """(label, x0, y0, x1, y1) rectangles on a size x size canvas."""
    masks = torch.zeros(len(rects), size, size, dtype=torch.bool)
    for i, (_, x0, y0, x1, y1) in enumerate(rects):
        masks[i, y0:y1, x0:x1] = True
    return Instances.from_masks(torch.tensor([r[0] for r in rects], dtype=torch.long), masks)


def painted_images(targets: list[Instances]) -> torch.Tensor:
    """uint8 images whose objects are flat colours per class on a grey background."""
    colours = torch.tensor([[230, 40, 40], [40, 200, 40], [40, 40, 230]], dtype=torch.uint8)
    images = torch.full((len(targets), 3, SIZE, SIZE), 120, dtype=torch.uint8)
    for b, t in enumerate(targets):
        for label, mask in zip(t.labels, t.masks):
            images[b][:, mask] = colours[label][:, None]
    return images

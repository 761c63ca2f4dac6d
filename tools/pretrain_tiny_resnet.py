"""Pretrain the tiny ResNet on procedural pretext images; writes the weights that semiseg ships.

The pretext task is dense: from the backbone's res2..res5 maps, a small feature pyramid predicts
for every pixel the pretext class of the visible object (12 classes + background, see
`semiseg/data/pretext_shapes.py`) and whether it lies on an instance boundary. The images share
no object class with the built-in dataset. The head is dropped; only the backbone is saved, with
detectron2 names, as `semiseg/models/backbones/pretrained/tiny_resnet_pretext.safetensors`.

    OMP_NUM_THREADS=1 python tools/pretrain_tiny_resnet.py --out semiseg/models/backbones/pretrained/tiny_resnet_pretext.safetensors

Defaults: 16,000 images of 128 px (rendered once, 2 processes), 6,000 steps of 32 images,
AdamW 2e-3 with cosine decay, horizontal/vertical flips; seed 0. docs/pretrained.md has the time.
"""
from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from semiseg.data.pretext_shapes import PRETEXT_CLASSES, render_pretext_image
from semiseg.models.backbones.resnet import build_tiny_resnet
from semiseg.models.preprocess import IMAGENET_MEAN_255, IMAGENET_STD_255
from semiseg.weights import save_safetensors_atomic


class DenseHead(nn.Module):
    """Top-down pyramid over res2..res5 -> [B, K + 2, H, W] logits (K + 1 classes, 1 boundary)."""

    def __init__(self, in_channels: list[int], num_outputs: int, width: int = 64):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.fuse = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.out = nn.Conv2d(width, num_outputs, 1)

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        x = self.lateral[-1](features[-1])
        for lateral, feature in zip(self.lateral[-2::-1], features[-2::-1]):
            x = lateral(feature) + F.interpolate(x, size=feature.shape[-2:], mode="nearest")
        return F.interpolate(self.out(self.fuse(x)), size=size, mode="bilinear", align_corners=False)


def _render(task: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    seed, index, size = task
    image = render_pretext_image(seed, index, size)
    return image.image, image.classes, image.boundary


def render_set(seed: int, count: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, 3, S, S] uint8 images, [N, S, S] long classes, [N, S, S] float boundaries."""
    with ProcessPoolExecutor(max_workers=2) as pool:
        rendered = list(tqdm(pool.map(_render, [(seed, i, size) for i in range(count)], chunksize=64),
                             total=count, desc="render pretext images", unit="img"))
    images = torch.from_numpy(np.stack([r[0] for r in rendered])).permute(0, 3, 1, 2).contiguous()
    classes = torch.from_numpy(np.stack([r[1] for r in rendered])).long()
    boundary = torch.from_numpy(np.stack([r[2] for r in rendered])).float()
    return images, classes, boundary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=int, default=16000)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    images, classes, boundary = render_set(args.seed, args.images, args.size)
    backbone = build_tiny_resnet("bn")
    head = DenseHead(list(backbone.out_channels.values()), len(PRETEXT_CLASSES) + 2)
    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps,
                                                   pct_start=0.05)
    mean = torch.tensor(IMAGENET_MEAN_255).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD_255).view(1, 3, 1, 1)
    generator = torch.Generator().manual_seed(args.seed)
    bar = tqdm(range(args.steps), desc="pretrain", unit="step")
    for step in bar:
        index = torch.randint(len(images), (args.batch_size,), generator=generator)
        x, y, b = (images[index].float() - mean) / std, classes[index], boundary[index]
        flips = [d for d, p in ((-1, 0.5), (-2, 0.5)) if torch.rand((), generator=generator) < p]
        if flips:
            x, y, b = x.flip(flips), y.flip([d + 1 for d in flips]), b.flip([d + 1 for d in flips])
        features = list(backbone(x).values())
        logits = head(features, x.shape[-2:])
        loss_class = F.cross_entropy(logits[:, :-1], y)
        loss_boundary = F.binary_cross_entropy_with_logits(logits[:, -1], b, pos_weight=torch.tensor(3.0))
        loss = loss_class + loss_boundary
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0:
            accuracy = (logits[:, :-1].argmax(1) == y).float().mean()
            bar.set_postfix(cls=f"{loss_class.item():.3f}", bnd=f"{loss_boundary.item():.3f}",
                            acc=f"{accuracy.item():.3f}")
    state = {k: v for k, v in backbone.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_safetensors_atomic(state, args.out)
    print(f"wrote {args.out} ({len(state)} tensors) in {time.perf_counter() - start:.0f} s; "
          f"last losses: class {loss_class.item():.3f}, boundary {loss_boundary.item():.3f}")


if __name__ == "__main__":
    main()

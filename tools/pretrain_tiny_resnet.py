"""Pretrain the tiny ResNet on procedural pretext images; writes the weights that semiseg ships.

Two pretext tasks on procedural images that share no object class with the built-in dataset
(12 shape classes, `semiseg/data/pretext_shapes.py`), half of each batch for each:
- dense, on scenes of 1-6 overlapping objects: from the backbone's res2..res5 maps a small feature
  pyramid predicts every pixel's class (background weighted 0.25, objects 1) and whether it lies
  on an instance boundary;
- image-level, on one large centred object: a linear classifier on the pooled res5 features
  predicts its class (the ImageNet-style task that makes the deep features tell shapes apart). The head is dropped; only the backbone is saved, with
detectron2 names, as `semiseg/models/pretrained/tiny_resnet_pretext.safetensors`.

    OMP_NUM_THREADS=1 python tools/pretrain_tiny_resnet.py --out semiseg/models/pretrained/tiny_resnet_pretext.safetensors

Defaults: 12,000 scenes + 12,000 single objects of 128 px (rendered once, 2 processes), 5,000
steps of 32 images, AdamW 2e-3 with one-cycle decay, horizontal/vertical flips; seed 0. At the end
it prints the accuracy of a linear probe on held-out single objects. docs/pretrained.md has the time.
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


def _render(task: tuple[int, int, int, bool]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    seed, index, size, single = task
    image = render_pretext_image(seed, index, size, single_centered=single)
    return image.image, image.classes, image.boundary


def render_set(seed: int, count: int, size: int, single: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, 3, S, S] uint8 images, [N, S, S] long classes, [N, S, S] float boundaries."""
    tasks = [(seed, i, size, single) for i in range(count)]
    with ProcessPoolExecutor(max_workers=2) as pool:
        rendered = list(tqdm(pool.map(_render, tasks, chunksize=64), total=count,
                             desc=f"render pretext {'objects' if single else 'scenes'}", unit="img"))
    images = torch.from_numpy(np.stack([r[0] for r in rendered])).permute(0, 3, 1, 2).contiguous()
    classes = torch.from_numpy(np.stack([r[1] for r in rendered])).long()
    boundary = torch.from_numpy(np.stack([r[2] for r in rendered])).float()
    return images, classes, boundary


def _flip(generator: torch.Generator, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """The same random horizontal / vertical flip of [B, ..., H, W] tensors."""
    dims = [d for d in (-1, -2) if torch.rand((), generator=generator) < 0.5]
    return [t.flip(dims) if dims else t for t in tensors]


def probe_accuracy(backbone: nn.Module, seed: int, count: int = 480) -> float:
    """Linear-probe accuracy on pooled res4+res5 features of held-out single objects (3/4 fit, 1/4 test)."""
    rendered = [render_pretext_image(seed, i, 128, single_centered=True) for i in range(count)]
    x = _normalize(torch.from_numpy(np.stack([r.image for r in rendered])).permute(0, 3, 1, 2))
    labels = torch.tensor([int(r.classes.max()) - 1 for r in rendered])
    with torch.no_grad():
        features = backbone.eval()(x)
    pooled = torch.cat([features[k].mean((2, 3)) for k in ("res4", "res5")], 1)
    pooled = (pooled - pooled.mean(0)) / (pooled.std(0) + 1e-6)
    fit = count * 3 // 4
    probe = nn.Linear(pooled.shape[1], len(PRETEXT_CLASSES))
    optimizer = torch.optim.Adam(probe.parameters(), lr=0.05, weight_decay=1e-3)
    for _ in range(300):
        optimizer.zero_grad()
        F.cross_entropy(probe(pooled[:fit]), labels[:fit]).backward()
        optimizer.step()
    return (probe(pooled[fit:]).argmax(1) == labels[fit:]).float().mean().item()


def _normalize(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] uint8 -> ImageNet-normalised float, as semiseg's models see their input."""
    mean = torch.tensor(IMAGENET_MEAN_255).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD_255).view(1, 3, 1, 1)
    return (images.float() - mean) / std


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=int, default=12000, help="scenes, and as many single objects")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=32, help="half scenes, half single objects")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    scenes, scene_classes, boundary = render_set(args.seed, args.images, args.size)
    objects, object_classes, _ = render_set(args.seed + 1, args.images, args.size, single=True)
    object_labels = object_classes.flatten(1).max(1).values - 1
    backbone = build_tiny_resnet("bn")
    num_classes = len(PRETEXT_CLASSES)
    dense_head = DenseHead(list(backbone.out_channels.values()), num_classes + 2)
    image_head = nn.Linear(backbone.out_channels["res5"], num_classes)
    params = [*backbone.parameters(), *dense_head.parameters(), *image_head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps,
                                                   pct_start=0.05)
    class_weight = torch.ones(num_classes + 1)
    class_weight[0] = 0.25  # background is most of every scene
    generator = torch.Generator().manual_seed(args.seed)
    half = args.batch_size // 2
    bar = tqdm(range(args.steps), desc="pretrain", unit="step")
    for step in bar:
        s = torch.randint(len(scenes), (half,), generator=generator)
        o = torch.randint(len(objects), (half,), generator=generator)
        x_scene, y, b = _flip(generator, _normalize(scenes[s]), scene_classes[s], boundary[s])
        (x_object,) = _flip(generator, _normalize(objects[o]))
        features = backbone(torch.cat([x_scene, x_object]))
        logits = dense_head([f[:half] for f in features.values()], x_scene.shape[-2:])
        loss_dense = F.cross_entropy(logits[:, :-1], y, weight=class_weight)
        loss_boundary = F.binary_cross_entropy_with_logits(logits[:, -1], b, pos_weight=torch.tensor(3.0))
        object_logits = image_head(features["res5"][half:].mean((2, 3)))
        loss_object = F.cross_entropy(object_logits, object_labels[o])
        optimizer.zero_grad(set_to_none=True)
        (loss_dense + loss_boundary + loss_object).backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0:
            accuracy = (object_logits.argmax(1) == object_labels[o]).float().mean()
            bar.set_postfix(dense=f"{loss_dense.item():.3f}", bnd=f"{loss_boundary.item():.3f}",
                            obj=f"{loss_object.item():.3f}", obj_acc=f"{accuracy.item():.2f}")
    state = {k: v for k, v in backbone.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_safetensors_atomic(state, args.out)
    print(f"wrote {args.out} ({len(state)} tensors) in {time.perf_counter() - start:.0f} s; last losses: "
          f"dense {loss_dense.item():.3f}, boundary {loss_boundary.item():.3f}, object {loss_object.item():.3f}; "
          f"linear probe on held-out objects: {probe_accuracy(backbone, args.seed + 1000):.3f} "
          f"(chance {1 / num_classes:.3f})")


if __name__ == "__main__":
    main()

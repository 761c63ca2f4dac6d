"""Can a teacher's features tell its classes apart? A linear probe against its own class head.

For every non-crowd object of the labeled images (`--train-ann`) and of the validation images
(`--val-ann`), the trained model's backbone features res3, res4 and res5 are averaged inside the
object's ground-truth mask and concatenated. A logistic regression (L-BFGS, L2, features
standardised on the labeled objects) is fitted on the labeled objects and scored on the validation
objects. Beside it: the model's own class head, read on the query whose mask best overlaps each
validation object (mask IoU >= 0.5; objects without such a query are "not located"), and chance.
If the probe is no better than the head, the features, not the head, limit the classes.

    python benchmarks/class_probe.py --weights runs/bench/p10_s0/teacher/checkpoints/last \
        --train-ann runs/bench/p10_s0/splits/instances_train_10.json --train-images data/train \
        --val-ann data/annotations/instances_val.json --val-images data/val
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from semiseg.api import load
from semiseg.data.coco import load_coco_instances
from semiseg.data.images import read_image
from semiseg.data.masks import decode_segmentation

LEVELS = ("res3", "res4", "res5")


@torch.no_grad()
def object_features(model, ann: str, images: str, limit: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features [N, C], true classes [N], the head's class of the best-matching query or -1 [N])."""
    feats, labels, head = [], [], []
    for record in load_coco_instances(ann, images).records[:limit]:
        image = torch.from_numpy(read_image(record.file_name)).permute(2, 0, 1)[None].float()
        h, w = image.shape[-2:]
        x = model.normalize(image, [(h, w)])
        levels = model.backbone(x)
        outputs = model.sem_seg_head(levels)
        probs = model.pseudo_label_candidates(outputs).class_probs[0]  # [Q, K]
        pred = F.interpolate(outputs["pred_masks"], size=x.shape[-2:], mode="bilinear")[0, :, :h, :w] > 0
        for a in record.annotations:
            mask = torch.from_numpy(decode_segmentation(a.segmentation, h, w)).float()
            if a.iscrowd or mask.sum() < 4:
                continue
            padded = F.pad(mask, (0, x.shape[-1] - w, 0, x.shape[-2] - h))[None, None]
            pooled = []
            for name in LEVELS:
                f = levels[name][0]
                weight = F.adaptive_avg_pool2d(padded, f.shape[-2:])[0, 0]
                pooled.append((f * weight).sum((1, 2)) / weight.sum().clamp(min=1e-6))
            feats.append(torch.cat(pooled))
            labels.append(a.label)
            inter = (pred.float() * mask).sum((1, 2))
            iou = inter / (pred.sum((1, 2)) + mask.sum() - inter)
            best = int(iou.argmax())
            head.append(int(probs[best].argmax()) if iou[best] >= 0.5 else -1)
    return torch.stack(feats), torch.tensor(labels), torch.tensor(head)


def linear_probe(x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, num_classes: int,
                 weight_decay: float) -> torch.Tensor:
    """Logistic regression fitted on (x, y); predicted classes of x_test."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    x, x_test = (x - mean) / std, (x_test - mean) / std
    weight = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=300)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + weight_decay * (weight ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return (x_test @ weight + bias).argmax(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="a trained Mask2Former / Mask DINO checkpoint")
    parser.add_argument("--train-ann", required=True, help="COCO json of the labeled images (the probe's training set)")
    parser.add_argument("--train-images", required=True)
    parser.add_argument("--val-ann", required=True)
    parser.add_argument("--val-images", required=True)
    parser.add_argument("--limit", type=int, default=150, help="validation images (default 150)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    predictor = load(args.weights, device="cpu")
    model, num_classes = predictor.model, len(predictor.class_names)
    x, y, _ = object_features(model, args.train_ann, args.train_images, 100_000)
    x_val, y_val, head = object_features(model, args.val_ann, args.val_images, args.limit)
    located = head >= 0
    print(f"{len(y)} labeled objects, {len(y_val)} validation objects, {num_classes} classes "
          f"(chance {100 / num_classes:.1f} %); accuracy on the validation objects:")
    print("| classifier | all objects | located objects |\n|---|---:|---:|")
    print(f"| class head (best query, IoU >= 0.5) | – | {(head[located] == y_val[located]).float().mean() * 100:.1f} % "
          f"({located.float().mean() * 100:.0f} % located) |")
    for weight_decay in (1e-4, 1e-3, 1e-2):
        p = linear_probe(x, y, x_val, num_classes, weight_decay)
        print(f"| linear probe on pooled {'+'.join(LEVELS)}, L2 {weight_decay:g} | {(p == y_val).float().mean() * 100:.1f} % "
              f"| {(p[located] == y_val[located]).float().mean() * 100:.1f} % |")


if __name__ == "__main__":
    main()

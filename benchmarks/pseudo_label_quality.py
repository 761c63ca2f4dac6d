"""How good are a teacher's pseudo-labels? Precision and recall of the pseudo-label filter per threshold.

Runs a trained model (Mask2Former or Mask DINO) on labeled images as if they were unlabeled, applies
the Guided Distillation filter (`semi.pseudo_labels`) at several confidence thresholds and compares
the pseudo-instances with the ground truth at the pseudo-masks' resolution (1/4, or the input's with
`--mask-upsampling 4`). A pseudo-instance is correct when it matches a ground-truth instance of its
class with mask IoU >= 0.5; matching is one-to-one in order of confidence, so duplicates count as
wrong. Used to calibrate the threshold (the Mask DINO default was chosen with it; see
docs/guided_distillation.md).

`--input-resolution` compares at the input's resolution whatever the pseudo-masks' (a 1/4 pseudo-mask
covers the input pixel blocks under its pixels), so that `--mask-upsampling 1` and `4` are judged
alike. The class-agnostic precision at IoU >= 0.75 says how well the pseudo-masks outline what they find.

`--flip agree|average` tries a flip test-time augmentation of the teacher: it also sees the image
flipped horizontally, and each query is paired with the flipped view's query whose flipped-back mask
overlaps it most. "agree" keeps a query only if that pairing has mask IoU > 0.5 and names the same
class; "average" averages the pair's class probabilities and mask logits.

    python benchmarks/pseudo_label_quality.py --weights runs/teacher/checkpoints/last \
        --ann data/synth/annotations/instances_val.json --images data/synth/val
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from semiseg.api import load
from semiseg.data.coco import load_coco_instances
from semiseg.data.datasets import Sample
from semiseg.data.images import read_image
from semiseg.data.loader import collate
from semiseg.data.masks import decode_segmentation
from semiseg.models.protocol import PseudoLabelCandidates
from semiseg.semi.pseudo_labels import ThresholdFilter

IOU_MATCH = 0.5


@dataclass
class Tally:
    """Counts over images for one threshold."""

    pseudo: int = 0
    correct: int = 0  # right class, IoU >= 0.5, first match of its ground truth
    located: int = 0  # the same, ignoring the class
    outlined: int = 0  # located with IoU >= 0.75
    truth: int = 0

    def row(self, threshold: float, images: int) -> str:
        precision = self.correct / max(self.pseudo, 1)
        agnostic = self.located / max(self.pseudo, 1)
        recall = self.correct / max(self.truth, 1)
        outlined = self.outlined / max(self.pseudo, 1)
        return (f"| {threshold:.2f} | {self.pseudo / images:.2f} | {precision:.2f} | {agnostic:.2f} | {outlined:.2f} "
                f"| {recall:.2f} | {2 * precision * recall / max(precision + recall, 1e-9):.2f} |")


def greedy_matches(pred_masks: torch.Tensor, truth_masks: torch.Tensor, iou_match: float = IOU_MATCH) -> list[int]:
    """pred_masks [P, h, w] (by decreasing confidence), truth_masks [T, h, w] bool -> for each prediction
    the index of the ground truth it claims (IoU >= iou_match, each ground truth once) or -1."""
    if len(pred_masks) == 0 or len(truth_masks) == 0:
        return [-1] * len(pred_masks)
    p, t = pred_masks.flatten(1).float(), truth_masks.flatten(1).float()
    inter = p @ t.T
    iou = inter / (p.sum(1)[:, None] + t.sum(1)[None, :] - inter).clamp(min=1)
    taken: set[int] = set()
    matches = []
    for row in iou:
        row = row.clone()
        row[list(taken)] = -1
        best = int(row.argmax())
        matches.append(best if row[best] >= iou_match else -1)
        if matches[-1] >= 0:
            taken.add(best)
    return matches


def truth_at_stride(annotations, height: int, width: int, padded: tuple[int, int],
                    stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-crowd ground truth -> (labels [T], masks [T, H/stride, W/stride] bool on the padded (H, W) canvas)."""
    kept = [a for a in annotations if not a.iscrowd]
    masks = torch.zeros(len(kept), *padded)
    for i, a in enumerate(kept):
        masks[i, :height, :width] = torch.from_numpy(decode_segmentation(a.segmentation, height, width)).float()
    small = F.avg_pool2d(masks[:, None], stride)[:, 0] > 0.5 if len(kept) else masks[:, ::stride, ::stride].bool()
    return torch.tensor([a.label for a in kept], dtype=torch.long), small


def with_flip(model, images: torch.Tensor, image_sizes, mode: str) -> PseudoLabelCandidates:
    """The teacher's candidates for `images`, combined with those of the flipped images (`mode`: see above).
    Expects unpadded images (a flip of a padded canvas would move the image)."""
    plain = model.pseudo_label_candidates(model(images, image_sizes))
    if mode == "none":
        return plain
    flipped = model.pseudo_label_candidates(model(images.flip(-1), image_sizes))
    flipped_masks = flipped.mask_logits.flip(-1)
    a = (plain.mask_logits[0] > 0).flatten(1).float()
    b = (flipped_masks[0] > 0).flatten(1).float()
    inter = a @ b.T
    iou = inter / (a.sum(1)[:, None] + b.sum(1)[None, :] - inter).clamp(min=1)
    best_iou, partner = iou.max(1)
    partner_probs = flipped.class_probs[0, partner]
    if mode == "agree":
        agree = (best_iou > 0.5) & (partner_probs.argmax(-1) == plain.class_probs[0].argmax(-1))
        return replace(plain, is_object=plain.is_object & agree[None])
    return replace(plain, class_probs=(plain.class_probs + partner_probs[None]) / 2,
                   mask_logits=(plain.mask_logits + flipped_masks[:, partner]) / 2)


def measure(weights: str, ann: str, images: str, thresholds: list[float], limit: int, nms_iou: float = 1.0,
            flip: str = "none", mask_upsampling: int = 1,
            input_resolution: bool = False) -> tuple[dict[float, Tally], int]:
    """({threshold: counts}, number of images) over the first `limit` images of `ann`."""
    predictor = load(weights, device="cpu")
    model = predictor.model
    records = load_coco_instances(ann, images).records[:limit]
    tallies = {t: Tally() for t in thresholds}
    for record in records:
        image = read_image(record.file_name)
        h, w = image.shape[:2]
        batch = collate([Sample(torch.from_numpy(image).permute(2, 0, 1).contiguous(), 0, (h, w))])
        if flip != "none" and tuple(batch.images.shape[-2:]) != (h, w):
            raise SystemExit(f"--flip needs images whose sides are multiples of 32; {record.file_name} is {h}x{w}")
        with torch.no_grad():
            candidates = with_flip(model, batch.images, batch.image_sizes, flip)
        padded = tuple(batch.images.shape[-2:])
        stride = padded[1] // candidates.mask_logits.shape[-1]
        pseudo_stride = stride // mask_upsampling
        compare_stride = 1 if input_resolution else pseudo_stride
        labels, truth = truth_at_stride(record.annotations, h, w, padded, compare_stride)
        for threshold, tally in tallies.items():
            (pseudo,) = ThresholdFilter(score_threshold=threshold, mask_stride=stride, nms_iou=nms_iou,
                                        mask_upsampling=mask_upsampling)(candidates, batch.image_sizes)
            scale = pseudo_stride // compare_stride
            pseudo = replace(pseudo, masks=pseudo.masks.repeat_interleave(scale, 1).repeat_interleave(scale, 2))
            order = pseudo.scores.argsort(descending=True)
            tally.pseudo += len(pseudo)
            tally.truth += len(labels)
            class_matches = [-1] * len(order)
            for c in pseudo.labels.unique().tolist():
                chosen = order[pseudo.labels[order] == c]
                for j, m in zip(chosen.tolist(), greedy_matches(pseudo.masks[chosen], truth[labels == c])):
                    class_matches[j] = m
            tally.correct += sum(m >= 0 for m in class_matches)
            tally.located += sum(m >= 0 for m in greedy_matches(pseudo.masks[order], truth))
            tally.outlined += sum(m >= 0 for m in greedy_matches(pseudo.masks[order], truth, 0.75))
    return tallies, len(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="a semiseg checkpoint or weights file")
    parser.add_argument("--ann", required=True, help="COCO instances json of the images to pseudo-label")
    parser.add_argument("--images", required=True, help="their image folder")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    parser.add_argument("--limit", type=int, default=200, help="number of images (default 200)")
    parser.add_argument("--nms-iou", type=float, default=1.0, help="semi.pseudo_labels.nms_iou (default 1 = off)")
    parser.add_argument("--flip", choices=("none", "agree", "average"), default="none",
                        help="flip test-time augmentation of the teacher (see above)")
    parser.add_argument("--mask-upsampling", type=int, default=1,
                        help="semi.pseudo_labels.mask_upsampling (default 1: pseudo-masks at 1/4 resolution)")
    parser.add_argument("--input-resolution", action="store_true",
                        help="compare with the ground truth at the input's resolution (see above)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tallies, images = measure(args.weights, args.ann, args.images, args.thresholds, args.limit, args.nms_iou,
                              args.flip, args.mask_upsampling, args.input_resolution)
    truth = next(iter(tallies.values())).truth / images
    print(f"{images} images, {truth:.2f} ground-truth instances per image; correct = right class and mask IoU >= "
          f"{IOU_MATCH}, one-to-one")
    print("| threshold | pseudo-labels / image | precision | class-agnostic precision | class-agnostic precision "
          "at IoU 0.75 | recall | F1 |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for threshold, tally in tallies.items():
        print(tally.row(threshold, images))


if __name__ == "__main__":
    main()

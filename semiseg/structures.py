"""The data types that flow through the whole library.

One representation end to end: the loader emits `Instances` for ground truth, a teacher emits
`Instances` as pseudo-labels, and `model.predict` returns `Instances` with `scores` filled in
(panoptic models return `PanopticSegmentation`, semantic ones a [H, W] class map).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes (pixel edges, so a single pixel at (x, y) gives [x, y, x+1, y+1]).

    masks: [N, H, W] bool -> [N, 4] float32; an empty mask gives [0, 0, 0, 0].
    """
    n = masks.shape[0]
    if n == 0:
        return torch.zeros(0, 4, dtype=torch.float32, device=masks.device)
    rows = masks.any(dim=2)  # [N, H]
    cols = masks.any(dim=1)  # [N, W]
    h, w = masks.shape[1:]
    ys = torch.arange(h, device=masks.device)
    xs = torch.arange(w, device=masks.device)
    big = torch.iinfo(torch.long).max
    y0 = torch.where(rows, ys, big).amin(dim=1)
    y1 = torch.where(rows, ys, -1).amax(dim=1) + 1
    x0 = torch.where(cols, xs, big).amin(dim=1)
    x1 = torch.where(cols, xs, -1).amax(dim=1) + 1
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    return torch.where(rows.any(dim=1, keepdim=True), boxes, torch.zeros_like(boxes))


@dataclass
class Instances:
    """Instances of one image, on one canvas of size (H, W).

    labels: [N] long, contiguous class ids in [0, num_classes)
    masks:  [N, H, W] bool
    boxes:  [N, 4] float xyxy in pixels of the same canvas
    scores: [N] float, or None for ground truth / hard pseudo-labels
    class_probs: [N, K] float, a teacher's class probabilities (soft pseudo-labels), or None: the
                 criteria then use one-hot `labels` (Mask2Former normalises the rows to sum 1; Mask DINO's
                 focal loss takes them as they are)
    ignore: [N] bool, True for an uncertain pseudo-object: the criteria match it like the others but
            give the query matched to it no loss at all (it is taught neither a class nor "no
            object"); None = every instance is a target
    """

    labels: torch.Tensor
    masks: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor | None = None
    class_probs: torch.Tensor | None = None
    ignore: torch.Tensor | None = None

    @classmethod
    def from_masks(cls, labels: torch.Tensor, masks: torch.Tensor, scores: torch.Tensor | None = None) -> "Instances":
        return cls(labels=labels.long(), masks=masks.bool(), boxes=masks_to_boxes(masks.bool()), scores=scores)

    @classmethod
    def empty(cls, height: int, width: int) -> "Instances":
        return cls(torch.zeros(0, dtype=torch.long), torch.zeros(0, height, width, dtype=torch.bool), torch.zeros(0, 4))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.masks.shape[-2]), int(self.masks.shape[-1])

    @property
    def num_targets(self) -> int:
        """The instances that are not ignored."""
        return len(self) if self.ignore is None else int((~self.ignore).sum())

    def confident(self) -> "Instances":
        """The instances that are not ignored (`ignore` dropped)."""
        return self if self.ignore is None else replace(self[~self.ignore], ignore=None)

    def __getitem__(self, keep: torch.Tensor | slice) -> "Instances":
        return Instances(self.labels[keep], self.masks[keep], self.boxes[keep],
                         *(None if t is None else t[keep] for t in (self.scores, self.class_probs, self.ignore)))

    def to(self, device: torch.device | str) -> "Instances":
        return Instances(self.labels.to(device), self.masks.to(device), self.boxes.to(device),
                         *(None if t is None else t.to(device) for t in (self.scores, self.class_probs, self.ignore)))


@dataclass(frozen=True)
class Segment:
    """One segment of a panoptic segmentation: its id in the id map, contiguous class, thing or stuff, score."""

    id: int
    label: int
    is_thing: bool
    score: float = 1.0


@dataclass
class PanopticSegmentation:
    """Panoptic segmentation of one image.

    segment_ids: [H, W] int32, the id of the segment each pixel belongs to (0 = none, void)
    segments:    the segments, one per id present in `segment_ids`
    """

    segment_ids: torch.Tensor
    segments: list[Segment]

    def to(self, device: torch.device | str) -> "PanopticSegmentation":
        return PanopticSegmentation(self.segment_ids.to(device), self.segments)


@dataclass
class Batch:
    """A padded batch ready for a model.

    images:      [B, 3, H, W] uint8 RGB, zero-padded at the bottom/right to a multiple of 32
    image_sizes: valid (h, w) of each image inside the padded canvas
    targets:     per-image `Instances` on the padded canvas (H, W), or None for unlabeled data
    strong:      [B, 3, H, W] uint8, the strong view of unlabeled images (same geometry as `images`)
    image_ids:   dataset image ids (for evaluation)
    orig_sizes:  (h, w) of each original image before any resize (for evaluation at full size)
    skipped:     "file: problem" of the unreadable images the loader passed over for this batch
    """

    images: torch.Tensor
    image_sizes: list[tuple[int, int]]
    targets: list[Instances] | None = None
    strong: torch.Tensor | None = None
    image_ids: list[int] = field(default_factory=list)
    orig_sizes: list[tuple[int, int]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def pin_memory(self) -> "Batch":
        """Called by DataLoader(pin_memory=True) so host→GPU copies can be asynchronous."""
        return replace(
            self,
            images=self.images.pin_memory(),
            strong=None if self.strong is None else self.strong.pin_memory(),
            targets=None if self.targets is None else [
                replace(t, labels=t.labels.pin_memory(), masks=t.masks.pin_memory(), boxes=t.boxes.pin_memory())
                for t in self.targets],
        )

    def to(self, device: torch.device | str) -> "Batch":
        return replace(
            self,
            images=self.images.to(device, non_blocking=True),
            strong=None if self.strong is None else self.strong.to(device, non_blocking=True),
            targets=None if self.targets is None else [t.to(device) for t in self.targets],
        )

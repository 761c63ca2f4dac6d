"""The `semi:` section of a training config: Guided Distillation settings (defaults = the reference).

    semi:
      enabled: true                  # stage 2 (teacher -> student); false = plain supervised training
      teacher_weights: runs/teacher/checkpoints/best   # stage-1 semiseg checkpoint, or an official GD .pth
      student_init: fresh            # fresh: backbone weights (model.backbone) + random head; teacher: a copy
      burn_in_iter: 50000            # teacher <- student copy at this iteration, EMA after it
      ema_decay: 0.9996
      unsup_loss_weight: 2.0         # L = L_sup + 2.0 * L_unsup (0: labeled data only, a control)
      unmatched_weight: 1.0          # unlabeled images: scale of the class loss of queries no pseudo-label matched
      unsup_class_weight: 1.0        # unlabeled images: scale of all classification terms (loss_ce*)
      unsup_mask_weight: 1.0         # unlabeled images: scale of all mask terms (loss_mask*, loss_dice*)
      labeled_sampler: repeat_factor # with data.repeat_threshold (10.0)
      eval_who: student              # student | teacher | both
      pseudo_labels: {min_area: 5.0, mask_threshold: 0.5, box_source: mask, mask_upsampling: 1}  # score_threshold, nms_iou: by model
                                     # ignore_threshold (off): unsure pseudo-objects get no loss

Unlabeled images come from `data.unlabeled` (+ `data.unlabeled_images`), `data.unlabeled_batch_size`
of them per iteration.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from semiseg.errors import ConfigError
from semiseg.models.protocol import PseudoLabelDefaults
from semiseg.semi.pseudo_labels import ThresholdFilter


@dataclass
class PseudoLabelConfig:
    """The default pseudo-label filter (`ThresholdFilter`) and how pseudo-labels enter the loss.

    score_threshold:     keep a query whose class confidence is above this; default (None): the
                         model's `pseudo_label_defaults` (Mask2Former 0.7, the reference; Mask DINO
                         0.3, calibrated)
    class_thresholds:    one threshold per class instead of `score_threshold` (empty = not used)
    min_area:            keep a query whose soft mask area (sum of sigmoid, 1/4 resolution) is above this
    mask_threshold:      binarise the pseudo-mask at sigmoid > this
    mask_upsampling:     binarise the teacher's mask logits after upsampling them bilinearly by this
                         factor: 1 = at 1/4 resolution (the reference), 4 = at the input's resolution
    score_weighted_loss: weight the unlabeled loss by the pseudo-labels' confidence (see
                         docs/guided_distillation.md; the reference uses hard, unweighted targets)
    box_source:          pseudo-instance boxes from the binarised pseudo-mask (mask, the reference) or
                         from the teacher's box head (head; models with boxes, e.g. Mask DINO)
    nms_iou:             drop a pseudo-instance whose mask IoU with a more confident one exceeds this
                         (class-agnostic, greedy); 1.0 = off; default (None): the model's
                         `pseudo_label_defaults` (off for Mask2Former, the reference; 0.5 for Mask DINO)
    class_targets:       hard: the student learns the teacher's top class (the reference); soft: its
                         class probabilities (Mask2Former: normalised over the K classes)
    ignore_threshold:    queries with a confidence between this and the threshold become ignored
                         pseudo-objects: the student's query matched to one gets no loss instead of
                         being taught "no object" (None: off, the reference)
    """

    score_threshold: float | None = None
    class_thresholds: tuple[float, ...] = ()
    min_area: float = 5.0
    mask_threshold: float = 0.5
    score_weighted_loss: bool = False
    box_source: Literal["mask", "head"] = "mask"
    nms_iou: float | None = None
    class_targets: Literal["hard", "soft"] = "hard"
    ignore_threshold: float | None = None
    mask_upsampling: int = 1

    def __post_init__(self) -> None:
        self.class_thresholds = tuple(self.class_thresholds)
        for name, value in [("score_threshold", self.score_threshold), ("mask_threshold", self.mask_threshold),
                            ("nms_iou", self.nms_iou), ("ignore_threshold", self.ignore_threshold),
                            *((f"class_thresholds[{i}]", t) for i, t in enumerate(self.class_thresholds))]:
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name}={value}: expected a value in [0, 1]")
        if self.min_area < 0:
            raise ConfigError(f"min_area={self.min_area}: expected >= 0")
        if self.mask_upsampling < 1:
            raise ConfigError(f"mask_upsampling={self.mask_upsampling}: expected an integer >= 1")

    def build_filter(self, defaults: PseudoLabelDefaults) -> ThresholdFilter:
        """The filter for a model whose `pseudo_label_defaults` are `defaults` (used for unset values)."""
        score_threshold = defaults.score_threshold if self.score_threshold is None else self.score_threshold
        lowest = min((score_threshold, *self.class_thresholds))
        if self.ignore_threshold is not None and self.ignore_threshold >= lowest:
            raise ConfigError(f"semi.pseudo_labels.ignore_threshold={self.ignore_threshold}: expected a value below "
                              f"the pseudo-label threshold ({lowest})")
        return ThresholdFilter(
            score_threshold=score_threshold, min_area=self.min_area, mask_threshold=self.mask_threshold,
            class_thresholds=self.class_thresholds or None, box_source=self.box_source,
            nms_iou=defaults.nms_iou if self.nms_iou is None else self.nms_iou,
            soft_classes=self.class_targets == "soft", ignore_threshold=self.ignore_threshold,
            mask_upsampling=self.mask_upsampling)


@dataclass
class SemiConfig:
    """Guided Distillation (stage 2). See the module docstring for a YAML example."""

    enabled: bool = False
    teacher_weights: Path | None = None
    student_init: Literal["fresh", "teacher"] = "fresh"
    burn_in_iter: int = 50000
    ema_decay: float = 0.9996
    unsup_loss_weight: float = 2.0
    labeled_sampler: Literal["repeat_factor", "uniform"] = "repeat_factor"
    eval_who: Literal["student", "teacher", "both"] = "student"
    unmatched_weight: float = 1.0
    unsup_class_weight: float = 1.0
    unsup_mask_weight: float = 1.0
    pseudo_labels: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)

    def __post_init__(self) -> None:
        if self.burn_in_iter < 0:
            raise ConfigError(f"burn_in_iter={self.burn_in_iter}: expected >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay={self.ema_decay}: expected a value in [0, 1)")
        if self.unsup_loss_weight < 0:
            raise ConfigError(f"unsup_loss_weight={self.unsup_loss_weight}: expected >= 0")
        if self.unmatched_weight < 0:
            raise ConfigError(f"unmatched_weight={self.unmatched_weight}: expected >= 0")
        for name in ("unsup_class_weight", "unsup_mask_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)}: expected >= 0")

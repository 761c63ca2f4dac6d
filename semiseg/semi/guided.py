"""Guided Distillation (Berrada et al., WACV 2024): stage 2, teacher -> student on labeled + unlabeled data.

Every iteration (`GuidedDistillationTrainer.run_step`, inherited from the supervised `Trainer`):
1. teacher update, before anything else (`semiseg.semi.ema.update_teacher`): frozen stage-1 teacher
   while `iteration < burn_in_iter` (the "guided burn-in"), a copy of the student at
   `burn_in_iter`, an EMA of the student (decay 0.9996) after it;
2. one labeled batch (weak augmentation + ground truth) and one unlabeled batch (weak view
   `images` and strong view `strong`, same geometry);
3. the teacher, in eval mode, without gradients and in fp32 (outside autocast), sees the weak view;
   the pseudo-label filter turns its outputs into `Instances` on the 1/4-resolution canvas;
4. the student sees the labeled images (loss against ground truth) and the strong view (loss
   against the pseudo-labels, same Hungarian-matched criterion at every decoder layer); the
   unlabeled terms are multiplied by `unsup_loss_weight` (2.0) and logged with a `_unsup` suffix;
   one backward of L = L_sup + 2.0 * L_unsup, clipping and an AdamW step on the student only.
Checkpoints hold `student.safetensors` and `teacher.safetensors`; resume restores both.
"""
from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from semiseg.config import Config
from semiseg.data.datasets import UnlabeledDataset
from semiseg.data.records import DatasetRecords
from semiseg.data.samplers import InfiniteSampler
from semiseg.data.unlabeled import load_unlabeled
from semiseg.engine.distributed import collective, get_rank, get_world_size, is_distributed
from semiseg.engine.run_dir import RunDir
from semiseg.engine.stream import BatchStream, build_labeled_stream, per_rank_batch
from semiseg.engine.trainer import EvaluateFn, Trainer
from semiseg.errors import ConfigError
from semiseg.models.build import build_model
from semiseg.semi.ema import copy_weights, freeze, update_teacher
from semiseg.semi.pseudo_labels import PseudoLabelFilter
from semiseg.structures import Batch, Instances
from semiseg.weights import WeightsInfo, load_weights_into, read_model_weights

logger = logging.getLogger("semiseg.train")

UNSUP_SUFFIX = "_unsup"
CLASS_LOSS_PREFIX = "loss_ce"  # the classification terms of both meta-architectures (`semi.unsup_class_weight`)
MASK_LOSS_PREFIXES = ("loss_mask", "loss_dice")  # their mask terms (`semi.unsup_mask_weight`)


def init_teacher_and_student(cfg: Config, teacher: nn.Module, student: nn.Module) -> None:
    """Load `semi.teacher_weights` into `teacher`; with `student_init: teacher` copy them into `student`.

    `student_init: fresh` leaves the student as built (pretrained backbone if `model.backbone`
    names weights, random head), as the reference does.
    """
    if cfg.semi.teacher_weights is None:
        raise ConfigError("semi.enabled=true needs semi.teacher_weights (a stage-1 checkpoint or weights file)")
    load_weights_into(teacher, read_model_weights(cfg.semi.teacher_weights), source=cfg.semi.teacher_weights)
    if cfg.semi.student_init == "teacher":
        copy_weights(student, teacher)
    logger.info("teacher from %s; student init: %s", cfg.semi.teacher_weights, cfg.semi.student_init)


def unsupervised_weight(pseudo_labels: list[Instances], base_weight: float, score_weighted: bool) -> float:
    """Multiplier of the unlabeled loss terms.

    `score_weighted`: `base_weight` x the mean confidence of the batch's pseudo-instances (1 when
    there are none), an approximation of per-instance weighting that needs no criterion change.
    """
    if not score_weighted:
        return base_weight
    scores = [p.confident().scores for p in pseudo_labels if p.scores is not None and p.num_targets]
    return base_weight * (float(torch.cat(scores).mean()) if scores else 1.0)


class GuidedDistillationTrainer(Trainer):
    """The supervised `Trainer` plus a teacher, an unlabeled stream and a pseudo-label filter.

    student, teacher: the same meta-architecture, on `device`; the teacher is frozen here
    streams:          "labeled" (images + targets) and "unlabeled" (weak `images` + `strong`)
    pseudo_labeler:   `(candidates, image_sizes) -> list[Instances]`; default: the `semi.pseudo_labels` filter
    """

    def __init__(self, cfg: Config, student: nn.Module, teacher: nn.Module, streams: dict[str, BatchStream],
                 run: RunDir, device: torch.device, info: WeightsInfo, evaluate: EvaluateFn | None = None,
                 pseudo_labeler: PseudoLabelFilter | None = None):
        missing = {"labeled", "unlabeled"} - set(streams)
        if missing:
            raise ValueError(f"Guided Distillation needs the streams {sorted(missing)}")
        super().__init__(cfg, student, streams, run, device, info, evaluate)
        self.teacher = freeze(teacher)
        self.pseudo_labeler = pseudo_labeler or cfg.semi.pseudo_labels.build_filter(student.pseudo_label_defaults)
        self.pseudo_label_count = 0  # pseudo-instances made since the last log line (not ignored)
        self.ignored_count = 0  # ignored pseudo-instances (semi.pseudo_labels.ignore_threshold) since then
        self.pseudo_label_images = 0

    @property
    def student(self) -> nn.Module:
        return self.model

    # ----------------------------------------------------------------- the GD step
    def before_step(self, iteration: int) -> None:
        semi = self.cfg.semi
        update = update_teacher(self.teacher, self.model, iteration, semi.burn_in_iter, semi.ema_decay)
        if update is not None and is_distributed():
            # DDP keeps parameters in sync, but each rank's BatchNorm statistics move with its own
            # batches: take rank 0's, so that every rank's teacher equals the checkpointed one.
            for buffer in self.teacher.buffers():
                torch.distributed.broadcast(buffer, src=0)
        if update == "copy":
            logger.info("iteration %d: end of burn-in, teacher <- student; EMA (decay %g) from now on",
                        iteration, semi.ema_decay)
        if iteration % self.cfg.train.log_period == 0 and self.pseudo_label_images:
            ignored = (f" (+ {self.ignored_count / self.pseudo_label_images:.2f} ignored)"
                       if semi.pseudo_labels.ignore_threshold is not None else "")
            logger.info("iteration %d: %.2f pseudo-instances per unlabeled image%s", iteration,
                        self.pseudo_label_count / self.pseudo_label_images, ignored)
            self.pseudo_label_count = self.ignored_count = self.pseudo_label_images = 0

    @torch.no_grad()
    def make_pseudo_labels(self, batch: Batch) -> list[Instances]:
        """The teacher's pseudo-labels for the weak view of `batch` (eval mode, fp32)."""
        self.teacher.eval()
        with torch.autocast(device_type=self.device.type, enabled=False):
            outputs = self.teacher(batch.images, batch.image_sizes)
            pseudo_labels = self.pseudo_labeler(self.teacher.pseudo_label_candidates(outputs), batch.image_sizes)
        self.pseudo_label_count += sum(p.num_targets for p in pseudo_labels)
        self.ignored_count += sum(len(p) - p.num_targets for p in pseudo_labels)
        self.pseudo_label_images += len(pseudo_labels)
        return pseudo_labels

    def forward_losses(self) -> dict[str, torch.Tensor]:
        """Supervised terms on the labeled batch + weighted `_unsup` terms on the strong unlabeled view.

        With `semi.unsup_loss_weight: 0` the unlabeled branch is skipped altogether: the student
        then trains on labeled data only (a same-budget supervised control for benchmarks).
        """
        labeled = self.next_batch("labeled")
        losses = self.model.loss(self.ddp_model(labeled.images, labeled.image_sizes, labeled.targets),
                                 labeled.targets)
        if self.cfg.semi.unsup_loss_weight == 0:
            return losses
        unlabeled = self.next_batch("unlabeled")
        pseudo_labels = self.make_pseudo_labels(unlabeled)
        outputs = self.ddp_model(unlabeled.strong, unlabeled.image_sizes, pseudo_labels)
        weight = unsupervised_weight(pseudo_labels, self.cfg.semi.unsup_loss_weight,
                                     self.cfg.semi.pseudo_labels.score_weighted_loss)
        for name, value in self.model.loss(outputs, pseudo_labels,
                                           unmatched_weight=self.cfg.semi.unmatched_weight).items():
            losses[name + UNSUP_SUFFIX] = value * (weight * self.term_factor(name))
        return losses

    def term_factor(self, name: str) -> float:
        """`semi.unsup_class_weight` for a classification term, `semi.unsup_mask_weight` for a mask term, else 1."""
        if name.startswith(CLASS_LOSS_PREFIX):
            return self.cfg.semi.unsup_class_weight
        return self.cfg.semi.unsup_mask_weight if name.startswith(MASK_LOSS_PREFIXES) else 1.0

    # ----------------------------------------------------------------- models and state
    def checkpoint_models(self) -> dict[str, nn.Module]:
        return {"student": self.model, "teacher": self.teacher}

    def eval_models(self) -> dict[str, nn.Module]:
        """By `semi.eval_who`; with "both" the student comes first (it selects the best checkpoint)."""
        who = self.cfg.semi.eval_who
        return {name: model for name, model in self.checkpoint_models().items() if who in (name, "both")}


def build_unlabeled_stream(cfg: Config) -> BatchStream:
    """This rank's endless unlabeled batches: weak view `images` + strong view `strong`, uniform sampling."""
    data = cfg.data
    if data.unlabeled is None:
        raise ConfigError("semi.enabled=true needs data.unlabeled (an image folder or an image-list json)")
    records = collective(lambda: load_unlabeled(data.unlabeled, data.unlabeled_images, strict=data.strict,
                                                allow_outside_root=data.allow_outside_root))
    seed = cfg.train.seed + 1  # augmentation draws independent of the labeled stream's
    dataset = UnlabeledDataset(records, data.augmentation.train_transform(), data.augmentation.strong_transform(),
                               strict=data.strict, seed=seed)
    rank, world = get_rank(), get_world_size()
    sampler = InfiniteSampler(len(dataset), seed=seed, rank=rank, world_size=world)
    return BatchStream(dataset, sampler, per_rank_batch(data.unlabeled_batch_size, "data.unlabeled_batch_size"),
                       data.num_workers, seed=seed, rank=rank, world_size=world,
                       size_divisibility=cfg.model.head.size_divisibility)


def build_guided_trainer(cfg: Config, student: nn.Module, records: DatasetRecords, run: RunDir,
                         device: torch.device, info: WeightsInfo, evaluate: EvaluateFn | None,
                         resume: bool) -> GuidedDistillationTrainer:
    """The stage-2 trainer `semiseg train` runs when `semi.enabled` (called by `semiseg.training.build_trainer`).

    The labeled stream samples with `semi.labeled_sampler` (repeat factors, threshold
    `data.repeat_threshold`, as the reference); the teacher is the student's architecture, loaded from
    `semi.teacher_weights` unless the run resumes (then both come from the checkpoint).
    """

    labeled_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sampler=cfg.semi.labeled_sampler))
    streams = {"labeled": build_labeled_stream(labeled_cfg, records), "unlabeled": build_unlabeled_stream(cfg)}
    teacher = build_model(cfg.model, cfg.model.num_classes, load_pretrained=False).to(device)
    if not resume:
        init_teacher_and_student(cfg, teacher, student)
    return GuidedDistillationTrainer(cfg, student, teacher, streams, run, device, info, evaluate)

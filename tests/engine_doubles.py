"""Test doubles for the engine tests: a tiny deterministic meta-architecture and a random-flip dataset.

`PixelClassifier` implements the whole model protocol (`semiseg.models.protocol.MetaArchitecture`)
with no randomness, so runs can be compared bit for bit (resume vs uninterrupted, 2 DDP ranks vs 1
process), and Guided Distillation runs on it in a fraction of a second.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from semiseg.config import Config, apply_overrides
from semiseg.data.datasets import Sample
from semiseg.data.samplers import InfiniteSampler
from semiseg.weights import WeightsInfo
from semiseg.engine.run_dir import RunDir, prepare_run_dir
from semiseg.engine.stream import BatchStream
from semiseg.engine.trainer import Trainer
from semiseg.models.protocol import PseudoLabelCandidates, PseudoLabelDefaults
from semiseg.structures import Instances

NUM_CLASSES = 2
CLASS_NAMES = ["square", "bar"]


class PixelClassifier(nn.Module):
    """Per-pixel (K+1)-way classifier: conv "backbone" -> GroupNorm -> 1x1 head; K = no object.

    forward -> {"pred_logits": [B, K+1, H, W]}; loss terms "loss_ce" and "loss_smooth".
    `poison` holds loss-call numbers (1-based) whose loss is NaN, to test non-finite handling.
    Its pseudo-label candidates are one query per class: the class's pixels as its mask.
    """

    pseudo_label_defaults = PseudoLabelDefaults(score_threshold=0.5, nms_iou=1.0)

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.num_classes = num_classes
        self.backbone = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.head = nn.Conv2d(8, num_classes + 1, 1)
        self.poison: set[int] = set()
        self.loss_calls = 0

    def forward(self, images, image_sizes, targets=None):
        x = (images.float() - 128.0) / 64.0
        return {"pred_logits": self.head(F.relu(self.norm(self.backbone(x))))}

    def loss(self, outputs, targets, unmatched_weight=1.0):
        """unmatched_weight scales the "no object" pixels' share of the cross-entropy."""
        self.loss_calls += 1
        logits = outputs["pred_logits"]
        semantic = torch.full((logits.shape[0], *logits.shape[-2:]), self.num_classes, dtype=torch.long,
                              device=logits.device)
        for i, t in enumerate(targets):
            masks = t.masks
            if len(masks) and masks.shape[-2:] != logits.shape[-2:]:  # pseudo-labels come at 1/4 of the canvas
                masks = F.interpolate(masks[None].float(), size=logits.shape[-2:], mode="nearest")[0].bool()
            for label, mask in zip(t.labels, masks):
                semantic[i][mask] = label
        class_weight = torch.ones(self.num_classes + 1, device=logits.device)
        class_weight[-1] = unmatched_weight
        ce = F.cross_entropy(logits, semantic, weight=class_weight)
        smooth = 0.01 * logits.diff(dim=-1).pow(2).mean()
        if self.loss_calls in self.poison:
            ce = ce * float("nan")
        return {"loss_ce": ce, "loss_smooth": smooth}

    def predict(self, outputs, image_sizes, orig_sizes):
        results = []
        for logits, (h, w), (oh, ow) in zip(outputs["pred_logits"], image_sizes, orig_sizes):
            probs = F.interpolate(logits[None, :, :h, :w], size=(oh, ow), mode="bilinear",
                                  align_corners=False)[0].softmax(0)
            best = probs.argmax(0)
            labels = [c for c in range(self.num_classes) if bool((best == c).any())]
            masks = torch.stack([best == c for c in labels]) if labels else torch.zeros(0, oh, ow, dtype=torch.bool)
            scores = torch.tensor([float(probs[c][best == c].mean()) for c in labels])
            results.append(Instances.from_masks(torch.tensor(labels, dtype=torch.long), masks, scores))
        return results

    def pseudo_label_candidates(self, outputs):
        """One query per class: confidence = its mean probability where it wins, mask logit = +-4 there
        (at 1/4 of the canvas, as the protocol asks)."""
        probs = F.avg_pool2d(outputs["pred_logits"].float().softmax(1), 4)  # [B, K+1, H/4, W/4]
        best = probs.argmax(1)  # [B, H, W]
        wins = torch.stack([best == c for c in range(self.num_classes)], 1)  # [B, K, H, W]
        area = wins.flatten(2).sum(-1).clamp(min=1)
        confidence = (probs[:, :-1] * wins).flatten(2).sum(-1) / area  # [B, K]
        class_probs = torch.diag_embed(confidence)  # query k proposes class k
        return PseudoLabelCandidates(class_probs=class_probs, is_object=wins.flatten(2).any(-1),
                                     mask_logits=wins.float() * 8 - 4)


def draw_sample(index: int, size: int = 32) -> tuple[torch.Tensor, Instances]:
    """Image [3, size, size] uint8 with a square (class 0) and a bar (class 1) placed by `index`."""
    g = np.random.default_rng(index)
    image = torch.from_numpy(g.integers(0, 60, (3, size, size), dtype=np.uint8))
    masks = torch.zeros(2, size, size, dtype=torch.bool)
    y, x = g.integers(0, size - 10, 2)
    masks[0, y:y + 8, x:x + 8] = True
    y, x = g.integers(0, size - 10, 2)
    masks[1, y:y + 3, x:x + 10] = True
    masks[0] &= ~masks[1]
    image[:, masks[0]] = 220
    image[0, masks[1]] = 250
    return image, Instances.from_masks(torch.tensor([0, 1]), masks)


class ToyDataset(torch.utils.data.Dataset):
    """Labeled samples with a random horizontal flip drawn from the dataset's own generator."""

    def __init__(self, n: int = 16, size: int = 32):
        self.n, self.size = n, size
        self.rng = np.random.default_rng(0)

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Sample:
        image, instances = draw_sample(index, self.size)
        if self.rng.random() < 0.5:
            image, instances = image.flip(-1), Instances.from_masks(instances.labels, instances.masks.flip(-1))
        return Sample(image, index + 1, (self.size, self.size), instances=instances)


def toy_config(output_dir: Path, *overrides: str) -> Config:
    """A CPU config for the double: constant LR (steps far away), no clipping surprises."""
    return apply_overrides(Config(), [
        f"train.output_dir={output_dir}", "train.device=cpu", "train.log_period=2", "train.eval_period=1000",
        "train.checkpoint_period=1000", "solver.lr=0.01", "solver.max_iter=6", "solver.steps=[1000]",
        "solver.warmup_iters=0", "solver.clip_grad_norm=1.0", "solver.amp=none", "data.batch_size=4",
        "data.num_workers=0", "solver.backbone_lr_mult=1.0", *overrides])


def toy_trainer(cfg: Config, resume: bool = False, evaluate=None, rank: int = 0, world_size: int = 1,
                model: PixelClassifier | None = None) -> Trainer:
    """A Trainer over `ToyDataset` with the engine's real stream, optimizer and checkpoints."""
    torch.manual_seed(cfg.train.seed)
    model = model or PixelClassifier()
    run = prepare_run_dir(cfg.train.output_dir, resume, cfg.train.overwrite) if rank == 0 else RunDir(cfg.train.output_dir)
    sampler = InfiniteSampler(16, seed=cfg.train.seed, rank=rank, world_size=world_size)
    stream = BatchStream(ToyDataset(), sampler, cfg.data.batch_size // world_size, cfg.data.num_workers,
                         seed=cfg.train.seed, rank=rank, world_size=world_size)
    trainer = Trainer(cfg, model, {"labeled": stream}, run, torch.device("cpu"),
                      WeightsInfo(None, CLASS_NAMES, [1, 2], "model"), evaluate)
    if resume:
        trainer.load_checkpoint(run.resume_checkpoint())
    return trainer


def parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}

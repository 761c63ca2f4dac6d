"""Mask2Former for instance segmentation: backbone -> pixel decoder -> masked-attention decoder.

The module layout and parameter names match the official detectron2 checkpoints (`backbone.*`,
`sem_seg_head.pixel_decoder.*`, `sem_seg_head.predictor.*`, `criterion.empty_weight`), so official
weights load after the converter strips their prefixes. The backbone is passed in (any module that
maps [B, 3, H, W] to {"res2": .., "res5": ..} and has `out_channels` / `strides` dicts).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from semiseg.errors import ConfigError
from semiseg.models.mask2former_criterion import SetCriterion
from semiseg.models.deform_attn import BACKENDS
from semiseg.models.mask2former_inference import instance_inference, resize_mask_logits
from semiseg.models.mask2former_decoder import MultiScaleMaskedTransformerDecoder
from semiseg.models.matcher import HungarianMatcher
from semiseg.models.pixel_decoder import MSDeformAttnPixelDecoder
from semiseg.models.preprocess import backbone_pixel_stats, normalize_and_pad
from semiseg.models.protocol import PseudoLabelCandidates, PseudoLabelDefaults
from semiseg.models.segmentation_task import SegmentationTask, panoptic_inference, semantic_inference
from semiseg.structures import Instances


@dataclass
class Mask2FormerConfig:
    """Head, loss and inference settings (defaults: the official COCO instance R50 recipe).

    dec_layers has the official DEC_LAYERS meaning: dec_layers - 1 decoder layers + the initial
    prediction. enc_dim_feedforward is the pixel decoder's FFN (official: hard-coded 1024).
    object_mask_threshold / overlap_threshold: panoptic fusion (the official TEST settings).
    """

    num_classes: int = 80
    hidden_dim: int = 256
    num_queries: int = 100
    nheads: int = 8
    dim_feedforward: int = 2048
    dec_layers: int = 10
    pre_norm: bool = False
    enforce_input_proj: bool = False
    enc_layers: int = 6
    enc_dim_feedforward: int = 1024
    enc_dropout: float = 0.0
    conv_dim: int = 256
    mask_dim: int = 256
    common_stride: int = 4
    deform_points: int = 4
    transformer_in_features: tuple[str, ...] = ("res3", "res4", "res5")
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    train_num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    test_topk: int = 100
    object_mask_threshold: float = 0.8
    overlap_threshold: float = 0.8
    pixel_mean: tuple[float, float, float] | None = None  # None: what the backbone's weights expect
    pixel_std: tuple[float, float, float] | None = None
    size_divisibility: int = 32
    deform_attn_backend: str = "pytorch"

    def __post_init__(self) -> None:
        problems = []
        if self.num_classes < 1:
            problems.append(f"num_classes must be >= 1, got {self.num_classes}")
        if self.dec_layers < 1:
            problems.append(f"dec_layers must be >= 1, got {self.dec_layers}")
        if self.hidden_dim % self.nheads or self.conv_dim % self.nheads:
            problems.append(f"hidden_dim {self.hidden_dim} and conv_dim {self.conv_dim} must be divisible by nheads {self.nheads}")
        if self.conv_dim % 32:
            problems.append(f"conv_dim must be a multiple of 32 (GroupNorm(32)), got {self.conv_dim}")
        if self.deform_attn_backend not in BACKENDS:
            problems.append(f"deform_attn_backend must be one of {BACKENDS}, got {self.deform_attn_backend!r}")
        if any(v is not None and len(v) != 3 for v in (self.pixel_mean, self.pixel_std)):
            problems.append("pixel_mean and pixel_std need 3 values (RGB)")
        if not 0.0 <= self.importance_sample_ratio <= 1.0:
            problems.append(f"importance_sample_ratio must be in [0, 1], got {self.importance_sample_ratio}")
        if problems:
            raise ConfigError("model: " + "; ".join(problems))


class MaskFormerHead(nn.Module):
    """Container named like the official `sem_seg_head` (pixel decoder + transformer predictor)."""

    def __init__(self, pixel_decoder: MSDeformAttnPixelDecoder, predictor: MultiScaleMaskedTransformerDecoder):
        super().__init__()
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor

    def forward(self, features: dict[str, torch.Tensor]) -> dict:
        mask_features, multi_scale_features = self.pixel_decoder(features)
        outputs = self.predictor(multi_scale_features, mask_features)
        outputs["mask_features"] = mask_features
        outputs["multi_scale_features"] = multi_scale_features
        return outputs


class Mask2Former(nn.Module):
    """Mask2Former meta-architecture implementing the model protocol of docs/design.md.

    forward(images [B, 3, H, W] uint8/float 0..255, image_sizes) -> {
        "pred_logits" [B, Q, K+1], "pred_masks" [B, Q, H/4, W/4], "aux_outputs",
        "mask_features" [B, mask_dim, H/4, W/4], "multi_scale_features" 3 x [B, C, h, w],
        "padded_size" (H, W) of the network input}
    """

    # The reference's softmax threshold, no NMS (the "no object" class removes duplicates).
    pseudo_label_defaults = PseudoLabelDefaults(score_threshold=0.7, nms_iou=1.0)

    def __init__(self, cfg: Mask2FormerConfig, backbone: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.task = SegmentationTask()  # what `predict` returns; `build_model` sets it from `model.task`
        self.backbone = backbone
        input_shape = {name: (backbone.out_channels[name], backbone.strides[name]) for name in backbone.out_channels}
        pixel_decoder = MSDeformAttnPixelDecoder(
            input_shape, conv_dim=cfg.conv_dim, mask_dim=cfg.mask_dim,
            transformer_in_features=cfg.transformer_in_features, common_stride=cfg.common_stride,
            transformer_dropout=cfg.enc_dropout, transformer_nheads=cfg.nheads,
            transformer_dim_feedforward=cfg.enc_dim_feedforward, transformer_enc_layers=cfg.enc_layers,
            transformer_n_points=cfg.deform_points, num_outputs=3, deform_attn_backend=cfg.deform_attn_backend)
        predictor = MultiScaleMaskedTransformerDecoder(
            in_channels=cfg.conv_dim, num_classes=cfg.num_classes, hidden_dim=cfg.hidden_dim,
            num_queries=cfg.num_queries, nheads=cfg.nheads, dim_feedforward=cfg.dim_feedforward,
            dec_layers=cfg.dec_layers, pre_norm=cfg.pre_norm, mask_dim=cfg.mask_dim,
            enforce_input_proj=cfg.enforce_input_proj)
        self.sem_seg_head = MaskFormerHead(pixel_decoder, predictor)
        matcher = HungarianMatcher(cost_class=cfg.class_weight, cost_mask=cfg.mask_weight,
                                   cost_dice=cfg.dice_weight, num_points=cfg.train_num_points)
        self.criterion = SetCriterion(
            cfg.num_classes, matcher, class_weight=cfg.class_weight, mask_weight=cfg.mask_weight,
            dice_weight=cfg.dice_weight, no_object_weight=cfg.no_object_weight, num_points=cfg.train_num_points,
            oversample_ratio=cfg.oversample_ratio, importance_sample_ratio=cfg.importance_sample_ratio)
        mean, std = backbone_pixel_stats(backbone, cfg.pixel_mean, cfg.pixel_std)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    def normalize(self, images: torch.Tensor, image_sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
        """[B, 3, H, W] 0..255 -> normalised float, zero outside each image, padded to size_divisibility."""
        return normalize_and_pad(images, image_sizes, self.pixel_mean, self.pixel_std, self.cfg.size_divisibility)

    def forward(self, images: torch.Tensor, image_sizes: Sequence[tuple[int, int]],
                targets: Sequence[Instances] | None = None) -> dict:
        """`targets` is part of the protocol (Mask DINO's denoising) and unused here."""
        if len(image_sizes) != images.shape[0]:
            raise ValueError(f"{len(image_sizes)} image sizes for a batch of {images.shape[0]} images")
        x = self.normalize(images, image_sizes)
        outputs = self.sem_seg_head(self.backbone(x))
        outputs["padded_size"] = (int(x.shape[-2]), int(x.shape[-1]))
        return outputs

    def loss(self, outputs: dict, targets: Sequence[Instances], unmatched_weight: float = 1.0
             ) -> dict[str, torch.Tensor]:
        """Weighted loss terms (`loss_ce`, `loss_mask`, `loss_dice`, then `_0`.. for the aux outputs)."""
        device = outputs["pred_logits"].device
        return self.criterion(outputs, [t.to(device) for t in targets], unmatched_weight=unmatched_weight)

    @torch.no_grad()
    def predict(self, outputs: dict, image_sizes: Sequence[tuple[int, int]],
                orig_sizes: Sequence[tuple[int, int]]) -> list:
        """Per image, by `self.task`: instance: top-k Instances with scores, masks [N, orig_h, orig_w] and
        boxes from the masks; panoptic: a PanopticSegmentation; semantic: a [orig_h, orig_w] class map."""
        padded = outputs["padded_size"]
        results = []
        for logits, masks, size, orig in zip(outputs["pred_logits"], outputs["pred_masks"], image_sizes, orig_sizes):
            if self.task.name == "instance":
                results.append(instance_inference(logits, masks, padded, tuple(size), tuple(orig), self.cfg.test_topk))
                continue
            probs = logits.float().softmax(-1)  # [Q, K+1]
            if self.task.name == "semantic":
                mask_probs = resize_mask_logits(masks.float(), padded, tuple(size), tuple(orig)).sigmoid()
                results.append(semantic_inference(probs[:, :-1], mask_probs))
                continue
            scores, labels = probs.max(-1)
            keep = (labels != self.cfg.num_classes) & (scores > self.cfg.object_mask_threshold)
            mask_probs = resize_mask_logits(masks[keep].float(), padded, tuple(size), tuple(orig)).sigmoid()
            results.append(panoptic_inference(scores[keep], labels[keep], mask_probs, self.task.stuff_classes,
                                              self.cfg.overlap_threshold))
        return results

    @torch.no_grad()
    def pseudo_label_candidates(self, outputs: dict) -> PseudoLabelCandidates:
        """Final-layer evidence: softmax over K+1; a query is an object unless "no object" wins."""
        probs = outputs["pred_logits"].float().softmax(-1)
        return PseudoLabelCandidates(
            class_probs=probs[..., :-1],
            is_object=probs.argmax(-1) != self.cfg.num_classes,
            mask_logits=outputs["pred_masks"].float(),
            boxes=None,
        )

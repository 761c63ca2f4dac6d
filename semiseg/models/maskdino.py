"""Mask DINO for instance segmentation: backbone -> deformable encoder -> DINO decoder with masks.

Implements the model protocol of docs/design.md. Mask DINO differs from Mask2Former in the head
(two-stage query selection, 4-d anchor boxes refined per layer, sigmoid classes without "no
object", a box head) and in training (focal loss, box L1 + GIoU, losses on the encoder's selected
tokens and on denoising queries built from the targets, so `forward` needs the targets in training).

Boxes: the model predicts normalised cxcywh boxes relative to the *padded* input canvas (H, W), as
the reference does, and normalises target boxes by their own canvas (the padded canvas per the
Batch contract). `predict` scales them to the original image: x by W / image_w * orig_w, y by
H / image_h * orig_h (not clipped, like the reference).

Module layout and parameter names match the official checkpoints (`backbone.*`,
`sem_seg_head.pixel_decoder.*`, `sem_seg_head.predictor.*`, `criterion.empty_weight`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import nn

from semiseg.errors import ConfigError
from semiseg.models.box_ops import box_cxcywh_to_xyxy, normalized_cxcywh
from semiseg.models.deform_attn import BACKENDS
from semiseg.models.denoising import (
    DenoisingNoise,
    DenoisingQueries,
    build_denoising_queries,
)
from semiseg.models.mask2former_inference import resize_mask_logits
from semiseg.models.maskdino_criterion import MaskDINOCriterion
from semiseg.models.maskdino_decoder import MaskDINODecoder
from semiseg.models.matcher import HungarianMatcher, focal_class_cost
from semiseg.models.pixel_decoder import MSDeformAttnPixelDecoder
from semiseg.models.preprocess import backbone_pixel_stats, normalize_and_pad
from semiseg.models.protocol import PseudoLabelCandidates, PseudoLabelDefaults
from semiseg.models.segmentation_task import SegmentationTask, panoptic_inference, semantic_inference
from semiseg.structures import Instances


@dataclass
class MaskDINOConfig:
    """Head, loss and inference settings (defaults: the official COCO instance R50 recipe,
    `maskdino_R50_bs16_50ep_3s_dowsample1_2048`).

    total_num_feature_levels: encoder/decoder levels = the transformer_in_features plus extra
        stride-2 3x3-conv levels on the coarsest one (4 = res3..res5 + stride 64).
    feature_order: "low2high" lists the encoder levels fine -> coarse, "high2low" coarse -> fine
        (the order of `input_proj`, `level_embed` and the decoder's level weights in checkpoints).
    nheads: encoder heads (official NHEADS); dec_nheads / dec_n_points: the decoder's (official: 8 / 4).
    dim_feedforward: decoder FFN; enc_dim_feedforward: encoder FFN (SEM_SEG_HEAD.DIM_FEEDFORWARD).
    dec_layers: decoder layers (official DEC_LAYERS, no -1); prediction sets = dec_layers + 1.
    initialize_box_type: "mask2box" / "bitmask" (anchors from the selected queries' masks) or "no".
    dn: "seg" (denoise labels, boxes and masks), "standard" (labels and boxes) or "no".
    object_mask_threshold / overlap_threshold / pano_temperature: the official panoptic (and, for the
    temperature, semantic) inference settings (docs/tasks.md).
    """

    num_classes: int = 80
    hidden_dim: int = 256
    num_queries: int = 300
    nheads: int = 8
    dec_nheads: int = 8
    dec_n_points: int = 4
    dim_feedforward: int = 2048
    dec_layers: int = 9
    enforce_input_proj: bool = False
    enc_layers: int = 6
    enc_dim_feedforward: int = 2048
    enc_dropout: float = 0.0
    enc_n_points: int = 4
    conv_dim: int = 256
    mask_dim: int = 256
    common_stride: int = 4
    transformer_in_features: tuple[str, ...] = ("res3", "res4", "res5")
    total_num_feature_levels: int = 4
    feature_order: Literal["low2high", "high2low"] = "low2high"
    initialize_box_type: Literal["mask2box", "bitmask", "no"] = "mask2box"
    dn: Literal["seg", "standard", "no"] = "seg"
    dn_num: int = 100
    dn_noise_scale: float = 0.4
    class_weight: float = 4.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    box_weight: float = 5.0
    giou_weight: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    train_num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    test_topk: int = 100
    object_mask_threshold: float = 0.25
    overlap_threshold: float = 0.8
    pano_temperature: float = 0.06
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
        if self.hidden_dim % self.dec_nheads or self.conv_dim % self.nheads:
            problems.append(f"hidden_dim {self.hidden_dim} must be divisible by dec_nheads {self.dec_nheads} and "
                            f"conv_dim {self.conv_dim} by nheads {self.nheads}")
        if self.hidden_dim % 2:
            problems.append(f"hidden_dim must be even (sine box embedding), got {self.hidden_dim}")
        if self.conv_dim % 32:
            problems.append(f"conv_dim must be a multiple of 32 (GroupNorm(32)), got {self.conv_dim}")
        if self.total_num_feature_levels < len(self.transformer_in_features):
            problems.append(f"total_num_feature_levels {self.total_num_feature_levels} is smaller than the "
                            f"{len(self.transformer_in_features)} transformer_in_features")
        if self.feature_order not in ("low2high", "high2low"):
            problems.append(f"feature_order must be low2high or high2low, got {self.feature_order!r}")
        if self.initialize_box_type not in ("mask2box", "bitmask", "no"):
            problems.append(f"initialize_box_type must be mask2box, bitmask or no, got {self.initialize_box_type!r}")
        if self.dn not in ("seg", "standard", "no"):
            problems.append(f"dn must be seg, standard or no, got {self.dn!r}")
        if self.dn_num < 1 or self.dn_noise_scale < 0:
            problems.append(f"dn_num must be >= 1 and dn_noise_scale >= 0, got {self.dn_num}, {self.dn_noise_scale}")
        if self.deform_attn_backend not in BACKENDS:
            problems.append(f"deform_attn_backend must be one of {BACKENDS}, got {self.deform_attn_backend!r}")
        if any(v is not None and len(v) != 3 for v in (self.pixel_mean, self.pixel_std)):
            problems.append("pixel_mean and pixel_std need 3 values (RGB)")
        if not 0.0 <= self.importance_sample_ratio <= 1.0:
            problems.append(f"importance_sample_ratio must be in [0, 1], got {self.importance_sample_ratio}")
        if self.pano_temperature <= 0:
            problems.append(f"pano_temperature must be > 0, got {self.pano_temperature}")
        if problems:
            raise ConfigError("model.maskdino: " + "; ".join(problems))


class MaskDINOHead(nn.Module):
    """Container named like the official `sem_seg_head` (encoder + predictor).

    forward(features: name -> [B, C, h, w], denoising) -> the predictor's outputs plus
    "mask_features" [B, mask_dim, H/4, W/4] and "multi_scale_features" (encoder order).
    """

    def __init__(self, pixel_decoder: MSDeformAttnPixelDecoder, predictor: MaskDINODecoder):
        super().__init__()
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor

    def forward(self, features: dict[str, torch.Tensor], denoising: DenoisingQueries | None = None) -> dict:
        mask_features, multi_scale_features = self.pixel_decoder(features)
        outputs = self.predictor(multi_scale_features, mask_features, denoising)
        outputs["mask_features"] = mask_features
        outputs["multi_scale_features"] = multi_scale_features
        return outputs


class MaskDINO(nn.Module):
    """Mask DINO meta-architecture (model protocol of docs/design.md).

    forward(images [B, 3, H, W] uint8/float 0..255, image_sizes, targets: B x Instances, needed in
    training when dn != "no" (empty Instances for images without objects)) -> {
        "pred_logits" [B, Q, K], "pred_masks" [B, Q, H/4, W/4], "pred_boxes" [B, Q, 4] (cxcywh in [0, 1]
        of the padded canvas), "aux_outputs", "interm_outputs", "dn_outputs", "denoising",
        "mask_features", "multi_scale_features", "padded_size" (H, W)}
    """

    # Sigmoid (focal-loss) scores run far lower than a softmax's: the demo's tiny Mask DINO teacher
    # (10 % labels, mask AP 15.6) kept no query at 0.7; at 0.3 with mask NMS 0.5 it kept 2.3
    # pseudo-labels per image, 49 % right (the best F1), close to the Mask2Former teacher of the same
    # data at 0.7 (3.0 per image, 53 %). benchmarks/pseudo_label_quality.py, docs/guided_distillation.md.
    pseudo_label_defaults = PseudoLabelDefaults(score_threshold=0.3, nms_iou=0.5)

    def __init__(self, cfg: MaskDINOConfig, backbone: nn.Module):
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
            transformer_n_points=cfg.enc_n_points, num_outputs=cfg.total_num_feature_levels,
            deform_attn_backend=cfg.deform_attn_backend,
            extra_levels=cfg.total_num_feature_levels - len(cfg.transformer_in_features),
            feature_order=cfg.feature_order, min_fpn_levels=1)
        predictor = MaskDINODecoder(
            in_channels=cfg.conv_dim, num_classes=cfg.num_classes, hidden_dim=cfg.hidden_dim,
            num_queries=cfg.num_queries, nheads=cfg.dec_nheads, dim_feedforward=cfg.dim_feedforward,
            dec_layers=cfg.dec_layers, mask_dim=cfg.mask_dim, num_feature_levels=cfg.total_num_feature_levels,
            dec_n_points=cfg.dec_n_points, initialize_box_type=cfg.initialize_box_type,
            enforce_input_proj=cfg.enforce_input_proj, deform_attn_backend=cfg.deform_attn_backend)
        self.sem_seg_head = MaskDINOHead(pixel_decoder, predictor)
        matcher = HungarianMatcher(
            cost_class=cfg.class_weight, cost_mask=cfg.mask_weight, cost_dice=cfg.dice_weight,
            num_points=cfg.train_num_points,
            class_cost=partial(focal_class_cost, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma),
            cost_bbox=cfg.box_weight, cost_giou=cfg.giou_weight)
        self.criterion = MaskDINOCriterion(
            cfg.num_classes, matcher, class_weight=cfg.class_weight, mask_weight=cfg.mask_weight,
            dice_weight=cfg.dice_weight, box_weight=cfg.box_weight, giou_weight=cfg.giou_weight,
            focal_alpha=cfg.focal_alpha, focal_gamma=cfg.focal_gamma, dn=cfg.dn, num_points=cfg.train_num_points,
            oversample_ratio=cfg.oversample_ratio, importance_sample_ratio=cfg.importance_sample_ratio)
        mean, std = backbone_pixel_stats(backbone, cfg.pixel_mean, cfg.pixel_std)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    def normalize(self, images: torch.Tensor, image_sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
        """[B, 3, H, W] 0..255 -> normalised float, zero outside each image, padded to size_divisibility."""
        return normalize_and_pad(images, image_sizes, self.pixel_mean, self.pixel_std, self.cfg.size_divisibility)

    def denoising_queries(self, targets: Sequence[Instances], noise: DenoisingNoise | None = None
                          ) -> DenoisingQueries | None:
        """DN queries from the targets' labels and canvas-normalised boxes (None: no DN this batch);
        instances flagged `ignore` get none."""
        predictor = self.sem_seg_head.predictor
        device = predictor.label_enc.weight.device
        targets = [t.confident() for t in targets]
        labels = [t.labels.to(device) for t in targets]
        boxes = [normalized_cxcywh(t.boxes.to(device), t.image_size) for t in targets]
        return build_denoising_queries(labels, boxes, predictor.label_enc, self.cfg.num_queries, self.cfg.dn_num,
                                       self.cfg.dn_noise_scale, noise=noise)

    def forward(self, images: torch.Tensor, image_sizes: Sequence[tuple[int, int]],
                targets: Sequence[Instances] | None = None) -> dict:
        if len(image_sizes) != images.shape[0]:
            raise ValueError(f"{len(image_sizes)} image sizes for a batch of {images.shape[0]} images")
        denoising = None
        if self.training and self.cfg.dn != "no":
            if targets is None:
                raise ValueError("Mask DINO needs the targets in training mode (denoising queries): pass them "
                                 "(empty Instances for images without objects) or set model.maskdino.dn: no")
            if len(targets) != images.shape[0]:
                raise ValueError(f"{len(targets)} targets for a batch of {images.shape[0]} images")
            denoising = self.denoising_queries(targets)
        x = self.normalize(images, image_sizes)
        outputs = self.sem_seg_head(self.backbone(x), denoising)
        outputs["padded_size"] = (int(x.shape[-2]), int(x.shape[-1]))
        return outputs

    def loss(self, outputs: dict, targets: Sequence[Instances], unmatched_weight: float = 1.0
             ) -> dict[str, torch.Tensor]:
        """Weighted loss terms: loss_{ce,mask,dice,bbox,giou} with suffixes "", "_{i}", "_interm",
        "_dn", "_dn_{i}" (5 x (2 * dec_layers + 3) terms with DN "seg")."""
        device = outputs["pred_logits"].device
        return self.criterion(outputs, [t.to(device) for t in targets], unmatched_weight=unmatched_weight)

    @torch.no_grad()
    def predict(self, outputs: dict, image_sizes: Sequence[tuple[int, int]],
                orig_sizes: Sequence[tuple[int, int]]) -> list:
        """Per image, by `self.task`: instance: top-k (query, class) pairs with scores, masks
        [N, orig_h, orig_w] and the box head's boxes in pixels of the original image; panoptic: a
        PanopticSegmentation; semantic: a [orig_h, orig_w] class map. Panoptic and semantic use the
        reference's score "sharpening" softmax(sigmoid(logits) / pano_temperature) over the classes."""
        padded = outputs["padded_size"]
        results = []
        for logits, masks, boxes, size, orig in zip(outputs["pred_logits"], outputs["pred_masks"],
                                                    outputs["pred_boxes"], image_sizes, orig_sizes):
            if self.task.name == "instance":
                results.append(instance_inference(logits, masks, boxes, padded, tuple(size), tuple(orig),
                                                  self.cfg.test_topk))
                continue
            sigmoid = logits.float().sigmoid()  # [Q, K]
            if self.task.name == "semantic":
                mask_probs = resize_mask_logits(masks.float(), padded, tuple(size), tuple(orig)).sigmoid()
                results.append(semantic_inference((sigmoid / self.cfg.pano_temperature).softmax(-1), mask_probs))
                continue
            keep = sigmoid.max(-1).values > self.cfg.object_mask_threshold
            scores, labels = (sigmoid[keep] / self.cfg.pano_temperature).softmax(-1).max(-1)
            mask_probs = resize_mask_logits(masks[keep].float(), padded, tuple(size), tuple(orig)).sigmoid()
            results.append(panoptic_inference(scores, labels, mask_probs, self.task.stuff_classes,
                                              self.cfg.overlap_threshold))
        return results

    @torch.no_grad()
    def pseudo_label_candidates(self, outputs: dict) -> PseudoLabelCandidates:
        """Final-layer evidence: sigmoid class scores, every query an object, mask logits [B, Q, h, w]
        and the box head's boxes as xyxy pixels of that mask canvas (h, w)."""
        mask_logits = outputs["pred_masks"].float()
        h, w = mask_logits.shape[-2:]
        scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=mask_logits.device)
        probs = outputs["pred_logits"].float().sigmoid()
        return PseudoLabelCandidates(
            class_probs=probs,
            is_object=torch.ones(probs.shape[:2], dtype=torch.bool, device=probs.device),
            mask_logits=mask_logits,
            boxes=box_cxcywh_to_xyxy(outputs["pred_boxes"].float()) * scale,
        )


def instance_inference(pred_logits: torch.Tensor, pred_masks: torch.Tensor, pred_boxes: torch.Tensor,
                       padded_size: tuple[int, int], image_size: tuple[int, int], orig_size: tuple[int, int],
                       topk: int = 100) -> Instances:
    """One image: pred_logits [Q, K], pred_masks [Q, h, w], pred_boxes [Q, 4] (cxcywh of the padded
    canvas) -> min(topk, Q*K) Instances at `orig_size`, sorted by class score.

    Every (query, class) pair is a candidate (a query may appear with several labels); the score is
    sigmoid(logit) times the mean mask probability inside the binary mask.
    """
    num_queries, num_classes = pred_logits.shape
    class_scores, flat_idx = pred_logits.float().sigmoid().flatten().topk(min(topk, num_queries * num_classes))
    labels = flat_idx % num_classes
    query_idx = flat_idx // num_classes
    logits = resize_mask_logits(pred_masks[query_idx].float(), padded_size, image_size, orig_size)
    masks = logits > 0
    mask_scores = (logits.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
    (pad_h, pad_w), (img_h, img_w), (orig_h, orig_w) = padded_size, image_size, orig_size
    scale = torch.tensor([pad_w / img_w * orig_w, pad_h / img_h * orig_h] * 2, device=pred_boxes.device)
    boxes = box_cxcywh_to_xyxy(pred_boxes[query_idx].float()) * scale
    return Instances(labels=labels, masks=masks, boxes=boxes, scores=class_scores * mask_scores)

"""Mask DINO's transformer decoder (the "predictor"): query selection, box refinement, heads.

1. The encoder levels are flattened coarse-to-fine in *reverse* encoder order (decoder level i is
   encoder level L-1-i) and projected to the hidden width (`input_proj`, identity when equal).
2. Two-stage query selection: every token gets a proposal box (its cell centre, size
   0.05 * 2**level in decoder level order; tokens near the border get none) and is scored by the
   shared class head; the top-Q tokens become the queries (content = the token, anchor = the box
   head's refinement of the proposal). Their prediction is the "interm" (encoder) output.
3. Mask-enhanced anchors (`initialize_box_type` "mask2box" / "bitmask"): the anchors are replaced by
   the boxes of the selected queries' predicted masks; "no" keeps the encoder boxes.
4. Denoising queries (training) are put before the Q matching queries.
5. A DINO deformable decoder: per layer, self-attention (with the DN attention mask), deformable
   cross-attention around the 4-d anchor boxes and an FFN (all post-norm); after each layer the
   shared box head refines the anchors in logit space ("look forward twice": the predicted boxes use
   the undetached previous reference, the next layer a detached one).
6. Heads on every prediction set (the selected queries before any layer, then every layer):
   LayerNorm -> class logits (sigmoid, no "no object") and mask embeddings dotted with the
   1/4-resolution mask features. The decoder layers' outputs already went through the same
   LayerNorm, so the class and mask heads see it applied twice (as in the reference).

All boxes are normalised cxcywh relative to the padded input canvas. Parameter names follow the
official checkpoints, including the shared modules stored under several names: the box MLP
(`_bbox_embed`, `bbox_embed.{l}`, `decoder.bbox_embed.{l}`) and the LayerNorm (`decoder_norm`,
`decoder.norm`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from semiseg.errors import ConfigError
from semiseg.models.box_ops import box_xyxy_to_cxcywh, inverse_sigmoid, masks_to_boxes_inclusive
from semiseg.models.deform_attn import MSDeformAttn
from semiseg.models.denoising import DenoisingQueries
from semiseg.models.mask2former_decoder import MLP
from semiseg.models.pixel_decoder import c2_xavier_fill
from semiseg.structures import masks_to_boxes

BOX_INIT_TYPES = ("no", "mask2box", "bitmask")


def sine_embedding_of_positions(positions: torch.Tensor, num_feats: int = 128,
                                temperature: float = 10000.0) -> torch.Tensor:
    """Sine/cosine features of normalised coordinates, in the order y, x (then w, h).

    positions: [..., 2] (x, y) or [..., 4] (cx, cy, w, h) in [0, 1] -> [..., 2 * num_feats] or [..., 4 * num_feats].
    """
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=positions.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)

    def embed(coord: torch.Tensor) -> torch.Tensor:
        x = coord[..., None] * (2 * math.pi) / dim_t
        return torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(-2)

    order = (1, 0) if positions.shape[-1] == 2 else (1, 0, 2, 3)
    return torch.cat([embed(positions[..., i]) for i in order], dim=-1)


def encoder_output_proposals(memory: torch.Tensor, spatial_shapes: Sequence[tuple[int, int]]
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """One proposal box per encoder token.

    memory: [B, S, C] tokens of the levels in `spatial_shapes` order (decoder order).
    Returns (memory with invalid tokens zeroed [B, S, C], proposals [B, S, 4] logit-space cxcywh).
    A token's box is its cell centre with w = h = 0.05 * 2**level; a token with any coordinate
    outside (0.01, 0.99) is invalid: proposal +inf, memory 0.
    """
    proposals = []
    for level, (h, w) in enumerate(spatial_shapes):
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=memory.device),
                                torch.arange(w, dtype=torch.float32, device=memory.device), indexing="ij")
        centres = torch.stack([(xs + 0.5) / w, (ys + 0.5) / h], dim=-1).view(-1, 2)
        sizes = torch.full_like(centres, 0.05 * 2.0 ** level)
        proposals.append(torch.cat([centres, sizes], dim=-1))
    proposals = torch.cat(proposals)[None].expand(memory.shape[0], -1, -1)  # [B, S, 4]
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals)).masked_fill(~valid, float("inf"))
    return memory.masked_fill(~valid, 0.0), proposals


class DeformableDecoderLayer(nn.Module):
    """Post-norm DINO decoder layer. queries [B, N, D] -> [B, N, D].

    self-attention (q = k = queries + pos) -> norm2; deformable cross-attention around the anchor
    boxes -> norm1; FFN -> norm3 (the official norm names).
    """

    def __init__(self, d_model: int = 256, d_ffn: int = 2048, dropout: float = 0.0, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4, backend: str = "pytorch"):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend=backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, queries: torch.Tensor, query_pos: torch.Tensor, anchors: torch.Tensor, memory: torch.Tensor,
                spatial_shapes: Sequence[tuple[int, int]], attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """anchors: [B, N, 4] sigmoid cxcywh; memory: [B, S, D]; attn_mask: [N, N] bool, True = blocked."""
        q = queries + query_pos
        attn = self.self_attn(q, q, queries, attn_mask=attn_mask, need_weights=False)[0]
        queries = self.norm2(queries + self.dropout2(attn))
        reference = anchors[:, :, None].expand(-1, -1, len(spatial_shapes), -1)  # valid ratios are all 1
        attn = self.cross_attn(queries + query_pos, reference, memory, spatial_shapes)
        queries = self.norm1(queries + self.dropout1(attn))
        ffn = self.linear2(self.dropout3(F.relu(self.linear1(queries))))
        return self.norm3(queries + self.dropout4(ffn))


class DeformableTransformerDecoder(nn.Module):
    """The layer stack with per-layer anchor refinement (`decoder.*` in the checkpoints).

    `norm` and `bbox_embed` are the predictor's shared LayerNorm and box MLPs (set by the owner).
    forward(queries [B, N, D], anchors [B, N, 4] logit space, memory [B, S, D], spatial_shapes, attn_mask)
    -> (outputs: num_layers x [B, N, D] after `norm`,
        references: (num_layers + 1) x [B, N, 4] sigmoid; [0] = the input anchors, [l + 1] = the
        anchors refined after layer l from its un-normalised output, not detached).
    """

    def __init__(self, num_layers: int, d_model: int, norm: nn.LayerNorm, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(DeformableDecoderLayer(d_model, **layer_kwargs) for _ in range(num_layers))
        self.norm = norm
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.bbox_embed: nn.ModuleList | None = None
        self.d_model = d_model
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()

    def forward(self, queries: torch.Tensor, anchors: torch.Tensor, memory: torch.Tensor,
                spatial_shapes: Sequence[tuple[int, int]], attn_mask: torch.Tensor | None = None
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        # float32 with autocast off, like the reference (deformable sampling and logit-space boxes)
        with torch.autocast(device_type=queries.device.type, enabled=False):
            queries, memory = queries.float(), memory.float()
            reference = anchors.float().sigmoid()
            outputs, references = [], [reference]
            for layer, box_head in zip(self.layers, self.bbox_embed):
                query_pos = self.ref_point_head(sine_embedding_of_positions(reference, self.d_model // 2))
                queries = layer(queries, query_pos, reference, memory, spatial_shapes, attn_mask)
                refined = (box_head(queries) + inverse_sigmoid(reference)).sigmoid()
                reference = refined.detach()
                references.append(refined)
                outputs.append(self.norm(queries))
        return outputs, references


@dataclass
class SelectedQueries:
    """Two-stage query selection of one batch.

    content:        [B, Q, D] selected encoder tokens (detached)
    anchors:        [B, Q, 4] logit-space anchors (detached; mask-enhanced when configured)
    topk_indices:   [B, Q] token indices in decoder token order, best score first
    interm_outputs: {"pred_logits" [B, Q, K], "pred_boxes" [B, Q, 4], "pred_masks" [B, Q, H4, W4]}
    """

    content: torch.Tensor
    anchors: torch.Tensor
    topk_indices: torch.Tensor
    interm_outputs: dict


class MaskDINODecoder(nn.Module):
    """Mask DINO predictor.

    forward(multi_scale_features: L x [B, C_in, h_l, w_l] in encoder order, mask_features [B, mask_dim, H4, W4],
            denoising: DenoisingQueries | None) -> {
        "pred_logits": [B, Q, K], "pred_masks": [B, Q, H4, W4], "pred_boxes": [B, Q, 4] (sigmoid cxcywh),
        "aux_outputs": dec_layers x {same keys}: [0] = the selected queries before any layer,
                       [l] = decoder layer l; aux masks are None in eval mode,
        "interm_outputs": {same keys}, the encoder's selected tokens,
        "dn_outputs": {same keys + "aux_outputs"} for the P denoising queries (None without DN),
        "denoising": the DenoisingQueries used (or None)}
    """

    def __init__(self, in_channels: int, num_classes: int, hidden_dim: int = 256, num_queries: int = 300,
                 nheads: int = 8, dim_feedforward: int = 2048, dec_layers: int = 9, mask_dim: int = 256,
                 num_feature_levels: int = 4, dec_n_points: int = 4, initialize_box_type: str = "mask2box",
                 enforce_input_proj: bool = False, dropout: float = 0.0, deform_attn_backend: str = "pytorch"):
        super().__init__()
        if initialize_box_type not in BOX_INIT_TYPES:
            raise ConfigError(f"initialize_box_type must be one of {BOX_INIT_TYPES}, got {initialize_box_type!r}")
        if dec_layers < 1:
            raise ConfigError(f"dec_layers must be >= 1, got {dec_layers}")
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.hidden_dim = hidden_dim
        self.num_feature_levels = num_feature_levels
        self.initialize_box_type = initialize_box_type

        self.input_proj = nn.ModuleList()
        for _ in range(num_feature_levels):
            if in_channels != hidden_dim or enforce_input_proj:
                proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
                c2_xavier_fill(proj)
                self.input_proj.append(proj)
            else:
                self.input_proj.append(nn.Sequential())
        self.enc_output = nn.Linear(hidden_dim, hidden_dim)
        self.enc_output_norm = nn.LayerNorm(hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes)
        self.label_enc = nn.Embedding(num_classes, hidden_dim)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.decoder = DeformableTransformerDecoder(
            dec_layers, hidden_dim, self.decoder_norm, d_ffn=dim_feedforward, dropout=dropout,
            n_levels=num_feature_levels, n_heads=nheads, n_points=dec_n_points, backend=deform_attn_backend)
        self._bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        nn.init.zeros_(self._bbox_embed.layers[-1].weight)
        nn.init.zeros_(self._bbox_embed.layers[-1].bias)
        self.bbox_embed = nn.ModuleList([self._bbox_embed] * dec_layers)
        self.decoder.bbox_embed = self.bbox_embed

    def flatten_memory(self, multi_scale_features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Encoder levels -> (memory [B, S, D] in decoder (reversed) level order, (h, w) per decoder level)."""
        if len(multi_scale_features) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature levels, got {len(multi_scale_features)}")
        tokens, shapes = [], []
        for level in reversed(range(self.num_feature_levels)):
            x = self.input_proj[level](multi_scale_features[level])
            shapes.append((x.shape[2], x.shape[3]))  # no int(): an export keeps them symbolic
            tokens.append(x.flatten(2).transpose(1, 2))
        return torch.cat(tokens, 1), shapes

    def prediction_heads(self, queries: torch.Tensor, mask_features: torch.Tensor, with_masks: bool = True
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """queries [B, N, D] -> class logits [B, N, K], mask logits [B, N, H4, W4] (or None)."""
        x = self.decoder_norm(queries)
        logits = self.class_embed(x)
        if not with_masks:
            return logits, None
        return logits, torch.einsum("bqc,bchw->bqhw", self.mask_embed(x), mask_features)

    def select_queries(self, memory: torch.Tensor, spatial_shapes: Sequence[tuple[int, int]],
                       mask_features: torch.Tensor) -> SelectedQueries:
        """Top-Q encoder tokens by their best class logit, their boxes and (optionally) mask boxes."""
        if memory.shape[1] < self.num_queries:
            raise ValueError(f"the image gives {memory.shape[1]} encoder tokens, fewer than num_queries "
                             f"{self.num_queries}; use larger images or fewer queries")
        tokens, proposals = encoder_output_proposals(memory, spatial_shapes)
        tokens = self.enc_output_norm(self.enc_output(tokens))
        token_logits = self.class_embed(tokens)  # [B, S, K]
        token_boxes = self._bbox_embed(tokens) + proposals  # [B, S, 4] logit space
        topk = torch.topk(token_logits.max(-1)[0], self.num_queries, dim=1)[1]  # [B, Q]
        anchors = torch.gather(token_boxes, 1, topk[..., None].expand(-1, -1, 4))
        content = torch.gather(tokens, 1, topk[..., None].expand(-1, -1, self.hidden_dim))
        logits, masks = self.prediction_heads(content, mask_features)
        interm = {"pred_logits": logits, "pred_boxes": anchors.sigmoid(), "pred_masks": masks}
        anchors = anchors.detach()
        if self.initialize_box_type != "no":
            anchors = self.mask_box_anchors(masks.detach())
        return SelectedQueries(content.detach(), anchors, topk, interm)

    def mask_box_anchors(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """[B, Q, H4, W4] mask logits -> [B, Q, 4] logit-space cxcywh boxes of the masks (logit > 0),
        normalised by the mask size ("mask2box": extreme pixel centres; "bitmask": pixel edges)."""
        b, q, h, w = mask_logits.shape
        masks = mask_logits.flatten(0, 1) > 0
        xyxy = masks_to_boxes_inclusive(masks) if self.initialize_box_type == "mask2box" else masks_to_boxes(masks)
        scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=mask_logits.device)
        return inverse_sigmoid(box_xyxy_to_cxcywh(xyxy) / scale).view(b, q, 4)

    def forward(self, multi_scale_features: Sequence[torch.Tensor], mask_features: torch.Tensor,
                denoising: DenoisingQueries | None = None) -> dict:
        memory, spatial_shapes = self.flatten_memory(multi_scale_features)
        selected = self.select_queries(memory, spatial_shapes, mask_features)
        queries, anchors, attn_mask = selected.content, selected.anchors, None
        pad = 0
        if denoising is not None:
            pad = denoising.num_queries
            queries = torch.cat([denoising.content, queries], 1)
            anchors = torch.cat([denoising.anchors, anchors], 1)
            attn_mask = denoising.attn_mask

        hs, references = self.decoder(queries, anchors, memory, spatial_shapes, attn_mask)
        logits, masks = self.prediction_heads(queries, mask_features, with_masks=self.training)
        all_logits, all_masks = [logits], [masks]
        for i, h in enumerate(hs):
            logits, masks = self.prediction_heads(h, mask_features, with_masks=self.training or i == len(hs) - 1)
            all_logits.append(logits)
            all_masks.append(masks)
        all_boxes = [anchors.sigmoid()] + [
            (box_head(h) + inverse_sigmoid(ref)).sigmoid()
            for box_head, h, ref in zip(self.bbox_embed, hs, references[:-1])]
        if self.training and denoising is None:
            # keeps label_enc in the graph when a batch has no DN queries (DDP expects every parameter used)
            all_logits[-1] = all_logits[-1] + 0.0 * self.label_enc.weight.sum()

        def prediction_sets(part: slice) -> list[dict]:
            return [{"pred_logits": c[:, part], "pred_masks": None if m is None else m[:, part], "pred_boxes": b[:, part]}
                    for c, m, b in zip(all_logits, all_masks, all_boxes)]

        matching = prediction_sets(slice(pad, None))
        outputs = dict(matching[-1], aux_outputs=matching[:-1], interm_outputs=selected.interm_outputs,
                       dn_outputs=None, denoising=denoising)
        if denoising is not None:
            dn = prediction_sets(slice(0, pad))
            outputs["dn_outputs"] = dict(dn[-1], aux_outputs=dn[:-1])
        return outputs

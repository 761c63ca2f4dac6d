"""Mask2Former's masked-attention transformer decoder (the "predictor").

Learnable queries attend to one pixel-decoder level per layer (round robin, low resolution first),
restricted to the foreground of the mask that the previous prediction made (masked attention),
then to each other, then pass an FFN. Every prediction set (the initial one from the learnable
queries and one after each layer) yields class logits and mask logits; all but the last are the
auxiliary outputs used for deep supervision. Parameter names follow the official checkpoints.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from semiseg.errors import ConfigError
from semiseg.models.pixel_decoder import c2_xavier_fill
from semiseg.models.position_encoding import sine_position_encoding


def _xavier_matrices(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class SelfAttentionLayer(nn.Module):
    """Self-attention among queries with the query position added to q and k. [Q, B, C] -> [Q, B, C]."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _xavier_matrices(self)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        x = self.norm(tgt) if self.normalize_before else tgt
        q = k = x + query_pos
        tgt = tgt + self.dropout(self.self_attn(q, k, value=x, need_weights=False)[0])
        return tgt if self.normalize_before else self.norm(tgt)


class CrossAttentionLayer(nn.Module):
    """Queries attend to one memory level. tgt [Q, B, C], memory/pos [HW, B, C] -> [Q, B, C].

    memory_mask: [B * nhead, Q, HW] bool, True where attention is blocked.
    """

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _xavier_matrices(self)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None,
                pos: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        x = self.norm(tgt) if self.normalize_before else tgt
        attn = self.multihead_attn(query=x + query_pos, key=memory + pos, value=memory, attn_mask=memory_mask,
                                   need_weights=False)[0]
        tgt = tgt + self.dropout(attn)
        return tgt if self.normalize_before else self.norm(tgt)


class FFNLayer(nn.Module):
    """Residual two-layer ReLU MLP with LayerNorm. [Q, B, C] -> [Q, B, C]."""

    def __init__(self, d_model: int, dim_feedforward: int = 2048, dropout: float = 0.0, normalize_before: bool = False):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.normalize_before = normalize_before
        _xavier_matrices(self)

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:
        x = self.norm(tgt) if self.normalize_before else tgt
        tgt = tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x)))))
        return tgt if self.normalize_before else self.norm(tgt)


class MLP(nn.Module):
    """`num_layers` Linear layers with ReLU between them (`layers.{j}` naming). [..., in] -> [..., out]."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MultiScaleMaskedTransformerDecoder(nn.Module):
    """Masked-attention decoder.

    dec_layers follows the official DEC_LAYERS meaning: `dec_layers - 1` transformer layers plus the
    initial prediction from the learnable queries, i.e. `dec_layers` prediction sets.
    forward(multi_scale_features: 3 x [B, C_in, h_l, w_l] low-res first, mask_features [B, mask_dim, H4, W4])
    -> {"pred_logits": [B, Q, K+1], "pred_masks": [B, Q, H4, W4],
        "aux_outputs": (dec_layers - 1) x {"pred_logits", "pred_masks"}}.
    """

    def __init__(self, in_channels: int, num_classes: int, hidden_dim: int = 256, num_queries: int = 100,
                 nheads: int = 8, dim_feedforward: int = 2048, dec_layers: int = 10, pre_norm: bool = False,
                 mask_dim: int = 256, enforce_input_proj: bool = False, num_feature_levels: int = 3):
        super().__init__()
        if dec_layers < 1:
            raise ConfigError(f"dec_layers must be >= 1 (layers + initial prediction), got {dec_layers}")
        if hidden_dim % nheads != 0:
            raise ConfigError(f"hidden_dim {hidden_dim} is not divisible by nheads {nheads}")
        self.num_heads = nheads
        self.num_layers = dec_layers - 1
        self.num_feature_levels = num_feature_levels
        self.hidden_dim = hidden_dim
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads, normalize_before=pre_norm) for _ in range(self.num_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads, normalize_before=pre_norm) for _ in range(self.num_layers))
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward, normalize_before=pre_norm) for _ in range(self.num_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(num_feature_levels):
            if in_channels != hidden_dim or enforce_input_proj:
                proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
                c2_xavier_fill(proj)
                self.input_proj.append(proj)
            else:
                self.input_proj.append(nn.Sequential())
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def prediction_heads(self, output: torch.Tensor, mask_features: torch.Tensor,
                         attn_mask_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """output [Q, B, C] -> class logits [B, Q, K+1], mask logits [B, Q, H4, W4] and the attention
        mask for the next layer [B * nheads, Q, h*w] (True = blocked: predicted background)."""
        decoded = self.decoder_norm(output).transpose(0, 1)
        logits = self.class_embed(decoded)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(decoded), mask_features)
        attn_mask = F.interpolate(masks, size=attn_mask_size, mode="bilinear", align_corners=False)
        attn_mask = attn_mask.sigmoid().flatten(2).unsqueeze(1).repeat(1, self.num_heads, 1, 1).flatten(0, 1) < 0.5
        return logits, masks, attn_mask.detach()

    def forward(self, multi_scale_features: Sequence[torch.Tensor], mask_features: torch.Tensor) -> dict:
        if len(multi_scale_features) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature levels, got {len(multi_scale_features)}")
        src, pos, sizes = [], [], []
        for i, x in enumerate(multi_scale_features):
            sizes.append((x.shape[-2], x.shape[-1]))  # no int(): an export keeps them symbolic
            pe = sine_position_encoding(x.shape[0], x.shape[2], x.shape[3], self.hidden_dim // 2, device=x.device)
            pos.append(pe.flatten(2).permute(2, 0, 1))  # [HW, B, C]
            src.append((self.input_proj[i](x).flatten(2) + self.level_embed.weight[i][None, :, None]).permute(2, 0, 1))
        b = src[0].shape[1]
        query_pos = self.query_embed.weight.unsqueeze(1).repeat(1, b, 1)  # [Q, B, C]
        output = self.query_feat.weight.unsqueeze(1).repeat(1, b, 1)

        logits, masks, attn_mask = self.prediction_heads(output, mask_features, sizes[0])
        all_logits, all_masks = [logits], [masks]
        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            # a query whose mask is empty at this level attends everywhere instead of nowhere
            attn_mask = attn_mask & ~attn_mask.all(-1, keepdim=True)
            output = self.transformer_cross_attention_layers[i](output, src[level], attn_mask, pos[level], query_pos)
            output = self.transformer_self_attention_layers[i](output, query_pos)
            output = self.transformer_ffn_layers[i](output)
            logits, masks, attn_mask = self.prediction_heads(
                output, mask_features, sizes[(i + 1) % self.num_feature_levels])
            all_logits.append(logits)
            all_masks.append(masks)
        return {
            "pred_logits": all_logits[-1],
            "pred_masks": all_masks[-1],
            "aux_outputs": [{"pred_logits": c, "pred_masks": m} for c, m in zip(all_logits[:-1], all_masks[:-1])],
        }

"""Multi-scale deformable-attention pixel decoder (Mask2Former's, shared with Mask DINO's encoder).

Backbone maps -> 1x1 projections + GroupNorm -> a post-norm deformable transformer encoder over the
coarse levels -> an FPN step down to `common_stride` -> `mask_features` (1x1 conv). Mask DINO's
options: extra encoder levels made by stride-2 3x3 convs from the coarsest map (`extra_levels`), the
level order (`feature_order`) and an FPN step even when the encoder reaches `common_stride`
(`min_fpn_levels=1`). Parameter names
follow the official checkpoints (`input_proj.{i}.{0,1}`, `transformer.level_embed`,
`transformer.encoder.layers.{l}.{self_attn,norm1,linear1,linear2,norm2}`, `adapter_1`, `layer_1`,
`mask_features`). The whole module runs in float32 with autocast disabled, like the reference.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from semiseg.errors import ConfigError
from semiseg.models.deform_attn import MSDeformAttn
from semiseg.models.position_encoding import sine_position_encoding

FEATURE_ORDERS = ("high2low", "low2high")


class ConvNorm(nn.Conv2d):
    """Conv2d followed by an optional `norm` module and activation (detectron2 `Conv2d` naming)."""

    def __init__(self, *args, norm: nn.Module | None = None, activation: nn.Module | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def c2_xavier_fill(conv: nn.Conv2d) -> None:
    """Caffe2 "XavierFill": kaiming-uniform with a=1, zero bias."""
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def encoder_reference_points(spatial_shapes: Sequence[tuple[int, int]], valid_ratios: torch.Tensor) -> torch.Tensor:
    """Pixel centres of every level, normalised by the valid extent -> [B, S, L, 2] (x, y).

    valid_ratios: [B, L, 2] (w, h) fraction of each level that is not padding (1 without padding).
    """
    points = []
    for level, (h, w) in enumerate(spatial_shapes):
        # arange + 0.5 equals linspace(0.5, n - 0.5, n) exactly, and keeps n symbolic in an ONNX export
        ys, xs = torch.meshgrid(
            torch.arange(h, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5,
            torch.arange(w, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5,
            indexing="ij",
        )
        ys = ys.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * h)
        xs = xs.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * w)
        points.append(torch.stack((xs, ys), -1))
    return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]


def valid_ratio(padding_mask: torch.Tensor) -> torch.Tensor:
    """[B, h, w] bool (True = padding) -> [B, 2] valid (w, h) fraction."""
    _, h, w = padding_mask.shape
    valid_h = (~padding_mask[:, :, 0]).sum(1).float() / h
    valid_w = (~padding_mask[:, 0, :]).sum(1).float() / w
    return torch.stack([valid_w, valid_h], -1)


class MSDeformAttnEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention over all levels, then an FFN. [B, S, C] -> [B, S, C]."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.0, n_levels: int = 3,
                 n_heads: int = 8, n_points: int = 4, backend: str = "pytorch"):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend=backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor,
                spatial_shapes: Sequence[tuple[int, int]], padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, padding_mask)
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class MSDeformAttnEncoder(nn.Module):
    """A stack of `MSDeformAttnEncoderLayer`s sharing reference points. [B, S, C] -> [B, S, C]."""

    def __init__(self, num_layers: int, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList([MSDeformAttnEncoderLayer(**layer_kwargs) for _ in range(num_layers)])

    def forward(self, src: torch.Tensor, spatial_shapes: Sequence[tuple[int, int]], valid_ratios: torch.Tensor,
                pos: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, padding_mask)
        return src


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    """Flattens L projected levels, adds level embeddings to the positions, runs the encoder.

    forward(srcs: L x [B, C, h_l, w_l], pos_embeds: L x [B, C, h_l, w_l], padding_masks: L x [B, h_l, w_l] | None)
    -> (memory [B, S, C], spatial_shapes [(h_l, w_l)]).
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6, dim_feedforward: int = 1024,
                 dropout: float = 0.0, num_feature_levels: int = 3, enc_n_points: int = 4, backend: str = "pytorch"):
        super().__init__()
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self.encoder = MSDeformAttnEncoder(num_encoder_layers, d_model=d_model, d_ffn=dim_feedforward,
                                           dropout=dropout, n_levels=num_feature_levels, n_heads=nhead,
                                           n_points=enc_n_points, backend=backend)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: Sequence[torch.Tensor], pos_embeds: Sequence[torch.Tensor],
                padding_masks: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        spatial_shapes = [(s.shape[2], s.shape[3]) for s in srcs]  # no int(): an export keeps them symbolic
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos_flat = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[i].view(1, 1, -1)
                              for i, p in enumerate(pos_embeds)], 1)
        if padding_masks is None:
            valid_ratios = src_flat.new_ones(src_flat.shape[0], len(srcs), 2)
            mask_flat = None
        else:
            valid_ratios = torch.stack([valid_ratio(m) for m in padding_masks], 1)
            mask_flat = torch.cat([m.flatten(1) for m in padding_masks], 1)
        memory = self.encoder(src_flat, spatial_shapes, valid_ratios, pos_flat, mask_flat)
        return memory, spatial_shapes


class MSDeformAttnPixelDecoder(nn.Module):
    """Mask2Former pixel decoder (and Mask DINO's encoder, with its options).

    input_shape: backbone feature name -> (channels, stride), e.g. {"res2": (256, 4), ..., "res5": (2048, 32)}.
    forward(features: name -> [B, C_name, H/stride, W/stride]) returns
      mask_features        [B, mask_dim, H/common_stride, W/common_stride]
      multi_scale_features `num_outputs` x [B, conv_dim, h, w], the encoder levels in encoder order
                           (Mask2Former: [1/32, 1/16, 1/8]).
    The encoder levels are the `transformer_in_features` and `extra_levels` coarser ones (each a
    stride-2 3x3 conv + GroupNorm of the previous, starting from the coarsest backbone map).
    feature_order "high2low" lists them low resolution first (Mask2Former; Mask DINO's default), so
    `input_proj.0` projects the coarsest backbone map; "low2high" lists them high resolution first
    (Mask DINO's R50 recipe: [1/8, 1/16, 1/32, 1/64]), so `input_proj.0` projects the finest. In both
    orders the extra levels' projections come last in `input_proj` (official checkpoint order).
    The FPN starts from the finest encoder level; `min_fpn_levels` forces FPN steps (Mask DINO: 1)
    when the encoder already reaches `common_stride`.
    """

    def __init__(
        self,
        input_shape: Mapping[str, tuple[int, int]],
        conv_dim: int = 256,
        mask_dim: int = 256,
        transformer_in_features: Sequence[str] = ("res3", "res4", "res5"),
        common_stride: int = 4,
        transformer_dropout: float = 0.0,
        transformer_nheads: int = 8,
        transformer_dim_feedforward: int = 1024,
        transformer_enc_layers: int = 6,
        transformer_n_points: int = 4,
        num_outputs: int = 3,
        deform_attn_backend: str = "pytorch",
        extra_levels: int = 0,
        feature_order: str = "high2low",
        min_fpn_levels: int = 0,
    ):
        super().__init__()
        if feature_order not in FEATURE_ORDERS:
            raise ConfigError(f"pixel decoder: feature_order must be one of {FEATURE_ORDERS}, got {feature_order!r}")
        if extra_levels < 0:
            raise ConfigError(f"pixel decoder: extra_levels must be >= 0, got {extra_levels}")
        if conv_dim % 32 != 0:
            raise ConfigError(f"pixel decoder: conv_dim {conv_dim} must be a multiple of 32 (GroupNorm(32))")
        missing = [f for f in transformer_in_features if f not in input_shape]
        if missing:
            raise ConfigError(f"pixel decoder: backbone has no feature(s) {missing}; it provides {sorted(input_shape)}")
        by_stride = sorted(input_shape.items(), key=lambda kv: kv[1][1])
        self.in_features = [name for name, _ in by_stride]
        coarse_first = sorted(transformer_in_features, key=lambda f: -input_shape[f][1])
        # backbone encoder levels in encoder order
        self.transformer_in_features = coarse_first if feature_order == "high2low" else coarse_first[::-1]
        self.coarsest_feature = coarse_first[0]
        self.feature_order = feature_order
        self.num_outputs = num_outputs
        self.conv_dim = conv_dim

        self.input_proj = nn.ModuleList()
        for name in self.transformer_in_features:
            proj = nn.Sequential(nn.Conv2d(input_shape[name][0], conv_dim, kernel_size=1), nn.GroupNorm(32, conv_dim))
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
            self.input_proj.append(proj)
        channels = input_shape[self.coarsest_feature][0]
        for _ in range(extra_levels):
            proj = nn.Sequential(nn.Conv2d(channels, conv_dim, kernel_size=3, stride=2, padding=1),
                                 nn.GroupNorm(32, conv_dim))
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
            self.input_proj.append(proj)
            channels = conv_dim

        self.transformer = MSDeformAttnTransformerEncoderOnly(
            d_model=conv_dim, nhead=transformer_nheads, num_encoder_layers=transformer_enc_layers,
            dim_feedforward=transformer_dim_feedforward, dropout=transformer_dropout,
            num_feature_levels=len(self.transformer_in_features) + extra_levels, enc_n_points=transformer_n_points,
            backend=deform_attn_backend)

        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)
        c2_xavier_fill(self.mask_features)

        # FPN levels finer than the finest encoder level, down to `common_stride`
        finest_stride = min(input_shape[f][1] for f in transformer_in_features)
        self.num_fpn_levels = max(int(math.log2(finest_stride) - math.log2(common_stride)), min_fpn_levels)
        lateral, output = [], []
        for idx, name in enumerate(self.in_features[: self.num_fpn_levels]):
            adapter = ConvNorm(input_shape[name][0], conv_dim, kernel_size=1, bias=False, norm=nn.GroupNorm(32, conv_dim))
            layer = ConvNorm(conv_dim, conv_dim, kernel_size=3, padding=1, bias=False,
                             norm=nn.GroupNorm(32, conv_dim), activation=nn.ReLU())
            c2_xavier_fill(adapter)
            c2_xavier_fill(layer)
            self.add_module(f"adapter_{idx + 1}", adapter)
            self.add_module(f"layer_{idx + 1}", layer)
            lateral.append(adapter)
            output.append(layer)
        # applied from low to high resolution
        self.lateral_convs = lateral[::-1]
        self.output_convs = output[::-1]

    def forward(self, features: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        device_type = next(iter(features.values())).device.type
        with torch.autocast(device_type=device_type, enabled=False):
            num_backbone_levels = len(self.transformer_in_features)
            srcs = [proj(features[name].float()) for proj, name in zip(self.input_proj, self.transformer_in_features)]
            extra, x = [], features[self.coarsest_feature].float()
            for proj in self.input_proj[num_backbone_levels:]:
                x = proj(x)
                extra.append(x)
            # the extra levels are the coarsest: last when fine -> coarse, first (coarsest first) otherwise
            srcs = srcs + extra if self.feature_order == "low2high" else extra[::-1] + srcs
            pos = [sine_position_encoding(s.shape[0], s.shape[2], s.shape[3], self.conv_dim // 2, device=s.device)
                   for s in srcs]
            memory, spatial_shapes = self.transformer(srcs, pos)
            b = memory.shape[0]
            levels = memory.split([h * w for h, w in spatial_shapes], dim=1)
            outs = [z.transpose(1, 2).reshape(b, -1, h, w) for z, (h, w) in zip(levels, spatial_shapes)]

            top = outs[0] if self.feature_order == "low2high" else outs[-1]  # the finest encoder level
            for idx, name in enumerate(self.in_features[: self.num_fpn_levels][::-1]):
                lateral = self.lateral_convs[idx](features[name].float())
                top_down = F.interpolate(top, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
                top = self.output_convs[idx](lateral + top_down)
                outs.append(top)
            return self.mask_features(top), outs[: self.num_outputs]

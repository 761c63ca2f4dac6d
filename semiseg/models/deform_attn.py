"""Multi-scale deformable attention (Deformable DETR), shared by Mask2Former and Mask DINO.

Each query samples `n_points` locations per head and per level around its reference point
(a point, or a box whose size scales the offsets) and sums the bilinearly sampled values with
softmax weights. The core op runs with `F.grid_sample` ("pytorch", default, everywhere) or with the
compiled kernel of the optional `torch-ms-deform-attn` package ("kernel", chosen explicitly).
Parameter names and initialisation follow the official implementation, so checkpoints load as is.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from semiseg.errors import ConfigError

BACKENDS = ("pytorch", "kernel")


def ms_deform_attn_core(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Deformable attention with `F.grid_sample` (bilinear, zero padding, align_corners=False).

    value:              [B, S, M, D] values of all levels, flattened level after level (S = sum h*w)
    spatial_shapes:     (h, w) of each of the L levels
    sampling_locations: [B, Q, M, L, P, 2] normalised (x, y) in [0, 1] (outside samples read zeros)
    attention_weights:  [B, Q, M, L, P]
    returns             [B, Q, M * D]
    """
    b, _, m, d = value.shape
    _, q, _, n_levels, n_points, _ = sampling_locations.shape
    values = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1
    weights = attention_weights.transpose(1, 2).reshape(b * m, 1, q, n_levels, n_points)
    out = None
    # level by level, each weighted and summed at once: no [B*M, D, Q, L*P] stack of all samples
    # (27 % less time than stacking at R50 512^2 on CPU; equal to transformers' core within 1e-6)
    for level, (h, w) in enumerate(spatial_shapes):
        value_l = values[level].flatten(2).transpose(1, 2).reshape(b * m, d, h, w)  # [B*M, D, h, w]
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # [B*M, Q, P, 2]
        sampled = F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        level_sum = (sampled * weights[..., level, :]).sum(-1)  # [B*M, D, Q]
        out = level_sum if out is None else out + level_sum
    return out.view(b, m * d, q).transpose(1, 2).contiguous()


def _kernel_op():
    try:
        from torch_ms_deform_attn import ms_deform_attn
    except ImportError as e:
        raise ConfigError("deform_attn_backend='kernel' needs the torch-ms-deform-attn package "
                          "(pip install 'semiseg[fast]'); use deform_attn_backend='pytorch' without it") from e
    return ms_deform_attn


def ms_deform_attn_kernel(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Same contract as `ms_deform_attn_core`, computed by the `torch-ms-deform-attn` kernel."""
    shapes = torch.as_tensor(spatial_shapes, dtype=torch.long, device=value.device).view(-1, 2)
    level_start = torch.cat((shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]))
    return _kernel_op()(value, shapes, level_start, sampling_locations, attention_weights)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention layer.

    d_model: channels C; n_levels: L; n_heads: M; n_points: P per head and level.
    backend: "pytorch" (grid_sample) or "kernel" (torch-ms-deform-attn; ConfigError if missing).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 backend: str = "pytorch"):
        super().__init__()
        if d_model % n_heads != 0:
            raise ConfigError(f"deformable attention: d_model {d_model} is not divisible by n_heads {n_heads}")
        if backend not in BACKENDS:
            raise ConfigError(f"deform_attn_backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "kernel":
            _kernel_op()  # fail at construction, not in the middle of training
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.backend = backend
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Offsets start on a ring of per-head directions, point k at distance k + 1; uniform weights."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]  # [M, 2], max-abs 1
        grid = directions.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query [B, Q, C] (position already added), value [B, S, C] -> [B, Q, C].

        reference_points: [B, Q, L, 2] normalised (x, y), or [B, Q, L, 4] boxes (cx, cy, w, h) whose
        half size scales the offsets (offset / P * wh * 0.5).
        padding_mask: optional [B, S] bool, True where `value` is padding (those values are zeroed).
        """
        b, q, _ = query.shape
        s = value.shape[1]
        if sum(h * w for h, w in spatial_shapes) != s:
            raise ValueError(f"spatial_shapes {list(spatial_shapes)} do not add up to {s} value tokens")
        value = self.value_proj(value)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(b, s, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(b, q, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(b, q, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(b, q, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: divide by (w, h)
            # from scalar tensors, not torch.tensor(list): an export keeps the level sizes symbolic
            normalizer = torch.stack([torch.stack([torch.scalar_tensor(w), torch.scalar_tensor(h)])
                                      for h, w in spatial_shapes]).to(query)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"reference_points must end in 2 or 4 coordinates, got {tuple(reference_points.shape)}")
        core = ms_deform_attn_kernel if self.backend == "kernel" else ms_deform_attn_core
        return self.output_proj(core(value, spatial_shapes, locations, weights))

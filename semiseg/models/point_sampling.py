"""Point sampling of mask logits / masks at normalised coordinates (PointRend-style).

Because coordinates are in [0, 1] x [0, 1] of the canvas, a prediction at 1/4 resolution and a
target at full (or any other) resolution are compared at the same places without resizing.
`get_uncertain_point_coords_with_randomness` draws its random numbers in the same order as
detectron2's, so seeded losses reproduce the reference implementations exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def point_sample(features: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear samples (align_corners=False, zeros outside).

    features: [N, C, H, W]; coords: [N, P, 2] normalised (x, y) -> [N, C, P].
    """
    grid = (2.0 * coords - 1.0).unsqueeze(2).to(features.dtype)  # [N, P, 1, 2]
    return F.grid_sample(features, grid, mode="bilinear", padding_mode="zeros", align_corners=False).squeeze(3)


def get_uncertain_point_coords_with_randomness(
    mask_logits: torch.Tensor, num_points: int, oversample_ratio: float, importance_sample_ratio: float
) -> torch.Tensor:
    """Points where the masks are least certain, plus uniform ones -> [N, num_points, 2].

    mask_logits: [N, 1, H, W]. Draws int(num_points * oversample_ratio) uniform points, keeps the
    int(importance_sample_ratio * num_points) with the smallest |logit|, and appends fresh uniform
    points for the rest.
    """
    n = mask_logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    candidates = torch.rand(n, num_sampled, 2, device=mask_logits.device)
    uncertainty = -point_sample(mask_logits, candidates)[:, 0, :].abs()  # [N, num_sampled]
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    top = torch.topk(uncertainty, k=num_uncertain, dim=1)[1]  # [N, num_uncertain]
    coords = torch.gather(candidates, 1, top[..., None].expand(-1, -1, 2))
    if num_random > 0:
        coords = torch.cat([coords, torch.rand(n, num_random, 2, device=mask_logits.device)], dim=1)
    return coords

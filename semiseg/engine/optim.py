"""AdamW with Mask2Former's parameter groups, warmup + multistep/poly LR schedules, full-model clipping.

Parameter groups follow Mask2Former's recipe (detectron2 semantics):
- parameters of `backbone.*` train with `lr * backbone_lr_mult`;
- normalisation layers (BatchNorm, SyncBatchNorm, GroupNorm, LayerNorm, InstanceNorm, ...) use
  `weight_decay_norm`, embeddings (`nn.Embedding` and parameters named like `level_embed`,
  `query_*`, `relative_position_bias_table`, `absolute_pos_embed`, `pos_embed`, `cls_token`) use
  `weight_decay_embed`; everything else uses `weight_decay`.
  (Mask2Former itself decays the pixel decoder's `level_embed` nn.Parameter; here every parameter
  named like an embedding is treated as one.)
"""
from __future__ import annotations

import bisect
from typing import Iterable

import torch
from torch import nn

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,  # BatchNorm1d/2d/3d and SyncBatchNorm
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
)
EMBEDDING_NAMES = ("level_embed", "relative_position_bias_table", "absolute_pos_embed", "pos_embed", "cls_token")


def is_embedding_param(name: str) -> bool:
    """True for parameters named like position/level/query embeddings (last name component)."""
    leaf = name.rsplit(".", 1)[-1]
    parent = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
    return any(e in (leaf, parent) for e in EMBEDDING_NAMES) or leaf.startswith("query_") or parent.startswith("query_")


def build_param_groups(model: nn.Module, lr: float, weight_decay: float, backbone_lr_mult: float = 1.0,
                       weight_decay_norm: float = 0.0, weight_decay_embed: float = 0.0) -> list[dict]:
    """One group per trainable parameter with its own `lr` and `weight_decay` (shared params once).

    Each group also carries `name` (the parameter's qualified name) for logging and tests.
    """
    groups: list[dict] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{param_name}" if module_name else param_name
            decay = weight_decay
            if isinstance(module, NORM_TYPES):
                decay = weight_decay_norm
            elif isinstance(module, nn.Embedding) or is_embedding_param(name):
                decay = weight_decay_embed
            group_lr = lr * backbone_lr_mult if name.startswith("backbone.") else lr
            groups.append({"params": [param], "lr": group_lr, "weight_decay": decay, "name": name})
    return groups


def build_optimizer(model: nn.Module, solver) -> torch.optim.AdamW:
    """AdamW over `model`'s trainable parameters, grouped as in `build_param_groups`.

    `solver` is a `semiseg.config.SolverConfig` (lr, weight_decay, backbone_lr_mult, ...).
    """
    groups = build_param_groups(model, solver.lr, solver.weight_decay, solver.backbone_lr_mult,
                                solver.weight_decay_norm, solver.weight_decay_embed)
    return torch.optim.AdamW(groups, lr=solver.lr, weight_decay=solver.weight_decay)


def warmup_factor(iteration: int, warmup_iters: int, warmup_factor: float) -> float:
    """detectron2's linear warmup: `warmup_factor * (1 - a) + a` with `a = t / warmup_iters`, 1 after."""
    if iteration >= warmup_iters:
        return 1.0
    alpha = iteration / warmup_iters
    return warmup_factor * (1 - alpha) + alpha


def lr_factor(iteration: int, solver) -> float:
    """Multiplier of the base LR at `iteration` (0-based) for `solver.schedule` multistep | poly."""
    warm = warmup_factor(iteration, solver.warmup_iters, solver.warmup_factor)
    if solver.schedule == "multistep":
        return warm * solver.gamma ** bisect.bisect_right(list(solver.steps), iteration)
    if solver.schedule == "poly":
        progress = min(iteration, solver.max_iter) / solver.max_iter
        return warm * (1.0 - progress) ** solver.poly_power
    raise ValueError(f"unknown schedule {solver.schedule!r}")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, solver) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration scheduler: call `.step()` once after each optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, solver))


def clip_full_model_grad_norm(params: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the L2 norm of all gradients together (detectron2 "full_model" clipping).

    Returns the norm before clipping (inf/nan when a gradient is not finite). `max_norm <= 0`
    only measures the norm.
    """
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(grads, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in grads])


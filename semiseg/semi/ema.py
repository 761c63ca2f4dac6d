"""Teacher <- student updates of Guided Distillation: a hard copy at the end of burn-in, then EMA.

Schedule (checked at the start of every iteration, before the teacher makes pseudo-labels):
- `iteration <  burn_in_iter`: nothing; the teacher is the frozen stage-1 model ("guided burn-in");
- `iteration == burn_in_iter`: teacher <- copy of the student (parameters and *all* buffers);
- `iteration >  burn_in_iter`: teacher <- decay * teacher + (1 - decay) * student for parameters
  and floating-point buffers; integer/bool buffers (e.g. `num_batches_tracked`) are copied.

The reference implementation never copies integer buffers (a rebinding bug); here they are copied.
Both models may be wrapped (DDP); they are unwrapped so that parameter names match.
"""
from __future__ import annotations

import torch
from torch import nn

from semiseg.engine.distributed import unwrap_model

COPY = "copy"
EMA = "ema"


def _paired_tensors(target: nn.Module, source: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(target tensor, source tensor) for every parameter and buffer, matched by name."""
    target, source = unwrap_model(target), unwrap_model(source)
    t_params, t_buffers = dict(target.named_parameters()), dict(target.named_buffers())
    s_params, s_buffers = dict(source.named_parameters()), dict(source.named_buffers())
    if t_params.keys() != s_params.keys() or t_buffers.keys() != s_buffers.keys():
        differing = sorted((s_params.keys() | s_buffers.keys()) ^ (t_params.keys() | t_buffers.keys()))
        raise ValueError(f"the two models' architectures differ (e.g. {differing[:3]})")
    pairs = [(t_params[name], s_params[name]) for name in s_params]
    pairs += [(t_buffers[name], s_buffers[name]) for name in s_buffers]
    return pairs


@torch.no_grad()
def copy_weights(target: nn.Module, source: nn.Module) -> None:
    """target <- source, for every parameter and buffer (integer buffers included)."""
    for t, s in _paired_tensors(target, source):
        t.copy_(s)


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, decay: float) -> None:
    """target <- decay * target + (1 - decay) * source; non-float buffers are copied."""
    for t, s in _paired_tensors(target, source):
        if t.is_floating_point():
            t.lerp_(s.to(t.dtype), 1.0 - decay)
        else:
            t.copy_(s)


def update_teacher(teacher: nn.Module, student: nn.Module, iteration: int, burn_in_iter: int,
                   decay: float) -> str | None:
    """Apply the schedule for this iteration; return "copy", "ema" or None (nothing done)."""
    if iteration == burn_in_iter:
        copy_weights(teacher, student)
        return COPY
    if iteration > burn_in_iter:
        ema_update(teacher, student, decay)
        return EMA
    return None


def freeze(model: nn.Module) -> nn.Module:
    """Put a teacher in eval mode without gradients (its weights change only by copy/EMA)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model

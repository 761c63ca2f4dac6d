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

COPY = "copy"
EMA = "ema"


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper (or the module itself)."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def _paired_tensors(teacher: nn.Module, student: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(teacher tensor, student tensor) for every parameter and buffer, matched by name."""
    teacher, student = unwrap(teacher), unwrap(student)
    t_params, t_buffers = dict(teacher.named_parameters()), dict(teacher.named_buffers())
    s_params, s_buffers = dict(student.named_parameters()), dict(student.named_buffers())
    if t_params.keys() != s_params.keys() or t_buffers.keys() != s_buffers.keys():
        missing = sorted((s_params.keys() | s_buffers.keys()) ^ (t_params.keys() | t_buffers.keys()))
        raise ValueError(f"teacher and student architectures differ (e.g. {missing[:3]})")
    pairs = [(t_params[name], s_params[name]) for name in s_params]
    pairs += [(t_buffers[name], s_buffers[name]) for name in s_buffers]
    return pairs


@torch.no_grad()
def copy_student_to_teacher(teacher: nn.Module, student: nn.Module) -> None:
    """teacher <- student, for every parameter and buffer (integer buffers included)."""
    for t, s in _paired_tensors(teacher, student):
        t.copy_(s)


@torch.no_grad()
def ema_student_to_teacher(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student; non-float buffers are copied."""
    for t, s in _paired_tensors(teacher, student):
        if t.is_floating_point():
            t.lerp_(s.to(t.dtype), 1.0 - decay)
        else:
            t.copy_(s)


def update_teacher(teacher: nn.Module, student: nn.Module, iteration: int, burn_in_iter: int,
                   decay: float) -> str | None:
    """Apply the schedule for this iteration; return "copy", "ema" or None (nothing done)."""
    if iteration == burn_in_iter:
        copy_student_to_teacher(teacher, student)
        return COPY
    if iteration > burn_in_iter:
        ema_student_to_teacher(teacher, student, decay)
        return EMA
    return None


def freeze(model: nn.Module) -> nn.Module:
    """Put a teacher in eval mode without gradients (its weights change only by copy/EMA)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model

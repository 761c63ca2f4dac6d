"""Official Mask2Former / Mask DINO / Guided Distillation checkpoints -> semiseg weights.

semiseg models use the official parameter names (`backbone.*`, `sem_seg_head.*`,
`criterion.empty_weight`), so converting is choosing the model inside the file and stripping
wrapper prefixes:
- detectron2 `.pkl` (`{"model": {name: np.ndarray}, ...}`) and `.pth` (`{"model": {...}, ...}`)
  checkpoints of Mask2Former or Mask DINO: taken as they are;
- Guided Distillation checkpoints hold two models, `modelTeacher.*` and `modelStudent.*`
  (a stage-1 checkpoint only the teacher): `which` picks one ("auto": the student if present);
- a `module.` prefix left by DistributedDataParallel is removed.
The result is written as safetensors (atomically) and loads with `load_model_weights`.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from semiseg.errors import CheckpointError
from semiseg.models.weights import load_checkpoint_file, save_safetensors_atomic

GD_PREFIXES = {"teacher": "modelTeacher.", "student": "modelStudent."}
WHICH = ("auto", "teacher", "student")


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def select_model_weights(state: Mapping[str, torch.Tensor], which: str = "auto",
                         source: str | Path = "checkpoint") -> tuple[dict[str, torch.Tensor], str]:
    """Pick one model's weights out of a checkpoint -> (weights with official names, what was taken).

    what was taken: "student" or "teacher" for Guided Distillation checkpoints, "model" otherwise.
    """
    if which not in WHICH:
        raise CheckpointError(f"{source}: which must be one of {WHICH}, got {which!r}")
    present = [name for name, prefix in GD_PREFIXES.items() if any(k.startswith(prefix) for k in state)]
    if present:
        taken = ("student" if "student" in present else "teacher") if which == "auto" else which
        if taken not in present:
            raise CheckpointError(f"{source}: has no {taken} weights ({GD_PREFIXES[taken]}*); "
                                  f"it holds: {', '.join(present)}")
        weights = _strip(state, GD_PREFIXES[taken])
    elif which != "auto":
        raise CheckpointError(f"{source}: is not a Guided Distillation checkpoint (no modelTeacher./modelStudent. "
                              f"weights), so --which {which} does not apply; use --which auto")
    else:
        taken, weights = "model", dict(state)
    if weights and all(k.startswith("module.") for k in weights):
        weights = _strip(weights, "module.")
    if not any(k.startswith("sem_seg_head.") for k in weights):
        example = ", ".join(sorted(weights)[:3]) or "nothing"
        raise CheckpointError(f"{source}: no sem_seg_head.* weights, so not a Mask2Former / Mask DINO model "
                              f"(it holds {len(weights)} entries, e.g. {example})")
    return weights, taken


def convert_checkpoint(src: Path, dst: Path, which: str = "auto") -> Path:
    """Convert `src` (.pkl / .pth / .safetensors) into semiseg weights at `dst` (.safetensors); returns `dst`."""
    src, dst = Path(src), Path(dst)
    if dst.suffix != ".safetensors":
        raise CheckpointError(f"{dst}: the converted weights must be written to a .safetensors file")
    weights, taken = select_model_weights(load_checkpoint_file(src), which, source=src)
    save_safetensors_atomic(weights, dst, metadata={"format": "semiseg", "source": src.name, "model": taken})
    print(f"semiseg convert: took the {taken} weights ({len(weights)} tensors) from {src} -> {dst}")
    return dst


def _listing(names: list[str], what: str, limit: int = 3) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return f"{len(names)} {what}: {', '.join(names[:limit])}{more}"


def load_model_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True,
                       source: str | Path = "checkpoint") -> tuple[list[str], list[str]]:
    """Load `state_dict` into `model`; returns (missing, unexpected) names.

    Shape mismatches always raise; with `strict`, missing or unexpected names raise too. The
    `CheckpointError` is one line naming `source`, with counts and the first few names of each kind.
    """
    own = model.state_dict()
    mismatched = sorted(f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                        for k, v in state_dict.items() if k in own and tuple(v.shape) != tuple(own[k].shape))
    missing = sorted(k for k in own if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in own)
    problems = []
    if mismatched:
        problems.append(_listing(mismatched, "shape mismatches"))
    if strict and missing:
        problems.append(_listing(missing, "missing"))
    if strict and unexpected:
        problems.append(_listing(unexpected, "unexpected"))
    if problems:
        raise CheckpointError(f"{source}: does not fit the model: " + "; ".join(problems))
    model.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
    return missing, unexpected

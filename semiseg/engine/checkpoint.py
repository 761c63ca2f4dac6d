"""Checkpoints: safetensors weights that describe themselves, plus a `weights_only` training state.

A checkpoint is a folder (`<run>/checkpoints/last`, `<run>/checkpoints/best`) holding
- `<name>.safetensors` for each named model (`model` for supervised runs; `student` and `teacher`
  for semi-supervised ones). Its metadata carries the resolved config (JSON), the class names and
  dataset category ids, so `semiseg.load(weights)` rebuilds the model from this one file;
- `state.pt`: optimizer, LR scheduler, grad scaler, iteration, RNG states, data-stream positions,
  best metric. Only tensors, dicts, lists, numbers and strings, so `torch.load(weights_only=True)`
  reads it without running code.

Every file is written to a temporary name in the same folder, fsynced and renamed; a checkpoint
folder is assembled under a temporary name and swapped in, so a crash never leaves a partial
checkpoint where a reader looks for one.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from semiseg.errors import CheckpointError
from semiseg.weights import WeightsInfo, atomic_write, fsync_dir, save_safetensors_atomic

STATE_FILE = "state.pt"
FORMAT = "semiseg-1"


def save_weights(path: Path, state_dict: dict[str, torch.Tensor], info: WeightsInfo) -> None:
    """Write `state_dict` as safetensors at `path` (atomically) with `info` in its metadata."""
    metadata = {
        "format": FORMAT,
        "name": info.name,
        "class_names": json.dumps(info.class_names),
        "category_ids": json.dumps(info.category_ids),
    }
    if info.config is not None:
        metadata["config"] = json.dumps(info.config)
    save_safetensors_atomic(state_dict, path, metadata=metadata)


def weights_file(path: Path, name: str) -> Path:
    """The weights of model `name` in a checkpoint folder, or `path` itself if it is a file.

    In a folder, "student" falls back to the single `model.safetensors` of a supervised run.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such weights file or checkpoint folder")
    for candidate in ([name, "model"] if name == "student" else [name]):
        if (path / f"{candidate}.safetensors").is_file():
            return path / f"{candidate}.safetensors"
    found = sorted(p.name for p in path.glob("*.safetensors"))
    raise CheckpointError(f"{path}: no {name}.safetensors in this checkpoint (found: {', '.join(found) or 'none'})")


def save_checkpoint(directory: Path, models: dict[str, nn.Module], state: dict[str, Any], info: WeightsInfo) -> None:
    """Write models + training state into `directory` as one atomic unit (replacing an old one).

    models: {"model": m} or {"student": s, "teacher": t}; info.name is replaced by each key.
    A write that fails (full disk, read-only or missing folder) raises one `CheckpointError` line and
    leaves the previous checkpoint in `directory` as it was.
    """
    directory = Path(directory)
    try:
        _write_checkpoint(directory, models, state, info)
    except OSError as e:
        raise CheckpointError(f"{directory}: cannot write the checkpoint ({e.strerror or e}); the previous "
                              f"checkpoint there, if any, is unchanged") from None


def _write_checkpoint(directory: Path, models: dict[str, nn.Module], state: dict[str, Any], info: WeightsInfo) -> None:
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        for name, model in models.items():
            save_weights(tmp / f"{name}.safetensors", model.state_dict(),
                         WeightsInfo(info.config, info.class_names, info.category_ids, name))
        atomic_write(tmp / STATE_FILE, lambda p: torch.save(state, p))
        previous = directory.with_name(directory.name + ".previous")
        if directory.exists():
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(directory, previous)
        os.replace(tmp, directory)
        fsync_dir(directory.parent)
        shutil.rmtree(previous, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_checkpoint_dir(directory: Path) -> Path | None:
    """`directory`, or its `.previous` copy if a crash interrupted the swap; None if neither exists."""
    directory = Path(directory)
    if (directory / STATE_FILE).is_file():
        return directory
    previous = directory.with_name(directory.name + ".previous")
    return previous if (previous / STATE_FILE).is_file() else None


def load_training_state(directory: Path) -> dict[str, Any]:
    """The `state.pt` of a checkpoint folder, read with `torch.load(weights_only=True)`."""
    path = Path(directory) / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a complete semiseg checkpoint)") from None
    except Exception as e:  # unpickling errors have many types; all mean the same thing here
        raise CheckpointError(f"{path}: cannot read training state ({type(e).__name__}: {e})") from None


def capture_rng_state() -> dict[str, Any]:
    """RNG states of python, numpy, torch (CPU) and CUDA as weights_only-loadable values."""
    version, py_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(py_state), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state` (CUDA states are restored only when the GPU count matches)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)

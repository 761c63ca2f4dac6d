"""Reading and writing weight files safely.

- `.pkl`: detectron2 model-zoo / Mask2Former / Guided Distillation pickles of numpy arrays, read
  with an unpickler that can only rebuild numpy arrays, so a malicious pickle cannot run code.
- `.pth` / `.pt` / `.bin`: `torch.load(weights_only=True)`.
- `.safetensors`: safetensors.
Wrappers such as `{"model": ...}` or `{"state_dict": ...}` are unwrapped. Every problem raises a
one-line `CheckpointError` naming the file.

Weights shipped with the package are named `semiseg:NAME` (e.g. `semiseg:tiny_resnet_pretext`,
the tiny ResNet pretrained on procedural pretext images; docs/pretrained.md) wherever a weights
path is accepted; `SHIPPED_WEIGHTS` lists them.
"""
from __future__ import annotations

import importlib
import logging
import os
import pickle
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from torch import nn

from semiseg.errors import CheckpointError

logger = logging.getLogger(__name__)

# The only callables a weights pickle may reference: numpy array/scalar/dtype reconstruction,
# ordered dicts, and the bytes decoding that protocol-2 pickles use for raw array data.
_ALLOWED_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),
}
_WRAPPER_KEYS = ("model", "state_dict")
SHIPPED_PREFIX = "semiseg:"
_SHIPPED_DIR = Path(__file__).resolve().parent / "backbones" / "pretrained"
SHIPPED_WEIGHTS = {"tiny_resnet_pretext": _SHIPPED_DIR / "tiny_resnet_pretext.safetensors"}
_ZIP_MAGIC = b"PK\x03\x04"


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only the globals in `_ALLOWED_PICKLE_GLOBALS`; anything else is refused."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="latin1")  # latin1: python-2 era detectron2 pickles
        self._path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_PICKLE_GLOBALS:
            raise CheckpointError(f"{self._path}: refuses to unpickle {module}.{name} (only numpy arrays are allowed)")
        if module.startswith("numpy.core.") and np.lib.NumpyVersion(np.__version__) >= "2.0.0":
            module = "numpy._core." + module[len("numpy.core."):]  # numpy 2 renamed it; the alias will go
        return getattr(importlib.import_module(module), name)


def _read_numpy_pickle(path: Path) -> object:
    with open(path, "rb") as f:
        try:
            return _NumpyOnlyUnpickler(f, path).load()
        except CheckpointError:
            raise
        except Exception as e:  # truncated or corrupt pickles raise many different types
            raise CheckpointError(f"{path}: not a readable weights pickle ({type(e).__name__}: {e})") from None


def _read_torch_file(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable weights-only torch file ({reason})") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(path, device="cpu")
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def _unwrap(obj: object, path: Path) -> Mapping:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a dict of weights")
    for key in _WRAPPER_KEYS:
        if isinstance(obj.get(key), Mapping):
            return obj[key]
    return obj


def _as_tensor(key: str, value: object, path: Path) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (np.ndarray, np.generic)) and value.dtype.kind in "biuf":
        return torch.from_numpy(np.array(value))  # np.array: a writable, owned copy
    raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a numeric array")


def load_checkpoint_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file into a flat `{name: tensor}` dict on the CPU (see the module docstring)."""
    path = resolve_shipped(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if path.suffix == ".safetensors":
        obj = _read_safetensors(path)
    elif path.suffix in (".pkl", ".pickle") and magic != _ZIP_MAGIC:
        obj = _read_numpy_pickle(path)
    else:
        obj = _read_torch_file(path)
    weights = _unwrap(obj, path)
    return {str(k): _as_tensor(str(k), v, path) for k, v in weights.items()}


def resolve_shipped(path: str | Path) -> Path:
    """The file of shipped weights `semiseg:NAME`; any other path unchanged."""
    text = str(path)
    if not text.startswith(SHIPPED_PREFIX):
        return Path(path)
    name = text[len(SHIPPED_PREFIX):]
    if name not in SHIPPED_WEIGHTS:
        raise CheckpointError(f"{text}: semiseg ships no weights named {name!r}; choose one of "
                              f"{', '.join(SHIPPED_PREFIX + n for n in SHIPPED_WEIGHTS)}")
    return SHIPPED_WEIGHTS[name]


def save_safetensors_atomic(state_dict: Mapping[str, torch.Tensor], path: str | Path,
                            metadata: dict[str, str] | None = None) -> None:
    """Write `state_dict` to `path` as safetensors so that `path` is either the old or the new file.

    Writes a temporary file in the same folder, fsyncs it, renames it over `path` and fsyncs the
    folder. Tensors are copied to the CPU; tensors sharing memory are cloned (safetensors refuses them).
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{path}: {name!r} is a {type(tensor).__name__}, not a tensor")
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen_storages and tensor.numel() > 0:
            tensor = tensor.clone()
        seen_storages.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        safetensors.torch.save_file(tensors, tmp_name, metadata=metadata)
        with open(tmp_name, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    if not hasattr(os, "O_DIRECTORY"):  # e.g. Windows, where folders cannot be opened
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_weights_into(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str | Path,
                      may_be_missing: Iterable[str] = ()) -> list[str]:
    """Copy `state_dict` into `module`, checking names and shapes.

    may_be_missing: name prefixes of `module` that the file may lack (layers that do not exist in
    the pretrained network, e.g. a feature pyramid); `num_batches_tracked` may always be missing.
    Any other missing entry or a shape mismatch raises `CheckpointError` naming `source`.
    Returns the file's entries that the module does not have (ignored, and logged).
    """
    prefixes = tuple(may_be_missing)
    own = module.state_dict()
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state_dict.items()
                  if k in own and v.shape != own[k].shape]
    if mismatched:
        raise CheckpointError(f"{source}: {len(mismatched)} shape mismatches, e.g. {', '.join(mismatched[:3])}")
    missing = [k for k in own if k not in state_dict
               and not k.endswith("num_batches_tracked") and not k.startswith(prefixes)]
    if missing:
        raise CheckpointError(f"{source}: lacks {len(missing)} weights of the model, e.g. {', '.join(missing[:3])}")
    unexpected = sorted(k for k in state_dict if k not in own)
    module.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
    if unexpected:
        logger.info("%s: ignored %d entries the model does not have, e.g. %s", source, len(unexpected),
                    ", ".join(unexpected[:5]))
    return unexpected

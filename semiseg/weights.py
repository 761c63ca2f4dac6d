"""Reading and writing weight files safely.

- `.pkl`: detectron2 model-zoo / Mask2Former / Guided Distillation pickles of numpy arrays, read
  with an unpickler that can only rebuild numpy arrays, so a malicious pickle cannot run code.
- `.pth` / `.pt` / `.bin`: `torch.load(weights_only=True)`.
- `.safetensors`: safetensors.
Wrappers such as `{"model": ...}` or `{"state_dict": ...}` are unwrapped. Every problem raises a
one-line `CheckpointError` naming the file.

Weights shipped with the package are named `semiseg:NAME` (`semiseg:tiny_resnet_pretext`, the
tiny ResNet pretrained on procedural pretext images, and `semiseg:tiny_mask2former_pretext`, the
whole tiny Mask2Former pretrained on pretext scenes; docs/pretrained.md) wherever a weights path is
accepted; `SHIPPED_WEIGHTS` lists them.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import pickle
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import safetensors.torch
from safetensors import SafetensorError, safe_open
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
GD_PREFIXES = {"teacher": "modelTeacher.", "student": "modelStudent."}  # Guided Distillation's two models
WHICH = ("auto", "teacher", "student")
SHIPPED_PREFIX = "semiseg:"
_SHIPPED_DIR = Path(__file__).resolve().parent / "models" / "pretrained"
SHIPPED_WEIGHTS = {name: _SHIPPED_DIR / f"{name}.safetensors"  # docs/pretrained.md
                   for name in ("tiny_resnet_pretext", "tiny_mask2former_pretext")}
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


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors on the CPU, metadata) of a safetensors file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
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
        obj = _read_safetensors(path)[0]
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
    """Write `state_dict` to `path` as safetensors with `atomic_write`: `path` is the old or the new file.

    Tensors are copied to the CPU; tensors sharing memory are cloned (safetensors refuses them).
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
    atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata=metadata))


def fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, fsync it, then rename it to `path`.

    If `write` raises, the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@dataclass
class WeightsInfo:
    """What a semiseg weights file says about itself (from its safetensors metadata)."""

    config: dict[str, Any] | None  # the resolved training config (`semiseg.config.config_to_dict`)
    class_names: list[str]
    category_ids: list[int]
    name: str  # "model", "student" or "teacher"


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], WeightsInfo]:
    """Tensors and metadata of a `.safetensors` file (metadata may be absent for converted files).

    An official `.pkl` / `.pth` checkpoint is converted on the fly (`select_model_weights`: of a
    Guided Distillation checkpoint, its student, else its teacher); it has no metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    if path.suffix.lower() != ".safetensors":
        tensors, taken = select_model_weights(load_checkpoint_file(path), source=path)
        return tensors, WeightsInfo(None, [], [], taken)
    tensors, meta = _read_safetensors(path)
    try:
        info = WeightsInfo(
            config=json.loads(meta["config"]) if "config" in meta else None,
            class_names=json.loads(meta.get("class_names", "[]")),
            category_ids=json.loads(meta.get("category_ids", "[]")),
            name=meta.get("name", path.stem),
        )
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt semiseg metadata ({e})") from None
    return tensors, info


def read_model_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """One trained model's weights, with semiseg/official parameter names (a stage-2 teacher, `model.weights`).

    path: a semiseg checkpoint folder (its `model.safetensors`, else `teacher.safetensors`), a
    semiseg or converted `.safetensors` file, shipped weights `semiseg:NAME`, or an official
    Mask2Former / Mask DINO / Guided Distillation `.pth`/`.pkl` (of a Guided Distillation
    checkpoint, the `modelTeacher.*` weights are taken).
    """
    path = resolve_shipped(path)
    if path.is_dir():
        for name in ("model", "teacher"):
            if (path / f"{name}.safetensors").is_file():
                return read_weights(path / f"{name}.safetensors")[0]
        raise CheckpointError(f"{path}: no model.safetensors or teacher.safetensors in this checkpoint folder")
    state = load_checkpoint_file(path)
    is_gd = any(k.startswith(GD_PREFIXES["teacher"]) for k in state)
    return select_model_weights(state, "teacher" if is_gd else "auto", source=path)[0]


def load_pretrained_model(model: nn.Module, path: str | Path, num_classes: int) -> None:
    """Initialise all of `model` from another trained model (`model.weights`), e.g. one pretrained elsewhere.

    Layers sized by the number of classes (a class head [K + 1, C], a label embedding [K, C]) are
    left as initialised when the file's class count differs from `num_classes`; any other
    difference is the usual one-line `CheckpointError`.
    """
    state = read_model_weights(path)
    own = model.state_dict()
    resized = sorted(k for k, v in state.items() if k in own and _differs_in_classes(v.shape, own[k].shape, num_classes))
    try:
        load_weights_into(model, {k: v for k, v in state.items() if k not in resized}, f"model.weights={path}",
                          may_be_missing=resized)
    except CheckpointError as e:  # most often a preset's model.weights under a config that resized the model
        raise CheckpointError(f"{e} (a model of another size or architecture: set model.weights=null to start "
                              f"from the backbone weights only)") from None
    if resized:
        logger.info("%s: %d class layers re-initialised for %d classes (%s)", path, len(resized), num_classes,
                    ", ".join(resized))


def _differs_in_classes(theirs: torch.Size, ours: torch.Size, num_classes: int) -> bool:
    """True when two shapes differ in exactly one dimension, ours being K or K + 1 there."""
    if len(theirs) != len(ours):
        return False
    differing = [(a, b) for a, b in zip(theirs, ours) if a != b]
    return len(differing) == 1 and differing[0][1] in (num_classes, num_classes + 1)


def load_weights_into(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str | Path,
                      may_be_missing: Iterable[str] = (), strict: bool = False) -> tuple[list[str], list[str]]:
    """Copy `state_dict` into `module`, checking names and shapes; returns (missing, unexpected) names.

    A shape mismatch, or a weight of `module` that the file lacks, raises one `CheckpointError`
    line naming `source`, with counts and the first names of each problem. May be missing: names
    under the `may_be_missing` prefixes (layers a pretrained network does not have, e.g. a feature
    pyramid) and `num_batches_tracked`. Entries the module does not have are ignored (logged),
    unless `strict` (a whole model from its own checkpoint), where they raise too.
    """
    prefixes = tuple(may_be_missing)
    own = module.state_dict()
    mismatched = sorted(f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                        for k, v in state_dict.items() if k in own and tuple(v.shape) != tuple(own[k].shape))
    missing = sorted(k for k in own if k not in state_dict)
    required = [k for k in missing if not k.endswith("num_batches_tracked") and not k.startswith(prefixes)]
    unexpected = sorted(k for k in state_dict if k not in own)
    problems = [_listing(names, what) for names, what in
                ((mismatched, "shape mismatches"), (required, "missing"), (unexpected if strict else [], "unexpected"))
                if names]
    if problems:
        raise CheckpointError(f"{source}: does not fit the model: " + "; ".join(problems))
    module.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
    if unexpected:
        logger.info("%s: ignored %d entries the model does not have, e.g. %s", source, len(unexpected),
                    ", ".join(unexpected[:5]))
    return missing, unexpected


def _listing(names: list[str], what: str, limit: int = 3) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return f"{len(names)} {what}: {', '.join(names[:limit])}{more}"


# --- official layouts ---------------------------------------------------------------------------


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
        # the unlabeled criterion's class weights: a copy of `criterion.empty_weight` that semiseg has no place for
        weights = {k: v for k, v in weights.items() if not k.startswith("ssl_criterion.")}
    elif which != "auto":
        raise CheckpointError(f"{source}: is not a Guided Distillation checkpoint (no modelTeacher./modelStudent. "
                              f"weights), so --which {which} does not apply; use --which auto")
    else:
        taken, weights = "model", dict(state)
    if weights and all(k.startswith("module.") for k in weights):
        weights = _strip(weights, "module.")
    weights = _swin_official_to_timm(weights)
    if not any(k.startswith("sem_seg_head.") for k in weights):
        example = ", ".join(sorted(weights)[:3]) or "nothing"
        raise CheckpointError(f"{source}: no sem_seg_head.* weights, so not a Mask2Former / Mask DINO model "
                              f"(it holds {len(weights)} entries, e.g. {example})")
    return weights, taken


_SWIN_DOWNSAMPLE = re.compile(r"^backbone\.layers\.(\d+)\.downsample\.")


def _swin_official_to_timm(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official Swin of Mask2Former / Mask DINO in semiseg's (timm's) layout; other weights unchanged.

    The official code merges patches at the end of stage s (`layers.{s}.downsample`), timm at the
    start of stage s + 1: a pure rename, shapes and weight order identical. Its saved
    `relative_position_index` buffers are dropped (timm rebuilds the same indices).
    """
    if "backbone.layers.0.downsample.reduction.weight" not in weights:  # timm's stage 0 has no downsample
        return weights
    renamed = {}
    for key, value in weights.items():
        if key.endswith("attn.relative_position_index"):
            continue
        stage = _SWIN_DOWNSAMPLE.match(key)
        if stage:
            key = f"backbone.layers.{int(stage.group(1)) + 1}.downsample.{key[stage.end():]}"
        renamed[key] = value
    return renamed


_SWIN_SIZES = {96: "swin_tiny", 128: "swin_base", 192: "swin_large"}  # embedding width -> variant (S: 18 blocks)
_LAYOUT_CONFIGS = {  # (arch, backbone) -> the repository's config for that official model
    ("mask2former", "resnet50"): "configs/coco_mask2former_r50.yaml",
    ("mask2former", "swin_tiny"): "configs/coco_mask2former_swin_t.yaml",
    ("mask2former", "swin_small"): "configs/coco_mask2former_swin_t.yaml with model.backbone.name=swin_small",
    ("mask2former", "swin_base"): "configs/coco_mask2former_swin_t.yaml with model.backbone.name=swin_base",
    ("mask2former", "swin_large"): "configs/coco_mask2former_swin_l.yaml",
    ("maskdino", "resnet50"): "configs/coco_maskdino_r50.yaml",
    ("maskdino", "swin_large"): "configs/coco_maskdino_swin_l.yaml",
    ("mask2former", "gd_dinov2_base"): "configs/coco_gd_dinov2_base.yaml",
    ("mask2former", "gd_dinov2_large"): "configs/coco_gd_dinov2_large.yaml",
    ("mask2former", "gd_deit_base"): "configs/coco_gd_deit_base.yaml",
}
_CITYSCAPES_CLASSES = 8  # a Mask2Former with 8 classes (+ "no object") is taken for a Cityscapes model
_CITYSCAPES_CONFIGS = {
    ("mask2former", "resnet50"): "configs/cityscapes_mask2former_r50.yaml",
    ("mask2former", "swin_large"): "configs/cityscapes_mask2former_swin_l.yaml",
    ("mask2former", "gd_dinov2_base"): "configs/cityscapes_gd_dinov2_base.yaml",
    ("mask2former", "gd_deit_base"): "configs/cityscapes_gd_deit_base.yaml",
}


def describe_layout(weights: Mapping[str, torch.Tensor]) -> str:
    """What a model's weights (semiseg/official names) look like, and the config to load them with, in words."""
    arch = "maskdino" if "sem_seg_head.predictor.label_enc.weight" in weights else "mask2former"
    backbone = "an unknown backbone"
    if "backbone.model.patch_embed.proj.weight" in weights:  # Guided Distillation's ViT adapters
        width, _, patch, _ = weights["backbone.model.patch_embed.proj.weight"].shape
        backbone = {14: "gd_dinov2_large" if width == 1024 else "gd_dinov2_base", 16: "gd_deit_base"}.get(patch, backbone)
    elif "backbone.patch_embed.proj.weight" in weights:
        width = weights["backbone.patch_embed.proj.weight"].shape[0]
        deep = any(k.startswith("backbone.layers.2.blocks.17.") for k in weights)
        backbone = "swin_small" if width == 96 and deep else _SWIN_SIZES.get(width, f"a Swin of width {width}")
    elif any(k.startswith("backbone.res4.") for k in weights):
        blocks = {k.split(".")[2] for k in weights if k.startswith("backbone.res4.")}
        backbone = {6: "resnet50", 23: "resnet101"}.get(len(blocks), backbone)
    queries = weights.get("sem_seg_head.predictor.query_feat.weight")
    text = f"{arch} with backbone {backbone}" + (f", {queries.shape[0]} queries" if queries is not None else "")
    class_rows = weights.get("sem_seg_head.predictor.class_embed.weight")
    cityscapes = arch == "mask2former" and class_rows is not None and class_rows.shape[0] == _CITYSCAPES_CLASSES + 1
    config = (_CITYSCAPES_CONFIGS if cityscapes else _LAYOUT_CONFIGS).get((arch, backbone))
    return text + (f" (the repository's {config})" if config else "")


def convert_checkpoint(src: Path, dst: Path, which: str = "auto") -> Path:
    """Convert `src` (.pkl / .pth / .safetensors) into semiseg weights at `dst` (.safetensors); returns `dst`."""
    src, dst = Path(src), Path(dst)
    if dst.suffix != ".safetensors":
        raise CheckpointError(f"{dst}: the converted weights must be written to a .safetensors file")
    weights, taken = select_model_weights(load_checkpoint_file(src), which, source=src)
    save_safetensors_atomic(weights, dst, metadata={"format": "semiseg", "source": src.name, "model": taken})
    print(f"semiseg convert: took the {taken} weights ({len(weights)} tensors) from {src} -> {dst}")
    return dst

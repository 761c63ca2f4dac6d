"""Typed training configuration: dataclasses, YAML files and `key=value` overrides.

A config file is YAML whose nesting mirrors `Config`; every key it leaves out keeps its default.
`load_config(path, overrides)` reads it, applies overrides such as `solver.lr=2e-4` or
`solver.steps=[100,200]` (values parsed as YAML) and checks every value against the field types.
An unknown key, in the file or in an override, is a `ConfigError` naming the key with a "did you
mean" suggestion: a misspelt key never falls back to a default silently.

Paths (fields typed `Path`) given relatively in a YAML file are relative to that file's folder;
in an override, to the current directory. `save_config` writes the resolved config (absolute paths).

A file may start from another with `base: OTHER.yaml` (relative to the file) or a preset shipped
with the package, `base: semiseg:tiny_mask2former` / `semiseg:tiny_maskdino` (`PRESETS`): the
base is read first (its paths relative to itself), then the file's keys replace its keys.

Adding a section (e.g. the semi-supervised one) is one field on `Config` with a dataclass type;
parsing, overrides, type checks and saving follow from the type.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from semiseg.data.transforms import AugmentationConfig
from semiseg.errors import ConfigError
from semiseg.evaluation import METRIC_GROUPS
from semiseg.models.backbones import BackboneConfig
from semiseg.models.mask2former import Mask2FormerConfig
from semiseg.models.maskdino import MaskDINOConfig
from semiseg.models.registry import META_ARCHITECTURES
from semiseg.models.segmentation_task import SegmentationTask
from semiseg.semi.config import SemiConfig
from semiseg.weights import SHIPPED_PREFIX, atomic_write


@dataclass
class ModelConfig:
    """arch: meta-architecture (a key of `models.registry.META_ARCHITECTURES`: "mask2former" or "maskdino",
    configured by the section of that name);
    num_classes: 0 = the number of categories of `data.train_ann`.
    weights: initialise the whole model (backbone and head) from a trained one before training: a
             checkpoint folder, a weights file or shipped weights (`semiseg:tiny_mask2former_pretext`);
             its class layers are re-initialised when its class count differs. None: only the
             backbone is pretrained (`backbone.weights`).

    task: "instance" (COCO AP), "panoptic" (PQ) or "semantic" (mIoU): what the model predicts and how it
          is evaluated (docs/tasks.md); the training data must hold that task's annotations.
    stuff_classes: contiguous ids of the stuff classes (panoptic); empty = from the training data's
          categories (`isthing: 0`).
    (The panoptic fusion thresholds are settings of the meta-architecture sections:
    `mask2former.object_mask_threshold` / `overlap_threshold`, and Mask DINO's.)

    `num_classes` is the one place to set the class count: the meta-architecture sections' own
    `num_classes` are overwritten with it (once known).
    """

    arch: str = "mask2former"
    num_classes: int = 0
    weights: Path | None = None
    task: Literal["instance", "panoptic", "semantic"] = "instance"
    stuff_classes: tuple[int, ...] = ()
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    mask2former: Mask2FormerConfig = field(default_factory=Mask2FormerConfig)
    maskdino: MaskDINOConfig = field(default_factory=MaskDINOConfig)

    def __post_init__(self) -> None:
        if self.arch not in META_ARCHITECTURES:
            raise ConfigError(f"model.arch={self.arch!r}: expected one of {', '.join(META_ARCHITECTURES)}")
        if self.num_classes < 0:
            raise ConfigError(f"model.num_classes={self.num_classes}: expected >= 1 (or 0 = from data.train_ann)")
        if self.num_classes > 0 and self.mask2former.num_classes != self.num_classes:
            self.mask2former = dataclasses.replace(self.mask2former, num_classes=self.num_classes)
        if self.num_classes > 0 and self.maskdino.num_classes != self.num_classes:
            self.maskdino = dataclasses.replace(self.maskdino, num_classes=self.num_classes)

    @property
    def segmentation_task(self) -> SegmentationTask:
        return SegmentationTask(self.task, tuple(self.stuff_classes))

    @property
    def head(self) -> Mask2FormerConfig | MaskDINOConfig:
        """The section of the selected `arch` (e.g. for its `size_divisibility`)."""
        return getattr(self, self.arch)


@dataclass
class DataConfig:
    """Datasets and loading.

    format:                 "coco" (train_ann / val_ann are COCO instances jsons), "coco_panoptic" (COCO
                            panoptic jsons, their PNGs in the folder of the same name) or "cityscapes"
                            (they are gtFine/<split> folders, the images leftImg8bit/<split>) or
                            "ade20k" (ADEChallengeData2016 annotations/<split>, images/<split>; semantic)
                            or "semantic_png" (label PNGs in ADE20K's convention, classes in <folder>.json)
    train_ann/train_images: labeled COCO instances json and its image folder
    train_list:             optional split list: train only on the images it names, one per line (image file
                            names, or Guided Distillation's Cityscapes `perc_*.txt` of instanceIds names)
    val_ann/val_images:     validation set (evaluated every `train.eval_period` iterations)
    unlabeled:              image folder or image-list json of unlabeled images (semi-supervised runs)
    unlabeled_images:       image root for the file names of an `unlabeled` json
    batch_size:             labeled images per iteration over all processes (split across ranks)
    unlabeled_batch_size:   unlabeled images per iteration over all processes
    num_workers:            loader worker processes per rank (0 = load in the training process)
    sampler:                "uniform" or "repeat_factor" (class-balanced, LVIS-style)
    repeat_threshold:       repeat-factor threshold t: r(c) = max(1, sqrt(t / f(c)))
    filter_empty:           drop training images without any non-crowd instance
    strict:                 unreadable / missing images are errors instead of counted skips
    allow_outside_root:     accept json `file_name`s that lead outside their image folder (`..`,
                            absolute paths); off by default so a dataset file cannot point anywhere
    """

    format: Literal["coco", "coco_panoptic", "cityscapes", "ade20k", "semantic_png"] = "coco"
    train_ann: Path | None = None
    train_images: Path | None = None
    train_list: Path | None = None
    val_ann: Path | None = None
    val_images: Path | None = None
    unlabeled: Path | None = None
    unlabeled_images: Path | None = None
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    batch_size: int = 16
    unlabeled_batch_size: int = 16
    num_workers: int = 4
    sampler: Literal["uniform", "repeat_factor"] = "uniform"
    repeat_threshold: float = 10.0
    filter_empty: bool = True
    strict: bool = False
    allow_outside_root: bool = False

    def __post_init__(self) -> None:
        _check_positive(self, "data", ("batch_size", "unlabeled_batch_size", "repeat_threshold"))
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers}: expected >= 0")


@dataclass
class SolverConfig:
    """AdamW, LR schedule (per iteration), clipping, mixed precision.

    schedule "multistep": LR x gamma at each of `steps`; "poly": LR x (1 - t / max_iter) ** poly_power.
    Both start with a linear warmup from `warmup_factor` over `warmup_iters` iterations.
    clip_grad_norm: max L2 norm of all gradients together (0 = no clipping).
    amp: "bf16" or "fp16" autocast on CUDA (fp16 with a gradient scaler); ignored on the CPU.
    grad_accum: micro-batches of `data.batch_size` accumulated per optimizer step.
    """

    lr: float = 1e-4
    weight_decay: float = 0.05
    backbone_lr_mult: float = 0.1
    weight_decay_norm: float = 0.0
    weight_decay_embed: float = 0.0
    schedule: Literal["multistep", "poly"] = "multistep"
    steps: tuple[int, ...] = (327778, 355092)
    gamma: float = 0.1
    poly_power: float = 0.9
    warmup_iters: int = 10
    warmup_factor: float = 1.0
    max_iter: int = 368750
    clip_grad_norm: float = 0.01
    amp: Literal["none", "bf16", "fp16"] = "fp16"
    grad_accum: int = 1

    def __post_init__(self) -> None:
        _check_positive(self, "solver", ("lr", "max_iter", "grad_accum", "gamma"))
        if self.warmup_iters < 0 or self.clip_grad_norm < 0:
            raise ConfigError("solver.warmup_iters and solver.clip_grad_norm must be >= 0")


def check_compile_backend(backend: str, key: str) -> None:
    """ConfigError unless `backend` is "none" or a torch.compile backend (imports torch._dynamo only then)."""
    if backend == "none":
        return
    import torch._dynamo

    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ConfigError(f"{key}={backend!r}: expected none or a torch.compile backend "
                          f"({', '.join(torch._dynamo.list_backends())}, aot_eager)")


@dataclass
class TrainConfig:
    """The run: output folder, seeding, periods (in iterations), device, failure handling.

    device: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N" (torchrun: GPU LOCAL_RANK).
    on_nonfinite: "stop" (error naming the iteration and every loss term) or "skip" the step.
    best_metric: "<group>.<metric>" of the evaluation that selects `checkpoints/best` (higher is better),
                 e.g. segm.AP, panoptic.PQ, sem_seg.mIoU; "auto" = the first of these for `model.task`.
    overwrite: a new run may replace the semiseg files of a non-empty `output_dir`.
    resume: continue the run in `output_dir` from `checkpoints/last` (true, same as `--resume`), or
            "auto": continue when `checkpoints/last` exists, else start a new run (elastic restarts:
            `torchrun --max-restarts N`, requeued SLURM jobs).
    compile: "none", or a torch.compile backend ("inductor" generates fused kernels; "aot_eager"
             only traces) for the training forward (the losses stay eager); see docs/training.md.
    """

    output_dir: Path = Path("runs/default")
    seed: int = 0
    deterministic: bool = False
    eval_period: int = 5000
    checkpoint_period: int = 5000
    log_period: int = 20
    device: str = "auto"
    on_nonfinite: Literal["stop", "skip"] = "stop"
    best_metric: str = "auto"
    find_unused_parameters: bool = False
    overwrite: bool = False
    resume: bool | Literal["auto"] = False
    compile: str = "none"

    def __post_init__(self) -> None:
        check_compile_backend(self.compile, "train.compile")
        _check_positive(self, "train", ("eval_period", "checkpoint_period", "log_period"))
        group, _, metric = self.best_metric.partition(".")
        if self.best_metric != "auto" and metric not in METRIC_GROUPS.get(group, ()):
            raise ConfigError(f"train.best_metric={self.best_metric!r}: expected auto or <group>.<metric> with "
                              + "; ".join(f"{g}: {', '.join(keys)}" for g, keys in METRIC_GROUPS.items()))


@dataclass
class Config:
    """The root config: one field per YAML section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    semi: SemiConfig = field(default_factory=SemiConfig)


class _Override:
    """An override value: its YAML parse, and the raw text for fields that take a string."""

    def __init__(self, text: str):
        self.text = text
        try:
            self.value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            self.value = text


PRESETS_DIR = Path(__file__).resolve().parent / "presets"
PRESETS = {path.stem: path for path in sorted(PRESETS_DIR.glob("*.yaml"))}


def load_config(path: Path | str, overrides: typing.Iterable[str] = ()) -> Config:
    """Read a YAML config (and its `base`), resolve its relative paths against its folder, apply overrides."""
    return apply_overrides(_load_with_base(Path(path), seen=()), overrides)


def preset_path(name: str) -> Path:
    """The file of the shipped preset `semiseg:NAME` (ConfigError naming the choices)."""
    name = name.removeprefix(SHIPPED_PREFIX)
    if name not in PRESETS:
        raise ConfigError(f"{SHIPPED_PREFIX}{name}: no such preset; choose one of "
                          f"{', '.join(SHIPPED_PREFIX + n for n in PRESETS)}")
    return PRESETS[name]


def preset_overrides(name: str) -> list[str]:
    """The shipped preset `name` as `key=value` overrides (what it sets, and nothing else)."""
    def flatten(node: dict, prefix: str) -> list[str]:
        items = []
        for key, value in node.items():
            items += flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}={value}"]
        return items

    return flatten(_read_yaml(preset_path(name)), "")


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, data, solver, train), got {type(data).__name__}")
    return data


def _load_with_base(path: Path, seen: tuple[Path, ...]) -> Config:
    """`path` on top of its `base` (recursively; a cycle is a ConfigError)."""
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ConfigError(f"{path}: base must be a config file or a semiseg:PRESET name, got {base!r}")
        base_path = preset_path(base) if base.startswith(SHIPPED_PREFIX) else (path.resolve().parent / base).resolve()
        if base_path in seen:
            raise ConfigError(f"{path}: base {base} includes itself")
        data = _merged(config_to_dict(_load_with_base(base_path, (*seen, path.resolve()))), data)
    cfg = config_from_dict(data, base_dir=path.resolve().parent, source=str(path))
    return config_from_dict(config_to_dict(cfg), base_dir=Path.cwd(), source=str(path))  # defaults: cwd


def _merged(base: dict, top: dict) -> dict:
    """`base` with `top`'s keys replacing its keys, section by section."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def apply_overrides(cfg: Config, overrides: typing.Iterable[str], base_dir: Path | None = None) -> Config:
    """A copy of `cfg` with each `dotted.key=value` applied in order (paths relative to `base_dir` or cwd)."""
    base_dir = Path.cwd() if base_dir is None else base_dir
    for item in overrides:
        source = f"override {item!r}"
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{source}: expected key=value, e.g. solver.lr=2e-4")
        _check_key(type(cfg), key, source)
        data = config_to_dict(cfg)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = _Override(text)
        cfg = config_from_dict(data, type(cfg), base_dir=base_dir, source=source)
    return cfg


def config_to_dict(cfg: Any) -> Any:
    """Plain YAML/JSON data of a config (dataclass -> dict, Path -> str, tuple -> list)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Path):
        return str(cfg)
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


def config_from_dict(data: dict[str, Any], cls: type = Config, base_dir: Path | None = None,
                     source: str = "config") -> Any:
    """Build `cls` from nested plain data, checking keys and types; missing keys keep defaults.

    Relative paths are resolved against `base_dir` (kept relative when it is None).
    """
    return _build(cls, data, None, "", _Context(base_dir, source))


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config as YAML (readable back with `load_config`)."""

    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    atomic_write(Path(path), lambda tmp: tmp.write_text(text))


@dataclass
class _Context:
    base_dir: Path | None
    source: str

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: {message}" if key else f"{self.source}: {message}")


def _check_positive(section: Any, name: str, keys: tuple[str, ...]) -> None:
    for key in keys:
        if getattr(section, key) <= 0:
            raise ConfigError(f"{name}.{key}={getattr(section, key)}: expected a positive value")


def _check_key(cls: type, key: str, source: str) -> None:
    """Raise for a dotted key that names no field (with a suggestion)."""
    node: Any = cls
    for depth, part in enumerate(key.split(".")):
        node = _dataclass_of(node)
        if node is None:
            raise ConfigError(f"{source}: {'.'.join(key.split('.')[:depth])} has no sub-keys")
        hints = typing.get_type_hints(node)
        if part not in hints:
            prefix = ".".join(key.split(".")[:depth])
            raise ConfigError(f"{source}: unknown key '{key}'{_suggest(part, list(hints), prefix)}")
        node = hints[part]


def _suggest(name: str, choices: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if not close:
        return f" (valid keys{' of ' + prefix if prefix else ''}: {', '.join(choices)})"
    return f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)"


def _dataclass_of(tp: Any) -> type | None:
    """The dataclass in `tp` (itself, or the non-None member of `X | None`), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if _is_union(tp):
        members = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return members[0] if len(members) == 1 else None
    return None


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _build(cls: type, data: Any, base: Any, key: str, ctx: _Context) -> Any:
    """`cls` from a mapping; fields absent from `data` take their value in `base` (or the default)."""
    if isinstance(data, _Override):
        data = data.value
    if not isinstance(data, dict):
        raise ctx.error(key, f"expected a mapping of {cls.__name__} fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in data:
        if name not in fields:
            raise ConfigError(f"{ctx.source}: unknown key '{_join(key, str(name))}'{_suggest(str(name), list(fields), key)}")
    kwargs = {}
    for name, f in fields.items():
        current = getattr(base, name) if base is not None else _default(f)
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], current, _join(key, name), ctx)
        elif current is dataclasses.MISSING:
            raise ctx.error(_join(key, name), "missing (this key has no default)")
        else:
            kwargs[name] = current
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ctx.error(key, str(e)) from None
    except (TypeError, ValueError) as e:
        raise ctx.error(key, f"invalid {cls.__name__}: {e}") from None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _convert(tp: Any, value: Any, current: Any, key: str, ctx: _Context) -> Any:
    """Check/convert one value against the type `tp` (value may be an `_Override`)."""
    raw = value
    if isinstance(value, _Override):
        value = value.value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if _is_union(tp):
        if value is None and type(None) in args:
            return None
        errors = []
        for member in (a for a in args if a is not type(None)):
            try:
                return _convert(member, raw, current if _matches(member, current) else None, key, ctx)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else ctx.error(key, f"{value!r} does not fit {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        base = current if isinstance(current, tp) else None
        return _build(tp, value, base, key, ctx)
    if origin is Literal:
        if value not in args:
            raise ctx.error(key, f"{value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ctx.error(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ctx.error(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ctx.error(key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(raw, _Override):
            return raw.text
        if not isinstance(value, str):
            raise ctx.error(key, f"expected a string, got {value!r}")
        return value
    if tp is Path:
        text = raw.text if isinstance(raw, _Override) else value
        if not isinstance(text, str) or not text:
            raise ctx.error(key, f"expected a path, got {value!r}")
        if text.startswith(SHIPPED_PREFIX):  # weights shipped with the package: a name, not a path
            return Path(text)
        path = Path(text).expanduser()
        return path if path.is_absolute() or ctx.base_dir is None else (ctx.base_dir / path).resolve()
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ctx.error(key, f"expected a list, got {value!r}")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ctx.error(key, f"expected a list of {len(args)} values, got {value!r}")
            return tuple(_convert(a, v, None, f"{key}[{i}]", ctx) for i, (a, v) in enumerate(zip(args, value)))
        items = [_convert(args[0] if args else Any, v, None, f"{key}[{i}]", ctx) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ctx.error(key, f"expected a mapping, got {value!r}")
        return {_convert(args[0], k, None, key, ctx): _convert(args[1], v, None, f"{key}.{k}", ctx)
                for k, v in value.items()}
    raise ctx.error(key, f"unsupported field type {_type_name(tp)}")


def _matches(tp: Any, value: Any) -> bool:
    return dataclasses.is_dataclass(tp) and isinstance(value, tp)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")

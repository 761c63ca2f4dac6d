"""The Python API of the training workflow: split, train, evaluate. The CLI calls these.

    import semiseg
    labeled, = semiseg.split("data/annotations/instances_train.json", [10], out_dir="data/splits",
                             unlabeled=True)
    run = semiseg.train("configs/synthetic_mask2former_tiny.yaml", solver__max_iter=500,
                        **{"data.train_ann": labeled})
    print(run.run_dir, run.metrics["model"]["segm"]["AP"])
    semiseg.evaluate(run.run_dir / "checkpoints" / "last")

Overrides are config keys (docs/configs.md): `solver__max_iter=500` or `**{"solver.max_iter": 500}`.
Inference is `semiseg.load(weights).predict(image)` (`semiseg/api.py`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from semiseg.config import Config, apply_overrides, load_config
from semiseg.data.splits import write_splits
from semiseg.engine.evaluate import evaluate_from_cli
from semiseg.training import train as train_config


@dataclass(frozen=True)
class TrainResult:
    """A finished run: its folder and the metrics of its last evaluation.

    metrics: {model name ("model", or "student" / "teacher"): {"segm": {...}, "bbox": {...}}};
             empty when the config has no validation set (`data.val_ann`)
    """

    run_dir: Path
    metrics: dict[str, dict]


def override_strings(overrides: dict[str, Any]) -> list[str]:
    """`{"solver__max_iter": 500, "data.train_ann": path}` -> ["solver.max_iter=500", "data.train_ann=path"]."""
    strings = []
    for key, value in overrides.items():
        text = str(value) if isinstance(value, (str, Path)) else yaml.safe_dump(value, default_flow_style=True)
        strings.append(f"{key.replace('__', '.')}={text.strip().removesuffix('...').strip()}")
    return strings


def train(config: Config | str | Path, *overrides: str, resume: bool = False, **keyword_overrides: Any
          ) -> TrainResult:
    """Train (supervised, or Guided Distillation with `semi.enabled`) as `semiseg train` does.

    config: a `Config` or a YAML file (its relative paths are relative to it); overrides:
    "key=value" strings and/or keywords (module docstring); relative paths in them are relative to
    the current directory.
    """
    strings = [*overrides, *override_strings(keyword_overrides)]
    cfg = apply_overrides(config, strings) if isinstance(config, Config) else load_config(config, strings)
    run_dir = train_config(cfg, resume=resume)
    evaluations = [json.loads(line)["eval"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                   if '"eval"' in line]
    return TrainResult(run_dir, evaluations[-1] if evaluations else {})


def evaluate(weights: str | Path, *overrides: str, config: str | Path | None = None, who: str = "student",
             ann: str | Path | None = None, images: str | Path | None = None, out: str | Path | None = None,
             device: str = "auto", **keyword_overrides: Any) -> dict[str, dict]:
    """COCO mask / box AP of a checkpoint folder or weights file, as `semiseg eval`; {model name: metrics}.

    Default data: the validation set of the config embedded in the weights (or of `config`).
    """
    return evaluate_from_cli(Path(weights), config=None if config is None else Path(config),
                             overrides=[*overrides, *override_strings(keyword_overrides)], who=who,
                             ann=None if ann is None else Path(ann), images=None if images is None else Path(images),
                             out=None if out is None else Path(out), device=device)


def split(ann: str | Path, percents: Iterable[float], out_dir: str | Path, seed: int = 0, unlabeled: bool = False,
          from_lists: Iterable[str | Path] | None = None, images: str | Path | None = None,
          allow_outside_root: bool = False) -> list[Path]:
    """Seeded, nested labeled splits of a COCO json, as `semiseg split`; returns the labeled jsons.

    The json is validated as `semiseg train` reads it (`images`: its image folder, to check the files too).
    unlabeled: also write each split's complement (`<stem>_<P>_unlabeled.json`) for `data.unlabeled`.
    """
    return write_splits(Path(ann), list(percents), seed=seed, out_dir=Path(out_dir), write_unlabeled=unlabeled,
                        labeled_lists=None if from_lists is None else [Path(p) for p in from_lists],
                        image_root=None if images is None else Path(images), allow_outside_root=allow_outside_root)

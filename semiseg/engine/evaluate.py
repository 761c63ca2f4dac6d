"""Evaluation of a model: the loop the trainer runs and the `semiseg eval` command.

The evaluator follows `model.task`: COCO mask and box AP (instance), PQ (panoptic), mIoU (semantic).

`semiseg eval --who student|teacher|both` picks the models of a checkpoint: a semi-supervised
checkpoint folder holds `student.safetensors` and `teacher.safetensors`; a supervised one holds a
single `model.safetensors`, which "student" (the default) means. A weights file given directly is
evaluated as it is.
"""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from semiseg.config import Config, apply_overrides, load_config
from semiseg.data.readers import coco_ground_truth, read_labeled
from semiseg.data.datasets import EvalDataset
from semiseg.data.loader import build_eval_loader
from semiseg.engine.checkpoint import weights_file
from semiseg.engine.distributed import (broadcast_object, destroy_distributed, get_rank, get_world_size,
                                        init_distributed, is_main_process, select_device, limit_cpu_threads)
from semiseg.errors import CheckpointError, ConfigError
from semiseg.cityscapes_evaluation import CityscapesEvaluator
from semiseg.data.cityscapes import instance_id_files, records_to_coco
from semiseg.evaluation import CocoEvaluator, format_metrics
from semiseg.panoptic_quality import PanopticEvaluator
from semiseg.semantic_metrics import SemanticEvaluator
from semiseg.restore import load_trained_model
from semiseg.weights import atomic_write, read_weights

logger = logging.getLogger(__name__)

WHO = {"student": ("student",), "teacher": ("teacher",), "both": ("student", "teacher")}


Evaluator = CocoEvaluator | PanopticEvaluator | SemanticEvaluator


@torch.no_grad()
def evaluate_model(model: nn.Module, loader: DataLoader, evaluator: Evaluator, device: torch.device,
                   amp_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The metrics of `model` on `loader` (this rank's shard; predictions gathered to rank 0).

    Returns {"segm": {"AP", ...}, "bbox": {...}} (instance), {"panoptic": {"PQ", ...}} or
    {"sem_seg": {"mIoU", ...}}, the same on every rank. The model is put in eval
    mode and restored to its previous mode afterwards.
    """
    evaluator.reset()
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(loader, desc="eval", leave=False, disable=not is_main_process(), dynamic_ncols=True):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                outputs = model(batch.images.to(device), batch.image_sizes)
            predictions = model.predict(outputs, batch.image_sizes, batch.orig_sizes)
            for image_id, prediction in zip(batch.image_ids, predictions):
                evaluator.add(image_id, prediction.to("cpu"))
    finally:
        model.train(was_training)
    evaluator.gather()
    return broadcast_object(evaluator.evaluate() if is_main_process() else None)


def build_eval_data(cfg: Config, ann: Path, images: Path, class_names: list[str] | None = None
                    ) -> tuple[DataLoader, Evaluator]:
    """This rank's loader over a labeled dataset (`data.format`) with the config's test resize, and the
    evaluator of `model.task` for its ground truth; checks the class list."""
    records = read_labeled(cfg.data.format, ann, images, strict=cfg.data.strict,
                           allow_outside_root=cfg.data.allow_outside_root, task=cfg.model.task)
    if class_names and records.class_names != list(class_names):
        raise ConfigError(f"{ann}: its categories {records.class_names[:5]}... differ from the model's classes "
                          f"{list(class_names)[:5]}... (evaluate on a dataset with the training categories)")
    dataset = EvalDataset(records, cfg.data.augmentation.test_transform())
    loader = build_eval_loader(dataset, batch_size=1, num_workers=cfg.data.num_workers, rank=get_rank(),
                               world_size=get_world_size(), size_divisibility=cfg.model.head.size_divisibility)
    if cfg.model.task == "panoptic":
        return loader, PanopticEvaluator(records)
    if cfg.model.task == "semantic":
        return loader, SemanticEvaluator(records)
    if cfg.data.format == "cityscapes":
        if importlib.util.find_spec("cityscapesscripts") is not None:
            gt_files = dict(enumerate(instance_id_files(ann), start=1))
            return loader, CityscapesEvaluator(records_to_coco(records), gt_files, source=str(ann))
        logger.warning("cityscapesscripts is not installed: COCO AP only (pip install 'semiseg[cityscapes]' "
                       "for the official Cityscapes AP)")
    return loader, CocoEvaluator(coco_ground_truth(cfg.data.format, ann, records), source=str(ann))


def evaluate_from_cli(weights: Path, config: Path | None = None, overrides: Iterable[str] = (), who: str = "student",
                      ann: Path | None = None, images: Path | None = None, out: Path | None = None,
                      device: str = "auto") -> dict[str, dict[str, Any]]:
    """`semiseg eval`: COCO AP of the chosen model(s) of a checkpoint; prints tables, writes JSON to `out`.

    weights: a checkpoint folder (`.../checkpoints/best`), a `.safetensors` file or an official `.pkl`/`.pth`
             (converted on the fly; give `config`).
    config:  a YAML config; default: the config embedded in the weights. `overrides` apply to it.
    ann/images: the COCO json and image folder; default: the config's `data.val_ann`/`val_images`.
    Returns {model name ("model", "student", "teacher"): metrics}.
    """
    weights = Path(weights)
    if who not in WHO:
        raise ConfigError(f"--who {who!r}: expected student, teacher or both")
    if weights.is_file():
        _, info = read_weights(weights)
        if who != "student" and info.name != who:
            raise CheckpointError(f"{weights}: holds the {info.name} model, not the {who}; pass the checkpoint folder")
        paths = [weights]
    else:
        paths = [weights_file(weights, name) for name in WHO[who]]
    base_cfg = load_config(config, overrides) if config is not None else None
    torch_device = select_device(device)
    joined = init_distributed(torch_device)
    try:
        results = {}
        for path in paths:
            model, cfg, info = load_trained_model(path, base_cfg, torch_device)
            if base_cfg is None:
                cfg = apply_overrides(cfg, overrides)
            ann_file, image_dir = (ann, images) if ann is not None else (cfg.data.val_ann, cfg.data.val_images)
            if ann_file is None or image_dir is None:
                raise ConfigError(f"{path}: no evaluation set: pass --ann and --images (or set data.val_ann/val_images)")
            limit_cpu_threads(torch_device, cfg.data.num_workers)
            loader, evaluator = build_eval_data(cfg, Path(ann_file), Path(image_dir), info.class_names)
            results[info.name] = evaluate_model(model, loader, evaluator, torch_device)
            if is_main_process():
                print(f"{info.name} ({path}) on {ann_file}:\n{format_metrics(results[info.name])}")
        if out is not None and is_main_process():
            text = json.dumps(results, indent=2)
            atomic_write(Path(out), lambda tmp: tmp.write_text(text))
        return results
    finally:
        if joined:
            destroy_distributed()

"""Build everything a config describes, then run the trainer: the composition root of `semiseg train`.

It sits above `engine/` (the supervised `Trainer`, data streams, checkpoints) and `semi/` (the
Guided Distillation trainer), so neither imports the other's builder. Runs as a plain process
(one CPU or GPU) or under `torchrun --nproc_per_node N -m semiseg.cli train ...` (one process per
GPU, or gloo on CPUs): `data.batch_size` is the global batch, split evenly across the processes.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path

import torch

from semiseg.config import Config, save_config
from semiseg.data.readers import read_labeled, select_listed
from semiseg.data.records import DatasetRecords
from semiseg.engine.distributed import (broadcast_object, collective, destroy_distributed, get_rank, get_world_size,
                                        init_distributed, is_main_process, limit_cpu_threads, seed_everything, select_device)
from semiseg.engine.evaluate import build_eval_data, evaluate_model
from semiseg.engine.run_dir import close_run_log, open_run_log, prepare_run_dir, should_resume
from semiseg.engine.stream import build_labeled_stream
from semiseg.engine.trainer import EvaluateFn, Trainer
from semiseg.errors import ConfigError
from semiseg.models.build import build_model
from semiseg.semi.guided import build_guided_trainer
from semiseg.weights import WeightsInfo

logger = logging.getLogger("semiseg")


def train(cfg: Config, resume: bool = False) -> Path:
    """Train the model `cfg` describes into `cfg.train.output_dir`; returns that run directory.

    resume (or `train.resume`): continue from `<output_dir>/checkpoints/last`, exactly where it stopped
    (`train.resume: auto`: when there is one). SIGTERM / SIGUSR1 end it with a checkpoint and
    `TrainingPreempted` (engine/preemption.py).
    """
    device = select_device(cfg.train.device)
    limit_cpu_threads(device, cfg.data.num_workers)
    joined = init_distributed(device)
    try:
        return run_training(cfg, device, resume or cfg.train.resume)
    finally:
        close_run_log()
        if joined:
            destroy_distributed()


def run_training(cfg: Config, device: torch.device, resume: bool | str) -> Path:
    """Build and run the trainer; it (and its DDP model) is out of scope when this returns."""
    trainer = build_trainer(cfg, device, resume)
    trainer.train()
    return trainer.run.root


def build_trainer(cfg: Config, device: torch.device, resume: bool | str) -> Trainer:
    """Run directory, seeds, data, model, evaluation and (for `resume`) the restored state."""
    data = cfg.data
    if data.train_ann is None or data.train_images is None:
        raise ConfigError("data.train_ann and data.train_images must be set (a COCO instances json and its images)")
    resume = broadcast_object(should_resume(cfg.train.output_dir, resume) if is_main_process() else None)
    run = collective(lambda: prepare_run_dir(cfg.train.output_dir, resume, cfg.train.overwrite))
    seed_everything(cfg.train.seed + get_rank(), cfg.train.deterministic)
    if is_main_process():
        open_run_log(run)

    records = collective(lambda: read_labeled(data.format, data.train_ann, data.train_images, strict=data.strict,
                                              allow_outside_root=data.allow_outside_root,
                                              task=cfg.model.task))
    if data.train_list is not None:
        records = select_listed(records, data.train_list)
    cfg = with_num_classes(cfg, records)
    if is_main_process():
        if data.unlabeled is not None and not cfg.semi.enabled:
            logger.warning("data.unlabeled is set, but this run is supervised: the unlabeled images are not used")
        save_config(cfg, run.config)
        logger.info("%s: %d images, %d classes; %d process(es) on %s", data.train_ann, len(records),
                    records.num_classes, get_world_size(), device)

    model = build_model(cfg.model, cfg.model.num_classes).to(device)
    evaluate = build_evaluate_fn(cfg, device, records.class_names) if data.val_ann is not None else None
    info = WeightsInfo(None, records.class_names, records.category_ids, "model")
    if cfg.semi.enabled:
        trainer = build_guided_trainer(cfg, model, records, run, device, info, evaluate, resume)
    else:
        trainer = Trainer(cfg, model, {"labeled": build_labeled_stream(cfg, records)}, run, device, info, evaluate)
    if resume:
        trainer.load_checkpoint(run.resume_checkpoint())
    return trainer


def with_num_classes(cfg: Config, records: DatasetRecords) -> Config:
    """`cfg` with `model.num_classes` set from the training data (0 in the config) or checked against it,
    and, for a panoptic model, `model.stuff_classes` from the data's categories when the config has none."""
    k = cfg.model.num_classes
    if k not in (0, records.num_classes):
        raise ConfigError(f"model.num_classes={k} but {records.source} has {records.num_classes} categories")
    stuff = cfg.model.stuff_classes or (records.stuff_classes if cfg.model.task == "panoptic" else ())
    if any(not 0 <= c < records.num_classes for c in stuff):
        raise ConfigError(f"model.stuff_classes={list(stuff)}: expected class ids in [0, {records.num_classes})")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=records.num_classes,
                                                              stuff_classes=tuple(stuff)))


def build_evaluate_fn(cfg: Config, device: torch.device, class_names: list[str]) -> EvaluateFn:
    """model -> COCO metrics on `data.val_ann` (validated now, so a bad val set fails before training)."""
    if cfg.data.val_images is None:
        raise ConfigError("data.val_images must be set when data.val_ann is")
    loader, evaluator = collective(lambda: build_eval_data(cfg, cfg.data.val_ann, cfg.data.val_images, class_names))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.solver.amp) if device.type == "cuda" else None
    return functools.partial(evaluate_model, loader=loader, evaluator=evaluator, device=device, amp_dtype=amp_dtype)

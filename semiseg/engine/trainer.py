"""The training loop: supervised now, extended (not copied) by the semi-supervised trainer.

`Trainer.train()` runs iterations `[iteration, max_iter)`. One iteration is `run_step`:
`before_step` (a hook), then `grad_accum` micro-batches of `forward_losses` (data -> model ->
weighted loss terms) under autocast, one backward each, then full-model gradient clipping and an
AdamW step. Around it: a non-finite loss stops with a one-line error or skips the step, metrics go
to `metrics.jsonl`, TensorBoard and a tqdm bar (rank 0), evaluation runs every `eval_period`
(the `best` checkpoint is chosen on the evaluation just computed), `last` is saved every
`checkpoint_period`, and `load_checkpoint` restores everything for an exact resume.

Extension points for other training methods (e.g. Guided Distillation):
- `before_step(iteration)`: e.g. update a teacher;
- `forward_losses()`: e.g. fetch labeled and unlabeled batches, pseudo-label, two forwards;
- `checkpoint_models()` / `eval_models()`: the named models saved / evaluated;
- `state_dict()` / `load_state_dict()`: extra training state (call `super()`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections import defaultdict
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

from semiseg.config import Config, config_to_dict
from semiseg.engine.checkpoint import (capture_rng_state, load_training_state, restore_rng_state, save_checkpoint,
                                       weights_file)
from semiseg.engine.distributed import (all_gather_object, all_ranks_true, collective, get_rank, get_world_size,
                                        is_main_process, reduce_dict, wrap_ddp)
from semiseg.engine.optim import build_lr_scheduler, build_optimizer, clip_full_model_grad_norm, lr_factor
from semiseg.engine.preemption import PreemptionFlag, TrainingPreempted, catch_preemption
from semiseg.engine.run_dir import RunDir
from semiseg.engine.stream import BatchStream
from semiseg.errors import TrainingError
from semiseg.evaluation import BEST_METRIC, METRIC_GROUPS, format_metrics
from semiseg.structures import Batch
from semiseg.weights import WeightsInfo, load_weights_into, read_weights

logger = logging.getLogger("semiseg.train")

EvaluateFn = Callable[[nn.Module], dict[str, Any]]


class Trainer:
    """Supervised training of one model on one labeled `BatchStream`.

    model:     a meta-architecture (`forward`, `loss`, `predict`), already on `device`
    streams:   named batch streams; the supervised step reads "labeled"
    evaluate:  model -> metrics ({"segm": {"AP": ...}, ...}, identical on every rank), or None
    info:      class names / category ids / config stored in every weights file
    """

    def __init__(self, cfg: Config, model: nn.Module, streams: dict[str, BatchStream], run: RunDir,
                 device: torch.device, info: WeightsInfo, evaluate: EvaluateFn | None = None):
        self.cfg, self.run, self.device, self.info, self.evaluate_fn = cfg, run, device, info, evaluate
        self.model = model
        self.ddp_model = wrap_ddp(model, device, cfg.train.find_unused_parameters)
        if cfg.train.compile != "none":  # the forward only: the losses (Hungarian matching) stay eager
            self.ddp_model = torch.compile(self.ddp_model, backend=cfg.train.compile)
        self.streams = streams
        self.optimizer = build_optimizer(model, cfg.solver)
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.solver)
        amp = cfg.solver.amp if device.type == "cuda" else "none"
        if cfg.solver.amp != "none" and amp == "none":
            logger.info("solver.amp=%s ignored on %s (mixed precision runs on CUDA only)", cfg.solver.amp, device)
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
        self.iteration = 0
        self.best_metric: float | None = None
        self.best_iteration: int | None = None
        self.skipped_steps = 0
        self.skipped_images: dict[str, int] = {}  # stream name -> unreadable images skipped (all ranks)
        self.data_time = 0.0
        self._writer = None

    # ----------------------------------------------------------------- extension points
    def before_step(self, iteration: int) -> None:
        """Called at the start of every iteration (before any data is fetched)."""

    def forward_losses(self) -> dict[str, torch.Tensor]:
        """One micro-batch: fetch data, run the model, return its weighted loss terms (summed = total)."""
        batch = self.next_batch("labeled")
        outputs = self.ddp_model(batch.images, batch.image_sizes, batch.targets)
        return self.model.loss(outputs, batch.targets)

    def checkpoint_models(self) -> dict[str, nn.Module]:
        """The models saved in a checkpoint, by file name (`<name>.safetensors`)."""
        return {"model": self.model}

    def eval_models(self) -> dict[str, nn.Module]:
        """The models evaluated; the first one's metric selects the `best` checkpoint."""
        return {"model": self.model}

    def state_dict(self) -> dict[str, Any]:
        """Training state saved in `state.pt` (weights_only-loadable values). Collective: call on every rank."""
        return {
            "iteration": self.iteration,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "streams": {name: stream.position for name, stream in self.streams.items()},
            "rng": all_gather_object(capture_rng_state()),
            "best_metric": self.best_metric,
            "best_iteration": self.best_iteration,
            "skipped_steps": self.skipped_steps,
            "world_size": get_world_size(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = int(state["iteration"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        for name, stream in self.streams.items():
            stream.start(int(state["streams"].get(name, 0)))
        rng = state["rng"]
        if state["world_size"] != get_world_size():
            logger.warning("resuming a %d-process run with %d processes: data order and random draws differ "
                           "from an uninterrupted run", state["world_size"], get_world_size())
        restore_rng_state(rng[get_rank()] if get_rank() < len(rng) else rng[0])
        self.best_metric, self.best_iteration = state["best_metric"], state["best_iteration"]
        self.skipped_steps = int(state["skipped_steps"])

    # ----------------------------------------------------------------- one iteration
    def next_batch(self, name: str) -> Batch:
        """The next batch of stream `name`, on the training device (time counted as data time)."""
        start = time.perf_counter()
        batch = next(self.streams[name]).to(self.device)
        self.data_time += time.perf_counter() - start
        return batch

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def run_step(self, iteration: int) -> dict[str, float] | None:
        """One optimizer step; returns the loss terms (mean over micro-batches), None if skipped."""
        self.before_step(iteration)
        self.optimizer.zero_grad(set_to_none=True)
        accum = self.cfg.solver.grad_accum
        logged: dict[str, float] = defaultdict(float)
        for micro in range(accum):
            sync = micro == accum - 1
            context = contextlib.nullcontext() if sync or self.ddp_model is self.model else self.ddp_model.no_sync()
            with context:
                with self.autocast():
                    losses = self.forward_losses()
                total = sum(losses.values())
                finite = all_ranks_true(bool(torch.isfinite(total.detach())), self.device)
                # Backward even when skipping: a DDP forward must be followed by its backward.
                self.scaler.scale(total / accum).backward()
            if not finite:
                return self._nonfinite(iteration, "loss", losses)
            values = torch.stack([v.detach().float() for v in losses.values()]).tolist()
            for k, v in zip(losses, values):
                logged[k] += v / accum
        self.scaler.unscale_(self.optimizer)
        norm = clip_full_model_grad_norm(self.model.parameters(), self.cfg.solver.clip_grad_norm)
        if not self.scaler.is_enabled() and not math.isfinite(float(norm)):  # the fp16 scaler skips such steps itself
            return self._nonfinite(iteration, "gradient norm", {"grad_norm": norm})
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return dict(logged)

    def _nonfinite(self, iteration: int, what: str, values: dict[str, torch.Tensor]) -> None:
        terms = " ".join(f"{k}={float(v.detach()):.4g}" for k, v in values.items())
        if self.cfg.train.on_nonfinite == "stop":
            raise TrainingError(f"non-finite {what} at iteration {iteration}: {terms} "
                                f"(train.on_nonfinite=skip skips such steps; a lower solver.lr may help)")
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.skipped_steps += 1
        logger.warning("skipped iteration %d (non-finite %s, %d skipped so far): %s",
                       iteration, what, self.skipped_steps, terms)
        return None

    # ----------------------------------------------------------------- the loop
    def train(self) -> None:
        """Run from `self.iteration` to `solver.max_iter`, then evaluate and save a final checkpoint.

        SIGTERM / SIGUSR1 stop it at the next step boundary with a checkpoint (`engine/preemption.py`).
        """
        main = is_main_process()
        for model in self.checkpoint_models().values():
            model.train()
        if main:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run.tensorboard))
        bar = tqdm(total=self.cfg.solver.max_iter, initial=self.iteration, disable=not main, dynamic_ncols=True,
                   desc="train", unit="it")
        with catch_preemption() as flag:
            self._train_loop(flag, bar)

    def _train_loop(self, flag: PreemptionFlag, bar: tqdm) -> None:
        """The iterations, with logging, evaluation and checkpoints; stops with a checkpoint when `flag` rises."""
        solver, train_cfg = self.cfg.solver, self.cfg.train
        window: dict[str, list[float]] = defaultdict(list)
        window_start, self.data_time = time.perf_counter(), 0.0
        window_iters = 0
        try:
            while self.iteration < solver.max_iter:
                losses = self.run_step(self.iteration)
                self.iteration += 1
                window_iters += 1
                if losses is not None:
                    for k, v in losses.items():
                        window[k].append(v)
                    bar.set_postfix_str(_postfix(losses), refresh=False)
                bar.update(1)
                last = self.iteration == solver.max_iter
                if self.iteration % train_cfg.log_period == 0 or last:
                    self._report_skipped_images(final=last)
                    elapsed = time.perf_counter() - window_start
                    self._log_train(window, elapsed / window_iters, self.data_time / window_iters)
                    window.clear()
                    window_start, self.data_time, window_iters = time.perf_counter(), 0.0, 0
                if self.evaluate_fn is not None and (self.iteration % train_cfg.eval_period == 0 or last):
                    self.evaluate_and_select()
                if self.iteration % train_cfg.checkpoint_period == 0 or last:
                    self.save("last")
                elif not all_ranks_true(flag.received is None, self.device):  # any rank signalled: all stop
                    self.save("last")
                    raise TrainingPreempted(
                        f"stopped by {flag.received or 'a preemption signal on another rank'} at iteration "
                        f"{self.iteration}; checkpoint saved in {self.run.last}: continue with --resume "
                        f"(or train.resume=auto)")
        except torch.OutOfMemoryError:
            raise TrainingError(f"{self.device} ran out of memory at iteration {self.iteration}: try a smaller "
                                f"data.batch_size (with solver.grad_accum to keep the effective batch), a smaller "
                                f"data.augmentation.image_size, or solver.amp=bf16") from None
        finally:
            bar.close()
            for stream in self.streams.values():
                stream.close()
            if self._writer is not None:
                self._writer.close()

    def _report_skipped_images(self, final: bool) -> None:
        """Gather every rank's skipped unreadable images (loader workers included); rank 0 warns when the
        count grew (and once more at the end of the run) and `_log_train` writes it to metrics.jsonl."""
        for name, stream in self.streams.items():
            merged = dict.fromkeys(m for skipped in all_gather_object(list(stream.skipped)) for m in skipped)
            count, before = len(merged), self.skipped_images.get(name, 0)
            self.skipped_images[name] = count
            if is_main_process() and count and (count > before or final):
                logger.warning("%s%d unreadable %s image(s) skipped so far, first: %s",
                               "end of training: " if final else "", count, name, next(iter(merged)))

    def _log_train(self, window: dict[str, list[float]], time_per_iter: float, data_time: float) -> None:
        """Average the window's loss terms over iterations and ranks; write them on rank 0."""
        means = {k: torch.tensor(sum(v) / len(v)) for k, v in sorted(window.items())}
        means = {k: float(v) for k, v in reduce_dict(means).items()}
        if not is_main_process():
            return
        record = {"iteration": self.iteration, "lr": self.cfg.solver.lr * lr_factor(self.iteration - 1, self.cfg.solver),
                  "loss": sum(means.values()) if means else None, **means, "time": time_per_iter,
                  "data_time": data_time, "skipped_steps": self.skipped_steps,
                  **{f"skipped_images_{name}": count for name, count in self.skipped_images.items()},
                  "eta_seconds": time_per_iter * (self.cfg.solver.max_iter - self.iteration)}
        self._append_metrics(record)
        for k, v in record.items():
            if k != "iteration" and v is not None:
                self._writer.add_scalar(f"train/{k}", v, self.iteration)

    def _append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.run.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")

    # ----------------------------------------------------------------- evaluation and checkpoints
    def evaluate_and_select(self) -> dict[str, dict[str, Any]]:
        """Evaluate `eval_models()`; save `best` if the first model's metric improved on this evaluation."""
        results = {}
        for name, model in self.eval_models().items():
            results[name] = self.evaluate_fn(model)
            model.train()
        key = self.cfg.train.best_metric
        key = BEST_METRIC[self.cfg.model.task] if key == "auto" else key
        value = metric_value(next(iter(results.values())), key)
        improved = value is not None and (self.best_metric is None or value > self.best_metric)
        if improved:
            self.best_metric, self.best_iteration = value, self.iteration
        if is_main_process():
            self._append_metrics({"iteration": self.iteration, "eval": results})
            for name, metrics in results.items():
                tqdm.write(f"[iteration {self.iteration}] {name}:\n{format_metrics(metrics)}")
                logger.info("evaluation of %s at iteration %d: %s", name, self.iteration, _summary(metrics))
                for iou_type, values in metrics.items():
                    for metric, v in values.items():
                        if isinstance(v, (int, float)) and not math.isnan(v):
                            self._writer.add_scalar(f"eval/{name}/{iou_type}/{metric}", v, self.iteration)
        if improved:
            self.save("best")
        return results

    def save(self, which: str) -> None:
        """Write checkpoint `which` ("last" or "best"). Collective: call on every rank."""
        state = self.state_dict()
        directory = self.run.last if which == "last" else self.run.best

        def write() -> None:
            if is_main_process():
                info = WeightsInfo(config_to_dict(self.cfg), self.info.class_names, self.info.category_ids, "model")
                save_checkpoint(directory, self.checkpoint_models(), state, info)
                logger.info("saved checkpoint %s at iteration %d", directory, self.iteration)

        collective(write)  # rank 0 writes; a failed write (full disk, read-only folder) stops every rank

    def load_checkpoint(self, directory) -> None:
        """Restore models and training state from a checkpoint folder written by `save`."""
        for name, model in self.checkpoint_models().items():
            path = weights_file(directory, name)
            load_weights_into(model, read_weights(path)[0], path, strict=True)
        self.load_state_dict(load_training_state(directory))
        logger.info("resumed from %s at iteration %d", directory, self.iteration)


def metric_value(metrics: dict[str, Any], key: str) -> float | None:
    """`metrics["segm"]["AP"]` for key "segm.AP"; None if absent or nan."""
    value: Any = metrics
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return None if not isinstance(value, (int, float)) or math.isnan(value) else float(value)


def _postfix(losses: dict[str, float]) -> str:
    """Total loss and the final-layer terms (aux terms `*_0`, `*_1`, ... left out) for the progress bar."""
    final = [f"{k.removeprefix('loss_')} {v:.3f}" for k, v in losses.items() if not k.rsplit("_", 1)[-1].isdigit()]
    return " ".join([f"loss {sum(losses.values()):.3f}", *final[:4]])


def _summary(metrics: dict[str, Any]) -> str:
    """The headline number of each metric group: "segm AP 31.20, bbox AP 28.10" or "panoptic PQ 29.29"."""
    return ", ".join(f"{group} {METRIC_GROUPS[group][0]} {values[METRIC_GROUPS[group][0]]:.2f}"
                     for group, values in metrics.items() if group in METRIC_GROUPS)

"""The run directory (`train.output_dir`): what a training run writes and the rule that protects it.

    <output_dir>/config.yaml          resolved config of the run
    <output_dir>/metrics.jsonl        one JSON object per logged iteration / evaluation
    <output_dir>/log.txt              the run's log messages
    <output_dir>/tensorboard/         TensorBoard event files
    <output_dir>/checkpoints/last/    latest checkpoint (resume from here)
    <output_dir>/checkpoints/best/    checkpoint with the best validation metric so far

A non-empty run directory is never overwritten silently: a new run into it is refused unless the
user resumes it (`--resume`) or asks to overwrite (`train.overwrite=true`), which deletes only the
files listed above. `open_run_log` / `close_run_log` attach the `semiseg` logger to `log.txt`.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from semiseg.engine.checkpoint import resolve_checkpoint_dir
from semiseg.errors import ConfigError

logger = logging.getLogger("semiseg")

RUN_FILES = ("config.yaml", "metrics.jsonl", "log.txt")
RUN_DIRS = ("tensorboard", "checkpoints")


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def log(self) -> Path:
        return self.root / "log.txt"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def last(self) -> Path:
        return self.root / "checkpoints" / "last"

    @property
    def best(self) -> Path:
        return self.root / "checkpoints" / "best"

    def resume_checkpoint(self) -> Path:
        """The `last` checkpoint to resume from; ConfigError if the run has none."""
        found = resolve_checkpoint_dir(self.last)
        if found is None:
            raise ConfigError(f"{self.root}: nothing to resume (no checkpoints/last); start a new run without --resume")
        return found


def should_resume(output_dir: Path, resume: bool | str) -> bool:
    """`train.resume` as a decision: True/False as given; "auto": whether `output_dir` has a checkpoint to resume."""
    if resume == "auto":
        return resolve_checkpoint_dir(RunDir(Path(output_dir)).last) is not None
    return bool(resume)


def prepare_run_dir(output_dir: Path, resume: bool, overwrite: bool) -> RunDir:
    """Check (and, for `overwrite`, clear) `output_dir` before a run writes into it.

    New run: the directory must be absent or empty, unless `overwrite`. Resume: it must hold a
    `checkpoints/last`. Called on the main process only.
    """
    run = RunDir(Path(output_dir))
    if resume:
        run.resume_checkpoint()
        return run
    if run.root.exists() and not run.root.is_dir():
        raise ConfigError(f"train.output_dir={run.root} is a file, not a directory")
    if run.root.is_dir() and any(run.root.iterdir()):
        if not overwrite:
            raise ConfigError(f"train.output_dir={run.root} is not empty: pass --resume to continue that run, "
                              f"or choose another train.output_dir=... (or train.overwrite=true)")
        for name in RUN_FILES:
            (run.root / name).unlink(missing_ok=True)
        for name in RUN_DIRS:
            shutil.rmtree(run.root / name, ignore_errors=True)
    run.root.mkdir(parents=True, exist_ok=True)
    return run


class _TqdmHandler(logging.Handler):
    """Log lines printed above the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record))


def open_run_log(run: RunDir) -> None:
    """Send the `semiseg` logger to `run.log` and to the console (above the progress bar)."""
    logger.setLevel(logging.INFO)
    file_handler = logging.FileHandler(run.log)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    console = _TqdmHandler()
    console.setFormatter(logging.Formatter("semiseg: %(message)s"))
    for handler in (file_handler, console):
        handler._semiseg_run = True
        logger.addHandler(handler)


def close_run_log() -> None:
    """Detach what `open_run_log` attached (a process may train several runs)."""
    for handler in [h for h in logger.handlers if getattr(h, "_semiseg_run", False)]:
        logger.removeHandler(handler)
        handler.close()

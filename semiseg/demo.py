"""`semiseg demo`: the whole semi-supervised pipeline on the built-in dataset, in one command.

1. write the synthetic dataset (`semiseg synth`) and draw a labeled split (`semiseg split`);
2. stage 1: train the teacher on the labeled images only (`semiseg train`);
3. stage 2: train the student with Guided Distillation, the other training images unlabeled;
4. meanwhile, in a second process, the 100 % reference: the same model on all the labels, for
   the teacher's + the student's iterations, so the demo can say how much of the teacher -> 100 %
   gap the unlabeled images closed;
5. print teacher, student and reference mask AP on the validation images, save overlays of a few
   of them (ground truth | teacher | student) and write every number to `results.json`.

The model is the tiny Mask2Former of the preset `semiseg:tiny_mask2former`, which starts from the
whole model pretrained on procedural pretext scenes (`semiseg:tiny_mask2former_pretext`;
`--model maskdino`: `semiseg:tiny_maskdino`, from the pretrained tiny ResNet only;
docs/pretrained.md); `configs/synthetic_*_tiny.yaml` use the same presets. `run_pipeline(..., dataset=...)` runs
the same pipeline on any COCO dataset (benchmarks/semi_supervised.py --ann).
docs/guided_distillation.md reports what the demo and its benchmark measured.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from semiseg.api import load
from semiseg.config import Config, apply_overrides, preset_overrides
from semiseg.data.coco import load_coco_instances
from semiseg.data.images import read_image
from semiseg.data.masks import decode_segmentation
from semiseg.data.splits import write_splits
from semiseg.data.synthetic import write_synthetic_dataset
from semiseg.errors import ConfigError
from semiseg.models.registry import META_ARCHITECTURES
from semiseg.structures import Instances
from semiseg.training import train
from semiseg.visualize import save_side_by_side
from semiseg.weights import atomic_write

@dataclass(frozen=True)
class DemoSettings:
    """Sizes and schedules of one demo run.

    num_train / num_val: synthetic images (all training images but the labeled ones are unlabeled)
    percent:             labeled share of the training images
    teacher_iters:       stage-1 iterations; student_iters: stage-2 iterations
    model:               a meta-architecture ("mask2former" or "maskdino"): its preset `semiseg:tiny_<model>`
    burn_in_iter / ema_decay / student_init / unsup_mask_weight: the `semi:` settings of stage 2
                         (unsup_mask_weight 0: the unlabeled images teach classes, not mask shapes;
                         docs/guided_distillation.md)
    mask_upsampling:     `semi.pseudo_labels.mask_upsampling` (4: pseudo-masks at the input's resolution)
    """

    num_train: int
    num_val: int
    image_size: int
    percent: float
    batch_size: int
    teacher_iters: int
    teacher_lr: float
    student_iters: int
    student_lr: float
    student_init: str
    burn_in_iter: int
    ema_decay: float
    num_workers: int
    num_overlays: int
    model: str = "mask2former"
    unsup_mask_weight: float = 0.0
    mask_upsampling: int = 1


DEFAULT = DemoSettings(num_train=1000, num_val=500, image_size=128, percent=10, batch_size=8,
                       teacher_iters=1000, teacher_lr=1e-3, student_iters=600, student_lr=3e-4,
                       student_init="teacher", burn_in_iter=300, ema_decay=0.99, num_workers=1, num_overlays=4)
QUICK = DemoSettings(num_train=40, num_val=10, image_size=64, percent=10, batch_size=2,
                     teacher_iters=20, teacher_lr=1e-3, student_iters=10, student_lr=3e-4,
                     student_init="teacher", burn_in_iter=5, ema_decay=0.9, num_workers=1, num_overlays=2)


def run_demo(out_dir: Path, model: str = "mask2former", quick: bool = False, device: str | None = None,
             seed: int = 0) -> dict[str, Any]:
    """Run the demo into `out_dir` (which must not exist or be empty); returns what `results.json` holds.

    quick: a minutes-long smoke run on a few dozen tiny images (CI). device: "cpu", "cuda", "cuda:N"
    or None (a GPU when there is one).
    """
    return run_pipeline(Path(out_dir), default_settings(model, quick), device=device, seed=seed)


def default_settings(model: str = "mask2former", quick: bool = False) -> DemoSettings:
    """DEFAULT (or QUICK) for `model`. The tiny Mask DINO learns more slowly than the tiny Mask2Former,
    so its teacher trains 2,000 iterations: after 1,000 it was far from converged (seed 0: mask AP 15.6,
    against 23.4 after 2,000). Its students keep the mask terms on the unlabeled images (unsup_mask_weight
    1, the reference): without them they lost 1.4-1.6 mask AP on two of three datasets (seed 0), while
    Mask2Former's gained 1.8 on one and kept the others (3 seeds; docs/guided_distillation.md). Those mask
    terms learn pseudo-masks binarised at the input's resolution (mask_upsampling 4): at the reference's 1/4
    the students lost on small objects (cells seed 0: -2.21 against +1.53)."""
    settings = dataclasses.replace(QUICK if quick else DEFAULT, model=model)
    if model == "maskdino":
        settings = dataclasses.replace(settings, unsup_mask_weight=1.0, mask_upsampling=4,
                                       teacher_iters=settings.teacher_iters if quick else 2000)
    return settings


def run_pipeline(out_dir: Path, settings: DemoSettings, device: str | None = None, seed: int = 0,
                 dataset: dict[str, Path] | None = None, reference_dir: Path | None = None) -> dict[str, Any]:
    """The demo with explicit `settings` (`run_demo` takes `default_settings`).

    dataset:       a COCO dataset to use instead of writing the built-in one: paths under the keys
                   "train_ann", "train_images", "val_ann", "val_images" (its train split is drawn with `seed`)
    reference_dir: where the 100 % reference trains (default `out_dir/reference`); a finished run
                   there is reused, so runs of several labeled shares can share one
    """
    if settings.model not in META_ARCHITECTURES:
        raise ConfigError(f"semiseg demo --model {settings.model}: expected one of {', '.join(META_ARCHITECTURES)}")
    _claim(out_dir)
    start = time.perf_counter()
    if dataset is None:
        _stage(1, f"the built-in dataset: {settings.num_train} training + {settings.num_val} validation images, "
                  f"{settings.percent:g} % of the training images labeled")
        data = write_synthetic_dataset(out_dir / "data", num_train=settings.num_train, num_val=settings.num_val,
                                       seed=seed, image_size=settings.image_size)
    else:
        _stage(1, f"dataset {dataset['train_ann']}: {settings.percent:g} % of the training images labeled")
        data = dataset
    (labeled,) = write_splits(data["train_ann"], [settings.percent], seed=seed, out_dir=out_dir / "splits",
                              write_unlabeled=True)
    unlabeled = labeled.with_name(labeled.stem + "_unlabeled.json")
    common = base_overrides(settings, data, labeled, device, seed)
    reference_dir = reference_dir or out_dir / "reference"
    reference = start_reference(base_overrides(settings, data, data["train_ann"], device, seed)
                                + reference_overrides(settings, reference_dir), reference_dir)

    try:
        _stage(2, f"teacher: supervised on the labeled images, {settings.teacher_iters} iterations (the 100 % "
                  f"reference trains meanwhile in a second process, log: {reference_dir / 'console.txt'})")
        teacher_run = train(apply_overrides(Config(), common + teacher_overrides(settings, out_dir / "teacher")))
        teacher_weights = teacher_run / "checkpoints" / "last"
        _stage(3, f"student: Guided Distillation with {_count_images(unlabeled)} unlabeled images, "
                  f"{settings.student_iters} iterations")
        student_run = train(apply_overrides(Config(), common + student_overrides(
            settings, out_dir / "student", teacher_weights, unlabeled, data["train_images"])))
    except BaseException:  # a failed or interrupted stage stops the reference too
        if reference is not None:
            reference.terminate()
        raise

    _stage(4, "the 100 % reference: waiting for it to finish")
    finish_reference(reference, reference_dir)

    _stage(5, "results")
    teacher = _final_evaluation(teacher_run)["model"]
    final = _final_evaluation(student_run)
    full = _final_evaluation(reference_dir)["model"]
    overlays = save_overlays(out_dir / "overlays", data, teacher_weights, student_run / "checkpoints" / "last",
                             settings.num_overlays, device)
    gain = final["student"]["segm"]["AP"] - teacher["segm"]["AP"]
    gap = full["segm"]["AP"] - teacher["segm"]["AP"]
    results = {
        "model": settings.model, "seed": seed, "settings": dataclasses.asdict(settings),
        "dataset": {k: str(v) for k, v in data.items()},
        "labeled_images": _count_images(labeled), "unlabeled_images": _count_images(unlabeled),
        "teacher": _summary(teacher), "student": _summary(final["student"]),
        "ema_teacher": _summary(final["teacher"]), "full": _summary(full),
        "gain": gain, "gap_closed": gain / gap if gap > 0 else None,
        "overlays": [str(p.relative_to(out_dir)) for p in overlays],
        "device": str(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "elapsed_seconds": round(time.perf_counter() - start, 1),
    }
    text = json.dumps(results, indent=2)
    atomic_write(out_dir / "results.json", lambda tmp: tmp.write_text(text))
    print(format_table(results))
    print(f"\nresults: {out_dir / 'results.json'}; overlays: {out_dir / 'overlays'}")
    return results


def start_reference(overrides: list[str], run_dir: Path) -> multiprocessing.Process | None:
    """Train the 100 % reference in a second process (console output in `run_dir/console.txt`); None when
    `run_dir` already holds a finished run."""
    if _has_evaluation(run_dir):
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    process = multiprocessing.get_context("spawn").Process(
        target=_train_logged, args=(overrides + [f"train.output_dir={run_dir}", "train.overwrite=true"],
                                    run_dir / "console.txt"))  # not a daemon: its data loader has workers
    process.start()
    return process


def finish_reference(process: multiprocessing.Process | None, run_dir: Path) -> None:
    """Wait for `start_reference`'s process; a failure raises with the log's last line."""
    if process is not None:
        process.join()
    if not _has_evaluation(run_dir):
        lines = (run_dir / "console.txt").read_text(errors="replace").strip().splitlines() or ["(empty log)"]
        raise ConfigError(f"{run_dir / 'console.txt'}: the 100 % reference training failed: {lines[-1]}")


def _train_logged(overrides: list[str], log: Path) -> None:
    """`train` with stdout and stderr going to `log` (runs in the reference's process, which ends
    when the demo's process does, even if that one was killed)."""
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    with open(log, "w", buffering=1) as stream:
        sys.stdout = sys.stderr = stream
        try:
            train(apply_overrides(Config(), overrides))
        except Exception as error:  # noqa: BLE001 - reported by finish_reference from the log
            print(f"{type(error).__name__}: {error}", flush=True)
            raise SystemExit(1) from None


def _exit_with_parent(parent: int) -> None:
    """Poll every 2 s; exit this process as soon as `parent` is gone (it is re-parented then)."""
    while os.getppid() == parent:
        time.sleep(2)
    os._exit(1)


def _has_evaluation(run: Path) -> bool:
    metrics = run / "metrics.jsonl"
    return metrics.is_file() and '"eval"' in metrics.read_text()


def _claim(out_dir: Path) -> None:
    """Refuse an existing non-empty output folder: a demo never overwrites earlier results."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"{out_dir}: already exists and is not empty; the demo never overwrites a previous run "
                          f"(choose another --out or delete that folder)")
    out_dir.mkdir(parents=True, exist_ok=True)


def _stage(number: int, text: str) -> None:
    print(f"\n[{number}/5] {text}", flush=True)


def base_overrides(settings: DemoSettings, data: dict[str, Path], labeled: Path, device: str | None,
                   seed: int) -> list[str]:
    """Config overrides shared by both stages: model, data (labeled json `labeled`), solver, device."""
    size = settings.image_size
    return preset_overrides(f"tiny_{settings.model}") + [
        f"data.train_ann={labeled}", f"data.train_images={data['train_images']}",
        f"data.val_ann={data['val_ann']}", f"data.val_images={data['val_images']}",
        "data.augmentation.kind=lsj", f"data.augmentation.image_size={size}", "data.augmentation.min_scale=0.8",
        "data.augmentation.max_scale=1.25", f"data.augmentation.test_short_edge={size}",
        f"data.augmentation.test_max_size={size}", f"data.batch_size={settings.batch_size}",
        f"data.num_workers={settings.num_workers}", "solver.backbone_lr_mult=1.0",
        "solver.amp=none", f"train.device={device or 'auto'}", f"train.seed={seed}",
        f"train.checkpoint_period={10 ** 9}", "train.log_period=20",
    ]


def teacher_overrides(settings: DemoSettings, output_dir: Path) -> list[str]:
    """Stage 1: supervised from scratch (short warmup), evaluated once at the end."""
    return _schedule(settings.teacher_iters, settings.teacher_lr) + [
        f"train.output_dir={output_dir}", f"solver.warmup_iters={min(50, settings.teacher_iters // 10)}",
        "solver.warmup_factor=0.01"]


def reference_overrides(settings: DemoSettings, output_dir: Path) -> list[str]:
    """The 100 % reference: stage 1's recipe on all the labels, for the teacher's + the student's iterations."""
    budget = dataclasses.replace(settings, teacher_iters=settings.teacher_iters + settings.student_iters)
    return teacher_overrides(budget, output_dir)


def student_overrides(settings: DemoSettings, output_dir: Path, teacher_weights: Path, unlabeled: Path,
                      unlabeled_images: Path) -> list[str]:
    """Stage 2: Guided Distillation from `teacher_weights`; student and EMA teacher evaluated at the end."""
    return _schedule(settings.student_iters, settings.student_lr) + [
        f"train.output_dir={output_dir}", "solver.warmup_iters=0", f"data.unlabeled={unlabeled}", f"data.unlabeled_images={unlabeled_images}",
        f"data.unlabeled_batch_size={settings.batch_size}", "semi.enabled=true",
        f"semi.teacher_weights={teacher_weights}", f"semi.student_init={settings.student_init}",
        f"semi.burn_in_iter={settings.burn_in_iter}", f"semi.ema_decay={settings.ema_decay}", "semi.eval_who=both",
        "semi.pseudo_labels.nms_iou=0.5", f"semi.unsup_mask_weight={settings.unsup_mask_weight}",
        f"semi.pseudo_labels.mask_upsampling={settings.mask_upsampling}"]


def _schedule(iterations: int, lr: float) -> list[str]:
    """`iterations` at `lr`, x0.1 for the last 20 %, one evaluation at the end."""
    return [f"solver.max_iter={iterations}", f"solver.lr={lr}", f"solver.steps=[{int(iterations * 0.8)}]",
            f"train.eval_period={iterations}"]


def _count_images(ann: Path) -> int:
    return len(json.loads(Path(ann).read_text())["images"])


def _final_evaluation(run: Path) -> dict[str, dict]:
    """The last evaluation a training run logged: {model name: metrics}."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["eval"] for r in records if "eval" in r][-1]


def _summary(metrics: dict) -> dict[str, float]:
    return {f"mask_{k}": metrics["segm"][k] for k in ("AP", "AP50", "AP75")}


def format_table(results: dict[str, Any]) -> str:
    """The demo's summary: teacher, student, reference, the gain and the share of the gap it closed (mask AP, %)."""
    rows = [(f"teacher ({results['labeled_images']} labeled images)", results["teacher"]),
            (f"student (Guided Distillation, +{results['unlabeled_images']} unlabeled)", results["student"]),
            ("EMA teacher at the end of stage 2", results["ema_teacher"]),
            (f"100 % reference (all {results['labeled_images'] + results['unlabeled_images']} images labeled)",
             results["full"])]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'':{width}}  mask AP   AP50   AP75"]
    lines += [f"{name:{width}}  {m['mask_AP']:7.2f} {m['mask_AP50']:6.2f} {m['mask_AP75']:6.2f}" for name, m in rows]
    closed = results["gap_closed"]
    share = "n/a (the reference is not above the teacher)" if closed is None else f"{100 * closed:.0f} %"
    lines.append(f"{'gain (student - teacher)':{width}}  {results['gain']:+7.2f}   closes {share} of the "
                 "teacher -> 100 % gap")
    return "\n".join(lines)


def save_overlays(folder: Path, data: dict[str, Path], teacher: Path, student: Path, count: int,
                  device: str | None) -> list[Path]:
    """Side-by-side PNGs (ground truth | teacher | student) of the first `count` validation images."""

    records = load_coco_instances(data["val_ann"], data["val_images"])
    models = {"teacher": load(teacher, device=device), "student": load(student, device=device)}
    paths = []
    for record in records.records[:count]:
        image = read_image(record.file_name)
        h, w = image.shape[:2]
        annotations = [a for a in record.annotations if not a.iscrowd]
        masks = np.stack([decode_segmentation(a.segmentation, h, w) for a in annotations]) if annotations \
            else np.zeros((0, h, w), dtype=bool)
        truth = Instances.from_masks(torch.tensor([a.label for a in annotations], dtype=torch.long),
                                     torch.from_numpy(masks))
        panels = {"ground truth": truth, **{name: m.predict(image) for name, m in models.items()}}
        paths.append(save_side_by_side(folder / f"{record.file_name.stem}.png", image, panels,
                                       records.class_names))
    return paths

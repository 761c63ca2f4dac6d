"""What does a Guided Distillation step cost, against its parts? Measured on the demo's tiny model.

Parts, each timed on the same fixed batches (no data loading; medians, the variants interleaved):
  supervised  the labeled batch: forward + loss + backward + optimizer step (a supervised step)
  teacher     the teacher's forward on the weak view + the pseudo-label filter
  unlabeled   the student's forward + loss + backward on the strong view against those pseudo-labels
  GD step     `GuidedDistillationTrainer.run_step` (all of the above, one backward, one step)
The bound checked: GD step <= (supervised + teacher + unlabeled) x 1.05. It also times the
alternative of one student forward over labeled and strong images together (one batch of 2B,
losses on the two halves) against the two passes semiseg makes, to show whether joining pays.

    python benchmarks/gd_step_cost.py --repeats 10 --threads 1
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from semiseg.config import Config, apply_overrides
from semiseg.data.coco import load_coco_instances
from semiseg.data.splits import write_splits
from semiseg.data.synthetic import write_synthetic_dataset
from semiseg.demo import DEFAULT, base_overrides, student_overrides
from semiseg.engine.checkpoint import save_weights
from semiseg.engine.run_dir import close_run_log
from semiseg.models.build import build_model
from semiseg.semi.guided import UNSUP_SUFFIX
from semiseg.training import build_trainer
from semiseg.weights import WeightsInfo

BOUND = 1.05


def build(folder: Path, batch: int):
    """The demo's stage-2 trainer (`semiseg.demo` overrides) on a few built-in images; the teacher is
    the pretrained tiny model with new class layers."""
    settings = dataclasses.replace(DEFAULT, batch_size=batch, num_workers=0)
    data = write_synthetic_dataset(folder / "data", num_train=4 * batch, num_val=2, seed=0,
                                   image_size=settings.image_size)
    (labeled,) = write_splits(data["train_ann"], [50], seed=0, out_dir=folder / "splits", write_unlabeled=True)
    common = base_overrides(settings, data, labeled, "cpu", 0)
    teacher = folder / "teacher.safetensors"
    num_classes = len(load_coco_instances(labeled, data["train_images"]).class_names)
    save_weights(teacher, build_model(apply_overrides(Config(), common).model, num_classes).state_dict(),
                 WeightsInfo(None, [], [], "model"))
    cfg = apply_overrides(Config(), common + student_overrides(
        settings, folder / "run", teacher, labeled.with_name(labeled.stem + "_unlabeled.json"), data["train_images"])
        + ["semi.pseudo_labels.score_threshold=0"])
    try:
        return build_trainer(cfg, torch.device("cpu"), resume=False)
    finally:
        close_run_log()


def medians(steps: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each callable; one warm-up each, then interleaved in alternating order."""
    for step in steps.values():
        step()
    times = {name: [] for name in steps}
    order = list(steps)
    for r in range(repeats):
        for name in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def split_outputs(outputs: dict, n: int) -> tuple[dict, dict]:
    """A joint forward's outputs -> (first n images, the rest), aux outputs included."""
    def cut(value, part):
        if isinstance(value, torch.Tensor):
            return value[:n] if part == 0 else value[n:]
        if isinstance(value, list):
            return [cut(v, part) for v in value]
        if isinstance(value, dict):
            return {k: cut(v, part) for k, v in value.items()}
        return value
    return cut(outputs, 0), cut(outputs, 1)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8, help="labeled and unlabeled images per step (the demo's 8)")
    parser.add_argument("--pseudo-per-image", type=int, default=4,
                        help="pseudo-instances per image: the most confident queries of the untrained teacher "
                             "(default 4, about the built-in dataset's 3.8 objects per image)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build(Path(tmp), args.batch)
        pseudo_labeler = trainer.pseudo_labeler
        trainer.pseudo_labeler = lambda candidates, sizes: [
            p[p.scores.argsort(descending=True)[:args.pseudo_per_image]] for p in pseudo_labeler(candidates, sizes)]
        labeled, unlabeled = trainer.next_batch("labeled"), trainer.next_batch("unlabeled")
        trainer.next_batch = lambda name: labeled if name == "labeled" else unlabeled  # fixed batches
        model, optimizer = trainer.model, trainer.optimizer
        pseudo = trainer.make_pseudo_labels(unlabeled)
        weight = trainer.cfg.semi.unsup_loss_weight

        def supervised():
            optimizer.zero_grad(set_to_none=True)
            sum(model.loss(model(labeled.images, labeled.image_sizes, labeled.targets), labeled.targets).values()).backward()
            optimizer.step()

        def unlabeled_pass():
            optimizer.zero_grad(set_to_none=True)
            outputs = model(unlabeled.strong, unlabeled.image_sizes, pseudo)
            (weight * sum(model.loss(outputs, pseudo).values())).backward()

        def two_passes():
            optimizer.zero_grad(set_to_none=True)
            sup = sum(model.loss(model(labeled.images, labeled.image_sizes, labeled.targets), labeled.targets).values())
            unsup = sum(model.loss(model(unlabeled.strong, unlabeled.image_sizes, pseudo), pseudo).values())
            (sup + weight * unsup).backward()

        def joint_pass():
            optimizer.zero_grad(set_to_none=True)
            n = len(labeled)
            outputs = model(torch.cat([labeled.images, unlabeled.strong]), labeled.image_sizes + unlabeled.image_sizes)
            first, second = split_outputs(outputs, n)
            (sum(model.loss(first, labeled.targets).values())
             + weight * sum(model.loss(second, pseudo).values())).backward()

        if labeled.images.shape[-2:] != unlabeled.strong.shape[-2:]:
            raise SystemExit("labeled and unlabeled batches have different padded sizes: no joint forward")
        times = medians({"supervised": supervised, "teacher": lambda: trainer.make_pseudo_labels(unlabeled),
                         "unlabeled": unlabeled_pass, "GD step": lambda: trainer.run_step(1000),
                         "two passes (fwd+bwd)": two_passes, "one joint pass (fwd+bwd)": joint_pass}, args.repeats)
        assert any(k.endswith(UNSUP_SUFFIX) for k in trainer.forward_losses())
    parts = times["supervised"] + times["teacher"] + times["unlabeled"]
    ratio = times["GD step"] / parts
    lines = [f"tiny Mask2Former, {args.batch} labeled + {args.batch} unlabeled images of 128 px per step, "
             f"{sum(len(p) for p in pseudo) / len(pseudo):.1f} pseudo-instances per image, "
             f"{torch.get_num_threads()} thread(s), median of {args.repeats}", "",
             "| part | seconds |", "|---|---:|"]
    lines += [f"| {name} | {seconds:.3f} |" for name, seconds in times.items()]
    lines += ["", f"GD step / (supervised + teacher + unlabeled) = {ratio:.3f} (bound {BOUND}: "
              f"{'met' if ratio <= BOUND else 'MISSED'})",
              f"one joint pass / two passes = {times['one joint pass (fwd+bwd)'] / times['two passes (fwd+bwd)']:.3f}"]
    report = "\n".join(lines)
    print(report)
    return report


if __name__ == "__main__":
    main()

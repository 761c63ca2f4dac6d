"""Which stage-2 recipe? Re-run stage 2 with other settings on the teachers of a finished benchmark.

For every `pP_sS` folder of a `semi_supervised.py` output (its teacher, splits and 100 % reference
are reused), each variant trains a student with the demo's stage-2 settings plus the variant's
overrides, into `pP_sS/variants/NAME`. The table gives, per variant, the student's mask AP, its
gain over the teacher (paired per seed) and the share of the teacher -> 100 % gap it closes, so
recipes are compared on the same teachers and the same budget.

    python benchmarks/stage2_variants.py runs/bench_gd runs/bench_cells --variants fresh threshold_0.5

Finished variant runs are reused.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from semi_supervised import final_ap, gap_closed, mean_std, timed_train

from semiseg.demo import DemoSettings, base_overrides, student_overrides
from semiseg.errors import SemisegError

# results.json written before a stage-2 setting existed: the value those runs used
RECIPE_BEFORE_SETTING = {"unsup_mask_weight": 1.0, "mask_upsampling": 1}
VARIANTS = {
    "default": [],  # the benchmark's own student
    # the reference's design: a fresh student (pretrained backbone, random head) at stage 1's rate
    "fresh": ["semi.student_init=fresh", "solver.lr=1e-3", "solver.warmup_iters=50", "solver.warmup_factor=0.01"],
    "threshold_0.5": ["semi.pseudo_labels.score_threshold=0.5"],
    "threshold_0.8": ["semi.pseudo_labels.score_threshold=0.8"],
    "no_nms": ["semi.pseudo_labels.nms_iou=1.0"],
    "ema_0.995": ["semi.ema_decay=0.995"],
    "lr_1e-3": ["solver.lr=1e-3"],  # the teacher's rate instead of 3e-4
    "burn_in_150": ["semi.burn_in_iter=150"],
    # three times the demo's stage 2 (the 100 % reference keeps its teacher + student iterations)
    "long_3x": ["solver.max_iter=1800", "solver.steps=[1440]", "train.eval_period=1800"],
    "unsup_1": ["semi.unsup_loss_weight=1.0"],
    "unsup_4": ["semi.unsup_loss_weight=4.0"],
    # unlabeled images: queries no pseudo-label matched are pushed less towards "no object", so the
    # objects a sparse teacher misses (dense scenes) are not taught as background
    "unmatched_0.25": ["semi.unmatched_weight=0.25"],
    # unlabeled images: the pseudo-labels' classes are wrong about half the time where their masks are right
    "unsup_class_0.25": ["semi.unsup_class_weight=0.25"],
    # the teacher's class probabilities as targets instead of its top class
    "soft_classes": ["semi.pseudo_labels.class_targets=soft"],
    # unlabeled images teach classes only: without classes the teachers are close to the 100 % models
    # (benchmarks/class_agnostic_ap.py), and learning their pseudo-masks made the students' outlines worse
    "unsup_mask_0": ["semi.unsup_mask_weight=0"],
    "unsup_mask_1": ["semi.unsup_mask_weight=1"],  # the reference's: the pseudo-masks' shapes taught too
    # the strong view without its Gaussian blur (sigma 0.1-2 px is the reference's for 1024 px canvases)
    "no_blur": ["data.augmentation.strong_blur_p=0"],
    # unlabeled images: objects the teacher is unsure of (confidence between half the threshold and the
    # threshold) are matched but give no loss, instead of being taught as "no object" (Mask2Former 0.7, Mask DINO 0.3)
    "ignore_0.35": ["semi.pseudo_labels.ignore_threshold=0.35"],
    "ignore_0.15": ["semi.pseudo_labels.ignore_threshold=0.15"],
    # pseudo-masks binarised after upsampling the teacher's mask logits to the input canvas (bilinear, as its
    # own inference does), not at 1/4 resolution: a cell of 8-24 px is 2-6 mask pixels there
    "masks_full_res": ["semi.pseudo_labels.mask_upsampling=4"],
    "unsup_mask_1_full_res": ["semi.unsup_mask_weight=1", "semi.pseudo_labels.mask_upsampling=4"],
    "masks_quarter_res": ["semi.pseudo_labels.mask_upsampling=1"],  # the reference's, for the demo's Mask DINO
    # an upper bound of the stage-2 budget: the same schedule with the ground truth of every image (see run_variant)
    "oracle": [],
}


def run_variant(folder: Path, name: str, device: str | None) -> dict:
    """Stage 2 of `variant` on the teacher of one benchmark folder -> its row."""
    demo = json.loads((folder / "results.json").read_text())
    settings = DemoSettings(**{**RECIPE_BEFORE_SETTING, **demo["settings"]})
    data = {k: Path(v) for k, v in demo["dataset"].items()}
    labeled = next((folder / "splits").glob("instances_train_*[0-9].json"))
    unlabeled = labeled.with_name(labeled.stem + "_unlabeled.json")
    run = folder / "student" if name == "default" else folder / "variants" / name  # default: the benchmark's
    teacher = folder / "teacher" / "checkpoints" / "last"
    overrides = (base_overrides(settings, data, labeled, device, demo["seed"])
                 + student_overrides(settings, run, teacher, unlabeled, data["train_images"]) + VARIANTS[name])
    if name == "oracle":  # perfect pseudo-labels: the teacher trained on every training image's ground truth
        overrides += ["semi.enabled=false", f"data.train_ann={data['train_ann']}", f"model.weights={teacher}",
                      f"data.batch_size={2 * settings.batch_size}"]  # the labeled + unlabeled images of a step
    try:
        ap = final_ap(run) or timed_train(overrides, run)[0]
    except SemisegError as err:  # e.g. a variant's threshold that does not fit this model
        raise SystemExit(f"{folder}: variant {name}: {err}") from None
    student = ap.get("student", ap.get("model"))
    row = {"folder": str(folder), "variant": name, "teacher": demo["teacher"]["mask_AP"],
           "full": demo["full"]["mask_AP"], "student": student, "ema_teacher": ap.get("teacher", student)}
    return {**row, "gap_closed": gap_closed(row)}


def summarize(rows: list[dict]) -> str:
    """Markdown table: one line per variant over all folders."""
    lines = ["| variant | runs | student | student - teacher | EMA teacher - teacher | gap closed (%) | wins |",
             "|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == name]
        closed = [r["gap_closed"] for r in rs if r["gap_closed"] is not None]
        lines.append(f"| {name} | {len(rs)} | {mean_std([r['student'] for r in rs])} "
                     f"| {mean_std([r['student'] - r['teacher'] for r in rs])} "
                     f"| {mean_std([r['ema_teacher'] - r['teacher'] for r in rs])} "
                     f"| {mean_std(closed, digits=0) if closed else 'n/a'} "
                     f"| {sum(r['student'] > r['teacher'] for r in rs)}/{len(rs)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    """Run the variants and print (and return) the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmarks", type=Path, nargs="+", help="output folders of semi_supervised.py")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["default", "fresh"])
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    folders = sorted(f for b in args.benchmarks for f in b.glob("p*_s*") if (f / "results.json").is_file())
    if not folders:
        raise SystemExit(f"{', '.join(map(str, args.benchmarks))}: no finished benchmark settings (pP_sS/results.json)")
    rows = [run_variant(folder, name, args.device) for name in args.variants for folder in folders]
    for row in rows:
        print(json.dumps(row))
    table = summarize(rows)
    print(table)
    return table


if __name__ == "__main__":
    main()

"""Does Guided Distillation help? The demo pipeline over labeled shares and seeds, on any COCO dataset.

For every labeled percentage P and seed S:
  teacher  stage 1 on P % of the images (`semiseg demo` settings)
  student  stage 2, Guided Distillation with the other images unlabeled
  control  the same stage 2 with the unlabeled loss weight at 0: the teacher trained for the
           student's extra iterations on the labeled images only (same sampler, schedule, budget)
  100 %    all training images labeled, teacher + student iterations (one per seed)
and the share of the teacher -> 100 % gap that the student closes, (student - teacher) / (100 % - teacher).
On the built-in dataset each seed draws its own dataset; with `--ann` every seed uses the given
dataset and draws its own split and initialisation. Mask AP on the validation images; mean ± std
over seeds and paired gains go to `summary.json` and are printed as a markdown table.

    python benchmarks/semi_supervised.py --out runs/bench_gd                  # built-in, 10 %, seeds 0 1 2
    python benchmarks/semi_supervised.py --out runs/bench_gd_md --model maskdino
    python benchmarks/shape_datasets.py --kind cells --out data/cells         # or any COCO dataset:
    python benchmarks/semi_supervised.py --out runs/bench_cells --ann data/cells/annotations/instances_train.json \
        --images data/cells/train --val-ann data/cells/annotations/instances_val.json --val-images data/cells/val

Finished runs are reused, so an interrupted benchmark continues where it stopped; `OUT/settings.json`
records the settings, and a later invocation with other settings is refused.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch

from semiseg.config import Config, apply_overrides
from semiseg.demo import DemoSettings, base_overrides, default_settings, run_pipeline, student_overrides
from semiseg.models.registry import META_ARCHITECTURES
from semiseg.training import train


def final_ap(run: Path) -> dict[str, float] | None:
    """{model name: mask AP} of the last evaluation of a finished run, None if it has none."""
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return None
    evals = [json.loads(line)["eval"] for line in metrics.read_text().splitlines() if '"eval"' in line]
    return {name: m["segm"]["AP"] for name, m in evals[-1].items()} if evals else None


def timed_train(overrides: list[str], output_dir: Path) -> tuple[dict[str, float], float]:
    """Train (unless a finished run is there) -> (final mask APs, seconds spent now)."""
    done = final_ap(output_dir)
    if done is not None:
        return done, 0.0
    start = time.perf_counter()
    train(apply_overrides(Config(), overrides + [f"train.output_dir={output_dir}", "train.overwrite=true"]))
    return final_ap(output_dir), time.perf_counter() - start


def one_setting(out: Path, settings: DemoSettings, seed: int, device: str | None,
                dataset: dict[str, Path] | None) -> dict:
    """Teacher, student, EMA teacher, control and 100 % reference of one (percent, seed)."""
    folder = out / f"p{settings.percent:g}_s{seed}"
    if (folder / "results.json").is_file():
        demo = json.loads((folder / "results.json").read_text())
    else:
        if folder.exists():  # an interrupted demo: start that setting again
            shutil.rmtree(folder)
        # the 100 % reference depends on the seed only (and, built in, on the seed's dataset)
        demo = run_pipeline(folder, settings, device=device, seed=seed, dataset=dataset,
                            reference_dir=out / f"full_s{seed}")
    data = {k: Path(v) for k, v in demo["dataset"].items()}
    labeled = next((folder / "splits").glob("instances_train_*[0-9].json"))
    unlabeled = labeled.with_name(labeled.stem + "_unlabeled.json")
    control, control_seconds = timed_train(
        base_overrides(settings, data, labeled, device, seed)
        + student_overrides(settings, folder / "control", folder / "teacher" / "checkpoints" / "last", unlabeled,
                            data["train_images"])
        + ["semi.unsup_loss_weight=0"], folder / "control")
    return {"percent": settings.percent, "seed": seed, "teacher": demo["teacher"]["mask_AP"],
            "student": demo["student"]["mask_AP"], "ema_teacher": demo["ema_teacher"]["mask_AP"],
            "control": control["student"], "full": demo["full"]["mask_AP"],
            "demo_seconds": demo["elapsed_seconds"], "control_seconds": control_seconds}


def claim_out_dir(out: Path, settings: DemoSettings, dataset: dict[str, Path] | None) -> None:
    """Record the settings (and dataset) of the runs in `out`; exit with one line if they were made with others."""
    record = out / "settings.json"
    wanted = {**dataclasses.asdict(settings), "dataset": {k: str(v) for k, v in (dataset or {}).items()} or "builtin"}
    if record.is_file():
        used = json.loads(record.read_text())
        changed = sorted(k for k in wanted.keys() | used.keys() if wanted.get(k) != used.get(k))
        if changed:
            raise SystemExit(f"{record}: the runs here used other settings ({', '.join(changed)}); "
                             "choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(wanted, indent=2))


def mean_std(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def gap_closed(row: dict) -> float | None:
    """(student - teacher) / (100 % - teacher) in %, None when the reference is not above the teacher."""
    gap = row["full"] - row["teacher"]
    return 100 * (row["student"] - row["teacher"]) / gap if gap > 0 else None


def summarize(rows: list[dict]) -> str:
    """Markdown table: one line per percentage, mean ± std over seeds, paired gains and the gap closed."""
    lines = ["| labeled | seeds | teacher | student (GD) | EMA teacher | control (same budget, labels only) "
             "| 100 % | student - teacher | EMA teacher - teacher | student - control | gap closed (%) "
             "| student > teacher, > control |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for percent in sorted({r["percent"] for r in rows}):
        rs = [r for r in rows if r["percent"] == percent]
        cells = [mean_std([r[k] for r in rs]) for k in ("teacher", "student", "ema_teacher", "control", "full")]
        gains = [mean_std([r[a] - r[b] for r in rs])
                 for a, b in (("student", "teacher"), ("ema_teacher", "teacher"), ("student", "control"))]
        closed = [c for c in map(gap_closed, rs) if c is not None]
        wins = (f"{sum(r['student'] > r['teacher'] for r in rs)}/{len(rs)}, "
                f"{sum(r['student'] > r['control'] for r in rs)}/{len(rs)}")
        lines.append(f"| {percent:g} % | {len(rs)} | " + " | ".join(cells + gains) +
                     f" | {mean_std(closed, digits=0) if closed else 'n/a'} | {wins} |")
    return "\n".join(lines)


def parse_dataset(args: argparse.Namespace) -> dict[str, Path] | None:
    """The --ann dataset's paths, None for the built-in one; exits with one line on a missing file."""
    given = {"train_ann": args.ann, "train_images": args.images, "val_ann": args.val_ann,
             "val_images": args.val_images or args.images}
    if args.ann is None:
        if any(v is not None for v in (args.images, args.val_ann, args.val_images)):
            raise SystemExit("--images, --val-ann and --val-images go with --ann")
        return None
    for key, path in given.items():
        if path is None:
            raise SystemExit(f"--ann needs --{key.replace('train_', '').replace('_', '-')} too")
    for path in given.values():
        if not path.exists():
            raise SystemExit(f"{path}: no such file or folder")
    return {k: v.resolve() for k, v in given.items()}


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark; returns the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--percents", type=float, nargs="+", default=[10])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model", choices=list(META_ARCHITECTURES), default="mask2former")
    parser.add_argument("--ann", type=Path, help="training COCO json (default: the built-in dataset)")
    parser.add_argument("--images", type=Path, help="training image folder (with --ann)")
    parser.add_argument("--val-ann", type=Path, help="validation COCO json (with --ann)")
    parser.add_argument("--val-images", type=Path, help="validation image folder (default: --images)")
    parser.add_argument("--quick", action="store_true", help="the demo's --quick settings (a smoke run)")
    parser.add_argument("--teacher-iters", type=int, default=None, help="stage-1 iterations instead of the demo's")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    dataset = parse_dataset(args)
    base = default_settings(args.model, args.quick)
    if args.teacher_iters is not None:
        base = dataclasses.replace(base, teacher_iters=args.teacher_iters)
    claim_out_dir(args.out, base, dataset)
    start = time.perf_counter()
    rows = [one_setting(args.out, dataclasses.replace(base, percent=percent), seed, args.device, dataset)
            for seed in args.seeds for percent in args.percents]
    table = summarize(rows)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
               f"{torch.get_num_threads()} torch threads, device {args.device or 'auto'}")
    summary = {"settings": dataclasses.asdict(base), "dataset": str(args.ann or "builtin"), "rows": rows,
               "machine": machine, "wall_seconds": round(time.perf_counter() - start, 1), "table": table}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(table)
    print(f"\nmachine: {machine}; wall time of this invocation: {summary['wall_seconds']:.0f} s")
    return table


if __name__ == "__main__":
    main()

"""Does Guided Distillation help on the built-in dataset? The demo pipeline over labeled shares and seeds.

For every labeled percentage P and seed S (each seed draws its own dataset, split and initialisation):
  teacher  stage 1 on P % of the images (`semiseg demo` settings)
  student  stage 2, Guided Distillation with the other images unlabeled
  control  the same stage 2 with the unlabeled loss weight at 0: the teacher trained for the
           student's extra iterations on the labeled images only (same sampler, schedule, budget)
and, per seed, the upper reference: all training images labeled, teacher + student iterations.
Mask AP on the validation images; mean ± std over seeds go to `summary.json` and are printed as a
markdown table (with the machine and the wall time).

    python benchmarks/semi_supervised.py --out runs/bench_gd                  # 5 % and 10 %, seeds 0 1 2
    python benchmarks/semi_supervised.py --out runs/bench_gd --percents 10 --seeds 0
    python benchmarks/semi_supervised.py --out runs/bench_gd_maskdino --model maskdino --no-full
    python benchmarks/semi_supervised.py --out runs/bench_gd_md2k --model maskdino --no-full --teacher-iters 2000

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
from semiseg.demo import (DemoSettings, base_overrides, default_settings, run_pipeline, student_overrides,
                          teacher_overrides)
from semiseg.engine.train import train


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


def one_setting(out: Path, settings: DemoSettings, seed: int, device: str | None) -> dict:
    """Teacher, student and control of one (percent, seed)."""
    folder = out / f"p{settings.percent:g}_s{seed}"
    if (folder / "results.json").is_file():
        demo = json.loads((folder / "results.json").read_text())
    else:
        if folder.exists():  # an interrupted demo: start that setting again
            shutil.rmtree(folder)
        demo = run_pipeline(folder, settings, device=device, seed=seed)
    data = {"train_images": folder / "data" / "train", "val_ann": folder / "data" / "annotations" / "instances_val.json",
            "val_images": folder / "data" / "val"}
    labeled = next((folder / "splits").glob("instances_train_*[0-9].json"))
    unlabeled = labeled.with_name(labeled.stem + "_unlabeled.json")
    control, control_seconds = timed_train(
        base_overrides(settings, data, labeled, device, seed)
        + student_overrides(settings, folder / "control", folder / "teacher" / "checkpoints" / "last", unlabeled,
                            data["train_images"])
        + ["semi.unsup_loss_weight=0"], folder / "control")
    return {"percent": settings.percent, "seed": seed, "teacher": demo["teacher"]["mask_AP"],
            "student": demo["student"]["mask_AP"], "ema_teacher": demo["ema_teacher"]["mask_AP"],
            "control": control["student"], "demo_seconds": demo["elapsed_seconds"], "control_seconds": control_seconds}


def upper_reference(out: Path, settings: DemoSettings, seed: int, device: str | None) -> dict:
    """All training images labeled, for the teacher's + the student's iterations (data of the first percent)."""
    folder = next(out.glob(f"p*_s{seed}"))
    data = {"train_images": folder / "data" / "train", "val_ann": folder / "data" / "annotations" / "instances_val.json",
            "val_images": folder / "data" / "val"}
    budget = dataclasses.replace(settings, teacher_iters=settings.teacher_iters + settings.student_iters)
    ap, seconds = timed_train(base_overrides(settings, data, folder / "data" / "annotations" / "instances_train.json",
                                             device, seed) + teacher_overrides(budget, out / f"full_s{seed}"),
                              out / f"full_s{seed}")
    return {"seed": seed, "full": ap["model"], "seconds": seconds}


def claim_out_dir(out: Path, settings: DemoSettings) -> None:
    """Record the settings of the runs in `out`; exit with one line if they were made with others."""
    record = out / "settings.json"
    wanted = dataclasses.asdict(settings)
    if record.is_file():
        used = json.loads(record.read_text())
        changed = sorted(k for k in wanted.keys() | used.keys() if wanted.get(k) != used.get(k))
        if changed:
            raise SystemExit(f"{record}: the runs here used other settings ({', '.join(changed)}); "
                             "choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(wanted, indent=2))


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def summarize(rows: list[dict], full: list[dict]) -> str:
    """Markdown table: one line per percentage, mean ± std over seeds."""
    lines = ["| labeled | seeds | teacher | student (GD) | EMA teacher | control (same budget, labels only) "
             "| student - teacher | EMA teacher - teacher | student - control |",
             "|---|---|---|---|---|---|---|---|---|"]
    for percent in sorted({r["percent"] for r in rows}):
        rs = [r for r in rows if r["percent"] == percent]
        cells = [mean_std([r[k] for r in rs]) for k in ("teacher", "student", "ema_teacher", "control")]
        gains = [mean_std([r[a] - r[b] for r in rs])
                 for a, b in (("student", "teacher"), ("ema_teacher", "teacher"), ("student", "control"))]
        lines.append(f"| {percent:g} % | {len(rs)} | " + " | ".join(cells + gains) + " |")
    if full:
        lines.append(f"| 100 % (upper reference) | {len(full)} | {mean_std([f['full'] for f in full])} | | | | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--percents", type=float, nargs="+", default=[5, 10])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-full", action="store_true", help="skip the 100 %%-labeled upper reference")
    parser.add_argument("--model", choices=["mask2former", "maskdino"], default="mask2former")
    parser.add_argument("--quick", action="store_true", help="the demo's --quick settings (a smoke run)")
    parser.add_argument("--teacher-iters", type=int, default=None,
                        help="stage-1 iterations instead of the demo's")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    base = default_settings(args.model, args.quick)
    if args.teacher_iters is not None:
        base = dataclasses.replace(base, teacher_iters=args.teacher_iters)
    claim_out_dir(args.out, base)
    start = time.perf_counter()
    rows, full = [], []
    for seed in args.seeds:
        for percent in args.percents:
            rows.append(one_setting(args.out, dataclasses.replace(base, percent=percent), seed, args.device))
        if not args.no_full:
            full.append(upper_reference(args.out, base, seed, args.device))
    table = summarize(rows, full)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
               f"{torch.get_num_threads()} torch threads, device {args.device or 'auto'}")
    summary = {"settings": dataclasses.asdict(base), "rows": rows, "full": full, "machine": machine,
               "wall_seconds": round(time.perf_counter() - start, 1), "table": table}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(table)
    print(f"\nmachine: {machine}; wall time of this invocation: {summary['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()

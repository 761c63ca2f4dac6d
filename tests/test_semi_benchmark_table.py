"""benchmarks/semi_supervised.py: the table (means, spreads, paired gains, gap closed), the guard of its --out,
and a quick run on a COCO dataset given with --ann."""
import json

import pytest
from benchmark_scripts import benchmark_script

from semiseg.data.synthetic import write_synthetic_dataset


def test_table_reports_mean_std_paired_gains_and_the_gap_closed():
    rows = [{"percent": 10, "teacher": 20.0, "student": 21.0, "ema_teacher": 21.5, "control": 19.0, "full": 30.0},
            {"percent": 10, "teacher": 24.0, "student": 25.0, "ema_teacher": 24.5, "control": 24.0, "full": 29.0},
            {"percent": 5, "teacher": 14.0, "student": 13.5, "ema_teacher": 14.5, "control": 14.0, "full": 30.0}]
    with benchmark_script("semi_supervised") as bench:
        lines = bench.summarize(rows).splitlines()
    assert lines[2] == "| 5 % | 1 | 14.00 | 13.50 | 14.50 | 14.00 | 30.00 | -0.50 | 0.50 | -0.50 | -3 | 0/1, 0/1 |"
    # seeds differ by 4 AP, but each seed's student is exactly 1 AP above its teacher: gain 1.00 ± 0.00;
    # the gaps are 10 and 5 AP, so the student closes 10 % and 20 % of them
    assert lines[3] == ("| 10 % | 2 | 22.00 ± 2.83 | 23.00 ± 2.83 | 23.00 ± 2.12 | 21.50 ± 3.54 | 29.50 ± 0.71 "
                        "| 1.00 ± 0.00 | 1.00 ± 0.71 | 1.50 ± 0.71 | 15 ± 7 | 2/2, 2/2 |")


def test_gap_closed_is_undefined_when_the_reference_is_not_above_the_teacher():
    with benchmark_script("semi_supervised") as bench:
        assert bench.gap_closed({"teacher": 20.0, "student": 21.0, "full": 20.0}) is None
        assert bench.summarize([{"percent": 10, "teacher": 20.0, "student": 21.0, "ema_teacher": 20.0,
                                 "control": 20.0, "full": 19.0}]).splitlines()[2].endswith("| n/a | 1/1, 1/1 |")


def test_out_dir_with_runs_of_other_settings_is_refused(tmp_path):
    with benchmark_script("semi_supervised") as bench:
        settings = bench.default_settings("maskdino")
        bench.claim_out_dir(tmp_path, settings, None)
        bench.claim_out_dir(tmp_path, settings, None)  # same settings: the runs are reused
        shorter = bench.dataclasses.replace(settings, teacher_iters=1000)
        with pytest.raises(SystemExit, match=r"settings\.json: the runs here used other settings \(teacher_iters\)"):
            bench.claim_out_dir(tmp_path, shorter, None)
        with pytest.raises(SystemExit, match=r"other settings \(dataset\)"):
            bench.claim_out_dir(tmp_path, settings, {"train_ann": tmp_path / "other.json"})


def test_ann_without_its_images_is_one_line(tmp_path):
    with benchmark_script("semi_supervised") as bench, pytest.raises(SystemExit, match="--ann needs --images too"):
        bench.main(["--out", str(tmp_path / "b"), "--ann", str(tmp_path / "a.json")])


def test_quick_benchmark_on_a_coco_dataset_given_with_ann(tmp_path):
    data = write_synthetic_dataset(tmp_path / "data", num_train=20, num_val=4, seed=5, image_size=64)
    out = tmp_path / "bench"
    args = ["--out", str(out), "--quick", "--seeds", "0", "--device", "cpu", "--ann", str(data["train_ann"]),
            "--images", str(data["train_images"]), "--val-ann", str(data["val_ann"]),
            "--val-images", str(data["val_images"])]
    with benchmark_script("semi_supervised") as bench:
        table = bench.main(args)
        assert bench.main(args) == table  # finished runs are reused
        with benchmark_script("stage2_variants") as variants:  # the oracle: the same stage 2 with every label
            oracle = variants.main([str(out), "--variants", "oracle", "--device", "cpu"])
            variants.VARIANTS["too_high"] = ["semi.pseudo_labels.ignore_threshold=0.9"]  # above Mask2Former's 0.7
            with pytest.raises(SystemExit, match=r"p10_s0: variant too_high: .*ignore_threshold=0.9: expected a value below"):
                variants.main([str(out), "--variants", "too_high", "--device", "cpu"])
    summary = json.loads((out / "summary.json").read_text())
    (row,) = summary["rows"]
    assert row["percent"] == 10 and all(0.0 <= row[k] <= 100.0 for k in ("teacher", "student", "control", "full"))
    assert summary["dataset"] == str(data["train_ann"])
    assert (out / "full_s0" / "checkpoints" / "last").is_dir()  # the seed's 100 % reference
    assert not (out / "p10_s0" / "data").exists()  # the given dataset is used, not a built-in one
    assert table.splitlines()[2].startswith("| 10 % | 1 |")
    assert oracle.splitlines()[2].startswith("| oracle | 1 |")
    assert '"eval"' in (out / "p10_s0" / "variants" / "oracle" / "metrics.jsonl").read_text()

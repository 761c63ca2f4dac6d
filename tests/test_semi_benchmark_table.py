"""benchmarks/semi_supervised.py: the table (means, spreads, paired gains over seeds) and the guard of its --out."""
import pytest
from benchmark_scripts import benchmark_script


def test_table_reports_mean_std_and_paired_gains():
    rows = [{"percent": 10, "teacher": 20.0, "student": 21.0, "ema_teacher": 21.5, "control": 19.0},
            {"percent": 10, "teacher": 24.0, "student": 25.0, "ema_teacher": 24.5, "control": 24.0},
            {"percent": 5, "teacher": 14.0, "student": 13.5, "ema_teacher": 14.5, "control": 14.0}]
    with benchmark_script("semi_supervised") as bench:
        lines = bench.summarize(rows, [{"full": 33.0}, {"full": 35.0}]).splitlines()
    assert lines[2] == "| 5 % | 1 | 14.00 | 13.50 | 14.50 | 14.00 | -0.50 | 0.50 | -0.50 |"
    # seeds differ by 4 AP, but each seed's student is exactly 1 AP above its teacher: gain 1.00 ± 0.00
    assert lines[3] == ("| 10 % | 2 | 22.00 ± 2.83 | 23.00 ± 2.83 | 23.00 ± 2.12 | 21.50 ± 3.54 "
                        "| 1.00 ± 0.00 | 1.00 ± 0.71 | 1.50 ± 0.71 |")
    assert lines[4].startswith("| 100 % (upper reference) | 2 | 34.00 ± 1.41 |")


def test_out_dir_with_runs_of_other_settings_is_refused(tmp_path):
    with benchmark_script("semi_supervised") as bench:
        settings = bench.default_settings("maskdino")
        bench.claim_out_dir(tmp_path, settings)
        bench.claim_out_dir(tmp_path, settings)  # same settings: the runs are reused
        shorter = bench.dataclasses.replace(settings, teacher_iters=1000)
        with pytest.raises(SystemExit, match=r"settings\.json: the runs here used other settings \(teacher_iters\)"):
            bench.claim_out_dir(tmp_path, shorter)

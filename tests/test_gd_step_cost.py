"""Smoke test of benchmarks/gd_step_cost.py (keeps the script from rotting; the bound is a benchmark, not a test)."""
import re

from benchmark_scripts import benchmark_script


def test_report_has_every_part_and_both_ratios():
    with benchmark_script("gd_step_cost") as module:
        report = module.main(["--repeats", "1", "--batch", "2"])
    parts = dict(re.findall(r"^\| ([^|]+) \| ([\d.]+) \|$", report, flags=re.M))
    assert set(parts) == {"supervised", "teacher", "unlabeled", "GD step", "two passes (fwd+bwd)",
                          "one joint pass (fwd+bwd)"}
    assert all(float(v) > 0 for v in parts.values())
    ratio = float(re.search(r"GD step / \(supervised \+ teacher \+ unlabeled\) = ([\d.]+)", report)[1])
    expected = float(parts["GD step"]) / sum(float(parts[k]) for k in ("supervised", "teacher", "unlabeled"))
    assert abs(ratio - expected) < 0.02  # the table rounds each part to 1 ms
    assert "4.0 pseudo-instances per image" in report

"""`semiseg demo --quick`: the whole pipeline end to end, its outputs, and its refusals."""
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from semiseg.cli import main
from semiseg.demo import DEFAULT, QUICK, default_settings, finish_reference, format_table, run_demo
from semiseg.errors import ConfigError


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    return out, run_demo(out, quick=True, device="cpu", seed=3)


def test_quick_demo_runs_the_pipeline_and_writes_results(demo):
    out, results = demo
    assert json.loads((out / "results.json").read_text()) == results
    assert results["labeled_images"] == QUICK.num_train * QUICK.percent // 100
    assert results["labeled_images"] + results["unlabeled_images"] == QUICK.num_train
    for model in ("teacher", "student", "ema_teacher", "full"):
        assert 0.0 <= results[model]["mask_AP"] <= 100.0
    assert results["gain"] == pytest.approx(results["student"]["mask_AP"] - results["teacher"]["mask_AP"])
    gap = results["full"]["mask_AP"] - results["teacher"]["mask_AP"]
    assert results["gap_closed"] == (pytest.approx(results["gain"] / gap) if gap > 0 else None)
    reference = yaml.safe_load((out / "reference" / "config.yaml").read_text())  # all labels, both stages' budget
    assert Path(reference["data"]["train_ann"]) == out / "data" / "annotations" / "instances_train.json"
    assert reference["solver"]["max_iter"] == QUICK.teacher_iters + QUICK.student_iters
    assert (out / "reference" / "console.txt").is_file()
    assert len(results["overlays"]) == QUICK.num_overlays and all((out / p).is_file() for p in results["overlays"])
    assert (out / "teacher" / "checkpoints" / "last" / "model.safetensors").is_file()
    assert {p.name for p in (out / "student" / "checkpoints" / "last").glob("*.safetensors")} == \
        {"student.safetensors", "teacher.safetensors"}
    student_log = [json.loads(line) for line in (out / "student" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_ce_unsup" in r for r in student_log)
    student = yaml.safe_load((out / "student" / "config.yaml").read_text())  # unlabeled images teach classes only
    assert student["semi"]["unsup_mask_weight"] == QUICK.unsup_mask_weight == 0.0
    masks = [r["loss_mask_unsup"] for r in student_log if "loss_mask_unsup" in r]
    assert masks and not any(masks)
    table = format_table(results)
    assert "teacher (4 labeled images)" in table and f"{results['gain']:+7.2f}" in table
    assert "100 % reference (all 40 images labeled)" in table and "of the teacher -> 100 % gap" in table


def test_existing_output_folder_is_never_overwritten(demo, capsys):
    out, _ = demo
    before = (out / "results.json").read_text()
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "results.json").read_text() == before


def test_quick_maskdino_demo_runs_guided_distillation_with_boxes(tmp_path):
    results = run_demo(tmp_path / "md", model="maskdino", quick=True, device="cpu", seed=1)
    assert results["model"] == "maskdino" and results["settings"]["model"] == "maskdino"
    assert 0.0 <= results["student"]["mask_AP"] <= 100.0
    student_log = [json.loads(line) for line in (tmp_path / "md" / "student" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_bbox_unsup" in r for r in student_log)
    student = yaml.safe_load((tmp_path / "md" / "student" / "config.yaml").read_text())
    assert student["semi"]["pseudo_labels"]["mask_upsampling"] == 4 and student["semi"]["unsup_mask_weight"] == 1.0


def test_failed_reference_training_is_one_line_naming_its_log(tmp_path):
    run = tmp_path / "reference"
    run.mkdir()
    (run / "console.txt").write_text("train: 3/30\nDataError: x.json: no images\n")
    with pytest.raises(ConfigError, match=r"console.txt: the 100 % reference training failed: DataError: x.json"):
        finish_reference(None, run)


def test_unknown_demo_model_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--quick", "--model", "yolo", "--out", str(tmp_path / "x")])
    assert "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_maskdino_demo_trains_its_slower_teacher_longer_and_keeps_full_resolution_unlabeled_mask_terms():
    assert default_settings("mask2former") == DEFAULT and DEFAULT.unsup_mask_weight == 0.0
    assert DEFAULT.mask_upsampling == 1
    assert default_settings("maskdino") == dataclasses.replace(DEFAULT, model="maskdino", teacher_iters=2000,
                                                               unsup_mask_weight=1.0, mask_upsampling=4)
    assert default_settings("maskdino", quick=True) == dataclasses.replace(QUICK, model="maskdino",
                                                                           unsup_mask_weight=1.0, mask_upsampling=4)

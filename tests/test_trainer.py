"""The training loop on a tiny deterministic problem: learning, non-finite losses, run dir, best checkpoint."""
import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
import torch
from engine_doubles import parameters, toy_config, toy_trainer

from semiseg.engine.checkpoint import STATE_FILE
from semiseg.weights import read_weights
from semiseg.engine.trainer import Trainer, metric_value
from semiseg.errors import ConfigError, TrainingError
from semiseg.evaluation import SUMMARY_KEYS
from semiseg.structures import Instances


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_loss_decreases_and_metrics_are_logged(tmp_path):
    trainer = toy_trainer(toy_config(tmp_path / "run", "solver.max_iter=16", "train.log_period=4"))
    trainer.train()
    records = read_metrics(tmp_path / "run")
    assert [r["iteration"] for r in records] == [4, 8, 12, 16]
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]
    first = records[0]
    assert first["loss"] == pytest.approx(first["loss_ce"] + first["loss_smooth"])
    assert first["lr"] == pytest.approx(0.01) and first["skipped_steps"] == 0 and first["time"] > 0
    assert any((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "run" / "checkpoints" / "last" / "model.safetensors").is_file()


def test_nonfinite_loss_stops_with_the_iteration_and_every_term(tmp_path):
    trainer = toy_trainer(toy_config(tmp_path / "run"))
    trainer.model.poison = {3}  # the third loss call = iteration 2
    with pytest.raises(TrainingError) as e:
        trainer.train()
    message = str(e.value)
    assert "non-finite loss at iteration 2" in message and "\n" not in message
    assert "loss_ce=nan" in message and "loss_smooth=" in message and "train.on_nonfinite=skip" in message


def test_nonfinite_loss_skips_the_step_when_asked(tmp_path):
    snapshots = {}

    class Recording(Trainer):
        def before_step(self, iteration):
            snapshots[iteration] = parameters(self.model)

    cfg = toy_config(tmp_path / "run", "train.on_nonfinite=skip", "train.log_period=1")
    base = toy_trainer(cfg)
    trainer = Recording(cfg, base.model, base.streams, base.run, base.device, base.info)
    trainer.model.poison = {3}
    trainer.train()
    assert trainer.skipped_steps == 1
    same = [torch.equal(snapshots[2][k], snapshots[3][k]) for k in snapshots[2]]
    assert all(same)  # the skipped iteration 2 changed nothing
    assert not all(torch.equal(snapshots[1][k], snapshots[2][k]) for k in snapshots[1])
    records = read_metrics(tmp_path / "run")
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1, 1]
    assert records[2]["loss"] is None
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    big = toy_trainer(toy_config(tmp_path / "big", "data.batch_size=4"))
    big.train()
    accum = toy_trainer(toy_config(tmp_path / "accum", "data.batch_size=2", "solver.grad_accum=2"))
    accum.train()
    a, b = parameters(big.model), parameters(accum.model)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert accum.streams["labeled"].position == 12


def test_non_empty_run_dir_is_refused_unless_resume_or_overwrite(tmp_path):
    run = tmp_path / "run"
    toy_trainer(toy_config(run, "solver.max_iter=2")).train()
    with pytest.raises(ConfigError) as e:
        toy_trainer(toy_config(run, "solver.max_iter=2"))
    assert str(run) in str(e.value) and "--resume" in str(e.value) and "train.overwrite=true" in str(e.value)

    (run / "notes.txt").write_text("mine")
    toy_trainer(toy_config(run, "solver.max_iter=2", "train.overwrite=true"))
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]  # only semiseg's own files were removed


def test_best_checkpoint_is_chosen_on_the_evaluation_just_computed(tmp_path):
    scripted = iter([10.0, 30.0, 20.0])
    evaluated = {}

    def evaluate(model):
        evaluated[len(evaluated) + 1] = parameters(model)
        ap = next(scripted)
        return {"segm": {**dict.fromkeys(SUMMARY_KEYS, ap / 2), "AP": ap, "per_class": {}},
                "bbox": {**dict.fromkeys(SUMMARY_KEYS, 0.0), "per_class": {}}}

    trainer = toy_trainer(toy_config(tmp_path / "run", "train.eval_period=2"), evaluate=evaluate)
    trainer.train()
    best = tmp_path / "run" / "checkpoints" / "best"
    state = torch.load(best / STATE_FILE, weights_only=True)
    assert state["iteration"] == 4 and state["best_metric"] == 30.0 and state["best_iteration"] == 4
    tensors, _ = read_weights(best / "model.safetensors")
    assert all(torch.equal(tensors[k], evaluated[2][k]) for k in tensors)  # the weights that scored 30
    assert not all(torch.equal(tensors[k], evaluated[3][k]) for k in tensors)
    evals = [r for r in read_metrics(tmp_path / "run") if "eval" in r]
    assert [(r["iteration"], r["eval"]["model"]["segm"]["AP"]) for r in evals] == [(2, 10.0), (4, 30.0), (6, 20.0)]


def test_metric_value_reads_dotted_keys():
    metrics = {"segm": {"AP": 12.5, "APs": float("nan")}}
    assert metric_value(metrics, "segm.AP") == 12.5
    assert metric_value(metrics, "segm.APs") is None
    assert metric_value(metrics, "bbox.AP") is None


# ----------------------------------------------------------------- the real tiny Mask2Former, end to end
REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "synthetic_mask2former_tiny.yaml"


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from semiseg.data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("synth") / "data", num_train=12, num_val=4, seed=0,
                                   image_size=64)


def tiny_run(synth, run, *extra):
    """Overrides that point the shipped tiny config at the test dataset and shrink it further."""
    return [f"data.train_ann={synth['train_ann']}", f"data.train_images={synth['train_images']}",
            f"data.val_ann={synth['val_ann']}", f"data.val_images={synth['val_images']}",
            f"train.output_dir={run}", "train.device=cpu", "solver.max_iter=4", "train.eval_period=4",
            "train.log_period=2", "data.batch_size=2", "data.num_workers=0", "data.augmentation.image_size=64",
            "data.augmentation.test_short_edge=64", "data.augmentation.test_max_size=64",
            "model.mask2former.train_num_points=256", *extra]


def test_cli_train_then_eval_with_the_real_tiny_mask2former(synth, tmp_path, capsys):
    from semiseg.cli import main

    run = tmp_path / "run"
    assert main(["train", "--config", str(TINY_CONFIG), *tiny_run(synth, run)]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["num_classes"] == 8 and saved["model"]["mask2former"]["num_classes"] == 8
    records = read_metrics(run)
    train_records = [r for r in records if "loss" in r]
    assert [r["iteration"] for r in train_records] == [2, 4]
    assert all(math.isfinite(r["loss"]) and r["loss_ce_0"] > 0 for r in train_records)
    final_eval = [r for r in records if "eval" in r][-1]["eval"]["model"]
    assert (run / "checkpoints" / "last" / "model.safetensors").is_file()
    assert "semiseg" in (run / "log.txt").read_text()

    out = tmp_path / "metrics.json"
    assert main(["eval", "--weights", str(run / "checkpoints" / "last"), "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())["model"]
    assert metrics["segm"]["AP"] == pytest.approx(final_eval["segm"]["AP"])  # same weights, same val set
    assert metrics["bbox"]["AP50"] == pytest.approx(final_eval["bbox"]["AP50"])
    assert "AP50" in capsys.readouterr().out

    assert main(["train", "--config", str(TINY_CONFIG), *tiny_run(synth, run)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("semiseg: error:") and "--resume" in error and "\n" not in error
    assert main(["train", "--config", str(TINY_CONFIG), *tiny_run(synth, tmp_path / "r2", "solver.lrr=1")]) == 2
    assert "did you mean 'solver.lr'?" in capsys.readouterr().err


class GroundTruthOracle(torch.nn.Module):
    """A "model" whose predictions are the ground truth of the image it is shown (score 1)."""

    def __init__(self, records):
        super().__init__()
        from semiseg.data.images import read_image
        from semiseg.data.masks import decode_segmentation

        self.table = {}
        for r in records.records:
            image = read_image(r.file_name)
            h, w = image.shape[:2]
            kept = [a for a in r.annotations if not a.iscrowd]
            masks = torch.zeros(len(kept), h, w, dtype=torch.bool)
            for i, a in enumerate(kept):
                masks[i] = torch.from_numpy(decode_segmentation(a.segmentation, h, w))
            labels = torch.tensor([a.label for a in kept], dtype=torch.long)
            self.table[image.tobytes()] = Instances.from_masks(labels, masks, torch.ones(len(kept)))

    def forward(self, images, image_sizes, targets=None):
        return {"images": images}

    def predict(self, outputs, image_sizes, orig_sizes):
        return [self.table[image[:, :h, :w].permute(1, 2, 0).numpy().tobytes()]
                for image, (h, w) in zip(outputs["images"], image_sizes)]


def test_evaluate_model_scores_100_for_ground_truth_predictions(synth):
    from semiseg.config import Config, apply_overrides
    from semiseg.data.coco import load_coco_instances
    from semiseg.engine.evaluate import build_eval_data, evaluate_model

    cfg = apply_overrides(Config(), ["data.augmentation.test_short_edge=64", "data.augmentation.test_max_size=64",
                                     "data.num_workers=0"])
    records = load_coco_instances(synth["val_ann"], synth["val_images"])
    loader, evaluator = build_eval_data(cfg, synth["val_ann"], synth["val_images"], records.class_names)
    metrics = evaluate_model(GroundTruthOracle(records), loader, evaluator, torch.device("cpu"))
    assert metrics["segm"]["AP"] == pytest.approx(100.0) and metrics["bbox"]["AP"] == pytest.approx(100.0)
    with pytest.raises(ConfigError, match="differ from the model's classes"):
        build_eval_data(cfg, synth["val_ann"], synth["val_images"], ["a", "b"])


def test_images_skipped_in_loader_workers_reach_the_log_metrics_and_the_end_summary(synth, tmp_path):
    from semiseg.config import apply_overrides, load_config
    from semiseg.training import train

    images = tmp_path / "images"
    shutil.copytree(synth["train_images"], images)
    broken = sorted(images.glob("*.png"))[::2]  # half of them: a 4-iteration run meets some
    for path in broken:
        path.write_bytes(path.read_bytes()[:60])  # truncated
    run = tmp_path / "run"
    train(apply_overrides(load_config(TINY_CONFIG), tiny_run(synth, run, "data.num_workers=1", "solver.max_iter=6",
                                                             f"data.train_images={images}")))
    last = [r for r in read_metrics(run) if "loss" in r][-1]
    assert 1 <= last["skipped_images_labeled"] <= len(broken)
    log = (run / "log.txt").read_text()
    assert f"end of training: {last['skipped_images_labeled']} unreadable labeled image(s) skipped so far" in log
    assert any(f"first: {p}" in log for p in broken)

"""The Python workflow API (`semiseg.split` / `train` / `evaluate` / `load`), as the README shows it."""
import json
from pathlib import Path

import pytest

import semiseg
from semiseg.data.synthetic import write_synthetic_dataset
from semiseg.errors import ConfigError
from semiseg.workflow import override_strings

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL = {"model.weights": None, "model.mask2former.hidden_dim": 32, "model.mask2former.dim_feedforward": 64,
         "model.mask2former.enc_dim_feedforward": 64, "model.mask2former.enc_layers": 1,
         "model.mask2former.dec_layers": 2, "model.mask2former.num_queries": 8,
         "model.mask2former.train_num_points": 128, "data.augmentation.image_size": 64,
         "data.augmentation.test_short_edge": 64, "data.augmentation.test_max_size": 64, "data.batch_size": 2,
         "data.num_workers": 0, "train.device": "cpu", "solver__max_iter": 2, "solver__warmup_iters": 0,
         "solver.steps": [1000], "train.eval_period": 2, "train.checkpoint_period": 2}


def test_override_strings_take_dotted_or_double_underscore_keys_and_python_values():
    assert override_strings({"solver__max_iter": 500, "solver.steps": [480], "semi.enabled": True,
                             "data.train_ann": Path("a b.json"), "solver.lr": 1e-3, "model.backbone.weights": None}) \
        == ["solver.max_iter=500", "solver.steps=[480]", "semi.enabled=true", "data.train_ann=a b.json",
            "solver.lr=0.001", "model.backbone.weights=null"]


def test_split_train_evaluate_load_from_python(tmp_path):
    data = write_synthetic_dataset(tmp_path / "data", num_train=8, num_val=2, seed=1, image_size=64)
    (labeled,) = semiseg.split(data["train_ann"], [50], out_dir=tmp_path / "splits", unlabeled=True)
    assert labeled.name == "instances_train_50.json" and labeled.with_name("instances_train_50_unlabeled.json").is_file()

    run = semiseg.train(CONFIGS / "synthetic_mask2former_tiny.yaml", **SMALL, **{
        "data.train_ann": labeled, "data.train_images": data["train_images"], "data.val_ann": data["val_ann"],
        "data.val_images": data["val_images"], "train.output_dir": tmp_path / "run"})
    assert run.run_dir == tmp_path / "run" and 0.0 <= run.metrics["model"]["segm"]["AP"] <= 100.0
    logged = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["eval"] == run.metrics and logged[-1]["iteration"] == 2

    metrics = semiseg.evaluate(run.run_dir / "checkpoints" / "last", "data.num_workers=0", device="cpu")
    assert metrics["model"]["segm"]["AP"] == pytest.approx(run.metrics["model"]["segm"]["AP"])
    prediction = semiseg.load(run.run_dir / "checkpoints" / "last", device="cpu").predict(
        data["val_images"] / "000001.png")
    assert prediction.masks.shape[-2:] == (64, 64)


def test_unknown_override_key_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="solver.max_iters"):
        semiseg.train(CONFIGS / "synthetic_mask2former_tiny.yaml", solver__max_iters=3)

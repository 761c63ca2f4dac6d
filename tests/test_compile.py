"""`train.compile` and `load(..., compile=...)`: torch.compile of the forward agrees with eager.

The tests use the "aot_eager" backend (traces forward and backward as inductor does, without
generating C++: seconds instead of minutes); benchmarks/mask2former_vs_transformers.py
--extra compiled measures inductor.
"""
import json

import pytest
import torch
from gd_helpers import TINY

from semiseg.api import load
from semiseg.config import Config, apply_overrides
from semiseg.errors import ConfigError
from semiseg.training import train
from semiseg.weights import read_weights
from test_api import image


def run(data, out, *extra):
    return train(apply_overrides(Config(), TINY + [
        f"data.train_ann={data['labeled_ann']}", f"data.train_images={data['train_images']}",
        f"train.output_dir={out}", "solver.max_iter=3", "train.seed=3", *extra]))


def losses(run_dir):
    """The logged total loss of every iteration."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_compiled_training_follows_the_eager_run(data, tmp_path):
    eager_run = run(data, tmp_path / "eager")
    compiled_run = run(data, tmp_path / "compiled", "train.compile=aot_eager")
    eager = read_weights(eager_run / "checkpoints" / "last" / "model.safetensors")[0]
    compiled = read_weights(compiled_run / "checkpoints" / "last" / "model.safetensors")[0]
    assert eager.keys() == compiled.keys()
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], atol=1e-4, rtol=1e-4, msg=name)
    assert len(losses(eager_run)) == 3 and losses(compiled_run) == pytest.approx(losses(eager_run), rel=1e-4)


def test_compiled_prediction_equals_eager(data):
    array = image(h=50, w=70)
    expected = load(data["teacher"], device="cpu").predict(array)
    got = load(data["teacher"], device="cpu", compile="aot_eager").predict(array)
    assert torch.equal(got.labels, expected.labels)
    torch.testing.assert_close(got.scores, expected.scores, atol=1e-5, rtol=0)


def test_unknown_backends_are_config_errors():
    with pytest.raises(ConfigError, match="train.compile='fastest': expected none or a torch.compile backend"):
        apply_overrides(Config(), ["train.compile=fastest"])
    with pytest.raises(ConfigError, match="compile='fastest'"):
        load("unused.safetensors", compile="fastest")


def test_cli_compile_flags_reach_the_config_and_the_predictor(data, tmp_path):
    from PIL import Image

    from semiseg.cli import build_parser, main
    args = build_parser().parse_args(["train", "--config", "c.yaml", "--compile"])
    assert args.compile == "inductor"
    Image.fromarray(image()).save(tmp_path / "a.png")
    assert main(["predict", str(tmp_path / "a.png"), "--weights", str(data["teacher"]), "--out",
                 str(tmp_path / "pred"), "--compile", "aot_eager", "--device", "cpu"]) == 0
    assert (tmp_path / "pred" / "predictions.json").is_file()

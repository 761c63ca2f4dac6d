"""Python API: load a saved tiny Mask2Former, predict on paths / arrays / PIL, predict_to_dir."""
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from semiseg.api import load, predict_to_dir
from semiseg.config import Config, apply_overrides, config_to_dict
from semiseg.engine.checkpoint import save_weights
from semiseg.weights import WeightsInfo, read_weights
from semiseg.errors import CheckpointError, DataError
from semiseg.models.build import build_model
from semiseg.structures import masks_to_boxes

CLASS_NAMES = ["disk", "square", "star"]
TINY = ["model.backbone.name=tiny_resnet", "model.mask2former.hidden_dim=32", "model.mask2former.conv_dim=32",
        "model.mask2former.mask_dim=32", "model.mask2former.nheads=4", "model.mask2former.dim_feedforward=64",
        "model.mask2former.enc_dim_feedforward=64", "model.mask2former.enc_layers=1",
        "model.mask2former.dec_layers=2", "model.mask2former.num_queries=8", "model.mask2former.test_topk=10",
        "data.augmentation.test_short_edge=64", "data.augmentation.test_max_size=96", "model.num_classes=3"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    cfg = apply_overrides(Config(), TINY)
    torch.manual_seed(0)
    model = build_model(cfg.model, 3)
    save_weights(path, model.state_dict(), WeightsInfo(config_to_dict(cfg), CLASS_NAMES, [1, 5, 9], "model"))
    return path


def image(seed=0, h=50, w=70):
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
    array[10:30, 20:45] = (230, 40, 40)
    return array


def test_predict_on_paths_arrays_and_pil_images(weights, tmp_path):
    predictor = load(weights, device="cpu")
    assert predictor.class_names == CLASS_NAMES
    array = image()
    Image.fromarray(array).save(tmp_path / "a.png")
    from_path = predictor.predict(tmp_path / "a.png")
    from_array = predictor.predict(array)
    from_pil = predictor.predict(Image.fromarray(array))
    assert from_path.masks.shape[1:] == (50, 70)  # original size, though the model ran at 64 px short side
    assert len(from_path) == 10 and from_path.scores.shape == (10,)
    assert from_path.labels.max() < 3 and from_path.masks.dtype == torch.bool
    assert torch.equal(from_path.boxes, masks_to_boxes(from_path.masks))
    for other in (from_array, from_pil):
        assert torch.equal(other.masks, from_path.masks) and torch.equal(other.scores, from_path.scores)
    batch = predictor.predict([array, image(1, 40, 40)])
    assert [r.masks.shape[1:] for r in batch] == [(50, 70), (40, 40)]


def test_checkpoint_folder_and_bad_inputs(weights, tmp_path):
    assert load(weights.parent, device="cpu").class_names == CLASS_NAMES  # folder -> model.safetensors
    predictor = load(weights, device="cpu")
    with pytest.raises(DataError, match=r"uint8 \[H, W, 3\]"):
        predictor.predict(np.zeros((10, 10), dtype=np.float32))
    with pytest.raises(DataError, match="missing.png"):
        predictor.predict(tmp_path / "missing.png")
    with pytest.raises(CheckpointError, match="no such weights"):
        load(tmp_path / "nothing.safetensors")


def test_predict_to_dir_writes_overlays_and_coco_results(weights, tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(image(0)).save(folder / "one.png")
    Image.fromarray(image(1, 40, 60)).save(folder / "sub" / "two.jpg")
    single = tmp_path / "three.png"
    Image.fromarray(image(2)).save(single)
    out = tmp_path / "out"
    predict_to_dir([folder, single], weights, out, score_threshold=0.0, device="cpu")

    assert sorted(p.name for p in out.glob("*.png")) == ["one.png", "three.png", "two.png"]
    overlay = np.asarray(Image.open(out / "two.png"))
    assert overlay.shape == (40, 60, 3)
    results = json.loads((out / "predictions.json").read_text())
    assert {r["file_name"] for r in results} == {str(folder / "one.png"), str(folder / "sub" / "two.jpg"), str(single)}
    assert len(results) == 30 and {r["category_id"] for r in results} <= {1, 5, 9}
    first = results[0]
    assert first["segmentation"]["size"] == [50, 70] and isinstance(first["segmentation"]["counts"], str)
    assert len(first["bbox"]) == 4 and 0.0 <= first["score"] <= 1.0

    with pytest.raises(DataError, match="predictions.json already exists"):
        predict_to_dir([single], weights, out, device="cpu")
    with pytest.raises(DataError, match="nowhere: no such file or folder"):
        predict_to_dir([tmp_path / "nowhere"], weights, tmp_path / "out2", device="cpu")


def test_model_weights_initialise_everything_but_the_class_layers(weights):
    cfg = apply_overrides(Config(), TINY + ["model.num_classes=5", f"model.weights={weights}"])
    model = build_model(cfg.model, 5)
    saved = load(weights, device="cpu").model.state_dict()
    resized = [name for name, value in model.state_dict().items() if value.shape != saved[name].shape]
    assert sorted(resized) == ["criterion.empty_weight", "sem_seg_head.predictor.class_embed.bias",
                               "sem_seg_head.predictor.class_embed.weight"]  # [K + 1, ...]: 4 in the file, 6 here
    for name, value in model.state_dict().items():
        assert name in resized or torch.equal(value, saved[name]), name
    same_classes = build_model(apply_overrides(Config(), TINY + [f"model.weights={weights}"]).model, 3)
    assert torch.equal(same_classes.state_dict()["sem_seg_head.predictor.class_embed.weight"],
                       saved["sem_seg_head.predictor.class_embed.weight"])


def test_model_weights_of_another_architecture_size_are_a_one_line_error(weights):
    wider = apply_overrides(Config(), TINY + ["model.mask2former.dim_feedforward=96", f"model.weights={weights}"])
    with pytest.raises(CheckpointError, match=r"^model.weights=.*model.safetensors: does not fit the model: \d+ shape "
                                              r"mismatches.* set model.weights=null to start from the backbone"):
        build_model(wider.model, 3)


def test_cli_predict_with_config_for_weights_without_an_embedded_one(weights, tmp_path, capsys):
    from semiseg.cli import main

    tensors, info = read_weights(weights)
    bare = tmp_path / "converted.safetensors"  # as `semiseg convert` writes an official checkpoint
    save_weights(bare, tensors, WeightsInfo(None, [], [], "model"))
    Image.fromarray(image(0)).save(tmp_path / "one.png")
    assert main(["predict", str(tmp_path / "one.png"), "--weights", str(bare), "--out", str(tmp_path / "a")]) == 2
    assert "has no embedded semiseg config (e.g. a converted official checkpoint); pass --config; it looks like " \
        "mask2former with backbone" in capsys.readouterr().err
    config = tmp_path / "model.yaml"
    wrong = {**info.config, "model": {**info.config["model"], "mask2former": {**info.config["model"]["mask2former"],
                                                                              "num_queries": 12}}}
    config.write_text(yaml.safe_dump(wrong))
    assert main(["predict", str(tmp_path / "one.png"), "--weights", str(bare), "--config", str(config),
                 "--out", str(tmp_path / "a")]) == 2
    error = capsys.readouterr().err
    assert "does not fit the model" in error and "the file looks like mask2former with backbone" in error
    assert "8 queries" in error and "\n" not in error.strip()
    config.write_text(yaml.safe_dump(info.config))
    assert main(["predict", str(tmp_path / "one.png"), "--weights", str(bare), "--config", str(config),
                 "--out", str(tmp_path / "b")]) == 0
    torch.save({"model": tensors}, tmp_path / "official.pth")  # an official checkpoint: converted on the fly
    assert main(["predict", str(tmp_path / "one.png"), "--weights", str(tmp_path / "official.pth"), "--config",
                 str(config), "--out", str(tmp_path / "d")]) == 0
    predict_to_dir([tmp_path / "one.png"], weights, tmp_path / "c", device="cpu")
    embedded = json.loads((tmp_path / "c" / "predictions.json").read_text())
    without_ids = [{k: v for k, v in r.items() if k != "category_id"} for r in embedded]
    for other in ("b", "d"):  # the same model
        results = json.loads((tmp_path / other / "predictions.json").read_text())
        assert [{k: v for k, v in r.items() if k != "category_id"} for r in results] == without_ids

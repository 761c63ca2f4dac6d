"""Checkpoint conversion: detectron2 .pkl and Guided Distillation .pth -> safetensors -> strict load."""
from __future__ import annotations

import pickle

import pytest
import safetensors.torch
import torch

from semiseg.cli import main
from semiseg.weights import convert_checkpoint, load_weights_into
from semiseg.errors import CheckpointError
from semiseg.models.backbones.resnet import build_tiny_resnet
from semiseg.models.mask2former import Mask2Former, Mask2FormerConfig


def tiny_model(seed: int, num_classes: int = 3) -> Mask2Former:
    torch.manual_seed(seed)
    cfg = Mask2FormerConfig(num_classes=num_classes, hidden_dim=32, num_queries=5, nheads=4, dim_feedforward=64,
                            dec_layers=3, enc_layers=1, enc_dim_feedforward=64, conv_dim=32, mask_dim=32)
    return Mask2Former(cfg, build_tiny_resnet(norm="bn")).eval()


def outputs_of(model: Mask2Former) -> dict:
    torch.manual_seed(99)
    images = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        return model(images, [(64, 64)])


def test_detectron2_pkl_converts_and_loads_strictly(tmp_path):
    official = tiny_model(seed=1)
    pkl = tmp_path / "model_final.pkl"
    with open(pkl, "wb") as f:  # the model-zoo layout: numpy arrays under "model"
        pickle.dump({"model": {k: v.numpy() for k, v in official.state_dict().items()}, "__author__": "test"}, f)

    dst = convert_checkpoint(pkl, tmp_path / "converted.safetensors")
    weights = safetensors.torch.load_file(dst)
    assert set(weights) == set(official.state_dict())
    assert "criterion.empty_weight" in weights and any(k.startswith("sem_seg_head.predictor.") for k in weights)

    fresh = tiny_model(seed=2)
    assert not torch.equal(outputs_of(fresh)["pred_masks"], outputs_of(official)["pred_masks"])
    assert load_weights_into(fresh, weights, "checkpoint", strict=True) == ([], [])
    for key in ("pred_logits", "pred_masks", "mask_features"):
        assert torch.equal(outputs_of(fresh)[key], outputs_of(official)[key])


@pytest.mark.parametrize("which, expected", [("auto", "student"), ("student", "student"), ("teacher", "teacher")])
def test_guided_distillation_checkpoint_picks_the_right_model(tmp_path, capsys, which, expected):
    models = {"teacher": tiny_model(seed=3), "student": tiny_model(seed=4)}
    state = {f"model{name.capitalize()}.{k}": v for name, m in models.items() for k, v in m.state_dict().items()}
    pth = tmp_path / "model_best.pth"
    torch.save({"model": state, "iteration": 1000}, pth)

    dst = convert_checkpoint(pth, tmp_path / f"{which}.safetensors", which=which)
    assert f"took the {expected} weights" in capsys.readouterr().out
    weights = safetensors.torch.load_file(dst)
    fresh = tiny_model(seed=5)
    load_weights_into(fresh, weights, "checkpoint", strict=True)
    assert torch.equal(outputs_of(fresh)["pred_masks"], outputs_of(models[expected])["pred_masks"])


def test_stage1_checkpoint_has_only_the_teacher(tmp_path):
    teacher = tiny_model(seed=6)
    pth = tmp_path / "stage1.pth"
    torch.save({"model": {f"modelTeacher.module.{k}": v for k, v in teacher.state_dict().items()}}, pth)
    weights = safetensors.torch.load_file(convert_checkpoint(pth, tmp_path / "t.safetensors"))
    assert set(weights) == set(teacher.state_dict())
    with pytest.raises(CheckpointError, match="has no student weights"):
        convert_checkpoint(pth, tmp_path / "s.safetensors", which="student")


def test_mismatched_checkpoint_is_a_one_line_error_listing_keys(tmp_path):
    model = tiny_model(seed=7)
    state = tiny_model(seed=7, num_classes=5).state_dict()  # class head and empty_weight differ in shape
    del state["sem_seg_head.predictor.query_feat.weight"]
    state["sem_seg_head.predictor.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        load_weights_into(model, state, tmp_path / "other.safetensors", strict=True)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(tmp_path / "other.safetensors"))
    assert "3 shape mismatches" in message and "class_embed.weight (6, 32) vs model (4, 32)" in message
    assert "1 missing: sem_seg_head.predictor.query_feat.weight" in message
    assert "1 unexpected: sem_seg_head.predictor.extra.weight" in message
    # not strict: names may differ, shapes still must fit
    del state["sem_seg_head.predictor.extra.weight"]
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_weights_into(model, state, "checkpoint", strict=False)


def test_non_model_checkpoints_and_bad_options_are_refused(tmp_path):
    backbone_only = tmp_path / "R-50.pth"
    torch.save({"stem.conv1.weight": torch.zeros(2, 3, 1, 1)}, backbone_only)
    with pytest.raises(CheckpointError, match="no sem_seg_head"):
        convert_checkpoint(backbone_only, tmp_path / "out.safetensors")
    plain = tmp_path / "plain.pth"
    torch.save({"model": tiny_model(seed=8).state_dict()}, plain)
    with pytest.raises(CheckpointError, match="not a Guided Distillation checkpoint"):
        convert_checkpoint(plain, tmp_path / "out.safetensors", which="teacher")
    with pytest.raises(CheckpointError, match=r"\.safetensors"):
        convert_checkpoint(plain, tmp_path / "out.pth")
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_convert(tmp_path, capsys):
    plain = tmp_path / "plain.pth"
    torch.save({"model": tiny_model(seed=9).state_dict()}, plain)
    assert main(["convert", str(plain), str(tmp_path / "ok.safetensors")]) == 0
    assert (tmp_path / "ok.safetensors").is_file()
    assert main(["convert", str(tmp_path / "missing.pkl"), str(tmp_path / "x.safetensors")]) == 2
    assert "semiseg: error:" in capsys.readouterr().err

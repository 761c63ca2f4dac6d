"""ADE20K in its downloaded layout (`data.format: ade20k`, semantic): records, mIoU of the ground
truth, one-line errors."""
import numpy as np
import pytest
import torch
from PIL import Image
from test_coco_panoptic import TruthOracle

from semiseg.config import Config, apply_overrides
from semiseg.data.ade20k import CLASSES, load_ade20k_semantic
from semiseg.data.readers import read_labeled
from semiseg.engine.evaluate import build_eval_data, evaluate_model
from semiseg.errors import ConfigError, DataError


def write_ade20k(root):
    """ADEChallengeData2016/{images,annotations}/validation with 3 images of 48 x 64."""
    images, annotations = root / "images" / "validation", root / "annotations" / "validation"
    images.mkdir(parents=True)
    annotations.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        labels = np.zeros((48, 64), np.uint8)  # 0: "other", ignored
        labels[:20] = 3  # sky
        labels[20:, :30] = 4 + i  # floor, tree, ceiling
        labels[30:40, 40:60] = 150  # flag
        name = f"ADE_val_{i + 1:08d}"
        Image.fromarray(labels).save(annotations / f"{name}.png")
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(images / f"{name}.jpg")
    return annotations, images


def test_records_and_ground_truth_miou(tmp_path):
    annotations, images = write_ade20k(tmp_path)
    records = load_ade20k_semantic(annotations, images)
    assert len(records) == 3 and records.class_names == list(CLASSES) and records.category_ids[-1] == 150
    assert sorted(records.class_names[a.label] for a in records.records[0].annotations) == ["flag", "floor", "sky"]
    cfg = apply_overrides(Config(), ["data.format=ade20k", "model.task=semantic", "data.num_workers=0",
                                     "data.augmentation.test_short_edge=48", "data.augmentation.test_max_size=64"])
    loader, evaluator = build_eval_data(cfg, annotations, images, records.class_names)
    metrics = evaluate_model(TruthOracle(records, "semantic"), loader, evaluator, torch.device("cpu"))
    assert metrics["sem_seg"]["mIoU"] == pytest.approx(100.0)  # classes absent from both are left out
    assert metrics["sem_seg"]["pACC"] == pytest.approx(100.0)


@pytest.mark.parametrize("breakage, message", [
    ("no_image", "ADE_val_00000001.png: its image .*ADE_val_00000001.jpg does not exist"),
    ("label", "ADE_val_00000001.png: label 151 is outside 0..150"),
    ("rgb", "ADE_val_00000001.png: a label PNG must be single-channel, got mode RGB"),
])
def test_bad_input_is_a_one_line_error_naming_the_file(tmp_path, breakage, message):
    annotations, images = write_ade20k(tmp_path)
    png = annotations / "ADE_val_00000001.png"
    if breakage == "no_image":
        (images / "ADE_val_00000001.jpg").unlink()
    elif breakage == "label":
        Image.fromarray(np.full((48, 64), 151, np.uint8)).save(png)
    else:
        Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(png)
    with pytest.raises(DataError, match=message) as error:
        load_ade20k_semantic(annotations, images)
    assert "\n" not in str(error.value)


def test_ade20k_is_semantic_only(tmp_path):
    annotations, images = write_ade20k(tmp_path)
    with pytest.raises(ConfigError, match="data.format=ade20k holds semantic labels only"):
        read_labeled("ade20k", annotations, images, task="panoptic")

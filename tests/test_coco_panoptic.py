"""COCO panoptic (`data.format: coco_panoptic`) on the built-in dataset with stuff (`semiseg synth --stuff`):
the records, PQ / mIoU of the ground truth itself, one-line errors, training and `semiseg predict` per task."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_guided_maskdino import MASKDINO

from gd_helpers import TINY
from semiseg.api import predict_to_dir
from semiseg.config import Config, apply_overrides
from semiseg.data.coco_panoptic import load_coco_panoptic
from semiseg.data.images import read_image
from semiseg.data.masks import decode_segmentation
from semiseg.data.readers import read_labeled
from semiseg.data.synthetic import write_synthetic_dataset
from semiseg.engine.evaluate import build_eval_data, evaluate_model
from semiseg.errors import DataError
from semiseg.structures import PanopticSegmentation, Segment
from semiseg.training import train

SIZE = 64


@pytest.fixture(scope="module")
def stuff_data(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("stuff"), num_train=6, num_val=3, image_size=SIZE,
                                   stuff=True)


def test_records_cover_every_pixel_once_with_things_and_stuff(stuff_data):
    records = load_coco_panoptic(stuff_data["val_panoptic"], stuff_data["val_images"])
    assert records.class_names[-3:] == ["sky", "wall", "floor"] and records.stuff_classes == (8, 9, 10)
    assert records.is_thing == [True] * 8 + [False] * 3
    for record in records.records:
        cover = sum(decode_segmentation(a.segmentation, SIZE, SIZE).astype(int) for a in record.annotations)
        assert (cover == 1).all()  # the built-in panoptic files have no void and no overlap
        labels = [a.label for a in record.annotations]
        assert any(k >= 8 for k in labels) and len({k for k in labels if k >= 8}) == sum(k >= 8 for k in labels)
    semantic = read_labeled("coco_panoptic", stuff_data["val_panoptic"], stuff_data["val_images"], task="semantic")
    for record in semantic.records:
        labels = [a.label for a in record.annotations]
        assert len(labels) == len(set(labels)) and not any(a.iscrowd for a in record.annotations)


class TruthOracle(torch.nn.Module):
    """Predicts the ground truth of the image it is shown, as the task's result type."""

    def __init__(self, records, task):
        super().__init__()
        self.table = {}
        for r in records.records:
            ids = torch.zeros(r.height, r.width, dtype=torch.int32)
            classes = torch.zeros(r.height, r.width, dtype=torch.long)
            segments = []
            for i, a in enumerate(r.annotations, start=1):
                mask = torch.from_numpy(decode_segmentation(a.segmentation, r.height, r.width))
                ids[mask], classes[mask] = i, a.label
                segments.append(Segment(i, a.label, a.label not in records.stuff_classes))
            prediction = PanopticSegmentation(ids, segments) if task == "panoptic" else classes
            self.table[read_image(r.file_name).tobytes()] = prediction

    def forward(self, images, image_sizes, targets=None):
        return {"images": images}

    def predict(self, outputs, image_sizes, orig_sizes):
        return [self.table[image[:, :h, :w].permute(1, 2, 0).numpy().tobytes()]
                for image, (h, w) in zip(outputs["images"], image_sizes)]


@pytest.mark.parametrize("task, key", [("panoptic", ("panoptic", "PQ")), ("semantic", ("sem_seg", "mIoU"))])
def test_ground_truth_scores_100(stuff_data, task, key):
    cfg = apply_overrides(Config(), [f"model.task={task}", "data.format=coco_panoptic", "data.num_workers=0",
                                     f"data.augmentation.test_short_edge={SIZE}", f"data.augmentation.test_max_size={SIZE}"])
    ann, images = stuff_data["val_panoptic"], stuff_data["val_images"]
    records = read_labeled("coco_panoptic", ann, images, task=task)
    loader, evaluator = build_eval_data(cfg, ann, images, records.class_names)
    metrics = evaluate_model(TruthOracle(records, task), loader, evaluator, torch.device("cpu"))
    assert metrics[key[0]][key[1]] == pytest.approx(100.0)
    if task == "panoptic":
        assert metrics["panoptic"]["PQ_st"] == pytest.approx(100.0)


def _break(data, breakage):
    ann = data["val_panoptic"]
    content = json.loads(ann.read_text())
    png = ann.with_suffix("") / "000001.png"
    if breakage == "unlisted":
        content["annotations"][0]["segments_info"] = content["annotations"][0]["segments_info"][1:]
    elif breakage == "category":
        content["annotations"][0]["segments_info"][0]["category_id"] = 999
    elif breakage == "size":
        Image.fromarray(np.zeros((SIZE, SIZE + 1, 3), np.uint8)).save(png)
    elif breakage == "gray":
        Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(png)
    elif breakage == "missing":
        png.unlink()
    ann.write_text(json.dumps(content))
    return ann


@pytest.mark.parametrize("breakage, message", [
    ("unlisted", r"000001.png: segment ids \[1\] are in the PNG but not in the json's segments_info"),
    ("category", "000001.png: segment 1 has unknown category id 999"),
    ("size", "000001.png: is 64x65 but its image is 64x64"),
    ("gray", "000001.png: a panoptic PNG must be RGB, got mode L"),
    ("missing", "000001.png: panoptic PNG not found"),
])
def test_bad_input_is_a_one_line_error_naming_the_file(tmp_path, breakage, message):
    data = write_synthetic_dataset(tmp_path / "d", num_train=1, num_val=2, image_size=SIZE, stuff=True)
    with pytest.raises(DataError, match=message) as error:
        load_coco_panoptic(_break(data, breakage), data["val_images"])
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("arch, task", [("mask2former", "panoptic"), ("maskdino", "semantic")])
def test_training_evaluation_and_predict_per_task(stuff_data, tmp_path, arch, task):
    run = train(apply_overrides(Config(), TINY + (MASKDINO if arch == "maskdino" else []) + [
        f"model.task={task}", "data.format=coco_panoptic", f"data.train_ann={stuff_data['train_panoptic']}",
        f"data.train_images={stuff_data['train_images']}", f"data.val_ann={stuff_data['val_panoptic']}",
        f"data.val_images={stuff_data['val_images']}", f"train.output_dir={tmp_path / 'run'}",
        "solver.max_iter=2", "train.eval_period=2"]))
    evaluations = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    group = {"panoptic": "panoptic", "semantic": "sem_seg"}[task]
    assert group in evaluations[-1]["eval"]["model"] and (run / "checkpoints" / "best").is_dir()
    out = predict_to_dir([stuff_data["val_images"]], run / "checkpoints" / "last", tmp_path / "pred", device="cpu")
    content = json.loads((out / "predictions.json").read_text())
    maps = sorted((out / task).glob("*.png"))
    assert len(maps) == 3 and len(list(out.glob("*.png"))) == 3
    if task == "panoptic":
        assert [a["file_name"] for a in content["annotations"]] == [m.name for m in maps]
        assert content["categories"][-1] == {"id": 103, "name": "floor"}
    else:
        assert np.asarray(Image.open(maps[0])).shape == (SIZE, SIZE)
        assert content["classes"][8] == {"value": 8, "id": 101, "name": "sky"}


def test_semantic_pngs_agree_with_the_panoptic_files(stuff_data, tmp_path):
    """`synth --stuff` also writes semantic label PNGs (`data.format: semantic_png`): the same classes
    per pixel as the panoptic files merged per class."""
    from_pngs = read_labeled("semantic_png", stuff_data["val_semantic"], stuff_data["val_images"], task="semantic")
    from_panoptic = read_labeled("coco_panoptic", stuff_data["val_panoptic"], stuff_data["val_images"], task="semantic")
    assert from_pngs.class_names == from_panoptic.class_names and from_pngs.category_ids == from_panoptic.category_ids
    for a, b in zip(from_pngs.records, from_panoptic.records):
        assert a.file_name == b.file_name
        masks = lambda r: {x.label: decode_segmentation(x.segmentation, SIZE, SIZE).tolist() for x in r.annotations}  # noqa: E731
        assert masks(a) == masks(b)
    lonely = tmp_path / "labels"
    lonely.mkdir()
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(lonely / "000001.png")
    with pytest.raises(DataError, match="labels: needs labels.json beside it"):
        read_labeled("semantic_png", lonely, stuff_data["val_images"], task="semantic")

"""Cityscapes in its downloaded layout (`data.format: cityscapes`): a tiny fixture with two cities,
instances, a crowd ("car group") region, stuff and a not-evaluated thing class; the records, the
COCO ground truth built from them, the official Cityscapes AP (cityscapesscripts) beside COCO AP,
one-line errors, and training + evaluation end to end."""
import numpy as np
import pytest
import torch
from PIL import Image
from test_trainer import GroundTruthOracle

from semiseg.config import Config, apply_overrides
from semiseg.data.cityscapes import THING_CLASSES, load_cityscapes_instances, records_to_coco
from semiseg.data.masks import decode_segmentation
from semiseg.engine.evaluate import build_eval_data, evaluate_model
from semiseg.errors import DataError
from semiseg.training import train
from gd_helpers import TINY

H, W = 64, 128


def instance_map(seed: int) -> np.ndarray:
    """[H, W] instanceIds: road (7) everywhere, person 24000 and 24001, car 26000, a car group (26),
    a caravan 29000 (not evaluated)."""
    ids = np.full((H, W), 7, dtype=np.int32)
    ids[5:25, 5:20] = 24000
    ids[30:60, 10:30] = 24001
    ids[10:40, 40 + seed:90] = 26000
    ids[45:60, 60:100] = 26  # crowd
    ids[0:10, 100:128] = 29000
    return ids


def write_cityscapes(root, split="train"):
    """root/gtFine/<split>/<city>/... and root/leftImg8bit/<split>/<city>/... for 2 cities x 2 images."""
    rng = np.random.default_rng(0)
    for c, city in enumerate(["aachen", "bonn"]):
        for i in range(2):
            stem = f"{city}_{i:06d}_000019"
            gt = root / "gtFine" / split / city
            img = root / "leftImg8bit" / split / city
            gt.mkdir(parents=True, exist_ok=True)
            img.mkdir(parents=True, exist_ok=True)
            Image.fromarray(instance_map(2 * c + i).astype(np.uint16)).save(gt / f"{stem}_gtFine_instanceIds.png")
            Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(img / f"{stem}_leftImg8bit.png")
    return root / "gtFine" / split, root / "leftImg8bit" / split


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory):
    return write_cityscapes(tmp_path_factory.mktemp("cityscapes"))


def test_records_hold_the_thing_instances_and_crowd_regions(cityscapes):
    gt, images = cityscapes
    records = load_cityscapes_instances(gt, images)
    assert records.class_names == list(THING_CLASSES.values()) and records.category_ids == [24, 25, 26, 27, 28, 31, 32, 33]
    assert len(records) == 4 and records.records[0].file_name == images / "aachen" / "aachen_000000_000019_leftImg8bit.png"
    first = records.records[0]
    assert (first.height, first.width) == (H, W)
    kinds = sorted((records.class_names[a.label], a.iscrowd) for a in first.annotations)
    assert kinds == [("car", False), ("car", True), ("person", False), ("person", False)]  # no road, no caravan
    areas = sorted(int(decode_segmentation(a.segmentation, H, W).sum()) for a in first.annotations)
    assert areas == sorted([20 * 15, 30 * 20, 30 * 50, 15 * 40])
    coco = records_to_coco(records)
    assert len(coco["images"]) == 4 and len(coco["annotations"]) == 16
    assert {a["category_id"] for a in coco["annotations"]} == {24, 26}
    crowd = [a for a in coco["annotations"] if a["iscrowd"]][0]
    assert crowd["category_id"] == 26
    assert decode_segmentation(crowd["segmentation"], H, W)[45:60, 60:100].all()


def test_ground_truth_predictions_score_100(cityscapes):
    gt, images = cityscapes
    cfg = apply_overrides(Config(), ["data.format=cityscapes", "data.augmentation.test_short_edge=64",
                                     "data.augmentation.test_max_size=128", "data.num_workers=0"])
    records = load_cityscapes_instances(gt, images)
    loader, evaluator = build_eval_data(cfg, gt, images, records.class_names)
    oracle = GroundTruthOracle(records)
    metrics = evaluate_model(oracle, loader, evaluator, torch.device("cpu"))
    assert metrics["segm"]["AP"] == pytest.approx(100.0)
    assert metrics["cityscapes"]["AP"] == pytest.approx(100.0) and metrics["cityscapes"]["AP50"] == pytest.approx(100.0)
    assert metrics["cityscapes"]["per_class"]["car"] == pytest.approx(100.0)
    for key, instances in oracle.table.items():  # drop every image's first person: both APs fall, AP50 too
        person = (instances.labels == 0).nonzero()[0]
        oracle.table[key] = instances[torch.arange(len(instances)) != person]
    metrics = evaluate_model(oracle, loader, evaluator, torch.device("cpu"))
    assert metrics["cityscapes"]["per_class"]["person"] == pytest.approx(50.0)
    assert metrics["cityscapes"]["per_class"]["car"] == pytest.approx(100.0)
    assert metrics["segm"]["per_class"]["person"] < 100


def test_training_and_evaluation_read_the_cityscapes_layout(cityscapes, tmp_path):
    gt, images = cityscapes
    run = train(apply_overrides(Config(), TINY + [
        "data.format=cityscapes", f"data.train_ann={gt}", f"data.train_images={images}", f"data.val_ann={gt}",
        f"data.val_images={images}", "data.augmentation.test_max_size=128", f"train.output_dir={tmp_path / 'run'}",
        "solver.max_iter=2", "train.eval_period=2"]))
    metrics = [line for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert metrics and '"segm"' in metrics[-1]


@pytest.mark.parametrize("breakage, message", [
    ("no_image", "its image .*aachen_000000_000019_leftImg8bit.png does not exist"),
    ("bad_id", r"pixel value 40000 is not a Cityscapes id \(label id 40 outside -1..33\)"),
    ("rgb", "must be single-channel, got mode RGB"),
    ("empty", "no \\*_gtFine_instanceIds.png files"),
])
def test_bad_input_is_a_one_line_error_naming_the_file(tmp_path, breakage, message):
    gt, images = write_cityscapes(tmp_path)
    target = gt / "aachen" / "aachen_000000_000019_gtFine_instanceIds.png"
    if breakage == "no_image":
        (images / "aachen" / "aachen_000000_000019_leftImg8bit.png").unlink()
    elif breakage == "bad_id":
        ids = instance_map(0)
        ids[0, 0] = 40000
        Image.fromarray(ids.astype(np.uint16)).save(target)
    elif breakage == "rgb":
        Image.fromarray(np.zeros((H, W, 3), dtype=np.uint8)).save(target)
    else:
        gt = tmp_path / "empty"
        gt.mkdir()
    with pytest.raises(DataError, match=message) as error:
        load_cityscapes_instances(gt, images)
    assert "\n" not in str(error.value)


def test_panoptic_and_semantic_tasks_use_the_19_train_classes(cityscapes):
    from test_coco_panoptic import TruthOracle

    from semiseg.data.cityscapes import TRAIN_CLASSES
    from semiseg.data.readers import read_labeled

    gt, images = cityscapes
    panoptic = read_labeled("cityscapes", gt, images, task="panoptic")
    assert panoptic.class_names == list(TRAIN_CLASSES.values()) and panoptic.stuff_classes == tuple(range(11))
    first = panoptic.records[0]
    kinds = sorted((panoptic.class_names[a.label], a.iscrowd) for a in first.annotations)
    assert kinds == [("car", False), ("car", True), ("person", False), ("person", False), ("road", False)]
    road = next(a for a in first.annotations if panoptic.class_names[a.label] == "road")
    assert decode_segmentation(road.segmentation, H, W).sum() == (instance_map(0) == 7).sum()  # caravan: void
    semantic = read_labeled("cityscapes", gt, images, task="semantic")
    assert sorted(semantic.class_names[a.label] for a in semantic.records[0].annotations) == ["car", "person", "road"]
    for task, records, key in (("panoptic", panoptic, ("panoptic", "PQ")), ("semantic", semantic, ("sem_seg", "mIoU"))):
        cfg = apply_overrides(Config(), ["data.format=cityscapes", f"model.task={task}", "data.num_workers=0",
                                         "data.augmentation.test_short_edge=64", "data.augmentation.test_max_size=128"])
        loader, evaluator = build_eval_data(cfg, gt, images, records.class_names)
        metrics = evaluate_model(TruthOracle(records, task), loader, evaluator, torch.device("cpu"))
        assert metrics[key[0]][key[1]] == pytest.approx(100.0)


def test_split_lists_select_the_labeled_images(cityscapes, tmp_path):
    from semiseg.data.readers import select_listed

    gt, images = cityscapes
    records = load_cityscapes_instances(gt, images)
    listed = tmp_path / "perc_50.txt"
    listed.write_text("bonn_000001_000019_gtFine_instanceIds.png\naachen_000000_000019_gtFine_instanceIds.png\n")
    chosen = select_listed(records, listed)
    assert [r.file_name.name for r in chosen.records] == ["bonn_000001_000019_leftImg8bit.png",
                                                         "aachen_000000_000019_leftImg8bit.png"]
    listed.write_text("bonn_000009_000019_gtFine_instanceIds.png\n")
    with pytest.raises(DataError, match=r"perc_50.txt: 1 listed image\(s\) not in .*, e.g. bonn_000009"):
        select_listed(records, listed)
    listed.write_text("aachen_000001_000019_gtFine_instanceIds.png\n")
    run = train(apply_overrides(Config(), TINY + [
        "data.format=cityscapes", f"data.train_ann={gt}", f"data.train_images={images}", f"data.train_list={listed}",
        f"train.output_dir={tmp_path / 'run'}", "solver.max_iter=1"]))
    assert "1 images" in (run / "log.txt").read_text()

"""The built-in synthetic dataset: determinism, COCO validity and the promised content mix."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycocotools.mask as pycoco_mask
import pytest
import torch

from semiseg.cli import main as cli_main
from semiseg.data import synthetic
from semiseg.data.synthetic import CATEGORIES, render_synthetic_image, write_synthetic_dataset
from semiseg.data.synthetic_shapes import SHAPE_CLASSES
from semiseg.errors import ConfigError, DataError
from semiseg.structures import masks_to_boxes

SIZE = 128
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools vs numpy 2


def decode(segmentation, height: int, width: int) -> np.ndarray:
    """[H, W] bool mask decoded with pycocotools (independent of the generator's encoder)."""
    if isinstance(segmentation, list) or isinstance(segmentation["counts"], list):
        rles = pycoco_mask.frPyObjects(segmentation, height, width)
        rle = pycoco_mask.merge(rles) if isinstance(rles, list) else rles
    else:
        rle = segmentation
    return pycoco_mask.decode(rle).astype(bool)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, Path]:
    return write_synthetic_dataset(tmp_path_factory.mktemp("synth") / "data", num_train=60, num_val=4, seed=3)


@pytest.fixture(scope="module")
def train(dataset) -> dict:
    return json.loads(dataset["train_ann"].read_text())


def files_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_returned_paths(dataset, train):
    assert dataset["train_ann"].name == "instances_train.json" and dataset["val_ann"].name == "instances_val.json"
    pngs = sorted(p.name for p in dataset["train_images"].glob("*.png"))
    assert pngs == [f"{i:06d}.png" for i in range(1, 61)]
    assert [im["id"] for im in train["images"]] == list(range(1, 61))
    assert all((dataset["train_images"] / im["file_name"]).is_file() for im in train["images"])
    val = json.loads(dataset["val_ann"].read_text())
    assert len(val["images"]) == 4 and len(list(dataset["val_images"].glob("*.png"))) == 4
    ids = [a["id"] for a in train["annotations"]]
    assert ids == list(range(1, len(ids) + 1))


def test_categories_are_shapes_with_non_contiguous_ids(train):
    ids = [c["id"] for c in train["categories"]]
    assert train["categories"] == CATEGORIES
    assert 6 <= len(ids) <= 8 and len(set(ids)) == len(ids)
    assert ids != list(range(1, len(ids) + 1))  # exercises the category id -> class index mapping
    assert {"ring", "frame"} <= {c["name"] for c in train["categories"]}  # classes with holes


def test_same_seed_gives_same_bytes_and_another_seed_differs(tmp_path):
    a = write_synthetic_dataset(tmp_path / "a", num_train=5, num_val=2, seed=7)
    write_synthetic_dataset(tmp_path / "b", num_train=5, num_val=2, seed=7)
    write_synthetic_dataset(tmp_path / "c", num_train=5, num_val=2, seed=8)
    fa, fb, fc = (files_bytes(tmp_path / n) for n in "abc")
    assert fa == fb
    assert fa.keys() == fc.keys()
    assert fa["annotations/instances_train.json"] != fc["annotations/instances_train.json"]
    assert fa["train/000001.png"] != fc["train/000001.png"]
    assert fa["train/000001.png"] != fa["val/000001.png"]  # splits draw from different streams
    assert a["train_images"] == tmp_path / "a" / "train"


def test_process_pool_gives_the_same_bytes(tmp_path, monkeypatch):
    write_synthetic_dataset(tmp_path / "serial", num_train=6, num_val=2, seed=1)
    monkeypatch.setattr(synthetic, "_PARALLEL_FROM", 2)
    write_synthetic_dataset(tmp_path / "pool", num_train=6, num_val=2, seed=1)
    assert files_bytes(tmp_path / "serial") == files_bytes(tmp_path / "pool")


def test_every_segmentation_decodes_to_its_area_and_bbox(dataset, train):
    for ann in train["annotations"]:
        mask = decode(ann["segmentation"], SIZE, SIZE)
        assert mask.sum() == ann["area"] >= 12
        x0, y0, x1, y1 = masks_to_boxes(torch.from_numpy(mask)[None])[0].tolist()
        assert ann["bbox"] == [x0, y0, x1 - x0, y1 - y0]


def test_visible_parts_of_one_image_do_not_overlap(train):
    coverage: dict[int, np.ndarray] = {}
    for ann in train["annotations"]:
        mask = decode(ann["segmentation"], SIZE, SIZE)
        seen = coverage.setdefault(ann["image_id"], np.zeros((SIZE, SIZE), dtype=bool))
        assert not (seen & mask).any(), f"annotation {ann['id']} overlaps another of image {ann['image_id']}"
        seen |= mask


def test_content_mix_of_a_small_dataset(train):
    anns = [a for a in train["annotations"] if not a["iscrowd"]]
    assert {a["category_id"] for a in anns} == {c.category_id for c in SHAPE_CLASSES}
    per_image = np.bincount([a["image_id"] for a in anns], minlength=61)[1:]
    assert per_image.max() <= 8 and 2.5 <= per_image.mean() <= 5.5
    areas = np.array([a["area"] for a in anns])
    assert (areas < 150).any() and (areas > 1024).any()  # small and COCO-"medium" objects
    polygons = [a for a in anns if isinstance(a["segmentation"], list)]
    rles = [a for a in anns if isinstance(a["segmentation"], dict)]
    assert polygons and rles
    assert all(isinstance(a["segmentation"]["counts"], str) for a in rles)
    hole_ids = {c.category_id for c in SHAPE_CLASSES if c.name in ("ring", "frame", "crescent")}
    assert not any(a["category_id"] in hole_ids for a in polygons)  # holes need RLE
    # Occlusion: some hole-free object is stored as RLE because a later object covers part of it.
    assert any(a["category_id"] not in hole_ids for a in rles)


def test_masks_sit_on_visible_objects(train, dataset):
    """Inside an annotation the colour differs from a thin ring just outside it (masks are aligned)."""
    from PIL import Image
    from scipy.ndimage import binary_dilation

    contrasts = []
    for ann in train["annotations"]:
        if ann["iscrowd"] or ann["area"] < 60:
            continue
        image = np.asarray(Image.open(dataset["train_images"] / f"{ann['image_id']:06d}.png"), dtype=float)
        mask = decode(ann["segmentation"], SIZE, SIZE)
        ring = binary_dilation(mask, iterations=2) & ~mask
        contrasts.append(np.linalg.norm(image[mask].mean(0) - image[ring].mean(0)))
    assert np.median(contrasts) > 40 and np.mean(np.array(contrasts) > 15) > 0.9


def test_crowd_region_is_uncompressed_rle():
    for image_id in range(1, 6):
        rendered = render_synthetic_image(0, 0, image_id, SIZE, crowd_prob=1.0)
        crowd = [a for a in rendered.annotations if a["iscrowd"]]
        assert len(crowd) == 1
        counts = crowd[0]["segmentation"]["counts"]
        assert isinstance(counts, list) and sum(counts) == SIZE * SIZE
        assert decode(crowd[0]["segmentation"], SIZE, SIZE).sum() == crowd[0]["area"]


def test_empty_images_keep_background_and_clutter():
    rendered = render_synthetic_image(0, 0, 1, SIZE, empty_prob=1.0)
    assert rendered.annotations == []
    assert rendered.image.shape == (SIZE, SIZE, 3) and rendered.image.dtype == np.uint8
    assert rendered.image.std() > 1.0


def test_refuses_a_non_empty_folder_and_overwrite_replaces_only_its_files(tmp_path):
    out = tmp_path / "data"
    write_synthetic_dataset(out, num_train=4, num_val=2)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        write_synthetic_dataset(out, num_train=2, num_val=1)
    write_synthetic_dataset(out, num_train=2, num_val=1, overwrite=True)
    assert sorted(p.name for p in (out / "train").iterdir()) == ["000001.png", "000002.png"]
    assert len(json.loads((out / "annotations" / "instances_train.json").read_text())["images"]) == 2
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("kwargs", [dict(num_train=0), dict(seed=-1), dict(image_size=16)])
def test_bad_arguments_raise_config_error(tmp_path, kwargs):
    with pytest.raises(ConfigError):
        write_synthetic_dataset(tmp_path / "data", **{"num_train": 2, "num_val": 1, **kwargs})
    assert not (tmp_path / "data").exists()


def test_cli_synth_writes_then_refuses_with_one_line(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["synth", "--out", str(out), "--train", "3", "--val", "2", "--size", "64"]) == 0
    assert json.loads((out / "annotations" / "instances_val.json").read_text())["images"][0]["width"] == 64
    assert cli_main(["synth", "--out", str(out), "--train", "3", "--val", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("semiseg: error: ") and str(out) in err[-1]

"""benchmarks/shape_datasets.py: valid COCO, the promised density, determinism and no colour cue."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from benchmark_scripts import benchmark_script
from PIL import Image

from semiseg.data.coco import load_coco_instances
from semiseg.data.masks import decode_segmentation

KINDS = ("cells", "blocks")


@pytest.fixture(scope="module")
def shapes():
    with benchmark_script("shape_datasets") as module:
        yield module


@pytest.fixture(scope="module", params=KINDS)
def dataset(request, shapes, tmp_path_factory) -> tuple[str, dict[str, Path]]:
    """40 train and 3 val images at 128 px: enough objects per class for the colour statistics."""
    kind = request.param
    return kind, shapes.write_shape_dataset(kind, tmp_path_factory.mktemp(kind) / "data", 40, 3, seed=5)


def test_layout_and_categories(dataset, shapes):
    kind, paths = dataset
    assert sorted(p.name for p in paths["val_images"].iterdir()) == ["000001.png", "000002.png", "000003.png"]
    coco = json.loads(paths["train_ann"].read_text())
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3, 4]
    assert [c["name"] for c in coco["categories"]] == list(shapes.CLASSES[kind])
    assert {c["supercategory"] for c in coco["categories"]} == {kind}
    assert [im["id"] for im in coco["images"]] == list(range(1, 41))
    assert [a["id"] for a in coco["annotations"]] == list(range(1, len(coco["annotations"]) + 1))


def test_annotations_decode_to_area_inside_bbox(dataset):
    _, paths = dataset
    for split in ("train", "val"):
        records = load_coco_instances(paths[f"{split}_ann"], paths[f"{split}_images"], strict=True)
        assert records.num_classes == 4
        for record in records.records:
            assert Image.open(record.file_name).size == (128, 128)
            for ann in record.annotations:
                mask = decode_segmentation(ann.segmentation, record.height, record.width)
                x, y, w, h = (int(v) for v in ann.bbox)
                assert not ann.iscrowd and isinstance(ann.segmentation["counts"], str)
                assert mask[y:y + h, x:x + w].sum() == mask.sum()
                assert mask[y, x:x + w].any() and mask[y + h - 1, x:x + w].any()  # tight box
                assert mask[y:y + h, x].any() and mask[y:y + h, x + w - 1].any()
    coco = json.loads(paths["train_ann"].read_text())
    for ann in coco["annotations"]:
        assert decode_segmentation(ann["segmentation"], 128, 128).sum() == ann["area"] > 0


def test_density_and_class_balance(dataset):
    kind, paths = dataset
    coco = json.loads(paths["train_ann"].read_text())
    per_image = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=41)[1:]
    per_class = np.bincount([a["category_id"] for a in coco["annotations"]], minlength=5)[1:]
    if kind == "cells":
        assert per_image.mean() >= 5 and per_image.max() <= 20
        assert np.median([a["area"] for a in coco["annotations"]]) < 300  # small objects
    else:
        assert per_image.mean() <= 5 and per_image.min() >= 1
        assert np.median([a["area"] for a in coco["annotations"]]) > 500  # large objects
    assert per_class.min() >= 0.5 * per_class.mean()  # every class is drawn


def colour_cue_z(paths: dict[str, Path]) -> float:
    """Largest gap between two classes' mean object colour (per RGB channel), in standard errors.

    Each object counts once, with the mean RGB of its visible pixels. Without a colour cue the gaps
    are noise: the largest of the 18 (6 class pairs x 3 channels) is rarely beyond 3 standard errors.
    """
    colours: dict[int, list[np.ndarray]] = {}
    for record in load_coco_instances(paths["train_ann"], paths["train_images"]).records:
        image = np.asarray(Image.open(record.file_name).convert("RGB"), dtype=np.float64)
        for ann in record.annotations:
            mask = decode_segmentation(ann.segmentation, record.height, record.width)
            colours.setdefault(ann.label, []).append(image[mask].mean(axis=0))
    stats = [(np.mean(c, axis=0), np.var(c, axis=0, ddof=1) / len(c)) for c in colours.values()]
    assert len(stats) == 4
    return max(float(np.max(np.abs(m1 - m2) / np.sqrt(v1 + v2)))
               for (m1, v1), (m2, v2) in itertools.combinations(stats, 2))


def test_colour_carries_no_class_information(dataset):
    # Measured with 40 images, seeds 0-9: the largest gap is 0.9-2.7 SE (cells), 1.0-2.8 SE (blocks).
    # Recolouring one class's pixels to a fixed hue (brightness kept) gives 11-14 SE (cells), 7-8 SE
    # (blocks). A weaker cue, that class only 20 % darker, gives 4-6 SE (cells), 2-3 SE (blocks).
    _, paths = dataset
    assert colour_cue_z(paths) < 4.0


def test_same_seed_same_bytes(shapes, tmp_path):
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    for kind in KINDS:
        first = shapes.write_shape_dataset(kind, tmp_path / f"{kind}_a", 6, 3, seed=1, image_size=64)
        shapes.write_shape_dataset(kind, tmp_path / f"{kind}_b", 6, 3, seed=1, image_size=64)
        shapes.write_shape_dataset(kind, tmp_path / f"{kind}_c", 6, 3, seed=2, image_size=64)
        a, b, c = (files(tmp_path / f"{kind}_{x}") for x in "abc")
        assert len(a) == 11 and a == b and a != c
        assert json.loads(first["val_ann"].read_text())["images"][0]["height"] == 64


def test_cli_refuses_a_non_empty_folder(shapes, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match=str(tmp_path)):
        shapes.main(["--kind", "cells", "--out", str(tmp_path), "--train", "2", "--val", "1"])
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]

"""COCO-style readers: the instances reader (`load_coco_instances`) and the unlabeled reader
(`load_unlabeled`), on tiny files written to tmp_path; every bad input is a one-line DataError."""
import copy
import json
import warnings

import numpy as np
import pytest
from PIL import Image

from semiseg.data.coco import load_coco_instances
from semiseg.data.masks import decode_segmentation, encode_rle
from semiseg.data.splits import write_splits
from semiseg.data.unlabeled import load_unlabeled
from semiseg.errors import ConfigError, DataError

BLOB = np.zeros((8, 10), bool)
BLOB[2:5, 3:9] = True
CROWD = np.zeros((6, 5), bool)
CROWD[1:, 2:4] = True


def column_major_runs(mask):
    flat = mask.T.ravel().astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return np.diff(np.concatenate([[0], edges])).tolist()


def valid_coco() -> dict:
    """3 images (one without annotations, one in a subfolder), non-contiguous unsorted category ids,
    a polygon, a compressed RLE, an uncompressed crowd RLE."""
    return {
        "images": [
            {"id": 10, "file_name": "a.png", "height": 8, "width": 10},
            {"id": 20, "file_name": "sub/b.png", "height": 6, "width": 5},
            {"id": 30, "file_name": "c.png", "height": 4, "width": 4},
        ],
        "categories": [{"id": 3, "name": "cat"}, {"id": 1, "name": "dog"}, {"id": 7, "name": "bird"}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 3, "segmentation": [[1, 1, 4, 1, 4, 4, 1, 4]],
             "bbox": [1, 1, 3, 3], "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 7, "segmentation": encode_rle(BLOB), "bbox": [3, 2, 6, 3]},
            {"id": 3, "image_id": 20, "category_id": 1, "iscrowd": 1,
             "segmentation": {"size": [6, 5], "counts": column_major_runs(CROWD)}},
            {"id": 4, "image_id": 20, "category_id": 3, "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2], [3, 3, 5, 3, 5, 5, 3, 5]]},
        ],
    }


def write_dataset(root, data) -> tuple:
    for image in data["images"]:
        path = root / "images" / image["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((image["height"], image["width"], 3), np.uint8)).save(path)
    ann_file = root / "instances.json"
    ann_file.write_text(json.dumps(data))
    return ann_file, root / "images"


def test_valid_file_loads_everything(tmp_path):
    ann_file, image_root = write_dataset(tmp_path, valid_coco())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataset = load_coco_instances(ann_file, image_root)
    assert dataset.source == ann_file and len(dataset) == 3 and dataset.num_classes == 3
    assert dataset.class_names == ["dog", "cat", "bird"] and dataset.category_ids == [1, 3, 7]
    a, b, c = dataset.records
    assert (a.image_id, a.height, a.width, a.file_name) == (10, 8, 10, image_root / "a.png")
    assert b.file_name == image_root / "sub" / "b.png"
    assert c.image_id == 30 and c.annotations == []
    assert [(x.ann_id, x.label, x.iscrowd) for x in a.annotations] == [(1, 1, False), (2, 2, False)]
    assert [(x.ann_id, x.label, x.iscrowd) for x in b.annotations] == [(3, 0, True), (4, 1, False)]
    assert a.annotations[0].bbox == [1.0, 1.0, 3.0, 3.0] and b.annotations[0].bbox is None
    assert [dataset.category_ids[x.label] for x in a.annotations + b.annotations] == [3, 7, 1, 3]  # way back
    polygon = decode_segmentation(a.annotations[0].segmentation, a.height, a.width)
    assert polygon.sum() == 9 and polygon[1:4, 1:4].all()
    assert np.array_equal(decode_segmentation(a.annotations[1].segmentation, a.height, a.width), BLOB)
    assert np.array_equal(decode_segmentation(b.annotations[0].segmentation, b.height, b.width), CROWD)
    two_parts = decode_segmentation(b.annotations[1].segmentation, b.height, b.width)
    assert two_parts.sum() == 8 and two_parts[:2, :2].all() and two_parts[3:5, 3:5].all()


def test_bbox_within_tolerance_is_accepted(tmp_path):
    data = valid_coco()
    data["annotations"][0]["bbox"] = [-0.5, 0, 10.9, 8.4]
    dataset = load_coco_instances(*write_dataset(tmp_path, data))
    assert dataset.records[0].annotations[0].bbox == [-0.5, 0.0, 10.9, 8.4]


def _set(path, value):
    def change(data):
        *keys, last = path
        target = data
        for key in keys:
            target = target[key]
        target[last] = value
    return change


def _drop(key):
    return lambda data: data.pop(key)


def _append(key, entry):
    return lambda data: data[key].append(entry)


BAD_CASES = {
    "missing key": (_drop("annotations"), "missing top-level key 'annotations'"),
    "images not a list": (_set(["images"], {"id": 1}), "'images' must be a list"),
    "empty": (_set(["images"], []), "no images"),
    "unknown image": (_set(["annotations", 2, "image_id"], 99), "annotation 3 refers to unknown image id 99"),
    "unknown category": (_set(["annotations", 0, "category_id"], 5), "annotation 1 refers to unknown category id 5"),
    "duplicate image": (_append("images", {"id": 10, "file_name": "c.png", "height": 4, "width": 4}),
                        "duplicate image id 10"),
    "duplicate annotation": (_append("annotations", {"id": 2, "image_id": 30, "category_id": 1,
                                                     "segmentation": [[0, 0, 1, 0, 1, 1]]}),
                             "duplicate annotation id 2"),
    "duplicate category": (_append("categories", {"id": 3, "name": "other"}), "duplicate category id 3"),
    "short polygon": (_set(["annotations", 0, "segmentation"], [[1, 1, 4, 1]]),
                      "annotation 1: polygon 0 has 2 points"),
    "odd polygon": (_set(["annotations", 3, "segmentation", 1], [3, 3, 5, 3, 5, 5, 3]),
                    "annotation 4: polygon 1 has an odd number"),
    "rle size": (_set(["annotations", 1, "segmentation", "size"], [10, 8]),
                 "annotation 2: RLE size [10, 8] (height, width) does not match the image size [8, 10]"),
    "rle counts": (_set(["annotations", 2, "segmentation", "counts"], [5, 3]), "annotation 3: RLE counts sum to 8"),
    "bbox outside": (_set(["annotations", 0, "bbox"], [5, 1, 7, 3]), "annotation 1 has bbox [5, 1, 7, 3] outside"),
    "negative bbox": (_set(["annotations", 0, "bbox"], [1, 1, -3, 3]), "negative width or height"),
    "short bbox": (_set(["annotations", 0, "bbox"], [1, 1, 3]), "expected 4 finite numbers"),
    "text in bbox": (_set(["annotations", 0, "bbox"], [1, 1, "3", 3]), "expected 4 finite numbers"),
    "no segmentation": (lambda data: data["annotations"][1].pop("segmentation"), "annotation 2 has no 'segmentation'"),
    "no annotation id": (lambda data: data["annotations"][1].pop("id"), "annotation #1 has no 'id'"),
    "string image id": (_set(["images", 1, "id"], "b"), "image #1 has 'id' = 'b', expected an integer"),
    "zero height": (_set(["images", 2, "height"], 0), "image 30 has 'height' = 0, expected a positive integer"),
    "no file name": (lambda data: data["images"][0].pop("file_name"), "image 10 has no 'file_name'"),
    "nameless category": (lambda data: data["categories"][0].pop("name"), "category 3 has no 'name'"),
    "iscrowd": (_set(["annotations", 0, "iscrowd"], 2), "iscrowd = 2"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_file_raises_one_line_error_naming_file_and_problem(tmp_path, case):
    change, words = BAD_CASES[case]
    data = valid_coco()
    ann_file, image_root = write_dataset(tmp_path, data)
    data = copy.deepcopy(data)
    change(data)
    ann_file.write_text(json.dumps(data))
    for read in (lambda: load_coco_instances(ann_file, image_root),  # what `semiseg train` reads
                 lambda: write_splits(ann_file, [50], seed=0, out_dir=tmp_path / "splits")):  # `semiseg split`
        with pytest.raises(DataError) as info:
            read()
        message = str(info.value)
        assert message.startswith(f"{ann_file}: ") and words in message and "\n" not in message
    assert not (tmp_path / "splits").exists()  # nothing written from a bad file


@pytest.mark.parametrize("text, words", [
    ('{"images": [\n  {"id": 1,}\n]}', "malformed JSON at line 2, column 12"),
    ("[1, 2]", "expected a JSON object"),
])
def test_unparseable_json(tmp_path, text, words):
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(DataError, match=f"bad.json: {words}"):
        load_coco_instances(tmp_path / "bad.json", tmp_path)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(DataError, match="nothere.json: file not found"):
        load_coco_instances(tmp_path / "nothere.json", tmp_path)


def test_missing_images_warn_with_count_or_fail_when_strict(tmp_path):
    ann_file, image_root = write_dataset(tmp_path, valid_coco())
    (image_root / "c.png").unlink()
    (image_root / "sub" / "b.png").unlink()
    with pytest.warns(UserWarning, match="2 of 3 image files are missing") as caught:
        dataset = load_coco_instances(ann_file, image_root)
    assert len(caught) == 1 and str(ann_file) in str(caught[0].message)
    assert [r.image_id for r in dataset.records] == [10]
    with pytest.raises(DataError, match="instances.json: 2 of 3 image files are missing"):
        load_coco_instances(ann_file, image_root, strict=True)
    with pytest.warns(UserWarning, match="2 of 3 image files are missing"):  # `semiseg split --images`: the same
        write_splits(ann_file, [50], seed=0, out_dir=tmp_path / "splits", image_root=image_root)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # without --images only the annotations are checked
        write_splits(ann_file, [50], seed=0, out_dir=tmp_path / "splits2")


@pytest.mark.parametrize("file_name", ["../../../../etc/passwd", "/etc/passwd", "sub/../../secret.png"])
def test_file_names_leading_outside_the_image_root_are_refused(tmp_path, file_name):
    data = valid_coco()
    ann_file, image_root = write_dataset(tmp_path, data)
    data["images"][1]["file_name"] = file_name
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DataError, match=rf"instances.json: image file_name '{file_name}' leads outside the image "
                                        r"folder .*images \(set data.allow_outside_root: true"):
        load_coco_instances(ann_file, image_root)
    unlabeled = tmp_path / "unlabeled.json"
    unlabeled.write_text(json.dumps({"images": [{"id": 1, "file_name": file_name}]}))
    with pytest.raises(DataError, match="unlabeled.json: image file_name .* leads outside the image folder"):
        load_unlabeled(unlabeled, image_root)
    (tmp_path / "secret.png").write_bytes((image_root / "a.png").read_bytes())  # an opt-in layout: allowed
    data["images"][1]["file_name"] = str(tmp_path / "secret.png")
    ann_file.write_text(json.dumps(data))
    assert len(load_coco_instances(ann_file, image_root, allow_outside_root=True).records) == 3


def test_symlinks_inside_the_image_root_are_followed(tmp_path):
    data = valid_coco()
    ann_file, image_root = write_dataset(tmp_path, data)
    (tmp_path / "elsewhere").mkdir()
    (image_root / "c.png").rename(tmp_path / "elsewhere" / "c.png")
    (image_root / "c.png").symlink_to(tmp_path / "elsewhere" / "c.png")
    assert len(load_coco_instances(ann_file, image_root).records) == 3


def test_all_images_missing_is_an_error(tmp_path):
    ann_file, _ = write_dataset(tmp_path, valid_coco())
    with pytest.raises(DataError, match="3 of 3 image files are missing"):
        load_coco_instances(ann_file, tmp_path / "wrong_root")


# --- unlabeled data ---------------------------------------------------------------------------

def test_unlabeled_folder_is_recursive_sorted_and_skips_non_images(tmp_path):
    folder = tmp_path / "unl"
    for name in ["b.png", "a.JPG", "sub/c.jpeg", ".hidden.jpg", "notes.txt", ".cache/d.png"]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")
    dataset = load_unlabeled(folder)
    assert [r.file_name for r in dataset.records] == [folder / "a.JPG", folder / "b.png", folder / "sub" / "c.jpeg"]
    assert [r.image_id for r in dataset.records] == [0, 1, 2]
    assert dataset.class_names == [] and dataset.category_ids == [] and dataset.source == folder
    assert all(r.height is None and r.annotations == [] for r in dataset.records)


def test_unlabeled_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="empty: no images found"):
        load_unlabeled(tmp_path / "empty")
    with pytest.raises(DataError, match="nothere: no such folder or file"):
        load_unlabeled(tmp_path / "nothere")
    with pytest.raises(ConfigError, match="image_root is only used with a json"):
        load_unlabeled(tmp_path / "empty", image_root=tmp_path)


def test_unlabeled_json_with_string_ids_like_guided_distillation(tmp_path):
    (tmp_path / "images").mkdir()
    names = ["000000000009.jpg", "000000000025.jpg", "000000000030.jpg"]
    for name in names:
        (tmp_path / "images" / name).write_bytes(b"")
    images = [{"file_name": n, "id": n[:-4], "height": 480, "width": 640} for n in names]
    ann = tmp_path / "coco_unlabel_train.json"
    ann.write_text(json.dumps({"annotations": [], "categories": [], "images": images}))
    dataset = load_unlabeled(ann, image_root=tmp_path / "images")
    assert [r.image_id for r in dataset.records] == [0, 1, 2]
    assert [r.file_name.name for r in dataset.records] == names
    assert (dataset.records[0].height, dataset.records[0].width) == (480, 640)
    assert load_unlabeled(ann, image_root=tmp_path / "images").records == dataset.records  # stable


def test_unlabeled_from_instances_json_keeps_ids_and_ignores_annotations(tmp_path):
    ann_file, image_root = write_dataset(tmp_path, valid_coco())
    dataset = load_unlabeled(ann_file, image_root)
    assert [r.image_id for r in dataset.records] == [10, 20, 30]
    assert all(r.annotations == [] for r in dataset.records) and dataset.class_names == []


def test_unlabeled_json_default_root_missing_files_and_errors(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    ann = tmp_path / "unlabeled.json"
    ann.write_text(json.dumps({"images": [{"file_name": "x.png", "id": 1}, {"file_name": "y.png", "id": 2}]}))
    with pytest.warns(UserWarning, match="1 of 2 image files are missing"):
        assert [r.image_id for r in load_unlabeled(ann).records] == [1]
    with pytest.raises(DataError, match="unlabeled.json: 1 of 2 image files are missing"):
        load_unlabeled(ann, strict=True)
    for content, words in [({"images": []}, "no images"), ({"files": []}, "'images' list"),
                           ({"images": [{"id": 1}]}, "image #0 has no 'file_name'"),
                           ({"images": [{"file_name": "x.png", "id": "a"}, {"file_name": "x.png", "id": "a"}]},
                            "duplicate image id 'a'"),
                           ({"images": [{"file_name": "x.png", "height": -1}]}, "'height' = -1")]:
        ann.write_text(json.dumps(content))
        with pytest.raises(DataError, match=words):
            load_unlabeled(ann)
    (tmp_path / "list.txt").write_text("x.png")
    with pytest.raises(DataError, match="list.txt: expected an image folder or a .json file"):
        load_unlabeled(tmp_path / "list.txt")

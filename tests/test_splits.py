"""Labeled splits: seeded and nested, Guided Distillation file names, id lists, given lists."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from semiseg.cli import main as cli_main
from semiseg.data.splits import num_labeled, sample_key, split_name, write_splits
from semiseg.errors import ConfigError, DataError

NUM_IMAGES = 50


def make_coco(path: Path, file_names: list[str] | None = None) -> dict:
    """A small instances json: ids 10, 20, ..., two annotations per image, every fifth one a crowd."""
    file_names = file_names or [f"{i:06d}.png" for i in range(1, NUM_IMAGES + 1)]
    images = [{"id": 10 * (i + 1), "file_name": name, "height": 32, "width": 32} for i, name in enumerate(file_names)]
    annotations = []
    for im in images:
        for _ in range(2):
            annotations.append({"id": len(annotations) + 1, "image_id": im["id"], "category_id": 3,
                                "segmentation": [[1, 1, 9, 1, 9, 9]], "area": 32.0, "bbox": [1, 1, 8, 8],
                                "iscrowd": int(len(annotations) % 5 == 0)})
    coco = {"info": {"description": "test"}, "licenses": [{"id": 1, "name": "x"}],
            "categories": [{"id": 3, "name": "thing"}], "images": images, "annotations": annotations}
    path.write_text(json.dumps(coco))
    return coco


@pytest.fixture
def ann(tmp_path) -> Path:
    path = tmp_path / "instances_train.json"
    make_coco(path)
    return path


def split_ids(path: Path) -> set[int]:
    return {im["id"] for im in json.loads(path.read_text())["images"]}


@pytest.mark.parametrize("percent, name", [(0.4, "250"), (0.1, "1000"), (0.25, "400"), (0.5, "200"),
                                           (1, "1"), (1.0, "1"), (10, "10"), (100, "100")])
def test_names_follow_guided_distillation(percent, name):
    assert split_name(percent) == name


@pytest.mark.parametrize("percent", [0, -1, 100.5, 2.5, 0.3, float("nan")])
def test_bad_percent_is_a_config_error(percent, ann, tmp_path):
    with pytest.raises(ConfigError, match="percentage"):
        write_splits(ann, [10, percent], seed=0, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_negative_seed_or_nothing_to_do_is_a_config_error(ann, tmp_path):
    with pytest.raises(ConfigError, match="seed"):
        write_splits(ann, [10], seed=-1, out_dir=tmp_path)
    with pytest.raises(ConfigError, match="at least one"):
        write_splits(ann, [], seed=0, out_dir=tmp_path)


def test_sizes_are_int_of_p_times_n_but_at_least_one():
    assert [num_labeled(p, 118287) for p in (0.4, 1, 10)] == [473, 1182, 11828]  # the reference's counts
    assert num_labeled(0.4, 50) == 1 and num_labeled(10, 50) == 5 and num_labeled(100, 50) == 50


def test_file_names_and_returned_paths(ann, tmp_path):
    out = tmp_path / "splits"
    paths = write_splits(ann, [10, 0.4, 1], seed=0, out_dir=out)
    assert [p.name for p in paths] == ["instances_train_250.json", "instances_train_1.json", "instances_train_10.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"instances_train_{s}.json" for s in ("250", "1", "10")]
        + [f"instances_train_{s}_image_ids.txt" for s in ("250", "1", "10")])


def test_splits_are_seeded_and_reproducible(ann, tmp_path):
    a = write_splits(ann, [20], seed=1, out_dir=tmp_path / "a")[0]
    b = write_splits(ann, [20], seed=1, out_dir=tmp_path / "b")[0]
    c = write_splits(ann, [20], seed=2, out_dir=tmp_path / "c")[0]
    assert a.read_bytes() == b.read_bytes()
    assert split_ids(a) != split_ids(c)
    assert len(split_ids(a)) == len(split_ids(c)) == 10


def test_smaller_splits_are_subsets_of_larger_ones(ann, tmp_path):
    paths = write_splits(ann, [100, 2, 50, 10, 20], seed=3, out_dir=tmp_path)
    sets = [split_ids(p) for p in paths]
    assert [len(s) for s in sets] == [1, 5, 10, 25, 50]
    assert all(small < large for small, large in zip(sets, sets[1:]))
    # The same percentage drawn alone gives the same images (one permutation, prefixes of it).
    alone = write_splits(ann, [10], seed=3, out_dir=tmp_path / "alone")[0]
    assert split_ids(alone) == sets[1]


def test_json_keeps_metadata_and_every_annotation_of_chosen_images(ann, tmp_path):
    coco = json.loads(ann.read_text())
    path = write_splits(ann, [20], seed=0, out_dir=tmp_path)[0]
    split = json.loads(path.read_text())
    for key in ("info", "licenses", "categories"):
        assert split[key] == coco[key]
    chosen = {im["id"] for im in split["images"]}
    expected = [a for a in coco["annotations"] if a["image_id"] in chosen]
    assert split["annotations"] == expected and any(a["iscrowd"] for a in expected)
    assert split["images"] == [im for im in coco["images"] if im["id"] in chosen]  # original order kept
    ids = (tmp_path / "instances_train_20_image_ids.txt").read_text().split()
    assert [int(i) for i in ids] == sorted(chosen)


def test_unlabeled_complement(ann, tmp_path):
    write_splits(ann, [10], seed=0, out_dir=tmp_path, write_unlabeled=True)
    labeled = {int(i) for i in (tmp_path / "instances_train_10_image_ids.txt").read_text().split()}
    unlabeled_ids = [int(i) for i in (tmp_path / "instances_train_10_unlabeled_image_ids.txt").read_text().split()]
    unlabeled = json.loads((tmp_path / "instances_train_10_unlabeled.json").read_text())
    assert list(unlabeled) == ["images"]
    assert {im["id"] for im in unlabeled["images"]} == set(unlabeled_ids)
    assert labeled.isdisjoint(unlabeled_ids) and len(labeled) + len(unlabeled_ids) == NUM_IMAGES
    assert labeled | set(unlabeled_ids) == {10 * (i + 1) for i in range(NUM_IMAGES)}


def test_rerun_is_a_no_op_but_different_content_is_refused(ann, tmp_path):
    path = write_splits(ann, [10], seed=0, out_dir=tmp_path)[0]
    before = path.stat().st_mtime_ns
    write_splits(ann, [10], seed=0, out_dir=tmp_path)
    assert path.stat().st_mtime_ns == before
    with pytest.raises(DataError, match="instances_train_10.json: exists with different content"):
        write_splits(ann, [10], seed=1, out_dir=tmp_path)


def test_given_lists_match_ids_file_names_and_cityscapes_basenames(tmp_path):
    names = [f"aachen/aachen_{i:06d}_000019_leftImg8bit.png" for i in range(NUM_IMAGES)]
    ann = tmp_path / "cityscapes_train.json"
    make_coco(ann, names)
    lists = tmp_path / "perc_5.txt"
    lists.write_text("# comment\n30\naachen/aachen_000004_000019_leftImg8bit.png\n\n"
                     "aachen_000007_000019_leftImg8bit.png\naachen_000009_000019_gtFine_instanceIds.png\n")
    paths = write_splits(ann, [], seed=0, out_dir=tmp_path / "out", labeled_lists=[lists], write_unlabeled=True)
    assert [p.name for p in paths] == ["cityscapes_train_perc_5.json"]
    assert split_ids(paths[0]) == {30, 50, 80, 100}
    assert len(json.loads((tmp_path / "out" / "cityscapes_train_perc_5_unlabeled.json").read_text())["images"]) == 46


def test_unknown_list_entry_names_file_and_line(ann, tmp_path):
    lists = tmp_path / "mine.txt"
    lists.write_text("10\n20\nnot_an_image.png\n")
    with pytest.raises(DataError, match=r"mine\.txt:3: 'not_an_image\.png' matches no image"):
        write_splits(ann, [], seed=0, out_dir=tmp_path / "out", labeled_lists=[lists])
    assert not (tmp_path / "out").exists()


def test_sample_key_drops_trailing_words_only():
    assert sample_key("x/aachen_000000_000019_leftImg8bit.png") == "aachen_000000_000019"
    assert sample_key("aachen_000000_000019_gtFine_instanceIds.png") == "aachen_000000_000019"
    assert sample_key("frame_001.png") == "frame_001" and sample_key("cat.jpg") == "cat"


def test_an_entry_naming_several_images_is_an_error(tmp_path):
    ann = tmp_path / "stereo.json"
    make_coco(ann, [f"a_{i // 2}_{'left' if i % 2 else 'right'}.png" for i in range(NUM_IMAGES)])
    lists = tmp_path / "l.txt"
    lists.write_text("a_3_mask.png\n")
    with pytest.raises(DataError, match=r"l\.txt:1: .* matches 2 images"):
        write_splits(ann, [], seed=0, out_dir=tmp_path / "out", labeled_lists=[lists])


@pytest.mark.parametrize("content, problem", [(None, "file not found"), ("{", "malformed JSON"),
                                              ('{"images": []}', "missing top-level key 'annotations'")])
def test_bad_annotation_file_is_a_data_error(tmp_path, content, problem):
    ann = tmp_path / "bad.json"
    if content is not None:
        ann.write_text(content)
    with pytest.raises(DataError, match=problem):
        write_splits(ann, [10], seed=0, out_dir=tmp_path / "out")


def test_cli_split_prints_one_line_per_split(ann, tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["split", "--ann", str(ann), "--percent", "2", "10", "--seed", "0", "--out", str(out),
                     "--unlabeled"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"split 2%: 1 images, 2 annotations -> {out / 'instances_train_2.json'}",
                     f"split 10%: 5 images, 10 annotations -> {out / 'instances_train_10.json'}"]
    assert cli_main(["split", "--ann", str(ann), "--percent", "2.5", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("semiseg: error: split: percentage 2.5")


def test_splits_of_the_synthetic_dataset_load_with_the_readers(tmp_path):
    from semiseg.data.coco import load_coco_instances
    from semiseg.data.synthetic import write_synthetic_dataset
    from semiseg.data.unlabeled import load_unlabeled

    data = write_synthetic_dataset(tmp_path / "synth", num_train=20, num_val=1, seed=0)
    path = write_splits(data["train_ann"], [10], seed=0, out_dir=tmp_path / "splits", write_unlabeled=True)[0]
    labeled = load_coco_instances(path, data["train_images"])
    unlabeled = load_unlabeled(tmp_path / "splits" / "instances_train_10_unlabeled.json", data["train_images"])
    assert len(labeled) == 2 and len(unlabeled) == 18
    assert labeled.category_ids == [1, 2, 3, 5, 8, 13, 21, 34]
    assert {r.image_id for r in labeled.records}.isdisjoint(r.image_id for r in unlabeled.records)

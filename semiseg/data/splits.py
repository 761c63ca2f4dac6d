"""Seeded, nested labeled-percentage splits of a COCO instances json (and splits from given lists).

One seeded permutation of the image ids is drawn and the split of p % takes its first
max(1, int(p * N / 100)) images, so a smaller split is always a subset of a larger one (Guided
Distillation draws every percentage independently and unseeded). Files are named as in Guided
Distillation: `<stem>_{S}.json` with S = p for p >= 1 and S = 100 / p below 1 % (0.4 -> 250).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from semiseg.data.coco import coco_records, read_json
from semiseg.errors import ConfigError, DataError


@dataclass
class _Split:
    """A chosen subset of images. name: the file-name suffix (`250`, `10`, or a list's stem)."""

    name: str
    label: str  # how the split is described in the summary ("0.4%", "perc_5.txt")
    image_ids: set


def write_splits(ann_file: Path, percents: list[float], seed: int, out_dir: Path, write_unlabeled: bool = False,
                 labeled_lists: list[Path] | None = None, image_root: Path | None = None,
                 allow_outside_root: bool = False) -> list[Path]:
    """Write one labeled json (+ image id list) per percentage and per given list; return the json paths.

    For each split, in `out_dir`: `<stem>_{S}.json` (info, licenses, categories of `ann_file`; its
    images and all their annotations, crowd included) and `<stem>_{S}_image_ids.txt`; with
    `write_unlabeled` also `<stem>_{S}_unlabeled.json` (`{"images": [...]}`, the complement) and
    `<stem>_{S}_unlabeled_image_ids.txt`. A list `L.txt` in `labeled_lists` gives `<stem>_L.*`.
    An existing file with identical content is left as is; one with different content is an error.
    `ann_file` is validated as `semiseg train` reads it (`image_root`: also check its image files).
    """
    ann_file = Path(ann_file)
    for p in percents:
        split_name(p)  # reject unnamable percentages before reading anything
    if not percents and not labeled_lists:
        raise ConfigError("split: give at least one percentage or one labeled list")
    if seed < 0:
        raise ConfigError(f"split: seed must be >= 0, got {seed}")
    coco = _read_coco(ann_file, image_root, allow_outside_root)
    splits = _percent_splits(coco, percents, seed) + [_list_split(coco, Path(f), ann_file) for f in labeled_lists or []]
    if len({s.name for s in splits}) < len(splits):
        raise ConfigError(f"split: two splits of {ann_file} would get the same file name: {[s.name for s in splits]}")
    outputs = {}
    for split in splits:
        outputs.update(_split_files(coco, split, Path(out_dir) / f"{ann_file.stem}_{split.name}", write_unlabeled))
    _write_all(outputs)
    json_paths = []
    for split in splits:
        path = Path(out_dir) / f"{ann_file.stem}_{split.name}.json"
        num_anns = sum(a["image_id"] in split.image_ids for a in coco["annotations"])
        print(f"split {split.label}: {len(split.image_ids)} images, {num_anns} annotations -> {path}")
        json_paths.append(path)
    return json_paths


def split_name(percent: float) -> str:
    """Guided Distillation's file-name suffix of a percentage: `int(p)` for p >= 1, `100 / p` below 1."""
    if not 0 < percent <= 100:
        raise ConfigError(f"split: percentage {percent:g} is not in (0, 100]")
    if percent >= 1:
        if percent != int(percent):
            raise ConfigError(f"split: percentage {percent:g} >= 1 must be a whole number (file names use int(p))")
        return str(int(percent))
    inverse = 100 / percent
    if not math.isclose(inverse, round(inverse), rel_tol=1e-9):
        raise ConfigError(f"split: percentage {percent:g} below 1 must divide 100 (file names use 100/p), "
                          "e.g. 0.1, 0.2, 0.25, 0.4, 0.5")
    return str(round(inverse))


def num_labeled(percent: float, num_images: int) -> int:
    """Images in a p % split: int(p * N / 100) as the reference, but at least one."""
    return max(1, int(percent * num_images / 100 + 1e-9))


def _percent_splits(coco: dict, percents: list[float], seed: int) -> list[_Split]:
    order = np.random.default_rng(seed).permutation(len(coco["images"]))
    ids = _sorted_ids(coco["images"])
    shuffled = [ids[i] for i in order]
    return [_Split(split_name(p), f"{p:g}%", set(shuffled[:num_labeled(p, len(ids))])) for p in sorted(set(percents))]


def _list_split(coco: dict, list_file: Path, ann_file: Path) -> _Split:
    """Images named by the lines of `list_file` (blank lines and `#` comments are skipped).

    A line matches, in this order: an image id; an image's `file_name`; its base name; or the image
    with the same sample key (see `sample_key`), so Cityscapes' `..._gtFine_instanceIds.png` lists
    name the `..._leftImg8bit.png` images. A line that matches no image or several is an error.
    """
    try:
        lines = list_file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{list_file}: cannot read the split list ({e})") from None
    finder = _ImageFinder(coco["images"])
    chosen = set()
    for number, line in enumerate(lines, start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        found = finder.find(entry)
        if len(found) != 1:
            problem = "matches no image" if not found else f"matches {len(found)} images"
            raise DataError(f"{list_file}:{number}: {entry!r} {problem} of {ann_file}")
        chosen |= found
    if not chosen:
        raise DataError(f"{list_file}: the split list names no image")
    return _Split(list_file.stem, list_file.name, chosen)


def sample_key(name: str) -> str:
    """The base name without extension and without trailing `_` words that contain a letter.

    `aachen_000000_000019_leftImg8bit.png` and `aachen_000000_000019_gtFine_instanceIds.png` both
    give `aachen_000000_000019`; `frame_001.png` gives `frame_001`; the first word is always kept.
    """
    parts = Path(Path(name).name).stem.split("_")
    while len(parts) > 1 and any(c.isalpha() for c in parts[-1]):
        parts.pop()
    return "_".join(parts)


class _ImageFinder:
    """Looks up images of a COCO json by id, file name, base name or sample key (see `_list_split`)."""

    def __init__(self, images: list[dict]):
        self.by_id = {str(im["id"]): im["id"] for im in images}
        self.by_name: dict[str, set] = {}
        self.by_key: dict[str, set] = {}
        for im in images:
            name = str(im.get("file_name", ""))
            for key in {name, Path(name).name}:
                self.by_name.setdefault(key, set()).add(im["id"])
            self.by_key.setdefault(sample_key(name), set()).add(im["id"])

    def find(self, entry: str) -> set:
        if entry in self.by_id:
            return {self.by_id[entry]}
        for name in (entry, Path(entry).name):
            if name in self.by_name:
                return self.by_name[name]
        return self.by_key.get(sample_key(entry), set())


def _read_coco(ann_file: Path, image_root: Path | None, allow_outside_root: bool) -> dict:
    """The parsed json, validated by the reader `semiseg train` uses (same errors and counted warnings);
    its image files are checked when `image_root` is given."""
    coco = read_json(ann_file)
    coco_records(coco, ann_file, image_root or ann_file.parent, allow_outside_root=allow_outside_root,
                 check_files=image_root is not None)
    return coco


def _split_files(coco: dict, split: _Split, prefix: Path, write_unlabeled: bool) -> dict[Path, str]:
    """Path -> text of every file of one split."""
    chosen = split.image_ids
    labeled = {key: coco[key] for key in ("info", "licenses", "categories") if key in coco}
    labeled["images"] = [im for im in coco["images"] if im["id"] in chosen]
    labeled["annotations"] = [a for a in coco["annotations"] if a["image_id"] in chosen]
    files = {prefix.with_name(prefix.name + ".json"): json.dumps(labeled),
             prefix.with_name(prefix.name + "_image_ids.txt"): _id_lines(labeled["images"])}
    if write_unlabeled:
        unlabeled = [im for im in coco["images"] if im["id"] not in chosen]
        files[prefix.with_name(prefix.name + "_unlabeled.json")] = json.dumps({"images": unlabeled})
        files[prefix.with_name(prefix.name + "_unlabeled_image_ids.txt")] = _id_lines(unlabeled)
    return files


def _id_lines(images: list[dict]) -> str:
    return "".join(f"{i}\n" for i in _sorted_ids(images))


def _sorted_ids(images: list[dict]) -> list:
    """Image ids in ascending order (COCO ids are ints; string ids, as in unlabeled jsons, sort as text)."""
    return sorted((im["id"] for im in images), key=lambda i: (isinstance(i, str), i))


def _write_all(files: dict[Path, str]) -> None:
    """Write every file, after checking that none would replace a different existing file."""
    for path, text in files.items():
        if path.exists() and (not path.is_file() or path.read_text() != text):
            raise DataError(f"{path}: exists with different content; remove it or choose another output folder")
    try:
        next(iter(files)).parent.mkdir(parents=True, exist_ok=True)
        for path, text in files.items():
            if not path.exists():
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text(text)
                tmp.replace(path)
    except OSError as e:
        raise DataError(f"{e.filename}: cannot write the split ({e.strerror})") from None

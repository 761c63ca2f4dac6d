"""Labeled datasets by `data.format` and `model.task`: one function that every consumer (training, evaluation) calls.

    coco:          `ann` is a COCO instances json, `images` its image folder
    coco_panoptic: `ann` is a COCO panoptic json (PNGs in the folder of the same name), `images` its images
    cityscapes:    `ann` is a Cityscapes `gtFine/<split>` folder, `images` the matching `leftImg8bit/<split>`
    ade20k:        `ann` is ADEChallengeData2016's `annotations/<split>` folder, `images` its `images/<split>`
                   (semantic task only)
    semantic_png:  `ann` is a folder of label PNGs (ADE20K's convention) with `<ann>.json` listing the
                   classes beside it (semantic task only)

For the semantic task the annotations of a class are merged into one per image (crowds included):
semantic segmentation is one mask per present class, as in the references.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from semiseg.data.ade20k import load_ade20k_semantic, load_semantic_pngs
from semiseg.data.cityscapes import load_cityscapes_instances, records_to_coco
from semiseg.data.coco import load_coco_instances, read_json
from semiseg.data.coco_panoptic import load_coco_panoptic
from semiseg.data.masks import decode_segmentation, encode_rle
from semiseg.data.records import Annotation, DatasetRecords
from semiseg.errors import ConfigError, DataError


def read_labeled(data_format: str, ann: Path, images: Path, strict: bool = False,
                 allow_outside_root: bool = False, task: str = "instance") -> DatasetRecords:
    """The records of a labeled dataset in `data_format` for `task` (`strict`: COCO instances only)."""
    if data_format in ("ade20k", "semantic_png"):
        if task != "semantic":
            raise ConfigError(f"data.format={data_format} holds semantic labels only, not model.task={task}; "
                              "panoptic / instance files are read with data.format=coco_panoptic / coco")
        load = load_ade20k_semantic if data_format == "ade20k" else load_semantic_pngs
        return load(Path(ann), Path(images))
    if data_format == "cityscapes":
        records = load_cityscapes_instances(Path(ann), Path(images), task)
    elif data_format == "coco_panoptic":
        records = load_coco_panoptic(Path(ann), Path(images), allow_outside_root=allow_outside_root)
    else:
        records = load_coco_instances(Path(ann), Path(images), strict=strict, allow_outside_root=allow_outside_root)
    return merged_by_class(records) if task == "semantic" else records


def select_listed(dataset: DatasetRecords, list_file: Path) -> DatasetRecords:
    """Only the images a split list names, one per line, in the list's order: an image file name, or a
    Cityscapes frame as Guided Distillation's `perc_*.txt` list them (`<city>_<seq>_<frame>_gtFine_instanceIds.png`,
    matched to `<city>_<seq>_<frame>_leftImg8bit.png`). A name without an image is a DataError."""
    try:
        names = [line.strip() for line in Path(list_file).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{list_file}: cannot read the split list ({e})") from None
    by_key = {_frame_key(r.file_name.name): r for r in dataset.records}
    missing = [n for n in names if _frame_key(Path(n).name) not in by_key]
    if missing:
        raise DataError(f"{list_file}: {len(missing)} listed image(s) not in {dataset.source}, e.g. {missing[0]}")
    if not names:
        raise DataError(f"{list_file}: the split list is empty")
    return dataclasses.replace(dataset, records=[by_key[_frame_key(Path(n).name)] for n in dict.fromkeys(names)])


def _frame_key(name: str) -> str:
    """A Cityscapes file name without its `_gtFine_*` / `_leftImg8bit` part; any other name as it is."""
    for marker in ("_gtFine_", "_leftImg8bit"):
        if marker in name:
            return name[:name.index(marker)]
    return name


def merged_by_class(dataset: DatasetRecords) -> DatasetRecords:
    """Each image's annotations of a class merged into one non-crowd annotation (the semantic targets)."""
    records = []
    for record in dataset.records:
        masks: dict[int, np.ndarray] = {}
        for a in record.annotations:
            mask = decode_segmentation(a.segmentation, record.height, record.width)
            masks[a.label] = masks[a.label] | mask if a.label in masks else mask
        merged = [Annotation(label, encode_rle(mask)) for label, mask in sorted(masks.items())]
        records.append(dataclasses.replace(record, annotations=merged))
    return dataclasses.replace(dataset, records=records)


def coco_ground_truth(data_format: str, ann: Path, records: DatasetRecords) -> dict[str, Any]:
    """The COCO instances dict evaluation compares with: the json itself, or built from `records`."""
    return read_json(Path(ann)) if data_format == "coco" else records_to_coco(records)

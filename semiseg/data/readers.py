"""Labeled datasets by `data.format`: one function that every consumer (training, evaluation) calls.

    coco:       `ann` is a COCO instances json, `images` its image folder
    cityscapes: `ann` is a Cityscapes `gtFine/<split>` folder, `images` the matching `leftImg8bit/<split>`
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from semiseg.data.cityscapes import load_cityscapes_instances, records_to_coco
from semiseg.data.coco import load_coco_instances, read_json
from semiseg.data.records import DatasetRecords

def read_labeled(data_format: str, ann: Path, images: Path, strict: bool = False,
                 allow_outside_root: bool = False) -> DatasetRecords:
    """The records of a labeled dataset in `data_format` (`strict` / `allow_outside_root`: COCO only)."""
    if data_format == "cityscapes":
        return load_cityscapes_instances(Path(ann), Path(images))
    return load_coco_instances(Path(ann), Path(images), strict=strict, allow_outside_root=allow_outside_root)


def coco_ground_truth(data_format: str, ann: Path, records: DatasetRecords) -> dict[str, Any]:
    """The COCO instances dict evaluation compares with: the json itself, or built from `records`."""
    return read_json(Path(ann)) if data_format == "coco" else records_to_coco(records)

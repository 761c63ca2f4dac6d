"""COCO instances json -> `DatasetRecords`, with every inconsistency reported as a `DataError`.

Category ids (sorted) map to contiguous labels 0..K-1; `DatasetRecords.category_ids[label]` maps
back for evaluation. Images without annotations are kept; crowd annotations are kept with
`iscrowd=True` (training ignores them, evaluation uses them). Segmentations are validated at load
time without being rasterised (`check_segmentation`), so a 100k-annotation file loads fast.
"""
from __future__ import annotations

import gc
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from semiseg.data.images import drop_missing_images, image_path
from semiseg.data.masks import check_segmentation
from semiseg.data.records import Annotation, DatasetRecords, ImageRecord
from semiseg.errors import DataError

BBOX_TOLERANCE = 1.0  # pixels a bbox may stick out of its image (rounding in exported files)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: it would rescan the millions of freshly parsed (and
    acyclic) json objects over and over, which more than doubles the load time of a large file."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def read_json(path: Path) -> Any:
    """Parse a JSON file; `DataError` naming the file for a missing file or malformed JSON."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f, _gc_paused():
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_field(entry: dict, key: str, where: str, source: Path, positive: bool = False) -> int:
    if key not in entry:
        raise DataError(f"{source}: {where} has no '{key}'")
    value = entry[key]
    if not _is_int(value) or (positive and value <= 0):
        kind = "a positive integer" if positive else "an integer"
        raise DataError(f"{source}: {where} has '{key}' = {value!r}, expected {kind}")
    return value


def _list_entries(data: dict, key: str, source: Path) -> list[dict]:
    if key not in data:
        raise DataError(f"{source}: missing top-level key '{key}' (a COCO instances file has 'images', "
                        f"'annotations' and 'categories')")
    entries = data[key]
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise DataError(f"{source}: '{key}' must be a list of objects")
    return entries


def _read_categories(entries: list[dict], source: Path) -> tuple[list[int], list[str]]:
    """Category ids sorted ascending (index = contiguous label) and their names."""
    names: dict[int, str] = {}
    for index, entry in enumerate(entries):
        cat_id = _int_field(entry, "id", f"category #{index}", source)
        if cat_id in names:
            raise DataError(f"{source}: duplicate category id {cat_id}")
        if not isinstance(entry.get("name"), str):
            raise DataError(f"{source}: category {cat_id} has no 'name' string")
        names[cat_id] = entry["name"]
    ids = sorted(names)
    return ids, [names[i] for i in ids]


def _read_images(entries: list[dict], image_root: Path, source: Path, allow_outside_root: bool) -> dict[int, ImageRecord]:
    """COCO `images` entries -> records keyed by image id (json order), with validated sizes."""
    images: dict[int, ImageRecord] = {}
    for index, entry in enumerate(entries):
        image_id = _int_field(entry, "id", f"image #{index}", source)
        if image_id in images:
            raise DataError(f"{source}: duplicate image id {image_id}")
        file_name = entry.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise DataError(f"{source}: image {image_id} has no 'file_name'")
        height = _int_field(entry, "height", f"image {image_id}", source, positive=True)
        width = _int_field(entry, "width", f"image {image_id}", source, positive=True)
        images[image_id] = ImageRecord(image_path(image_root, file_name, source, allow_outside_root), image_id,
                                        height, width)
    return images


def _check_bbox(bbox: Any, image: ImageRecord, where: str, source: Path) -> list[float]:
    try:
        numeric = isinstance(bbox, list) and len(bbox) == 4 and math.isfinite(sum(bbox))
    except TypeError:  # a non-number inside
        numeric = False
    if not numeric:
        raise DataError(f"{source}: {where} has bbox {bbox!r}, expected 4 finite numbers [x, y, width, height]")
    x, y, w, h = bbox
    tol = BBOX_TOLERANCE
    if w < 0 or h < 0:
        raise DataError(f"{source}: {where} has bbox {bbox} with a negative width or height")
    if x < -tol or y < -tol or x + w > image.width + tol or y + h > image.height + tol:
        raise DataError(f"{source}: {where} has bbox {bbox} outside its {image.width}x{image.height} "
                        f"(width x height) image {image.image_id}")
    return [float(v) for v in bbox]


def _read_annotation(entry: dict, index: int, images: dict[int, ImageRecord], labels: dict[int, int],
                     seen: set[int], source: Path) -> tuple[ImageRecord, Annotation]:
    ann_id = _int_field(entry, "id", f"annotation #{index}", source)
    if ann_id in seen:
        raise DataError(f"{source}: duplicate annotation id {ann_id}")
    seen.add(ann_id)
    where = f"annotation {ann_id}"
    image_id = _int_field(entry, "image_id", where, source)
    if image_id not in images:
        raise DataError(f"{source}: {where} refers to unknown image id {image_id}")
    category_id = _int_field(entry, "category_id", where, source)
    if category_id not in labels:
        raise DataError(f"{source}: {where} refers to unknown category id {category_id}")
    image = images[image_id]
    if "segmentation" not in entry:
        raise DataError(f"{source}: {where} has no 'segmentation' (instance masks are required)")
    segmentation = entry["segmentation"]
    check_segmentation(segmentation, image.height, image.width, f"{source}: {where}")
    iscrowd = entry.get("iscrowd", 0)
    if iscrowd not in (0, 1):  # also accepts False/True
        raise DataError(f"{source}: {where} has iscrowd = {iscrowd!r}, expected 0 or 1")
    bbox = _check_bbox(entry["bbox"], image, where, source) if "bbox" in entry else None
    return image, Annotation(labels[category_id], segmentation, bool(iscrowd), bbox, ann_id)


def load_coco_instances(ann_file: Path, image_root: Path, strict: bool = False,
                        allow_outside_root: bool = False) -> DatasetRecords:
    """Read a COCO instances json whose `file_name`s are relative to `image_root` (and stay inside it,
    unless `allow_outside_root`).

    Images whose file is missing are skipped with one warning that counts them (`strict=True`:
    `DataError`). Unreadable or truncated image files are detected later, by `read_image`.
    """
    return coco_records(read_json(ann_file), Path(ann_file), Path(image_root), strict, allow_outside_root)


def coco_records(data: Any, ann_file: Path, image_root: Path, strict: bool = False, allow_outside_root: bool = False,
                 check_files: bool = True) -> DatasetRecords:
    """`load_coco_instances` on the parsed content `data` of `ann_file`; `check_files=False` skips the
    image files (`semiseg split` without `--images` validates the annotations only)."""
    if not isinstance(data, dict):
        raise DataError(f"{ann_file}: expected a JSON object with 'images', 'annotations' and 'categories'")
    image_entries = _list_entries(data, "images", ann_file)
    ann_entries = _list_entries(data, "annotations", ann_file)
    category_ids, class_names = _read_categories(_list_entries(data, "categories", ann_file), ann_file)
    if not image_entries:
        raise DataError(f"{ann_file}: no images ('images' is empty)")
    labels = {cat_id: label for label, cat_id in enumerate(category_ids)}
    seen: set[int] = set()
    with _gc_paused():
        images = _read_images(image_entries, image_root, ann_file, allow_outside_root)
        for index, entry in enumerate(ann_entries):
            image, annotation = _read_annotation(entry, index, images, labels, seen, ann_file)
            image.annotations.append(annotation)
    records = drop_missing_images(list(images.values()), ann_file, strict) if check_files else list(images.values())
    return DatasetRecords(records, class_names, category_ids, ann_file)

"""Unlabeled images -> `DatasetRecords` (no classes, no annotations), from a folder or a json.

A folder is searched recursively (following folder symlinks, skipping hidden files and folders)
for the extensions in `IMAGE_EXTENSIONS`, in sorted path order with ids 0..N-1. A json is a
COCO-style file with an `images` list: Guided Distillation's image-only `coco_unlabel_train.json`
(string ids), a split's `*_unlabeled.json`, or a full COCO instances file (annotations ignored).
"""
from __future__ import annotations

import os
from pathlib import Path

from semiseg.data.coco import read_json
from semiseg.data.images import IMAGE_EXTENSIONS, drop_missing_images, image_path
from semiseg.data.records import DatasetRecords, ImageRecord
from semiseg.errors import ConfigError, DataError


def image_files(folder: Path) -> list[Path]:
    """Image files under `folder` (recursive, hidden entries skipped, symlink loops visited once), sorted."""
    found: list[Path] = []
    visited: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        stat = os.stat(root)
        if (stat.st_dev, stat.st_ino) in visited:
            dirs.clear()
            continue
        visited.add((stat.st_dev, stat.st_ino))
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(root, f) for f in files if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(found)


def _size_field(entry: dict, key: str, where: str, source: Path) -> int | None:
    value = entry.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise DataError(f"{source}: {where} has '{key}' = {value!r}, expected a positive integer")
    return value


def _json_records(path: Path, image_root: Path, allow_outside_root: bool) -> list[ImageRecord]:
    data = read_json(path)
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise DataError(f"{path}: expected a JSON object with an 'images' list")
    if not entries:
        raise DataError(f"{path}: no images ('images' is empty)")
    original_ids = [e.get("id") for e in entries]
    seen: set[int | str] = set()
    for index, original in enumerate(original_ids):
        if original is None:
            continue
        if not isinstance(original, (int, str)) or isinstance(original, bool):
            raise DataError(f"{path}: image #{index} has id {original!r}, expected an integer or a string")
        if original in seen:
            raise DataError(f"{path}: duplicate image id {original!r}")
        seen.add(original)
    # Integer ids are kept; otherwise (e.g. Guided Distillation's string ids) ids are file positions.
    keep_ids = all(isinstance(i, int) and not isinstance(i, bool) for i in original_ids)
    records = []
    for index, entry in enumerate(entries):
        where = f"image #{index}"
        file_name = entry.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise DataError(f"{path}: {where} has no 'file_name'")
        image_id = original_ids[index] if keep_ids else index
        records.append(ImageRecord(image_path(image_root, file_name, path, allow_outside_root), image_id, _size_field(entry, "height", where, path),
                                   _size_field(entry, "width", where, path)))
    return records


def load_unlabeled(path: Path, image_root: Path | None = None, strict: bool = False,
                   allow_outside_root: bool = False) -> DatasetRecords:
    """Unlabeled images from a folder, or from a json whose file names are relative to `image_root`
    (default: the json's folder). Missing files in a json are skipped with one counting warning
    (`strict=True`: `DataError`)."""
    path = Path(path)
    if path.is_dir():
        if image_root is not None:
            raise ConfigError(f"{path}: image_root is only used with a json file, but this is a folder")
        records = [ImageRecord(f, i) for i, f in enumerate(image_files(path))]
        if not records:
            raise DataError(f"{path}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)")
    elif path.is_file():
        if path.suffix.lower() != ".json":
            raise DataError(f"{path}: expected an image folder or a .json file")
        root = path.parent if image_root is None else Path(image_root)
        records = drop_missing_images(_json_records(path, root, allow_outside_root), path, strict)
    else:
        raise DataError(f"{path}: no such folder or file")
    return DatasetRecords(records, [], [], path)

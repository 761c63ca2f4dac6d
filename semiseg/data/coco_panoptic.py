"""COCO panoptic as downloaded: `panoptic_{split}.json` beside its PNG folder `panoptic_{split}/`.

Each PNG pixel's segment id is R + 256 G + 256^2 B (0 = void, unlabeled); the json's `annotations`
list, per image, the `segments_info` (id, category_id, iscrowd) and its `categories` say which
classes are things (`isthing: 1`) or stuff. Every segment becomes an `Annotation` (its mask as RLE),
so the panoptic task trains on things and stuff alike (the semantic task merges them per class, see
`readers.py`). Crowd segments stay crowd
(ignored in training, as panopticapi does in evaluation). Category ids (sorted) map to contiguous
labels; `DatasetRecords.stuff_classes` lists the stuff ones.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from semiseg.data.coco import read_json
from semiseg.data.images import image_path
from semiseg.data.masks import encode_rle
from semiseg.data.records import Annotation, DatasetRecords, ImageRecord
from semiseg.errors import DataError


def load_coco_panoptic(ann_file: Path, image_root: Path, allow_outside_root: bool = False) -> DatasetRecords:
    """Records of a COCO panoptic json (its PNGs in the folder of the same name beside it) and the
    images under `image_root`. Every problem is a DataError naming the file."""
    ann_file, image_root = Path(ann_file), Path(image_root)
    data = read_json(ann_file)
    png_dir = ann_file.with_suffix("")
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations",
                                                                                      "categories")):
        raise DataError(f"{ann_file}: not a COCO panoptic json (needs lists 'images', 'annotations', 'categories')")
    if not png_dir.is_dir():
        raise DataError(f"{ann_file}: its PNG folder {png_dir} does not exist (COCO panoptic keeps the PNGs in "
                        "the folder named like the json)")
    categories = sorted(data["categories"], key=lambda c: c.get("id", 0))
    if not categories or not all("id" in c and "name" in c for c in categories):
        raise DataError(f"{ann_file}: every category needs an 'id' and a 'name'")
    labels = {c["id"]: k for k, c in enumerate(categories)}
    stuff = tuple(k for k, c in enumerate(categories) if not c.get("isthing", 1))
    images = {}
    for entry in data["images"]:
        if not all(k in entry for k in ("id", "file_name", "height", "width")):
            raise DataError(f"{ann_file}: every image needs 'id', 'file_name', 'height' and 'width' "
                            f"(got {str(entry)[:80]})")
        images[entry["id"]] = entry
    records = []
    for entry in tqdm(data["annotations"], desc=f"read {png_dir.name}", unit="img", leave=False):
        image = images.get(entry.get("image_id"))
        if image is None:
            raise DataError(f"{ann_file}: annotation of unknown image id {entry.get('image_id')}")
        png = png_dir / str(entry.get("file_name", ""))
        ids = read_segment_ids(png, (image["height"], image["width"]))
        annotations = _segments(ids, entry.get("segments_info", []), labels, png)
        records.append(ImageRecord(image_path(image_root, image["file_name"], ann_file, allow_outside_root),
                                   image["id"], image["height"], image["width"], annotations))
    return DatasetRecords(records, [c["name"] for c in categories], [c["id"] for c in categories], ann_file, stuff)


def write_segment_ids(ids: np.ndarray, png: Path) -> None:
    """Save [H, W] integer segment ids as a COCO panoptic PNG (R + 256 G + 256^2 B)."""
    ids = np.asarray(ids, dtype=np.int64)
    Image.fromarray(np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)).save(png)


def read_segment_ids(png: Path, size: tuple[int, int]) -> np.ndarray:
    """A COCO panoptic PNG -> [H, W] int64 segment ids (R + 256 G + 256^2 B); DataError if missing,
    unreadable, not RGB or not of the image's `size` (h, w)."""
    try:
        with Image.open(png) as image:
            if image.mode != "RGB":
                raise DataError(f"{png}: a panoptic PNG must be RGB, got mode {image.mode}")
            rgb = np.asarray(image, dtype=np.int64)
    except FileNotFoundError:
        raise DataError(f"{png}: panoptic PNG not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{png}: cannot read the panoptic PNG ({e})") from None
    if rgb.shape[:2] != tuple(size):
        raise DataError(f"{png}: is {rgb.shape[0]}x{rgb.shape[1]} but its image is {size[0]}x{size[1]}")
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def _segments(ids: np.ndarray, segments_info: list[dict], labels: dict[int, int], png: Path) -> list[Annotation]:
    """One annotation per listed segment; ids in the PNG that the json does not list are an error."""
    listed = {}
    for segment in segments_info:
        if segment.get("category_id") not in labels:
            raise DataError(f"{png}: segment {segment.get('id')} has unknown category id {segment.get('category_id')}")
        listed[segment["id"]] = segment
    present = set(np.unique(ids).tolist()) - {0}
    unlisted = sorted(present - set(listed))
    if unlisted:
        raise DataError(f"{png}: segment ids {unlisted[:5]} are in the PNG but not in the json's segments_info")
    return [Annotation(labels[s["category_id"]], encode_rle(ids == segment_id), bool(s.get("iscrowd", 0)),
                       ann_id=segment_id)
            for segment_id, s in listed.items() if segment_id in present]


"""Semantic label PNGs: ADE20K as downloaded (ADEChallengeData2016, the 150-class SceneParsing benchmark),
and the same convention with the classes listed in a json (`data.format: semantic_png`).

ADE20K: `annotations/{training,validation}/<name>.png` beside `images/{training,validation}/<name>.jpg`.
A label PNG pixel v in 1..K is class v - 1; 0 is "other" and ignored (255 in evaluation). Each
present class becomes one annotation per image (the semantic targets). ADE20K's panoptic and
instance files, as Mask2Former's `prepare_ade20k_{pan,ins}_seg.py` write them, are COCO panoptic and
COCO instances files: read them with `data.format: coco_panoptic` / `coco`.

`semantic_png`: a folder of label PNGs in the same convention and, beside it, the json of the same
name listing the classes in label order (`{"categories": [{"id": ..., "name": ...}, ...]}`), as
`semiseg synth --stuff` writes them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from semiseg.data.coco import read_json
from semiseg.data.masks import encode_rle
from semiseg.data.records import Annotation, DatasetRecords, ImageRecord
from semiseg.errors import DataError

# the 150 SceneParsing classes in label order (short names, as objectInfo150's first synonyms)
CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")


def load_ade20k_semantic(ann_dir: Path, image_dir: Path) -> DatasetRecords:
    """Records of every label PNG in `ann_dir` (e.g. annotations/training) and its image in `image_dir`
    (images/training) with the same name; DataError naming the file for any problem."""
    return load_label_pngs(ann_dir, image_dir, list(CLASSES), list(range(1, len(CLASSES) + 1)))


def load_semantic_pngs(ann_dir: Path, image_dir: Path) -> DatasetRecords:
    """Label PNGs whose classes the json beside the folder (`<ann_dir>.json`) lists."""
    listing = Path(ann_dir).with_suffix(".json")
    categories = read_json(listing).get("categories") if listing.is_file() else None
    if not isinstance(categories, list) or not all(isinstance(c, dict) and "name" in c for c in categories):
        raise DataError(f"{ann_dir}: needs {listing.name} beside it with 'categories' [{{id, name}}, ...] in label order")
    return load_label_pngs(ann_dir, image_dir, [c["name"] for c in categories],
                           [c.get("id", k + 1) for k, c in enumerate(categories)])


def load_label_pngs(ann_dir: Path, image_dir: Path, class_names: list[str], category_ids: list[int]) -> DatasetRecords:
    """Every label PNG of `ann_dir` (value v in 1..K = class v - 1, 0 ignored) with its image of the
    same name in `image_dir`; DataError naming the file for any problem."""
    ann_dir, image_dir = Path(ann_dir), Path(image_dir)
    pngs = sorted(ann_dir.glob("*.png")) if ann_dir.is_dir() else []
    if not pngs:
        raise DataError(f"{ann_dir}: no label PNGs (e.g. ADEChallengeData2016/annotations/<split>)")
    records = []
    for image_id, png in enumerate(pngs, start=1):
        image = next((image_dir / (png.stem + s) for s in IMAGE_SUFFIXES if (image_dir / (png.stem + s)).is_file()),
                     None)
        if image is None:
            raise DataError(f"{png}: its image {image_dir / png.stem}.jpg does not exist")
        labels = read_label_png(png, len(class_names))
        annotations = [Annotation(int(v) - 1, encode_rle(labels == v)) for v in np.unique(labels) if v > 0]
        records.append(ImageRecord(image, image_id, int(labels.shape[0]), int(labels.shape[1]), annotations))
    return DatasetRecords(records, class_names, category_ids, ann_dir)


def read_label_png(png: Path, num_classes: int) -> np.ndarray:
    """[H, W] int64 values of a single-channel label PNG, checked to lie in 0..num_classes."""
    try:
        with Image.open(png) as image:
            if image.mode not in ("L", "P", "I", "I;16"):
                raise DataError(f"{png}: a label PNG must be single-channel, got mode {image.mode}")
            labels = np.asarray(image).astype(np.int64)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{png}: cannot read the label PNG ({e})") from None
    if labels.max(initial=0) > num_classes:
        raise DataError(f"{png}: label {int(labels.max())} is outside 0..{num_classes} (0 = ignored)")
    return labels

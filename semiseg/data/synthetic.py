"""The built-in synthetic dataset: shapes on cluttered backgrounds, written as a COCO dataset.

Eight shape classes (`synthetic_shapes.SHAPE_CLASSES`), told apart by shape only: every object's
colour (hue, saturation, value, shading) is drawn independently of its class, so no colour cue
gives a class away. Objects are painted bottom to top and each annotation is the visible part of
its object. Backgrounds are textured (gradients, low-frequency noise, stripes,
checkers) with distractor clutter (thin lines, elongated blobs) and photometric jitter.

With `stuff=True` (`semiseg synth --stuff`) the background is instead made of stuff regions of three
classes told apart by texture, not colour (sky: a smooth gradient, wall: brick courses, floor: a
checker in perspective-free tiles), and the dataset is also written as COCO panoptic (json + PNG
folder, segment id = R + 256 G + 256^2 B) and as semantic label PNGs (0 = none, k + 1 = class k of the
panoptic categories, listed in the json beside the folder) for the panoptic and semantic tasks.

Every image is drawn from its own `numpy.random.default_rng([seed, split_index, image_id])`, so a
seed gives the same bytes whatever the number of worker processes.
"""
from __future__ import annotations

import colorsys
import json
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from semiseg.data.coco_panoptic import write_segment_ids
from semiseg.data.masks import decode_segmentation, encode_rle
from semiseg.data.synthetic_shapes import SHAPE_CLASSES, Shape, make_shape
from semiseg.errors import ConfigError, DataError

CATEGORIES = [{"id": c.category_id, "name": c.name, "supercategory": "shape"} for c in SHAPE_CLASSES]
STUFF_CATEGORIES = [{"id": 101, "name": "sky", "supercategory": "stuff"},
                    {"id": 102, "name": "wall", "supercategory": "stuff"},
                    {"id": 103, "name": "floor", "supercategory": "stuff"}]
SPLITS = ("train", "val")

_MIN_VISIBLE_AREA = 12  # pixels; smaller visible parts are not annotated, so never produced
_MIN_VISIBLE_FRACTION = 0.5  # an object keeps at least this share of its pixels under later objects
_MIN_COLOR_DISTANCE = 80.0  # RGB distance between an object and the pixels it covers
_MAX_SIZE = 80.0  # largest bounding-circle diameter at 128 px
_PARALLEL_FROM = 200  # images per split from which a process pool pays off


@dataclass
class SyntheticImage:
    """One rendered image and its COCO annotations (without `id`/`image_id`), bottom object first.

    image: [S, S, 3] uint8 RGB
    stuff: [S, S] uint8, index + 1 into STUFF_CATEGORIES of each background pixel (0 = an object's
           visible pixel), or None without stuff
    """

    image: np.ndarray
    annotations: list[dict]
    stuff: np.ndarray | None = None


@dataclass
class _Placed:
    """An object painted on the canvas. mask/visible: [S, S] bool (all pixels / not covered later)."""

    category_id: int
    mask: np.ndarray
    visible: np.ndarray
    shape: Shape | None  # None for a crowd region (several shapes, one annotation)


def write_synthetic_dataset(out_dir: Path, num_train: int = 800, num_val: int = 500, seed: int = 0,
                            image_size: int = 128, overwrite: bool = False, stuff: bool = False) -> dict[str, Path]:
    """Write the synthetic dataset to `out_dir` and return its paths.

    Layout: `train/*.png`, `val/*.png`, `annotations/instances_{train,val}.json` (COCO instances,
    image ids 1..N, file names `000001.png`...). Returned keys: "train_images", "val_images",
    "train_ann", "val_ann"; with `stuff` also "train_panoptic", "val_panoptic":
    `annotations/panoptic_{train,val}.json` beside their PNG folders `annotations/panoptic_{split}/`, and
    "train_semantic", "val_semantic": the label PNG folders `annotations/semantic_{split}/` (their classes
    in `semantic_{split}.json`).
    A non-empty `out_dir` is refused unless `overwrite`, which replaces only the files this function
    writes (numbered PNGs in train/ and val/, the jsons).
    """
    out_dir = Path(out_dir)
    _check_arguments(num_train, num_val, seed, image_size)
    _prepare_output(out_dir, overwrite)
    paths = {"train_images": out_dir / "train", "val_images": out_dir / "val",
             "train_ann": out_dir / "annotations" / "instances_train.json",
             "val_ann": out_dir / "annotations" / "instances_val.json"}
    counts = []
    for split_index, (split, num_images) in enumerate(zip(SPLITS, (num_train, num_val))):
        panoptic_dir = out_dir / "annotations" / f"panoptic_{split}" if stuff else None
        coco, panoptic = _write_split(paths[f"{split}_images"], split, split_index, num_images, seed, image_size,
                                      panoptic_dir)
        _write_json(paths[f"{split}_ann"], coco)
        if panoptic is not None:
            paths[f"{split}_panoptic"] = panoptic_dir.with_suffix(".json")
            _write_json(paths[f"{split}_panoptic"], panoptic)
            paths[f"{split}_semantic"] = out_dir / "annotations" / f"semantic_{split}"
            _write_json(paths[f"{split}_semantic"].with_suffix(".json"), {"categories": panoptic["categories"]})
        counts.append(len(coco["annotations"]))
    kinds = f"{len(CATEGORIES)} thing + {len(STUFF_CATEGORIES)} stuff classes" if stuff else f"{len(CATEGORIES)} classes"
    print(f"synthetic dataset: {num_train} train images ({counts[0]} annotations), {num_val} val images "
          f"({counts[1]} annotations), {kinds}, {image_size} px -> {out_dir}")
    return paths


def render_synthetic_image(seed: int, split_index: int, image_id: int, image_size: int = 128, *,
                           max_objects: int = 8, empty_prob: float = 0.05,
                           crowd_prob: float = 0.03, stuff: bool = False) -> SyntheticImage:
    """Render one image of the dataset, deterministically from (seed, split_index, image_id).

    A non-empty image tries to place 1 + Binomial(max_objects - 1, 3/7) objects (mean 4 for the
    default 8); an object that finds no placement leaving earlier ones visible enough is dropped.
    A `crowd_prob` share of the images also gets one crowd region (iscrowd=1) at the bottom.
    `stuff`: a background of stuff regions (sky / wall / floor) instead of one texture.
    """
    rng = np.random.default_rng([seed, split_index, image_id])
    if stuff:
        canvas, stuff_map = _stuff_background(rng, image_size)
    else:
        canvas, stuff_map = _background(rng, image_size), None
    _draw_clutter(rng, canvas)
    placed: list[_Placed] = []
    if rng.random() >= empty_prob:
        if rng.random() < crowd_prob:
            _place_crowd(rng, canvas, placed)
        for _ in range(1 + rng.binomial(max_objects - 1, 3 / 7)):
            _place_object(rng, canvas, placed)
    image = _photometric(rng, canvas)
    if stuff_map is not None:
        for p in placed:
            stuff_map[p.visible] = 0
    return SyntheticImage(image, [_annotation(p, image_size) for p in placed], stuff_map)


def _check_arguments(num_train: int, num_val: int, seed: int, image_size: int) -> None:
    if num_train < 1 or num_val < 1:
        raise ConfigError(f"synthetic dataset: need at least 1 train and 1 val image, got {num_train} and {num_val}")
    if seed < 0:
        raise ConfigError(f"synthetic dataset: seed must be >= 0, got {seed}")
    if not 32 <= image_size <= 4096:
        raise ConfigError(f"synthetic dataset: image size must be in 32..4096 px, got {image_size}")


def _prepare_output(out_dir: Path, overwrite: bool) -> None:
    """Refuse a non-empty folder unless `overwrite`; then remove only our own previous files."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise DataError(f"{out_dir}: folder is not empty; pass --overwrite (overwrite=True) to replace "
                            "the synthetic dataset in it")
        for split in SPLITS:
            for png in (out_dir / split).glob("*.png"):
                if re.fullmatch(r"\d{6,}\.png", png.name):
                    png.unlink()
            (out_dir / "annotations" / f"instances_{split}.json").unlink(missing_ok=True)
            for kind in ("panoptic", "semantic"):
                (out_dir / "annotations" / f"{kind}_{split}.json").unlink(missing_ok=True)
                for png in (out_dir / "annotations" / f"{kind}_{split}").glob("*.png"):
                    if re.fullmatch(r"\d{6,}\.png", png.name):
                        png.unlink()
    try:
        for sub in (*SPLITS, "annotations"):
            (out_dir / sub).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{out_dir}: cannot create the dataset folders ({e.strerror})") from None


def _write_split(image_dir: Path, split: str, split_index: int, num_images: int, seed: int,
                 image_size: int, panoptic_dir: Path | None) -> tuple[dict, dict | None]:
    """Render and save the PNGs of one split; return its COCO instances dict and, when `panoptic_dir`
    is given (stuff backgrounds), its COCO panoptic dict (PNGs written to `panoptic_dir`)."""
    if panoptic_dir is not None:
        panoptic_dir.mkdir(parents=True, exist_ok=True)
        _semantic_dir(panoptic_dir).mkdir(parents=True, exist_ok=True)
    tasks = [(seed, split_index, image_id, image_size, image_dir / f"{image_id:06d}.png", panoptic_dir)
             for image_id in range(1, num_images + 1)]
    bar = dict(total=num_images, desc=f"synth {split}", unit="img")
    if num_images >= _PARALLEL_FROM and (os.cpu_count() or 1) > 1:
        with ProcessPoolExecutor(max_workers=2) as pool:
            per_image = list(tqdm(pool.map(_render_and_save, tasks, chunksize=16), **bar))
    else:
        per_image = [_render_and_save(t) for t in tqdm(tasks, **bar)]
    images, annotations, panoptic = [], [], []
    for (_, _, image_id, _, path, _), (anns, segments) in zip(tasks, per_image):
        images.append({"id": image_id, "file_name": path.name, "height": image_size, "width": image_size})
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
        panoptic.append({"image_id": image_id, "file_name": path.name, "segments_info": segments})
    info = {"description": "semiseg built-in synthetic shapes", "version": "1", "split": split, "seed": seed}
    coco = {"info": info, "licenses": [], "categories": CATEGORIES, "images": images, "annotations": annotations}
    if panoptic_dir is None:
        return coco, None
    categories = [{**c, "isthing": 1} for c in CATEGORIES] + [{**c, "isthing": 0} for c in STUFF_CATEGORIES]
    return coco, {**coco, "categories": categories, "annotations": panoptic}


def _render_and_save(task: tuple[int, int, int, int, Path, Path | None]) -> tuple[list[dict], list[dict]]:
    """Render one image, save it (and its panoptic PNG) -> (instance annotations, panoptic segments_info)."""
    seed, split_index, image_id, image_size, path, panoptic_dir = task
    rendered = render_synthetic_image(seed, split_index, image_id, image_size, stuff=panoptic_dir is not None)
    Image.fromarray(rendered.image).save(path, format="PNG")
    if panoptic_dir is None:
        return rendered.annotations, []
    ids, segments = _panoptic_segments(rendered)
    write_segment_ids(ids, panoptic_dir / path.name)
    label_of = {c["id"]: k + 1 for k, c in enumerate(CATEGORIES + STUFF_CATEGORIES)}
    labels = np.zeros(ids.shape, np.uint8)
    for segment in segments:
        labels[ids == segment["id"]] = label_of[segment["category_id"]]
    Image.fromarray(labels).save(_semantic_dir(panoptic_dir) / path.name, format="PNG")
    return rendered.annotations, segments


def _semantic_dir(panoptic_dir: Path) -> Path:
    """`annotations/semantic_<split>` beside `annotations/panoptic_<split>`."""
    return panoptic_dir.with_name(panoptic_dir.name.replace("panoptic_", "semantic_", 1))


def _panoptic_segments(rendered: SyntheticImage) -> tuple[np.ndarray, list[dict]]:
    """[S, S] segment ids (objects 1..N in annotation order, then one per present stuff class) and
    their COCO panoptic `segments_info`."""
    size = rendered.image.shape[0]
    ids = np.zeros((size, size), np.int64)
    segments = []
    regions = [(a["category_id"], decode_segmentation(a["segmentation"], size, size), a["iscrowd"])
               for a in rendered.annotations]
    regions += [(c["id"], rendered.stuff == k + 1, 0) for k, c in enumerate(STUFF_CATEGORIES)]
    for category_id, mask, iscrowd in regions:
        mask = mask & (ids == 0)
        if not mask.any():
            continue
        ys, xs = np.nonzero(mask)
        ids[mask] = len(segments) + 1
        segments.append({"id": len(segments) + 1, "category_id": category_id, "iscrowd": int(iscrowd),
                         "area": int(mask.sum()), "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                                                           int(ys.max() - ys.min() + 1)]})
    return ids, segments


def _write_json(path: Path, content: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(content, separators=(",", ":")))
    tmp.replace(path)


# --- scene -----------------------------------------------------------------------------------


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """[S, S, 3] float32 in 0..255: a blend of two nearby colours by a gradient, noise, stripes or checker."""
    base = rng.uniform(0, 255, 3).astype(np.float32)
    other = np.clip(base + rng.normal(0, 45, 3), 0, 255).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    along = xx * np.cos(theta) + yy * np.sin(theta)
    kind = rng.integers(4)
    if kind == 0:  # linear gradient
        weight = (along - along.min()) / (along.max() - along.min())
    elif kind == 1:  # low-frequency noise
        cells = rng.integers(3, 8)
        coarse = Image.fromarray(rng.uniform(0, 1, (cells, cells)).astype(np.float32))
        weight = np.asarray(coarse.resize((size, size), Image.BILINEAR))
    elif kind == 2:  # stripes
        period = rng.uniform(5, 16) * size / 128
        weight = 0.5 + 0.5 * np.sin(2 * np.pi * along / period)
    else:  # rotated checker
        cell = rng.uniform(6, 16) * size / 128
        across = -xx * np.sin(theta) + yy * np.cos(theta)
        weight = (np.floor(along / cell) + np.floor(across / cell)) % 2
    canvas = base * (1 - weight[..., None]) + other * weight[..., None]
    canvas += np.float32(rng.uniform(2, 10)) * rng.standard_normal((size, size, 1), dtype=np.float32)
    return canvas


def _stuff_background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """[S, S, 3] float32 canvas and [S, S] uint8 stuff map (1 sky, 2 wall, 3 floor): a wavy horizon with
    floor below and sky or wall above (sky sometimes with a wall block); colours random for every class."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    horizon = rng.uniform(0.3, 0.7) * size + rng.uniform(0, 0.06) * size * np.sin(
        2 * np.pi * xx / size * rng.uniform(0.5, 2) + rng.uniform(0, 2 * np.pi))
    stuff = np.where(yy >= horizon, 3, 1 if rng.random() < 0.6 else 2).astype(np.uint8)
    if stuff[0, 0] == 1 and rng.random() < 0.5:
        x0, x1 = np.sort(rng.uniform(0, size, 2))
        stuff[(xx >= x0) & (xx < x1) & (yy >= rng.uniform(0.05, 0.25) * size) & (stuff == 1)] = 2
    canvas = np.zeros((size, size, 3), np.float32)
    for value, texture in ((1, _sky), (2, _bricks), (3, _tiles)):
        weight = texture(rng, xx, yy, size)
        base = rng.uniform(0, 255, 3).astype(np.float32)
        other = np.clip(base + rng.normal(0, 60, 3), 0, 255).astype(np.float32)
        region = stuff == value
        canvas[region] = (base * (1 - weight[..., None]) + other * weight[..., None])[region]
    canvas += np.float32(rng.uniform(2, 8)) * rng.standard_normal((size, size, 1), dtype=np.float32)
    return canvas, stuff


def _sky(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, size: int) -> np.ndarray:
    """A smooth vertical gradient."""
    return np.clip(yy / size * rng.uniform(0.8, 1.6), 0, 1)


def _bricks(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, size: int) -> np.ndarray:
    """Brick courses: dark mortar lines, every other course shifted by half a brick."""
    height, width = rng.uniform(5, 9) * size / 128, rng.uniform(12, 20) * size / 128
    course = np.floor(yy / height)
    shifted = xx + (course % 2) * width / 2
    mortar = ((yy % height) < 1.2) | ((shifted % width) < 1.2)
    return mortar.astype(np.float32)


def _tiles(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, size: int) -> np.ndarray:
    """An axis-aligned checker of square tiles."""
    cell = rng.uniform(7, 14) * size / 128
    return ((np.floor(xx / cell) + np.floor(yy / cell)) % 2).astype(np.float32)


def _draw_clutter(rng: np.random.Generator, canvas: np.ndarray) -> None:
    """Paint distractors that are no class: 0-4 thin lines and 0-4 small elongated blobs, in place."""
    size = canvas.shape[0]
    scale = size / 128
    for _ in range(rng.integers(0, 5)):
        ends = rng.uniform(0, size, 4).tolist()
        width = 1 if rng.random() < 0.8 else 2
        _paint_drawn(canvas, lambda d: d.line(ends, fill=1, width=width), rng.uniform(0, 255, 3))
    for _ in range(rng.integers(0, 5)):
        n = rng.integers(8, 13)
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = rng.uniform(1.5, 4) * scale * rng.uniform(0.5, 1.0, n)
        stretch = rng.uniform(1.8, 3.0)  # elongated pebbles and sticks, unlike any shape class
        theta = rng.uniform(0, np.pi)
        along, across = stretch * radii * np.cos(angles), radii * np.sin(angles)
        pts = rng.uniform(0, size, 2) + np.stack([along * np.cos(theta) - across * np.sin(theta),
                                                  along * np.sin(theta) + across * np.cos(theta)], axis=1)
        points = [tuple(p) for p in pts.tolist()]
        _paint_drawn(canvas, lambda d: d.polygon(points, fill=1), rng.uniform(0, 255, 3))


def _paint_drawn(canvas: np.ndarray, draw, color: np.ndarray) -> None:
    """Paint `color` where the PIL drawing callback `draw(ImageDraw)` marks pixels."""
    stencil = Image.new("L", canvas.shape[1::-1], 0)
    draw(ImageDraw.Draw(stencil))
    canvas[np.asarray(stencil, dtype=bool)] = color


def _object_size(rng: np.random.Generator, min_size: float, image_size: int) -> float:
    """Bounding-circle diameter in pixels, uniform from the class minimum to 80 px (at 128 px)."""
    low = min_size * max(1.0, image_size / 128)
    high = max(_MAX_SIZE * image_size / 128, 2 * low)
    return rng.uniform(low, high)


def _place_object(rng: np.random.Generator, canvas: np.ndarray, placed: list[_Placed]) -> None:
    """Try a few random placements of one object; keep the first that leaves earlier ones visible enough."""
    size = canvas.shape[0]
    for _ in range(10):
        shape_class = SHAPE_CLASSES[rng.integers(len(SHAPE_CLASSES))]
        diameter = _object_size(rng, shape_class.min_size, size)
        r = diameter / 2
        if rng.random() < 0.1 or diameter >= size:  # may be cut by the image border
            center = rng.uniform(0.2 * r, size - 0.2 * r, 2)
        else:
            center = rng.uniform(r, size - r, 2)
        shape = make_shape(shape_class, rng, (center[0], center[1]), diameter, rng.uniform(0, 2 * np.pi))
        mask = shape.rasterize(size, size)
        if mask.sum() >= _MIN_VISIBLE_AREA and _occlusion_ok(mask, placed):
            _paint_object(rng, canvas, mask)
            _add_on_top(placed, _Placed(shape.category_id, mask, mask.copy(), shape))
            return


def _place_crowd(rng: np.random.Generator, canvas: np.ndarray, placed: list[_Placed]) -> None:
    """A cluster of 5-10 small overlapping shapes of one class, annotated as one crowd region."""
    size = canvas.shape[0]
    shape_class = SHAPE_CLASSES[rng.integers(len(SHAPE_CLASSES))]
    middle = rng.uniform(0.3 * size, 0.7 * size, 2)
    region = np.zeros((size, size), dtype=bool)
    for _ in range(rng.integers(5, 11)):
        diameter = shape_class.min_size * max(1.0, size / 128) * rng.uniform(1.0, 1.6)
        center = np.clip(middle + rng.normal(0, 0.07 * size, 2), 0, size)
        shape = make_shape(shape_class, rng, (center[0], center[1]), diameter, rng.uniform(0, 2 * np.pi))
        mask = shape.rasterize(size, size)
        _paint_object(rng, canvas, mask)
        region |= mask
    placed.append(_Placed(shape_class.category_id, region, region.copy(), None))


def _occlusion_ok(mask: np.ndarray, placed: list[_Placed]) -> bool:
    """Whether every placed object keeps enough visible pixels if `mask` [S, S] is painted on top."""
    for p in placed:
        left = np.count_nonzero(p.visible & ~mask)
        if left < max(_MIN_VISIBLE_AREA, _MIN_VISIBLE_FRACTION * np.count_nonzero(p.mask)):
            return False
    return True


def _add_on_top(placed: list[_Placed], new: _Placed) -> None:
    for p in placed:
        p.visible &= ~new.mask
    placed.append(new)


def _paint_object(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray) -> None:
    """Fill `mask` with a random colour (any hue, whatever the class), far from what it covers, softly shaded."""
    if not mask.any():
        return
    under = canvas[mask].mean(axis=0)
    for _ in range(20):
        hue = rng.random()
        color = 255 * np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.45, 1.0), rng.uniform(0.35, 1.0)))
        if np.linalg.norm(color - under) >= _MIN_COLOR_DISTANCE:
            break
    ys, xs = np.nonzero(mask)
    theta = rng.uniform(0, 2 * np.pi)
    along = (xs - xs.mean()) * np.cos(theta) + (ys - ys.mean()) * np.sin(theta)
    spread = max(float(np.abs(along).max()), 1.0)
    canvas[ys, xs] = color + rng.uniform(0, 25) * (along / spread)[:, None]


def _photometric(rng: np.random.Generator, canvas: np.ndarray) -> np.ndarray:
    """Global contrast/brightness jitter, pixel noise and (sometimes) a slight blur -> [S, S, 3] uint8."""
    mean = canvas.mean()
    image = (canvas - mean) * np.float32(rng.uniform(0.75, 1.2)) + mean + np.float32(rng.uniform(-20, 20))
    image += np.float32(rng.uniform(0, 6)) * rng.standard_normal(image.shape, dtype=np.float32)
    out = np.clip(np.round(image), 0, 255).astype(np.uint8)
    if rng.random() < 0.3:
        out = np.asarray(Image.fromarray(out).filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 0.9))))
    return out


# --- annotations -----------------------------------------------------------------------------


def _annotation(obj: _Placed, image_size: int) -> dict:
    """COCO annotation of the visible part: a polygon when the shape is whole and hole-free,
    compressed RLE otherwise, uncompressed RLE for crowd regions."""
    visible = obj.visible
    ys, xs = np.nonzero(visible)
    bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
    whole = np.count_nonzero(visible) == np.count_nonzero(obj.mask)
    if obj.shape is None:
        segmentation = _uncompressed_rle(visible)
    elif whole and not obj.shape.has_holes and obj.shape.inside(image_size, image_size):
        segmentation = obj.shape.polygons()
    else:
        segmentation = encode_rle(visible)
    return {"category_id": obj.category_id, "segmentation": segmentation, "area": int(len(xs)),
            "bbox": bbox, "iscrowd": int(obj.shape is None)}


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE of an [H, W] bool mask: run lengths in column-major order, zeros first."""
    flat = mask.reshape(-1, order="F")
    bounds = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}

"""The built-in synthetic dataset: shapes on cluttered backgrounds, written as a COCO dataset.

Eight shape classes (`synthetic_shapes.SHAPE_CLASSES`), told apart by shape only: every object's
colour (hue, saturation, value, shading) is drawn independently of its class, so no colour cue
gives a class away. Objects are painted bottom to top and each annotation is the visible part of
its object. Backgrounds are textured (gradients, low-frequency noise, stripes,
checkers) with distractor clutter (thin lines, elongated blobs) and photometric jitter.

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

from semiseg.data.masks import encode_rle
from semiseg.data.synthetic_shapes import SHAPE_CLASSES, Shape, make_shape
from semiseg.errors import ConfigError, DataError

CATEGORIES = [{"id": c.category_id, "name": c.name, "supercategory": "shape"} for c in SHAPE_CLASSES]
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
    """

    image: np.ndarray
    annotations: list[dict]


@dataclass
class _Placed:
    """An object painted on the canvas. mask/visible: [S, S] bool (all pixels / not covered later)."""

    category_id: int
    mask: np.ndarray
    visible: np.ndarray
    shape: Shape | None  # None for a crowd region (several shapes, one annotation)


def write_synthetic_dataset(out_dir: Path, num_train: int = 800, num_val: int = 500, seed: int = 0,
                            image_size: int = 128, overwrite: bool = False) -> dict[str, Path]:
    """Write the synthetic dataset to `out_dir` and return its paths.

    Layout: `train/*.png`, `val/*.png`, `annotations/instances_{train,val}.json` (COCO instances,
    image ids 1..N, file names `000001.png`...). Returned keys: "train_images", "val_images",
    "train_ann", "val_ann". A non-empty `out_dir` is refused unless `overwrite`, which replaces
    only the files this function writes (numbered PNGs in train/ and val/, the two jsons).
    """
    out_dir = Path(out_dir)
    _check_arguments(num_train, num_val, seed, image_size)
    _prepare_output(out_dir, overwrite)
    paths = {"train_images": out_dir / "train", "val_images": out_dir / "val",
             "train_ann": out_dir / "annotations" / "instances_train.json",
             "val_ann": out_dir / "annotations" / "instances_val.json"}
    counts = []
    for split_index, (split, num_images) in enumerate(zip(SPLITS, (num_train, num_val))):
        coco = _write_split(paths[f"{split}_images"], split, split_index, num_images, seed, image_size)
        _write_json(paths[f"{split}_ann"], coco)
        counts.append(len(coco["annotations"]))
    print(f"synthetic dataset: {num_train} train images ({counts[0]} annotations), {num_val} val images "
          f"({counts[1]} annotations), {len(CATEGORIES)} classes, {image_size} px -> {out_dir}")
    return paths


def render_synthetic_image(seed: int, split_index: int, image_id: int, image_size: int = 128, *,
                           max_objects: int = 8, empty_prob: float = 0.05,
                           crowd_prob: float = 0.03) -> SyntheticImage:
    """Render one image of the dataset, deterministically from (seed, split_index, image_id).

    A non-empty image tries to place 1 + Binomial(max_objects - 1, 3/7) objects (mean 4 for the
    default 8); an object that finds no placement leaving earlier ones visible enough is dropped.
    A `crowd_prob` share of the images also gets one crowd region (iscrowd=1) at the bottom.
    """
    rng = np.random.default_rng([seed, split_index, image_id])
    canvas = _background(rng, image_size)
    _draw_clutter(rng, canvas)
    placed: list[_Placed] = []
    if rng.random() >= empty_prob:
        if rng.random() < crowd_prob:
            _place_crowd(rng, canvas, placed)
        for _ in range(1 + rng.binomial(max_objects - 1, 3 / 7)):
            _place_object(rng, canvas, placed)
    image = _photometric(rng, canvas)
    return SyntheticImage(image, [_annotation(p, image_size) for p in placed])


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
    try:
        for sub in (*SPLITS, "annotations"):
            (out_dir / sub).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{out_dir}: cannot create the dataset folders ({e.strerror})") from None


def _write_split(image_dir: Path, split: str, split_index: int, num_images: int, seed: int,
                 image_size: int) -> dict:
    """Render and save the PNGs of one split; return its COCO instances dict."""
    tasks = [(seed, split_index, image_id, image_size, image_dir / f"{image_id:06d}.png")
             for image_id in range(1, num_images + 1)]
    bar = dict(total=num_images, desc=f"synth {split}", unit="img")
    if num_images >= _PARALLEL_FROM and (os.cpu_count() or 1) > 1:
        with ProcessPoolExecutor(max_workers=2) as pool:
            per_image = list(tqdm(pool.map(_render_and_save, tasks, chunksize=16), **bar))
    else:
        per_image = [_render_and_save(t) for t in tqdm(tasks, **bar)]
    images, annotations = [], []
    for (_, _, image_id, _, path), anns in zip(tasks, per_image):
        images.append({"id": image_id, "file_name": path.name, "height": image_size, "width": image_size})
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
    info = {"description": "semiseg built-in synthetic shapes", "version": "1", "split": split, "seed": seed}
    return {"info": info, "licenses": [], "categories": CATEGORIES, "images": images, "annotations": annotations}


def _render_and_save(task: tuple[int, int, int, int, Path]) -> list[dict]:
    seed, split_index, image_id, image_size, path = task
    rendered = render_synthetic_image(seed, split_index, image_id, image_size)
    Image.fromarray(rendered.image).save(path, format="PNG")
    return rendered.annotations


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

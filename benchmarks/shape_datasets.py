"""Two procedurally drawn COCO instance segmentation datasets, unlike semiseg's built-in one.

They exist to check that the semi-supervised recipe, developed on `semiseg.data.synthetic`, still
works on data nobody tuned it to. Classes differ by shape only: every object's brightness, tint,
colour and texture are drawn independently of its class, so no colour cue gives a class away.

  cells   microscopy-like, dense and small: 8-20 objects of ~8-24 px (at 128 px) on a smooth, tinted
          illumination gradient. round_cell (disk with a darker or lighter nucleus), rod (capsule),
          budding_cell (two overlapping disks, one instance), bean (disk with a shallow bite).
          Objects may touch or overlap a little.
  blocks  large, few, heavily occluded: 2-5 objects of ~35-110 px with textured fills (solid,
          stripes, noise, gradient) on multi-scale noise with clutter (lines, small ellipses).
          semicircle, trapezoid, heart, kite. An object is kept only if >= 30 % (and >= 20 px) of
          it stays visible under the later ones.

Annotations are compressed RLEs of the visible parts. Every image is drawn from
`numpy.random.default_rng([seed, split_index, image_id])`, so a seed gives the same bytes whatever
the number of worker processes.

    python benchmarks/shape_datasets.py --kind cells --out data/cells [--train 1000] [--val 300] [--seed 0] [--size 128]
"""
from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from semiseg.data.masks import encode_rle
from semiseg.data.synthetic_shapes import polygons_to_mask

CLASSES = {"cells": ("round_cell", "rod", "budding_cell", "bean"),
           "blocks": ("semicircle", "trapezoid", "heart", "kite")}
SPLITS = ("train", "val")
_PARALLEL_FROM = 200  # images per split from which a process pool pays off


def write_shape_dataset(kind: str, out_dir: Path, num_train: int, num_val: int, seed: int,
                        image_size: int = 128) -> dict[str, Path]:
    """Write dataset `kind` to the new or empty folder `out_dir` and return its paths.

    Layout: `train/000001.png...`, `val/...`, `annotations/instances_{train,val}.json`. Returned keys:
    "train_images", "val_images", "train_ann", "val_ann".
    """
    if kind not in CLASSES:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {sorted(CLASSES)}")
    if num_train < 1 or num_val < 1 or seed < 0 or image_size < 32:
        raise ValueError("need >= 1 train and val image, seed >= 0 and an image size >= 32 px")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir}: exists and is not an empty folder; choose a new or empty one")
    paths = {"train_images": out_dir / "train", "val_images": out_dir / "val",
             "train_ann": out_dir / "annotations" / "instances_train.json",
             "val_ann": out_dir / "annotations" / "instances_val.json"}
    for split_index, (split, num_images) in enumerate(zip(SPLITS, (num_train, num_val))):
        paths[f"{split}_images"].mkdir(parents=True)
        coco = _write_split(kind, paths[f"{split}_images"], split_index, num_images, seed, image_size)
        paths[f"{split}_ann"].parent.mkdir(exist_ok=True)
        paths[f"{split}_ann"].write_text(json.dumps(coco, separators=(",", ":")))
    return paths


def render_image(kind: str, seed: int, split_index: int, image_id: int,
                 size: int = 128) -> tuple[np.ndarray, list[dict]]:
    """One image [S, S, 3] uint8 and its COCO annotations (without `id`/`image_id`), bottom first."""
    rng = np.random.default_rng([seed, split_index, image_id])
    canvas, objects = (_cells if kind == "cells" else _blocks)(rng, size)
    return _finish(rng, canvas), [_annotation(category_id, visible) for category_id, visible in objects]


def _write_split(kind: str, image_dir: Path, split_index: int, num_images: int, seed: int, size: int) -> dict:
    """Render and save the PNGs of one split; return its COCO instances dict."""
    tasks = [(kind, seed, split_index, image_id, size, image_dir / f"{image_id:06d}.png")
             for image_id in range(1, num_images + 1)]
    bar = {"total": num_images, "desc": f"{kind} {SPLITS[split_index]}", "unit": "img"}
    if num_images >= _PARALLEL_FROM:
        with ProcessPoolExecutor(max_workers=2) as pool:
            per_image = list(tqdm(pool.map(_render_and_save, tasks, chunksize=16), **bar))
    else:
        per_image = [_render_and_save(task) for task in tqdm(tasks, **bar)]
    images, annotations = [], []
    for (_, _, _, image_id, _, path), anns in zip(tasks, per_image):
        images.append({"id": image_id, "file_name": path.name, "height": size, "width": size})
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
    categories = [{"id": i + 1, "name": name, "supercategory": kind} for i, name in enumerate(CLASSES[kind])]
    info = {"description": f"semiseg benchmark shapes: {kind}", "split": SPLITS[split_index], "seed": seed}
    return {"info": info, "licenses": [], "images": images, "annotations": annotations, "categories": categories}


def _render_and_save(task: tuple[str, int, int, int, int, Path]) -> list[dict]:
    kind, seed, split_index, image_id, size, path = task
    image, annotations = render_image(kind, seed, split_index, image_id, size)
    Image.fromarray(image).save(path, format="PNG")
    return annotations


def _annotation(category_id: int, visible: np.ndarray) -> dict:
    ys, xs = np.nonzero(visible)
    x0, y0 = int(xs.min()), int(ys.min())
    bbox = [float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)]
    return {"category_id": category_id, "segmentation": encode_rle(visible), "area": int(xs.size),
            "bbox": bbox, "iscrowd": 0}


def _ellipse(a: float, b: float, center: tuple[float, float] = (0.0, 0.0), n: int = 32) -> np.ndarray:
    """[n, 2] polygon of an axis-aligned ellipse in local coordinates."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([center[0] + a * np.cos(t), center[1] + b * np.sin(t)], axis=1)


def _place(points: np.ndarray, center: np.ndarray, angle: float) -> np.ndarray:
    """Rotate local [V, 2] (x, y) points by `angle` and move them to `center`."""
    c, s = np.cos(angle), np.sin(angle)
    return points @ np.array([[c, s], [-s, c]]) + center


def _noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """[S, S] smooth noise in 0..1: a random `cells` x `cells` grid, bilinearly upsampled."""
    grid = Image.fromarray(rng.uniform(0, 1, (cells, cells)).astype(np.float32))
    return np.asarray(grid.resize((size, size), Image.BILINEAR))


def _finish(rng: np.random.Generator, canvas: np.ndarray) -> np.ndarray:
    """Pixel noise (grey and per channel) and sometimes a slight blur -> [S, S, 3] uint8."""
    shape = canvas.shape
    canvas = canvas + rng.uniform(2, 8) * rng.standard_normal((*shape[:2], 1), dtype=np.float32)
    canvas += rng.uniform(0, 3) * rng.standard_normal(shape, dtype=np.float32)
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    if rng.random() < 0.3:
        image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.0))))
    return image


def _cells(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Tinted illumination gradient with 8-20 small cells that may touch or overlap a little."""
    scale = size / 128
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    theta = rng.uniform(0, 2 * np.pi)
    level = (rng.uniform(80, 170) + rng.uniform(0, 60) * (xx * np.cos(theta) + yy * np.sin(theta))
             + rng.uniform(0, 30) * (_noise(rng, size, 4) - 0.5))
    canvas = level[..., None] + rng.normal(0, 12, 3).astype(np.float32)
    placed: list[list] = []  # [category_id, area, visible mask], bottom first
    covered = np.zeros((size, size), dtype=bool)
    for _ in range(rng.integers(8, 21)):
        for _ in range(6):  # a few tries to find a spot that overlaps little
            label = int(rng.integers(4))
            diameter = rng.uniform(8, 24) * scale
            center = rng.uniform(diameter / 2, size - diameter / 2, 2)
            mask, nucleus = _cell_masks(rng, label, center, diameter, size)
            area = np.count_nonzero(mask)
            if area >= 10 and np.count_nonzero(mask & covered) <= 0.25 * area and all(
                    np.count_nonzero(vis & ~mask) >= 0.75 * a for _, a, vis in placed):
                for p in placed:
                    p[2] &= ~mask
                _paint_cell(rng, canvas, mask, nucleus, center, diameter / 2)
                placed.append([label + 1, area, mask])
                covered |= mask
                break
    return canvas, [(category_id, visible) for category_id, _, visible in placed]


def _cell_masks(rng: np.random.Generator, label: int, center: np.ndarray, diameter: float,
                size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """[S, S] masks of one cell of class `label` and, for a round cell, of its nucleus."""
    angle, r = rng.uniform(0, 2 * np.pi), diameter / 2

    def raster(*polygons: np.ndarray) -> np.ndarray:
        return polygons_to_mask([_place(p, center, angle) for p in polygons], size, size)

    if label == 0:  # round_cell: near-round disk, off-centre nucleus
        k = r * rng.uniform(0.3, 0.5)
        offset = rng.uniform(-0.25, 0.25, 2) * r
        mask = raster(_ellipse(r, r * rng.uniform(0.85, 1.0)))
        return mask, raster(_ellipse(k, k * rng.uniform(0.8, 1.0), offset)) & mask
    if label == 1:  # rod: capsule of aspect 2-3.5
        half_width = r / rng.uniform(2, 3.5)
        t = np.linspace(-np.pi / 2, np.pi / 2, 12)
        cap = np.stack([r - half_width + half_width * np.cos(t), half_width * np.sin(t)], axis=1)
        return raster(np.concatenate([cap, -cap])), None
    if label == 2:  # budding_cell: a mother disk and a smaller bud overlapping it
        ratio, overlap = rng.uniform(0.45, 0.7), rng.uniform(0.35, 0.7)
        mother = diameter / (2 + 2 * ratio - overlap * ratio)
        bud = ratio * mother
        return raster(_ellipse(mother, mother, (mother - r, 0)), _ellipse(bud, bud, (r - bud, 0))), None
    # bean: a slightly flattened disk with a shallow circular bite on one long side
    short = r * rng.uniform(0.65, 0.8)
    bite = r * rng.uniform(0.45, 0.7)
    depth = 2 * short * rng.uniform(0.15, 0.28)
    return raster(_ellipse(r, short)) & ~raster(_ellipse(bite, bite, (0, short + bite - depth))), None


def _paint_cell(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray, nucleus: np.ndarray | None,
                center: np.ndarray, radius: float) -> None:
    """Darker or lighter than what it covers (random), a random tint and soft radial shading."""
    ys, xs = np.nonzero(mask)
    colour = (canvas[ys, xs].mean(axis=0) + rng.choice([-1, 1]) * rng.uniform(25, 70)
              + rng.normal(0, 10, 3))
    falloff = 1 - np.minimum(((xs + 0.5 - center[0]) ** 2 + (ys + 0.5 - center[1]) ** 2) / radius ** 2, 1)
    canvas[ys, xs] = colour + rng.uniform(-25, 25) * falloff[:, None]
    if nucleus is not None:
        canvas[nucleus] += rng.choice([-1, 1]) * rng.uniform(20, 50)


def _blocks(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Multi-scale noise with clutter and 2-5 large occluding shapes; too hidden ones are left out."""
    scale = size / 128
    field = sum(0.6 ** k * _noise(rng, size, 3 * 2 ** k) for k in range(4))
    field = (field - field.min()) / max(float(np.ptp(field)), 1e-6)
    low, high = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    canvas = _clutter(rng, low + (high - low) * field[..., None], scale)
    drawn = []
    for _ in range(rng.integers(2, 6)):
        label = int(rng.integers(4))
        diameter = rng.uniform(35, 110) * scale
        polygon = _place(_block_polygon(rng, label) * diameter / 2, rng.uniform(0.1, 0.9, 2) * size,
                         rng.uniform(0, 2 * np.pi))
        drawn.append((label + 1, polygons_to_mask([polygon], size, size)))
    kept, covered = [], np.zeros((size, size), dtype=bool)
    for category_id, mask in reversed(drawn):  # top first: what is dropped hides nothing below
        visible = mask & ~covered
        if np.count_nonzero(visible) >= max(20, 0.3 * np.count_nonzero(mask)):
            kept.insert(0, (category_id, mask, visible))
            covered |= mask
    for _, mask, _ in kept:
        _paint_fill(rng, canvas, mask, scale)
    return canvas, [(category_id, visible) for category_id, _, visible in kept]


def _clutter(rng: np.random.Generator, canvas: np.ndarray, scale: float) -> np.ndarray:
    """Paint 3-10 random lines and 3-12 small ellipses of random colours (no class) on the canvas."""
    size = canvas.shape[0]
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(3, 11)):
        width = max(1, round(rng.uniform(1, 3) * scale))
        draw.line(rng.uniform(0, size, 4).tolist(), fill=tuple(rng.integers(0, 256, 3).tolist()), width=width)
    for _ in range(rng.integers(3, 13)):
        (cx, cy), (rx, ry) = rng.uniform(0, size, 2), rng.uniform(1.5, 6, 2) * scale
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=tuple(rng.integers(0, 256, 3).tolist()))
    return np.asarray(image, dtype=np.float32).copy()


def _block_polygon(rng: np.random.Generator, label: int) -> np.ndarray:
    """[V, 2] outline of class `label`, centred on its box and fitting the unit circle."""
    if label == 0:  # semicircle
        t = np.linspace(0, np.pi, 33)
        points = np.stack([np.cos(t), -np.sin(t)], axis=1)
    elif label == 1:  # trapezoid: long base 2, shorter top, possibly slanted
        top, height, shift = rng.uniform(0.3, 0.7), rng.uniform(0.5, 0.9), rng.uniform(-0.2, 0.2)
        points = np.array([[-1, height], [1, height], [shift + top, 0], [shift - top, 0]])
    elif label == 2:  # heart: the classic parametric curve, its tip downwards
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        points = np.stack([16 * np.sin(t) ** 3 * rng.uniform(0.85, 1.15), -y], axis=1)
    else:  # kite: diagonals of unequal length, crossing off-centre on the long one
        cross, width = rng.uniform(0.25, 0.4), rng.uniform(0.5, 0.8)
        points = np.array([[0, -cross], [width / 2, 0], [0, 1 - cross], [-width / 2, 0]])
    points = points - (points.min(axis=0) + points.max(axis=0)) / 2
    return points / np.linalg.norm(points, axis=1).max()


def _paint_fill(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray, scale: float) -> None:
    """Fill `mask` with two random colours as solid, stripes, blotchy noise or a linear gradient."""
    ys, xs = np.nonzero(mask)
    candidates = rng.uniform(0, 255, (20, 3))  # random colours; the first two that stand out are used
    far = candidates[np.linalg.norm(candidates - canvas[ys, xs].mean(axis=0), axis=1) >= 70]
    first, second = (far if len(far) >= 2 else candidates)[:2]
    theta = rng.uniform(0, 2 * np.pi)
    along = xs * np.cos(theta) + ys * np.sin(theta)
    style = rng.integers(4)
    if style == 0:
        weight = np.zeros(xs.size)
    elif style == 1:
        weight = (along // (rng.uniform(3, 10) * scale)) % 2
    elif style == 2:
        weight = _noise(rng, canvas.shape[0], int(rng.integers(6, 20)))[ys, xs]
    else:
        weight = (along - along.min()) / max(float(np.ptp(along)), 1.0)
    canvas[ys, xs] = first + (second - first) * weight[:, None]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=sorted(CLASSES), required=True)
    parser.add_argument("--out", type=Path, required=True, help="new or empty folder")
    for flag, default in (("--train", 1000), ("--val", 300), ("--seed", 0), ("--size", 128)):
        parser.add_argument(flag, type=int, default=default, help=f"default {default}")
    args = parser.parse_args(argv)
    try:
        write_shape_dataset(args.kind, args.out, args.train, args.val, args.seed, args.size)
    except (FileExistsError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{args.kind}: {args.train} train and {args.val} val images of {args.size} px -> {args.out}")


if __name__ == "__main__":
    main()

"""Shape classes of the built-in synthetic dataset: geometry and rasterisation.

A shape is a set of filled polygons minus a set of hole polygons, so the same geometry gives the
pixels to paint and, for hole-free shapes, an exact COCO polygon annotation: masks are rasterised
with the COCO polygon rasteriser, so decoding the annotation reproduces the painted pixels.
Classes differ by shape only; colour is chosen by the scene, independently of the class.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from faster_coco_eval.core import mask as coco_mask


@dataclass(frozen=True)
class ShapeClass:
    """One object class: its COCO category id, name and smallest size that still reads as the shape."""

    category_id: int
    name: str
    min_size: float  # bounding-circle diameter in pixels at 128 px images


# Non-contiguous category ids on purpose: they exercise the category id <-> class index mapping.
SHAPE_CLASSES: tuple[ShapeClass, ...] = (
    ShapeClass(1, "disk", 16),
    ShapeClass(2, "rectangle", 16),
    ShapeClass(3, "triangle", 18),
    ShapeClass(5, "star", 22),
    ShapeClass(8, "ring", 24),
    ShapeClass(13, "cross", 20),
    ShapeClass(21, "crescent", 24),
    ShapeClass(34, "frame", 24),
)


@dataclass
class Shape:
    """A placed shape: filled polygons minus holes, in pixel coordinates of the image.

    fills: list of [V, 2] float arrays (x, y), rounded to 0.01 px as they are stored in COCO json
    holes: list of [V, 2] float arrays cut out of the fills (ring/frame holes, the crescent's bite)
    """

    category_id: int
    fills: list[np.ndarray]
    holes: list[np.ndarray]

    @property
    def has_holes(self) -> bool:
        return bool(self.holes)

    def inside(self, height: int, width: int) -> bool:
        """True when every vertex lies inside the image, i.e. nothing is cut off by the border."""
        pts = np.concatenate(self.fills)
        return bool(pts.min() >= 0 and pts[:, 0].max() <= width and pts[:, 1].max() <= height)

    def polygons(self) -> list[list[float]]:
        """COCO polygon segmentation (flat [x0, y0, x1, y1, ...] lists) of the fills."""
        return [poly.reshape(-1).tolist() for poly in self.fills]

    def rasterize(self, height: int, width: int) -> np.ndarray:
        """[H, W] bool mask of the shape, clipped to the image."""
        mask = polygons_to_mask(self.fills, height, width)
        if self.holes:
            mask &= ~polygons_to_mask(self.holes, height, width)
        return mask


def polygons_to_mask(polygons: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """Union of polygons ([V, 2] arrays) as an [H, W] bool mask, with the COCO rasteriser."""
    rles = coco_mask.frPyObjects([p.reshape(-1).tolist() for p in polygons], height, width)
    return coco_mask.decode(coco_mask.merge(rles)).astype(bool)


def make_shape(shape_class: ShapeClass, rng: np.random.Generator, center: tuple[float, float],
               size: float, angle: float) -> Shape:
    """Draw the per-instance parameters of `shape_class` and place it.

    size: bounding-circle diameter in pixels; angle: rotation in radians; center: (x, y).
    """
    r = size / 2
    name = shape_class.name
    holes: list[np.ndarray] = []
    if name == "disk":
        fills = [_circle(r)]
    elif name == "rectangle":
        fills = [_rectangle(r, rng.uniform(0.45, 0.8))]
    elif name == "triangle":
        base = np.deg2rad(90 + np.array([0.0, 120 + rng.uniform(-15, 15), 240 + rng.uniform(-15, 15)]))
        fills = [r * np.stack([np.cos(base), np.sin(base)], axis=1)]
    elif name == "star":
        k = np.arange(10)
        radii = np.where(k % 2 == 0, r, r * rng.uniform(0.38, 0.5))
        fills = [np.stack([radii * np.cos(k * np.pi / 5), radii * np.sin(k * np.pi / 5)], axis=1)]
    elif name == "ring":
        fills, holes = [_circle(r)], [_circle(r * rng.uniform(0.45, 0.62))]
    elif name == "cross":
        fills = [_plus(r, rng.uniform(0.26, 0.36))]
    elif name == "crescent":
        offset = r * rng.uniform(0.4, 0.55)
        fills, holes = [_circle(r)], [_circle(r * rng.uniform(0.75, 0.9)) + [offset, 0.0]]
    elif name == "frame":
        phi = rng.uniform(0.6, 0.8)
        outer = _rectangle(r, phi)
        border = r * min(np.cos(phi), np.sin(phi)) * rng.uniform(0.32, 0.45)
        half = np.abs(outer[0]) - border
        fills, holes = [outer], [_box(half[0], half[1])]
    else:
        raise ValueError(f"unknown shape class {name!r}")
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    offset = np.asarray(center, dtype=float)
    return Shape(shape_class.category_id, [_place(p, rot, offset) for p in fills],
                 [_place(p, rot, offset) for p in holes])


def _place(poly: np.ndarray, rot: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Rotate and translate [V, 2] points, rounded to the 0.01 px stored in the json."""
    return np.round(poly @ rot.T + offset, 2)


def _circle(r: float) -> np.ndarray:
    """[V, 2] regular polygon approximating a circle of radius r (more vertices when larger)."""
    n = int(np.clip(np.pi * r, 16, 64))
    t = np.arange(n) * (2 * np.pi / n)
    return r * np.stack([np.cos(t), np.sin(t)], axis=1)


def _box(half_w: float, half_h: float) -> np.ndarray:
    return np.array([[-half_w, -half_h], [half_w, -half_h], [half_w, half_h], [-half_w, half_h]])


def _rectangle(r: float, phi: float) -> np.ndarray:
    """Rectangle with corners on the circle of radius r; phi sets the aspect (tan(phi) = h / w)."""
    return _box(r * np.cos(phi), r * np.sin(phi))


def _plus(r: float, arm: float) -> np.ndarray:
    """12-vertex plus sign whose outer corners lie on the circle of radius r; arm = half-width / r."""
    w = r * arm
    length = np.sqrt(r * r - w * w)
    quarter = [[length, -w], [length, w], [w, w]]
    pts = []
    for k in range(4):
        c, s = np.cos(k * np.pi / 2), np.sin(k * np.pi / 2)
        pts += [[x * c - y * s, x * s + y * c] for x, y in quarter]
    return np.array(pts)

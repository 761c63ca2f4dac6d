"""Procedural pretext images for pretraining the tiny backbone (`tools/pretrain_tiny_resnet.py`).

Twelve pretext classes that share no class with the built-in dataset (no disk, rectangle,
triangle, star, ring, cross, crescent or frame): thin ovals, smooth 3-, 4- and 6-lobed flowers,
jagged blobs, L, Z and U bars, arrows, thick curved worms, blobs with holes and regular hexagons.
Objects overlap, carry a random fill (solid, stripes, gradient or speckle, colours independent of
the class) and sit on random textured backgrounds. Every image comes with a per-pixel class map
(0 = background, k + 1 = class k, the visible object) and an instance-boundary map, the dense
targets of the pretext task.

Every image is drawn from `numpy.random.default_rng([seed, index])`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from semiseg.data.synthetic_shapes import polygons_to_mask

PRETEXT_CLASSES = ("oval", "trefoil", "quatrefoil", "hexafoil", "jagged", "l_bar", "z_bar", "u_bar",
                   "arrow", "worm", "holed_blob", "hexagon")


@dataclass
class PretextImage:
    """image: [S, S, 3] uint8; classes: [S, S] uint8 (0 = background); boundary: [S, S] bool;
    instances: [S, S] int32 (0 = background, i = the i-th object drawn, where it is visible)."""

    image: np.ndarray
    classes: np.ndarray
    boundary: np.ndarray
    instances: np.ndarray


def render_pretext_image(seed: int, index: int, size: int = 128, max_objects: int = 6,
                         single_centered: bool = False) -> PretextImage:
    """One pretext image. `single_centered`: one large object in the middle (for a linear probe)."""
    rng = np.random.default_rng([seed, index])
    canvas = _texture(rng, size, rng.uniform(0, 255, 3), rng.uniform(0, 255, 3))
    classes = np.zeros((size, size), np.uint8)
    instances = np.zeros((size, size), np.int32)
    count = 1 if single_centered else rng.integers(1, max_objects + 1)
    for instance in range(1, count + 1):
        label = rng.integers(len(PRETEXT_CLASSES))
        if single_centered:
            diameter, center = rng.uniform(0.5, 0.8) * size, size / 2 + rng.normal(0, 0.04 * size, 2)
        else:
            diameter = rng.uniform(0.08, 0.7) * size
            center = rng.uniform(0, size, 2)
        mask = _rasterize(PRETEXT_CLASSES[label], rng, center, diameter, size)
        if mask.sum() < 8:
            continue
        fill = _texture(rng, size, rng.uniform(0, 255, 3), rng.uniform(0, 255, 3))
        canvas[mask] = fill[mask]
        classes[mask] = label + 1
        instances[mask] = instance
    canvas += rng.uniform(0, 8) * rng.standard_normal(canvas.shape)
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    return PretextImage(image, classes, _boundary(instances), instances)


def _boundary(instances: np.ndarray) -> np.ndarray:
    """[S, S] bool: pixels whose right or lower neighbour belongs to another instance (or background)."""
    edge = np.zeros(instances.shape, bool)
    horizontal = instances[:, 1:] != instances[:, :-1]
    vertical = instances[1:, :] != instances[:-1, :]
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    return edge


def _texture(rng: np.random.Generator, size: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[S, S, 3] float: colour `a`, or a mix of `a` and `b` by stripes, a gradient or speckles."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    along = xx * np.cos(theta) + yy * np.sin(theta)
    kind = rng.integers(4)
    if kind == 0:
        weight = np.zeros((size, size), np.float32)
    elif kind == 1:
        weight = (np.sin(2 * np.pi * along / rng.uniform(3, 14)) > 0).astype(np.float32)
    elif kind == 2:
        weight = (along - along.min()) / max(float(along.max() - along.min()), 1.0)
    else:
        weight = (rng.random((size, size)) < rng.uniform(0.05, 0.4)).astype(np.float32)
    return a * (1 - weight[..., None]) + b * weight[..., None]


def _rasterize(name: str, rng: np.random.Generator, center: np.ndarray, diameter: float, size: int) -> np.ndarray:
    """[S, S] bool mask of a pretext shape of class `name`, rotated at random."""
    r = diameter / 2
    holes: list[np.ndarray] = []
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    if name == "oval":
        aspect = rng.uniform(2.5, 4.0)
        fills = [np.stack([r * np.cos(t), r / aspect * np.sin(t)], 1)]
    elif name in ("trefoil", "quatrefoil", "hexafoil"):
        lobes = {"trefoil": 3, "quatrefoil": 4, "hexafoil": 6}[name]
        radius = r * (0.75 + 0.25 * np.cos(lobes * t))
        fills = [np.stack([radius * np.cos(t), radius * np.sin(t)], 1)]
    elif name == "jagged":
        n = rng.integers(14, 21)
        angles = np.linspace(0, 2 * np.pi, n, endpoint=False)
        radius = r * rng.uniform(0.45, 1.0, n)
        fills = [np.stack([radius * np.cos(angles), radius * np.sin(angles)], 1)]
    elif name in ("l_bar", "z_bar", "u_bar"):
        w = r * rng.uniform(0.25, 0.4)
        bars = {"l_bar": [(-r, -r, -r + 2 * w, r), (-r, r - 2 * w, r, r)],
                "z_bar": [(-r, -r, r, -r + 2 * w), (-w, -r, w, r), (-r, r - 2 * w, r, r)],
                "u_bar": [(-r, -r, -r + 2 * w, r), (r - 2 * w, -r, r, r), (-r, r - 2 * w, r, r)]}[name]
        fills = [np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]) for x0, y0, x1, y1 in bars]
    elif name == "arrow":
        w, head = r * rng.uniform(0.15, 0.25), r * rng.uniform(0.4, 0.6)
        fills = [np.array([[-r, -w], [r - head, -w], [r - head, -head], [r, 0], [r - head, head],
                           [r - head, w], [-r, w]])]
    elif name == "worm":
        s = np.linspace(-1, 1, 24)
        spine = np.stack([r * s, r * 0.5 * np.sin(np.pi * s * rng.uniform(1, 2.5) + rng.uniform(0, np.pi))], 1)
        normal = np.gradient(spine, axis=0)[:, ::-1] * [1, -1]
        normal /= np.linalg.norm(normal, axis=1, keepdims=True)
        width = r * rng.uniform(0.12, 0.2)
        fills = [np.concatenate([spine + width * normal, (spine - width * normal)[::-1]])]
    elif name == "holed_blob":
        radius = r * (0.85 + 0.15 * np.cos(2 * t + rng.uniform(0, np.pi)))
        fills = [np.stack([radius * np.cos(t), radius * np.sin(t)], 1)]
        for offset in ([-0.4, -0.1], [0.35, 0.25])[: rng.integers(1, 3)]:
            hole_r = r * rng.uniform(0.12, 0.22)
            holes.append(np.stack([hole_r * np.cos(t), hole_r * np.sin(t)], 1) + np.array(offset) * r)
    elif name == "hexagon":
        angles = np.arange(6) * np.pi / 3
        fills = [np.stack([r * np.cos(angles), r * np.sin(angles)], 1)]
    else:
        raise ValueError(f"unknown pretext class {name!r}")
    angle = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    fills = [p @ rot.T + center for p in fills]
    mask = polygons_to_mask(fills, size, size)
    if holes:
        mask &= ~polygons_to_mask([p @ rot.T + center for p in holes], size, size)
    return mask

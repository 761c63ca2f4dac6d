"""Overlays of instance masks on images: semi-transparent fills, contours, boxes and labels.

Colours are fixed per instance index, so the same query order gives the same colours in every
panel. Text uses PIL's built-in default font (nothing is downloaded).
"""
from __future__ import annotations

import colorsys
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from semiseg.structures import Instances

_TITLE_PAD = 4  # pixels around a panel title
_PANEL_GAP = 6  # pixels between side-by-side panels


def instance_color(index: int) -> tuple[int, int, int]:
    """A saturated RGB colour for instance `index`; neighbouring indices get distant hues."""
    hue = (index * 0.618033988749895) % 1.0  # golden-ratio steps spread hues evenly
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_instances(image: np.ndarray, instances: Instances, class_names: list[str], score_threshold: float = 0.5,
                   alpha: float = 0.5, show_boxes: bool = True) -> np.ndarray:
    """Draw masks, contours, optional boxes and "name 0.93" labels on a copy of `image`.

    image: [H, W, 3] uint8 RGB; instances on the same (H, W) canvas, on any device. Instances with
    a score below `score_threshold` are skipped; ground truth (scores None) is drawn entirely.
    Returns [H, W, 3] uint8.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"draw_instances needs a [H, W, 3] uint8 image, got {image.dtype} {list(image.shape)}")
    if len(instances) and instances.image_size != image.shape[:2]:
        raise ValueError(f"masks are {instances.image_size} but the image is {image.shape[:2]}")
    instances = instances.to("cpu")
    masks = instances.masks.numpy()
    boxes = instances.boxes.tolist()
    labels = instances.labels.tolist()
    scores = None if instances.scores is None else instances.scores.tolist()
    order = range(len(instances)) if scores is None else sorted(
        (i for i in range(len(instances)) if scores[i] >= score_threshold), key=lambda i: scores[i])

    out = image.astype(np.float32)
    for i in order:  # lowest score first, so the most confident instance ends up on top
        color = np.array(instance_color(i), dtype=np.float32)
        out[masks[i]] = out[masks[i]] * (1 - alpha) + color * alpha
        out[_contour(masks[i])] = color
    canvas = Image.fromarray(out.round().clip(0, 255).astype(np.uint8))

    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i in order:
        color = instance_color(i)
        x0, y0, x1, y1 = boxes[i]
        if show_boxes and x1 > x0 and y1 > y0:
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=color, width=1)
        name = class_names[labels[i]] if 0 <= labels[i] < len(class_names) else f"class {labels[i]}"
        text = name if scores is None else f"{name} {scores[i]:.2f}"
        _draw_label(draw, text, (x0, y0), color, font, canvas.width)
    return np.asarray(canvas)


def save_overlay(path: str | os.PathLike, image: np.ndarray, instances: Instances, class_names: list[str],
                 score_threshold: float = 0.5, alpha: float = 0.5, show_boxes: bool = True) -> Path:
    """Write `draw_instances(...)` as a PNG (parent folders are created); returns the path."""
    overlay = draw_instances(image, instances, class_names, score_threshold, alpha, show_boxes)
    return _write_png(path, overlay)


def save_side_by_side(path: str | os.PathLike, image: np.ndarray, panels: dict[str, Instances],
                      class_names: list[str], score_threshold: float = 0.5, alpha: float = 0.5,
                      show_boxes: bool = True) -> Path:
    """One titled overlay per panel, left to right, in one PNG; returns the path.

    panels: title -> instances on the image's canvas, e.g. {"ground truth": gt, "teacher": t, "student": s}.
    """
    if not panels:
        raise ValueError("save_side_by_side needs at least one panel")
    font = ImageFont.load_default()
    text_height = max(font.getbbox(title)[3] for title in panels)
    title_height = text_height + 2 * _TITLE_PAD
    h, w = image.shape[:2]
    sheet = Image.new("RGB", (len(panels) * w + (len(panels) - 1) * _PANEL_GAP, h + title_height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, (title, instances) in enumerate(panels.items()):
        left = k * (w + _PANEL_GAP)
        overlay = draw_instances(image, instances, class_names, score_threshold, alpha, show_boxes)
        sheet.paste(Image.fromarray(overlay), (left, title_height))
        draw.text((left + _TITLE_PAD, _TITLE_PAD), title, fill=(0, 0, 0), font=font)
    return _write_png(path, np.asarray(sheet))


def _contour(mask: np.ndarray) -> np.ndarray:
    """Pixels of a [H, W] bool mask that touch a background pixel (4-neighbourhood) or the border."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def _draw_label(draw: ImageDraw.ImageDraw, text: str, anchor: tuple[float, float], color: tuple[int, int, int],
                font: ImageFont.ImageFont | ImageFont.FreeTypeFont, image_width: int) -> None:
    """Text on a filled box in the instance colour, above the anchor when there is room, else below it.

    The box is shifted left where it would leave the image on the right.
    """
    left, top, right, bottom = font.getbbox(text)
    tw, th = right - left + 2, bottom + 2
    x, y = anchor
    x = max(0, min(x, image_width - 1 - tw))
    y = y - th if y - th >= 0 else y
    draw.rectangle([x, y, x + tw, y + th], fill=color)
    luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    draw.text((x + 1, y + 1), text, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255), font=font)


def _write_png(path: str | os.PathLike, array: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")
    return path

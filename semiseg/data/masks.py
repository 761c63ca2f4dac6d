"""COCO segmentations (polygons, uncompressed RLE, compressed RLE) <-> boolean masks.

`check_segmentation` validates a segmentation against its image size without rasterising it (cheap
enough to run on every annotation of a large json at load time); `decode_segmentation` runs the
same checks and then rasterises. Rasterisation and compressed-RLE coding use faster-coco-eval's
C++ mask API, which matches pycocotools pixel for pixel.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from faster_coco_eval.core import mask as mask_api

from semiseg.errors import DataError

Segmentation = list[list[float]] | dict[str, Any]


def _fail(source: str, problem: str) -> DataError:
    return DataError(f"{source}: {problem}" if source else problem)


def rle_counts(counts: str | bytes, source: str = "") -> np.ndarray:
    """Run lengths [R] (int64) of a compressed COCO RLE string, decoded with array operations.

    The string stores each run length in 5-bit groups (character = group + 48, bit 0x20 = more
    groups follow, bit 0x10 of the last group = negative); from the fourth run on, the stored
    value is the difference to the run two places earlier.
    """
    if isinstance(counts, str) and not counts.isascii():
        raise _fail(source, "compressed RLE counts contain non-ASCII characters")
    data = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    groups = np.frombuffer(data, np.uint8).astype(np.int64) - 48
    if groups.size == 0:
        return groups
    invalid = (groups < 0) | (groups >= 64)
    if invalid.any():
        raise _fail(source, f"compressed RLE counts contain the invalid character {chr(data[invalid.argmax()])!r}")
    last = (groups & 0x20) == 0  # the final group of each number
    if not last[-1]:
        raise _fail(source, "compressed RLE counts end in the middle of a number")
    ends = np.flatnonzero(last)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > 12:  # 60 bits: far beyond any image, and still fits int64
        raise _fail(source, "compressed RLE counts contain an impossibly large number")
    shifts = 5 * (np.arange(groups.size) - np.repeat(starts, lengths))
    values = np.add.reduceat((groups & 0x1F) << shifts, starts)
    values -= np.where(groups[ends] & 0x10, 1 << (5 * lengths), 0)
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])  # run i = stored i + run i-2, for i >= 3
    runs[2::2] = np.cumsum(values[2::2])
    return runs


def _uncompressed_runs(counts: Any, source: str) -> np.ndarray:
    try:
        runs = np.asarray(counts) if isinstance(counts, list) and counts else np.zeros(0, np.int64)
    except ValueError:  # ragged nested lists
        runs = np.zeros((0, 0))
    if not isinstance(counts, list) or runs.ndim != 1 or runs.dtype.kind not in "iu":
        raise _fail(source, "RLE counts must be a string (compressed) or a list of integers (uncompressed)")
    return runs


def _check_rle(rle: dict[str, Any], height: int, width: int, source: str) -> None:
    size, counts = rle.get("size"), rle.get("counts")
    if size is None or counts is None:
        raise _fail(source, "RLE segmentation needs both 'size' and 'counts'")
    if not isinstance(size, (list, tuple)) or list(size) != [height, width]:
        raise _fail(source, f"RLE size {size} (height, width) does not match the image size [{height}, {width}]")
    runs = rle_counts(counts, source) if isinstance(counts, (str, bytes)) else _uncompressed_runs(counts, source)
    if (runs < 0).any():
        raise _fail(source, "RLE counts contain a negative run length")
    total = int(runs.sum())
    if total != height * width:
        raise _fail(source, f"RLE counts sum to {total} pixels, but the image has {height}*{width} = {height * width}")


def _check_polygons(polygons: list, source: str) -> None:
    if not polygons:
        raise _fail(source, "segmentation is an empty list of polygons")
    for i, polygon in enumerate(polygons):
        if not isinstance(polygon, list):
            raise _fail(source, f"polygon {i} is not a list of coordinates (got {type(polygon).__name__})")
        if len(polygon) % 2:
            raise _fail(source, f"polygon {i} has an odd number of coordinates ({len(polygon)})")
        if len(polygon) < 6:
            raise _fail(source, f"polygon {i} has {len(polygon) // 2} points, a polygon needs at least 3")


def check_segmentation(segmentation: Any, height: int, width: int, source: str = "") -> None:
    """Raise `DataError` (prefixed by `source`) if `segmentation` cannot describe a mask of the image.

    Checks the structure, polygon lengths (>= 3 points, even coordinate count), the RLE size and
    that the RLE run lengths cover exactly height*width pixels. Does not rasterise.
    """
    if isinstance(segmentation, dict):
        _check_rle(segmentation, height, width, source)
    elif isinstance(segmentation, list):
        _check_polygons(segmentation, source)
    else:
        raise _fail(source, f"segmentation must be a list of polygons or an RLE dict, got {type(segmentation).__name__}")


def _polygon_arrays(polygons: list[list[float]], height: int, width: int, source: str) -> list[list[float]]:
    """Numeric, finite polygons with every vertex within max(H, W) of the image (the rasteriser's
    work grows with the distance between vertices, so a stray 1e9 would exhaust memory)."""
    checked = []
    for i, polygon in enumerate(polygons):
        try:
            xy = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
        except (TypeError, ValueError):
            raise _fail(source, f"polygon {i} has non-numeric coordinates") from None
        if not np.isfinite(xy).all():
            raise _fail(source, f"polygon {i} has a NaN or infinite coordinate")
        margin = max(height, width)
        far = (xy[:, 0] < -margin) | (xy[:, 0] > width + margin) | (xy[:, 1] < -margin) | (xy[:, 1] > height + margin)
        if far.any():
            x, y = xy[far][0]
            raise _fail(source, f"polygon {i} has the point ({x:g}, {y:g}) far outside the {width}x{height} image")
        checked.append(xy.ravel().tolist())
    return checked


def decode_segmentation(segmentation: Segmentation, height: int, width: int, source: str = "") -> np.ndarray:
    """Rasterise a COCO segmentation to a bool mask [H, W].

    segmentation: polygons (list of flat [x0, y0, x1, y1, ...] lists, unioned), uncompressed RLE
                  ({"size": [h, w], "counts": [int, ...]}) or compressed RLE (counts str/bytes)
    source:       names the annotation in error messages (e.g. "train.json annotation 17")
    """
    check_segmentation(segmentation, height, width, source)
    if isinstance(segmentation, list):
        polygons = _polygon_arrays(segmentation, height, width, source)
        rle = mask_api.merge(mask_api.frPyObjects(polygons, height, width))
        return mask_api.decode(rle).astype(bool)
    counts = segmentation["counts"]
    if isinstance(counts, list):
        # Runs alternate 0, 1, 0, ... in column-major (Fortran) order.
        flat = np.repeat(np.arange(len(counts)) % 2 == 1, counts)
        return flat.reshape(width, height).T.copy()
    counts = counts.encode("ascii") if isinstance(counts, str) else counts
    return mask_api.decode({"size": [height, width], "counts": counts}).astype(bool)


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """Compressed COCO RLE of a mask [H, W] (bool or 0/1): {"size": [h, w], "counts": str}."""
    if mask.ndim != 2:
        raise ValueError(f"encode_rle expects a mask [H, W], got shape {tuple(mask.shape)}")
    rle = mask_api.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle["counts"].decode("ascii")}

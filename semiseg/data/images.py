"""Image files: decode any common file to uint8 RGB, and find dataset images missing on disk.

Colour handling, chosen to match detectron2's `read_image(..., format="RGB")` where it has one:
- EXIF orientation is applied, so the pixels are the way a photo viewer shows them;
- grayscale ("L", "1") is replicated to three channels;
- alpha ("RGBA", "LA", palette with transparency) is dropped, keeping the stored colours (no
  compositing), as PIL's `convert("RGB")` does;
- 16-bit grayscale ("I;16*"; also 32-bit "I", which older PIL versions use for 16-bit PNGs, clipped
  to 0..65535) is scaled linearly, 0..65535 -> 0..255 (rounded); 16-bit RGB PNGs are reduced to
  their high byte by PIL itself;
- floating-point images ("F") are refused: their value range is unknown.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from semiseg.data.records import ImageRecord
from semiseg.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _to_rgb(image: Image.Image, path: Path) -> np.ndarray:
    mode = image.mode
    if mode == "I" or mode.startswith("I;16"):
        values = np.asarray(image).astype(np.float64).clip(0, 65535)
        gray = np.rint(values / 257.0).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        raise DataError(f"{path}: floating-point images (PIL mode 'F') are not supported; convert to 8-bit")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        return np.asarray(image.convert("RGBA"))[:, :, :3].copy()
    return np.asarray(image.convert("RGB")).copy()


def read_image(path: Path) -> np.ndarray:
    """Decode an image file to uint8 RGB [H, W, 3] (EXIF orientation applied).

    Raises `DataError` naming `path` for a missing, unrecognised, truncated or corrupt file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    try:
        with Image.open(path) as image:
            image.load()  # decodes now, so truncated data raises here
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image, path)
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image file (unrecognised format)") from None
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: image too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DataError(f"{path}: truncated or corrupt image ({e})") from None


def missing_files(paths: list[Path]) -> list[Path]:
    """The paths that do not exist, found by listing each distinct folder once (cheap for 100k files)."""
    listings: dict[Path, set[str]] = {}
    missing = []
    for path in paths:
        folder = path.parent
        if folder not in listings:
            listings[folder] = set(os.listdir(folder)) if folder.is_dir() else set()
        if path.name not in listings[folder]:
            missing.append(path)
    return missing


def image_path(image_root: Path, file_name: str, source: Path, allow_outside_root: bool = False) -> Path:
    """`image_root / file_name`; a `DataError` when that leads outside `image_root` (`..`, an absolute
    path), so a dataset file cannot make semiseg read any file the user can read, unless
    `allow_outside_root` (layouts with absolute paths). The test is on the path as written:
    symbolic links inside `image_root` are followed as usual."""
    if not allow_outside_root:
        relative = os.path.normpath(file_name)  # leaves the root iff absolute or starting with ".."
        if os.path.isabs(relative) or relative == os.pardir or relative.startswith(os.pardir + os.sep):
            raise DataError(f"{source}: image file_name {file_name!r} leads outside the image folder {image_root} "
                            f"(set data.allow_outside_root: true if your layout needs that)")
    return Path(image_root) / file_name


def drop_missing_images(records: list[ImageRecord], source: Path, strict: bool) -> list[ImageRecord]:
    """Keep the records whose image file exists.

    Missing files give one `UserWarning` with their count (or a `DataError` when `strict`); no
    image left at all is always a `DataError`.
    """
    missing = set(missing_files([r.file_name for r in records]))
    if not missing:
        return records
    first = min(missing)
    summary = f"{len(missing)} of {len(records)} image files are missing (first: {first})"
    if strict or len(missing) == len(records):
        raise DataError(f"{source}: {summary}")
    warnings.warn(f"{source}: {summary}; skipping those images", UserWarning, stacklevel=3)
    return [r for r in records if r.file_name not in missing]

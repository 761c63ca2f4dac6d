"""read_image: every pixel format ends as uint8 RGB [H, W, 3]; bad files raise DataError naming the file."""
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from semiseg.data.images import read_image
from semiseg.errors import DataError


def halves(h: int, w: int) -> np.ndarray:
    """Left half red, right half blue: [H, W, 3] uint8."""
    image = np.zeros((h, w, 3), np.uint8)
    image[:, : w // 2, 0] = 255
    image[:, w // 2:, 2] = 255
    return image


def test_exif_orientation_is_applied(tmp_path):
    stored = halves(16, 32)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(stored).save(tmp_path / "rotated.jpg", exif=exif, quality=100, subsampling=0)
    image = read_image(tmp_path / "rotated.jpg")
    assert image.shape == (32, 16, 3) and image.dtype == np.uint8
    expected = np.rot90(stored, k=-1)  # clockwise: the red left half becomes the top
    assert np.abs(image.astype(int) - expected).max() < 40
    assert image[:16, :, 0].mean() > 200 and image[16:, :, 2].mean() > 200


def test_plain_rgb_is_exact(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "rgb.png")
    assert np.array_equal(read_image(tmp_path / "rgb.png"), pixels)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    gray = np.arange(35, dtype=np.uint8).reshape(5, 7) * 7
    Image.fromarray(gray, mode="L").save(tmp_path / "gray.png")
    image = read_image(tmp_path / "gray.png")
    assert image.shape == (5, 7, 3)
    assert all(np.array_equal(image[:, :, c], gray) for c in range(3))


def test_rgba_drops_alpha_and_keeps_colours(tmp_path):
    rgba = np.random.default_rng(1).integers(0, 256, (4, 6, 4), dtype=np.uint8)
    rgba[0, :, 3] = 0  # fully transparent row keeps its stored colour
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(read_image(tmp_path / "rgba.png"), rgba[:, :, :3])


@pytest.mark.parametrize("transparent", [False, True])
def test_palette_maps_to_palette_colours(tmp_path, transparent):
    indices = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    colours = [(10, 20, 30), (200, 100, 0), (0, 255, 128)]
    palette_image = Image.fromarray(indices, mode="P")
    palette_image.putpalette([v for c in colours for v in c])
    options = {"transparency": 0} if transparent else {}
    palette_image.save(tmp_path / "palette.png", **options)
    image = read_image(tmp_path / "palette.png")
    assert np.array_equal(image, np.array(colours, np.uint8)[indices])


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 1000], [32896, 60000, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode == "I;16"
    image = read_image(tmp_path / "gray16.png")
    expected = np.array([[0, 1, 4], [128, 233, 255]], np.uint8)
    assert all(np.array_equal(image[:, :, c], expected) for c in range(3))


def test_32bit_integer_mode_is_treated_as_16bit(tmp_path):
    values = np.array([[0, 65535, 100000]], np.int32)
    Image.fromarray(values, mode="I").save(tmp_path / "int32.tif")
    assert np.array_equal(read_image(tmp_path / "int32.tif")[:, :, 0], [[0, 255, 255]])


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_16bit_rgb_png_keeps_the_high_byte(tmp_path):
    h, w = 3, 4
    values = (np.arange(h * w * 3).reshape(h, w, 3) * 1500).astype(">u2")
    rows = b"".join(b"\x00" + values[y].tobytes() for y in range(h))
    png = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
           + _png_chunk(b"IDAT", zlib.compress(rows)) + _png_chunk(b"IEND", b""))
    (tmp_path / "rgb16.png").write_bytes(png)
    assert np.array_equal(read_image(tmp_path / "rgb16.png"), (values >> 8).astype(np.uint8))


@pytest.mark.parametrize("suffix", ["jpg", "png"])
def test_truncated_file_is_detected(tmp_path, suffix):
    pixels = np.random.default_rng(2).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / f"full.{suffix}")
    data = (tmp_path / f"full.{suffix}").read_bytes()
    (tmp_path / f"cut.{suffix}").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated") as info:
        read_image(tmp_path / f"cut.{suffix}")
    assert str(info.value).startswith(str(tmp_path / f"cut.{suffix}"))


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(DataError, match=r"nothere\.jpg: image file not found"):
        read_image(tmp_path / "nothere.jpg")
    with pytest.raises(DataError, match="not found"):
        read_image(tmp_path)


def test_non_image_file(tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(DataError, match=r"notes\.jpg: not an image file"):
        read_image(tmp_path / "notes.jpg")


def test_float_image_is_refused(tmp_path):
    Image.fromarray(np.ones((2, 2), np.float32), mode="F").save(tmp_path / "float.tif")
    with pytest.raises(DataError, match="floating-point"):
        read_image(tmp_path / "float.tif")

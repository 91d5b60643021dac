"""open_rgb: every image mode a dataset folder may hold comes out as the 8-bit RGB picture a viewer shows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inatpipe.data.images import is_image_name, open_rgb


def pixels(path: Path, **kwargs) -> np.ndarray:
    img = open_rgb(path, **kwargs)
    assert img.mode == "RGB"
    return np.asarray(img)


def test_rgb_and_grayscale(tmp_path: Path):
    Image.new("RGB", (5, 4), (10, 20, 30)).save(tmp_path / "rgb.png")
    Image.new("L", (5, 4), 77).save(tmp_path / "gray.png")
    Image.new("1", (5, 4), 1).save(tmp_path / "bits.bmp")
    assert pixels(tmp_path / "rgb.png").shape == (4, 5, 3)
    assert (pixels(tmp_path / "rgb.png") == (10, 20, 30)).all()
    assert (pixels(tmp_path / "gray.png") == 77).all()
    assert (pixels(tmp_path / "bits.bmp") == 255).all()


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path: Path):
    values = np.array([[0, 4096, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as img:
        assert img.mode.startswith("I")
        assert np.asarray(img.convert("RGB"))[0, 1, 0] == 255, "PIL alone clips 4096 to white"
    assert pixels(tmp_path / "deep.png")[0, :, 0].tolist() == [0, 16, 128, 255]


def test_32_bit_integer_images_use_the_16_bit_range(tmp_path: Path):
    Image.fromarray(np.array([[0, 65535, 70000, -5]], dtype=np.int32), "I").save(tmp_path / "wide.tif")
    assert pixels(tmp_path / "wide.tif")[0, :, 0].tolist() == [0, 255, 255, 0]


def test_palette_with_and_without_transparency(tmp_path: Path):
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.save(tmp_path / "plain.png")
    img.save(tmp_path / "transparent.png", transparency=0)
    img.save(tmp_path / "anim.gif")
    assert pixels(tmp_path / "plain.png")[0, 0].tolist() == [0, 0, 0]
    assert pixels(tmp_path / "plain.png")[1, 1].tolist() == [200, 0, 0]
    assert pixels(tmp_path / "transparent.png")[0, 0].tolist() == [255, 255, 255], "transparent shows the background"
    assert pixels(tmp_path / "transparent.png")[1, 1].tolist() == [200, 0, 0]
    assert pixels(tmp_path / "anim.gif")[1, 1].tolist() == [200, 0, 0]


def test_rgba_is_composited_over_white(tmp_path: Path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (0, 0, 255, 255)  # opaque blue
    rgba[0, 1] = (0, 0, 0, 0)  # fully transparent (black underneath)
    rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    out = pixels(tmp_path / "alpha.png")
    assert out[0, 0].tolist() == [0, 0, 255]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert abs(int(out[1, 0, 0]) - 127) <= 1


def test_cmyk_jpeg(tmp_path: Path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "print.jpg", quality=100)
    red = pixels(tmp_path / "print.jpg")[4, 4]
    assert red[0] > 240 and red[1] < 15 and red[2] < 15


@pytest.mark.parametrize(("orientation", "top_left_white"), [(1, True), (3, False), (6, True), (8, False)])
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, top_left_white: bool):
    """A 20-wide, 10-high photo, left half white; the tag says how the camera was held."""
    x = np.zeros((10, 20, 3), np.uint8)
    x[:, :10] = 255
    img = Image.fromarray(x)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(tmp_path / "photo.jpg", exif=exif, quality=100)
    out = pixels(tmp_path / "photo.jpg")
    assert out.shape == ((10, 20, 3) if orientation in (1, 3) else (20, 10, 3))
    assert (out[1, 1, 0] > 200) == top_left_white
    if orientation == 6:  # turned clockwise: the white left half becomes the top half
        assert out[:10].min() > 200 and out[10:].max() < 50


def test_draft_mode_decodes_big_jpegs_small_and_still_catches_truncation(tmp_path: Path):
    noise = np.random.default_rng(0).integers(0, 256, size=(600, 800, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "big.jpg")
    assert open_rgb(tmp_path / "big.jpg", draft_size=(64, 64)).size == (100, 75)
    assert open_rgb(tmp_path / "big.jpg").size == (800, 600)
    data = (tmp_path / "big.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    for draft in (None, (64, 64)):
        with pytest.raises(OSError, match="truncated"):
            open_rgb(tmp_path / "cut.jpg", draft_size=draft)


def test_upper_case_extensions_count_as_images():
    assert all(is_image_name(n) for n in ("a.JPG", "b.JPEG", "c.PNG", "d.jpeg", "e.Png"))
    assert not any(is_image_name(n) for n in ("Thumbs.db", "notes.txt", "jpg", "x.jpg.part"))

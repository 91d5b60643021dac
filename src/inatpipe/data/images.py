"""Opening any image file as the 8-bit RGB picture a person would see: the one place images are decoded, and the
prepared square every later step starts from. No torch here: predictions from an ONNX file read images through it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

# File suffixes (compared in lower case, so .JPG and .Png count) that the pipeline reads as images.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})

EXIF_ORIENTATION = 0x0112
# Transparent pixels are shown over white, as an image viewer or a web page shows them.
BACKGROUND = (255, 255, 255)
# Integer modes whose values span 16 bits; PIL's convert("RGB") clips them at 255 instead of scaling.
WIDE_INT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# What decoding raises for a file that is no readable image: not an image (UnidentifiedImageError, an OSError),
# truncated or corrupt (OSError, ValueError, SyntaxError from some plugins), or a decompression bomb.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
# Short side over training size: 256/224, the ratio ImageNet recipes resize to before a 224 crop.
SIDE_RATIO = 256 / 224


def is_image_name(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def open_rgb(path: str | Path | BinaryIO, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode `path` (a file name, or a binary file object such as an upload's bytes in io.BytesIO) fully into an
    RGB image, upright as its EXIF orientation says.

    Grayscale, palette (with or without transparency), RGBA, CMYK and 16-bit images all come out as 8-bit RGB.
    `draft_size` lets a JPEG decode at a reduced scale no smaller than it (much faster for big photos), which is
    enough to prove the file is readable. Raises OSError (or a subclass, e.g. PIL.UnidentifiedImageError) for files
    that are not images, are truncated or are corrupt (any of DECODE_ERRORS, to be exact).
    """
    with Image.open(path) as img:
        if draft_size is not None:
            img.draft("RGB", draft_size)  # JPEG only; other formats ignore it
        img.load()  # decode now, inside the `with`, so a truncated file raises here
        if img.getexif().get(EXIF_ORIENTATION, 1) != 1:
            img = ImageOps.exif_transpose(img)
        return to_rgb(img)  # a new image: it outlives the file


def to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of a decoded image, whatever its mode."""
    if img.mode == "RGB":
        return img.copy()
    if img.mode in WIDE_INT_MODES:
        # Scale the full 16-bit range onto 0..255 (rounding), as a viewer would; values outside it are clipped.
        wide = np.asarray(img, dtype=np.float64).clip(0, 65535)
        return Image.fromarray(np.rint(wide * (255 / 65535)).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info or img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def prepared_side(image_size: int) -> int:
    return math.ceil(SIDE_RATIO * image_size)


def decode(img: Image.Image, side: int) -> np.ndarray:
    """An opened RGB image resized to side x side (antialiased bilinear), as an (side, side, 3) uint8 array."""
    return np.array(img.resize((side, side), Image.Resampling.BILINEAR))


def prepare_image(path: str | Path | BinaryIO, image_size: int) -> np.ndarray:
    """One image file as `prepare` stores it for `image_size`: decoded by `open_rgb` (a JPEG at reduced scale) and
    resized to the prepared square. Predictions on files go through this, so they see what evaluation saw."""
    side = prepared_side(image_size)
    return decode(open_rgb(path, draft_size=(side, side)), side)

"""Image files for heatmaps and cards: palette PNGs (one byte a pixel), and the WebP thumbnails
of MLflow's image cards.

A heatmap holds a few hundred colours (viridis, light grey, and anti-aliased text), so a
palette PNG stores one byte a pixel instead of three. Measured on one event's 26 TensorBoard
images with the defaults: 1,069 KiB and 130 ms as RGB at compress level 1; as palette PNGs
about 400 KiB at level 3 (level 6 took twice the zlib time for 15 % less).

The palette is fixed, `draw.PALETTE` (viridis in 128 levels, NaN grey, 16 greys from ink to
white), and Pillow maps each pixel to its nearest entry: 0.5 ms for a probe's 480 x 916
overview, where Pillow's adaptive octree took 3.5 ms, with a smaller mean error (0.8 against
1.8 in a channel). An image that does not fit it (a mean error over `_FITS` on a sample of its
pixels: not one of attnlog's heatmaps) gets the octree's adaptive palette instead.
"""

from __future__ import annotations

import io
import os
from functools import lru_cache
from typing import BinaryIO

import numpy as np
from PIL import Image

from attnlog.render.draw import PALETTE

__all__ = ["encode_png", "palette_image", "save_png", "save_thumbnail"]

PNG_LEVEL = 3  # zlib level of every palette PNG written (see the measurements above)
_FITS = 3.0  # mean error in a channel (0-255) up to which an image keeps the fixed palette


def palette_image(image: np.ndarray) -> Image.Image:
    """uint8 RGB `[height, width, 3]` as a Pillow palette ("P") image of at most 256 colours."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    rgb = Image.fromarray(image, "RGB")
    fixed = rgb.quantize(palette=_palette(), dither=Image.Dither.NONE)
    sample = image[::7, ::7].astype(np.int16)  # a check of 1 pixel in 49
    mapped = PALETTE[np.asarray(fixed)[::7, ::7]]
    if np.abs(mapped - sample).mean() <= _FITS:
        return fixed
    return rgb.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)


@lru_cache(maxsize=1)
def _palette() -> Image.Image:
    image = Image.new("P", (1, 1))
    image.putpalette(PALETTE.tobytes())
    return image


def encode_png(image: np.ndarray) -> bytes:
    """uint8 RGB `[height, width, 3]` as palette PNG bytes."""
    buffer = io.BytesIO()
    save_png(image, buffer)
    return buffer.getvalue()


def save_png(image: np.ndarray | Image.Image, target: str | os.PathLike | BinaryIO) -> None:
    """uint8 RGB `[height, width, 3]`, or a Pillow image, as a palette PNG at `target` (a path
    or a binary file; a "P" image, such as a probe card, as it is)."""
    if not (isinstance(image, Image.Image) and image.mode == "P"):
        rgb = image.convert("RGB") if isinstance(image, Image.Image) else image
        image = palette_image(np.asarray(rgb))
    image.save(target, format="PNG", compress_level=PNG_LEVEL)


def save_thumbnail(image: np.ndarray | Image.Image, path: str | os.PathLike, side: int) -> None:
    """`image` scaled to `side` px on its longer side, as a quick RGB WebP (method 0) at `path`.

    What MLflow's image cards show. A 512 px card is reduced by a 2 x 2 box average (0.3 ms,
    against 3 ms for Lanczos); WebP's method 0 takes 2 ms a card against 7 ms at Pillow's
    default, for files 15 % larger. Quality 60, not 80: 18 KB a card instead of 24, with no
    difference to see at 256 px.
    """
    from PIL import WebPImagePlugin  # noqa: F401 (registers WEBP: else Pillow imports its
    # 40-odd other format plugins first, 20 ms)

    if isinstance(image, Image.Image):
        rgb = image.convert("RGB")
    else:
        rgb = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB")
    width, height = rgb.size
    if width > height:  # as MLflow sizes the thumbnails that its `log_image` makes
        size = (side, max(1, int(height * side / width)))
    else:
        size = (max(1, int(width * side / height)), side)
    factor = width // size[0]
    if factor > 1 and (size[0] * factor, size[1] * factor) == (width, height):
        small = rgb.reduce(factor)
    else:
        small = rgb.resize(size)
    small.save(path, format="WEBP", quality=60, method=0)

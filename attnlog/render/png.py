"""PNG bytes for heatmaps and cards, as a 256-colour palette image.

A heatmap holds a few hundred colours (viridis, light grey, and anti-aliased text), so a
palette PNG stores one byte a pixel instead of three. Measured on one event's 26 TensorBoard
images with the defaults: 1,069 KiB and 130 ms as RGB at compress level 1; as a palette PNG
264 KiB at level 6 (50 ms of zlib), 333 KiB at level 3 (21 ms), 409 KiB at level 1.

The palette is fixed, `draw.PALETTE` (viridis in 239 levels, NaN grey, 16 greys from ink to
white), and Pillow maps each pixel to its nearest entry: 0.5 ms for a probe's 480 x 916
overview, where Pillow's adaptive octree took 3.5 ms, with a smaller mean error (0.8 against
1.8 in a channel). An image that does not fit it (a mean error over `_FITS` on a sample of its
pixels: not one of attnlog's heatmaps) gets the octree's adaptive palette instead.
"""

from __future__ import annotations

import io
import os
from functools import lru_cache

import numpy as np
from PIL import Image

from attnlog.render.draw import PALETTE

__all__ = ["LeanImage", "encode_png", "palette_image"]

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


def encode_png(image: np.ndarray, compress_level: int = PNG_LEVEL) -> bytes:
    """uint8 RGB `[height, width, 3]` as palette PNG bytes."""
    buffer = io.BytesIO()
    palette_image(image).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


class LeanImage(Image.Image):
    """An RGB or palette Pillow image that saves itself lean: a palette PNG to a `.png` path
    (quantised only when RGB), a quick RGB WebP (method 0) to a `.webp` path; `resize` keeps
    the class (RGB, a box average for a whole factor).

    For `MlflowClient.log_image`, which saves the image it is given at Pillow's defaults (an
    RGB PNG: three times the bytes, twice the time) and its card thumbnail, a `resize` of it,
    as WebP at method 4 (7 ms a card against 2 ms, for files 15 % smaller). Measured on one
    event's 8 cards: 19 ms a card through `log_image` before, about 10 ms after.
    """

    @classmethod
    def of(cls, image: np.ndarray | Image.Image) -> LeanImage:
        """uint8 RGB `[height, width, 3]`, or an RGB or "P" Pillow image (taken over, not
        copied)."""
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB")
        return cls._lean(image)

    @classmethod
    def _lean(cls, image: Image.Image) -> LeanImage:
        image.__class__ = cls  # same object layout: only `save` and `resize` differ
        return image  # type: ignore[return-value]

    def resize(self, *args, **kwargs) -> LeanImage:  # type: ignore[override]
        rgb = self._rgb()
        factor = _whole_factor(self.size, args[0]) if len(args) == 1 and not kwargs else 0
        if factor > 1:  # MLflow's 256 px thumbnail of a 512 px card: a 2 x 2 box average,
            return self._lean(rgb.reduce(factor))  # 0.3 ms against Lanczos's 3 ms
        return self._lean(Image.Image.resize(rgb, *args, **kwargs))

    def save(self, fp, format=None, **params) -> None:  # noqa: A002 (Pillow's signature)
        path = str(fp) if format is None and isinstance(fp, (str, os.PathLike)) else ""
        if path.endswith(".png"):
            paletted = self if self.mode == "P" else palette_image(np.asarray(self._rgb()))
            Image.Image.save(paletted, fp, format="PNG", compress_level=PNG_LEVEL)
        elif path.endswith(".webp"):
            from PIL import WebPImagePlugin  # noqa: F401 (registers WEBP: else Pillow imports
            # its 40-odd other format plugins first, 20 ms)

            Image.Image.save(self._rgb(), fp, format="WEBP", quality=80, method=0)
        else:
            super().save(fp, format, **params)

    def _rgb(self) -> Image.Image:
        return self if self.mode == "RGB" else self.convert("RGB")


def _whole_factor(size: tuple[int, int], target: object) -> int:
    """The integer f with `size == f * target` on both sides, else 0."""
    try:
        (width, height), (new_width, new_height) = size, target  # type: ignore[misc]
        factor = width // new_width
    except (TypeError, ValueError, ZeroDivisionError):
        return 0
    return factor if (new_width * factor, new_height * factor) == (width, height) else 0

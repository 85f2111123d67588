"""Drawing pieces the heatmaps share: the viridis lookup, canvases, text masks, titles,
colour bars and small pure helpers (numpy + Pillow, no I/O)."""

from __future__ import annotations

import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from attnlog.render.fonts import AUTO, FontSpec, font_for
from attnlog.snapshot import to_numpy

# matplotlib's viridis, 256 RGB entries (generated once with matplotlib, embedded as hex).
_VIRIDIS_HEX = (
    "44015444025645045745055946075a46085c460a5d460b5e470d60470e61471063471164471365481467481668481769"
    "48186a481a6c481b6d481c6e481d6f481f70482071482173482374482475482576482677482878482979472a7a472c7a"
    "472d7b472e7c472f7d46307e46327e46337f463480453581453781453882443983443a83443b84433d84433e85423f85"
    "4240864241864142874144874045884046883f47883f48893e49893e4a893e4c8a3d4d8a3d4e8a3c4f8a3c508b3b518b"
    "3b528b3a538b3a548c39558c39568c38588c38598c375a8c375b8d365c8d365d8d355e8d355f8d34608d34618d33628d"
    "33638d32648e32658e31668e31678e31688e30698e306a8e2f6b8e2f6c8e2e6d8e2e6e8e2e6f8e2d708e2d718e2c718e"
    "2c728e2c738e2b748e2b758e2a768e2a778e2a788e29798e297a8e297b8e287c8e287d8e277e8e277f8e27808e26818e"
    "26828e26828e25838e25848e25858e24868e24878e23888e23898e238a8d228b8d228c8d228d8d218e8d218f8d21908d"
    "21918c20928c20928c20938c1f948c1f958b1f968b1f978b1f988b1f998a1f9a8a1e9b8a1e9c891e9d891f9e891f9f88"
    "1fa0881fa1881fa1871fa28720a38620a48621a58521a68522a78522a88423a98324aa8325ab8225ac8226ad8127ad81"
    "28ae8029af7f2ab07f2cb17e2db27d2eb37c2fb47c31b57b32b67a34b67935b77937b87838b9773aba763bbb753dbc74"
    "3fbc7340bd7242be7144bf7046c06f48c16e4ac16d4cc26c4ec36b50c46a52c56954c56856c66758c7655ac8645cc863"
    "5ec96260ca6063cb5f65cb5e67cc5c69cd5b6ccd5a6ece5870cf5773d05675d05477d1537ad1517cd2507fd34e81d34d"
    "84d44b86d54989d5488bd6468ed64590d74393d74195d84098d83e9bd93c9dd93ba0da39a2da37a5db36a8db34aadc32"
    "addc30b0dd2fb2dd2db5de2bb8de29bade28bddf26c0df25c2df23c5e021c8e020cae11fcde11dd0e11cd2e21bd5e21a"
    "d8e219dae319dde318dfe318e2e418e5e419e7e419eae51aece51befe51cf1e51df4e61ef6e620f8e621fbe723fde725"
)
NAN_RGB = (210, 210, 210)  # cells with no value
VIRIDIS = np.frombuffer(bytes.fromhex(_VIRIDIS_HEX), dtype=np.uint8).reshape(-1, 3)

# The 145 colours that every attnlog image fits: viridis in 128 levels (indices 0..127), the
# grey of NaN (128), and 16 greys from ink to white (129..144) for anti-aliased text. Probe cards
# are drawn in these indices; other images are mapped onto them when saved (`render.png`).
# 128 levels, not 256: a level is at most 3 of 255 off in a channel, and an event's PNGs are
# 60 KiB smaller than with 239 (fewer distinct pixels for deflate).
PALETTE_LEVELS, PALETTE_NAN, PALETTE_GREY0, PALETTE_GREYS = 128, 128, 129, 16
BG = 255
INK = (20, 20, 20)
PAD = 10
LABEL_PX = 11
TICK_PX = 11
TITLE_PX = 15
MAX_LABEL_W = 90
BAR_W = 14


PALETTE = np.concatenate(
    [
        VIRIDIS[np.round(np.linspace(0, 255, PALETTE_LEVELS)).astype(int)],
        np.array([NAN_RGB], dtype=np.uint8),
        np.round(np.linspace(INK, (BG, BG, BG), PALETTE_GREYS)).astype(np.uint8),
    ]
)


def colorize(values: Any, vmin: float = 0.0, vmax: float = 1.0) -> np.ndarray:
    """Map values `[...]` through viridis to uint8 RGB `[..., 3]`; NaN/inf become light grey."""
    values = np.asarray(values, dtype=np.float32)
    span = vmax - vmin if vmax > vmin else 1.0
    scaled = (values - vmin) * (255.999 / span)
    finite = np.isfinite(scaled)
    idx = np.clip(np.where(finite, scaled, 0), 0, 255).astype(np.uint8)
    rgb = VIRIDIS[idx]
    if not finite.all():
        rgb[~finite] = NAN_RGB
    return rgb


# ---- drawing -----------------------------------------------------------------------


def blank_canvas(width: int, height: int) -> np.ndarray:
    return np.full((int(height), int(width), 3), BG, dtype=np.uint8)


def text_mask(
    shape: tuple[int, int],
    items: list[tuple[float, float, str, str]],
    size: int,
    cjk_font: FontSpec = AUTO,
    max_w: float | None = None,
) -> np.ndarray:
    """Alpha mask `[h, w]` with each (x, y_center, text, align) drawn; align in l/c/r.

    Read-only and cached: an event's labels (tokens, layer and head numbers) are the same at
    every event, and drawing them was a third of the rendering.
    """
    spec = os.fspath(cjk_font) if cjk_font is not None else None
    items = tuple((float(x), float(y), str(t), str(a)) for x, y, t, a in items)
    return _text_mask((int(shape[0]), int(shape[1])), items, int(size), spec, max_w)


@lru_cache(maxsize=1024)
def _text_mask(
    shape: tuple[int, int],
    items: tuple[tuple[float, float, str, str], ...],
    size: int,
    cjk_font: FontSpec,
    max_w: float | None,
) -> np.ndarray:
    img = Image.new("L", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(img)
    for x, y, text, align in items:
        font = font_for(text, size, cjk_font)
        if max_w is not None:
            text = fit(text, font, max_w)
        width = font.getlength(text)
        ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (size, 0)
        x0 = x - width if align == "r" else x - width / 2 if align == "c" else x
        draw.text((x0, y - (ascent + descent) / 2), text, fill=255, font=font)
    mask = np.asarray(img)
    mask.flags.writeable = False
    return mask


def blend(canvas: np.ndarray, mask: np.ndarray, y: int, x: int, color=INK) -> None:
    """Alpha-blend `color` into `canvas` where `mask` `[h, w]` is set, clipped to the canvas."""
    blend_all(canvas, [(mask, y, x, color)])


def blend_all(canvas: np.ndarray, pieces: Sequence[tuple[np.ndarray, int, int, Any]]) -> None:
    """`blend` each (mask, y, x, color) of `pieces` in one pass over the canvas: a score
    matrix's 72 cell values cost one fancy index instead of 72."""
    if not pieces:
        return
    inked = [_inked(mask) for mask, _, _, _ in pieces]  # text covers few pixels: only those
    ys = np.concatenate([i[0] + int(y) for i, (_, y, _, _) in zip(inked, pieces)])
    xs = np.concatenate([i[1] + int(x) for i, (_, _, x, _) in zip(inked, pieces)])
    alpha = np.concatenate([i[2] for i in inked])
    ink = np.repeat(
        np.asarray([color for _, _, _, color in pieces], dtype=np.float32),
        [len(i[0]) for i in inked],
        axis=0,
    )
    inside = (ys < canvas.shape[0]) & (xs < canvas.shape[1])  # pieces start on the canvas
    _mix(canvas, ys[inside], xs[inside], alpha[inside], ink[inside])


def _mix(canvas: np.ndarray, ys: np.ndarray, xs: np.ndarray, alpha: np.ndarray, ink) -> None:
    """canvas[ys, xs] = canvas * (1 - alpha) + ink * alpha, rounded; through flat pixel
    indices, which numpy gathers and scatters about twice as fast as (ys, xs) pairs."""
    if not canvas.flags.c_contiguous:  # a view of a larger image: no flat view of its own
        mixed = canvas[ys, xs] * (1.0 - alpha) + ink * alpha + 0.5
        canvas[ys, xs] = mixed.astype(np.uint8)
        return
    pixels = canvas.reshape(-1, canvas.shape[-1])
    at = ys * canvas.shape[1] + xs
    mixed = pixels[at].astype(np.float32)
    mixed -= ink
    mixed *= 1.0 - alpha
    mixed += ink
    mixed += 0.5
    pixels[at] = mixed  # float to uint8: truncated, so + 0.5 rounds


_INKED: OrderedDict[int, tuple] = OrderedDict()  # id(read-only mask) -> (mask, ys, xs, alpha)


def _inked(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ys, xs, alpha `[k, 1]`) of a mask's inked pixels. Kept for the read-only masks that
    `text_mask` caches: finding them again was a sixth of the rendering."""
    entry = _INKED.get(id(mask))
    if entry is not None and entry[0] is mask:
        _INKED.move_to_end(id(mask))
        return entry[1:]
    ys, xs = np.nonzero(mask)
    alpha = mask[ys, xs, None].astype(np.float32) * (1.0 / 255.0)
    if not mask.flags.writeable:  # cached by text_mask: the same object comes back
        _INKED[id(mask)] = (mask, ys, xs, alpha)  # holding the mask keeps its id unique
        if len(_INKED) > 1024:
            _INKED.popitem(last=False)
    return ys, xs, alpha


def paste_text(
    canvas: np.ndarray,
    items: list[tuple[float, float, str, str]],
    size: int,
    *,
    color=INK,
    x0: int = 0,
    width: int | None = None,
    cjk_font: FontSpec = AUTO,
) -> None:
    """Draw (x, y_center, text, align) items (canvas coordinates) in one mask over the canvas."""
    if not items:
        return
    ys = [y for _, y, _, _ in items]
    y0 = max(0, int(min(ys)) - size)
    y1 = min(canvas.shape[0], int(max(ys)) + size + 2)
    width = canvas.shape[1] - x0 if width is None else width
    local = [(x - x0, y - y0, t, a) for x, y, t, a in items]
    blend(canvas, text_mask((y1 - y0, width), local, size, cjk_font), y0, x0, color)


@lru_cache(maxsize=4096)
def glyphs(text: str, size: int) -> np.ndarray:
    """`text` as an alpha mask `[ascent + descent, width]`, read-only (cached: score values and
    labels repeat across images and events)."""
    font = font_for(text, size)
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (size, 0)
    image = Image.new("L", (int(font.getlength(text)) + 2, ascent + descent), 0)
    ImageDraw.Draw(image).text((0, 0), text, fill=255, font=font)
    mask = np.asarray(image)
    mask.flags.writeable = False
    return mask


def stamp(canvas, text: str, size: int, at: tuple[float, float], anchor: str, ink=INK) -> None:
    """Blend `text` into `canvas` at `at` = (x, y); `anchor` is horizontal l/m/r then vertical
    t (top), m (middle) or b (bottom)."""
    mask = glyphs(text, size)
    blend(canvas, mask, *anchored(mask.shape, at, anchor), ink)


def anchored(shape: tuple[int, int], at: tuple[float, float], anchor: str) -> tuple[int, int]:
    """(y, x) of the top left corner of a `shape` mask placed at `at` by `anchor` (see `stamp`),
    kept on the canvas's top and left."""
    h, w = shape
    x = at[0] - {"l": 0, "m": w / 2, "r": w}[anchor[0]]
    y = at[1] - {"t": 0, "m": h / 2, "b": h}[anchor[1]]
    return max(0, int(round(y))), max(0, int(round(x)))


def paste_rotated(canvas: np.ndarray, text: str, size: int, *, x: int, y_center: float) -> None:
    """`text` reading bottom to top, its left edge at `x`, centred on `y_center`."""
    font = font_for(text, size)
    w = int(font.getlength(text)) + 2
    mask = np.rot90(text_mask((size + 6, w), [(1, (size + 6) / 2, text, "l")], size))
    blend(canvas, mask, max(0, int(y_center - w / 2)), x)


def draw_title(canvas: np.ndarray, title: str, cjk_font: FontSpec) -> None:
    """`title` at the top left, in a strip as tall as its font's ascent + descent (CJK fonts
    are taller than Latin ones: a fixed strip cut their glyphs)."""
    if title:
        height = title_font_height(title, cjk_font)
        items = [(PAD, height / 2 + 1, title, "l")]
        mask = text_mask(
            (height + 2, canvas.shape[1]), items, TITLE_PX, cjk_font, canvas.shape[1] - 2 * PAD
        )
        blend(canvas, mask, PAD - 2, 0)


def draw_colorbar(
    canvas: np.ndarray, x: int, y: int, height: int, vmin: float, vmax: float
) -> None:
    """Vertical viridis bar `height` px tall at (x, y) with vmin / middle / vmax ticks."""
    values = np.linspace(vmax, vmin, height, dtype=np.float32)
    bar = colorize(values, vmin, vmax)[:, None, :]
    canvas[y : y + height, x : x + BAR_W] = bar
    canvas[y - 1 : y + height + 1, x - 1] = INK  # frame, outside the bar
    canvas[y - 1 : y + height + 1, x + BAR_W] = INK
    canvas[y - 1, x : x + BAR_W] = INK
    canvas[y + height, x : x + BAR_W] = INK
    ticks = [(vmax, y), ((vmin + vmax) / 2, y + height / 2), (vmin, y + height - 1)]
    items = [(x + BAR_W + 4, ty, f"{v:.3g}", "l") for v, ty in ticks]
    for _, ty in ticks:
        canvas[int(ty), x + BAR_W : x + BAR_W + 3] = INK
    paste_text(canvas, items, TICK_PX)


def bar_width() -> int:
    return BAR_W + 4 + int(font_for("0", TICK_PX).getlength("0.00")) + 6


def title_font_height(title: str, cjk_font: FontSpec = AUTO) -> int:
    font = font_for(title, TITLE_PX, cjk_font, warn=False)
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (TITLE_PX, 0)
    return int(ascent + descent)


def title_height(title: str, cjk_font: FontSpec = AUTO) -> int:
    """Rows the title takes above the content (0 without a title)."""
    return title_font_height(title, cjk_font) + 6 if title else 0


# ---- small pure helpers --------------------------------------------------------------------


def as_float(value: Any, ndim: int, func: str, shape: str) -> np.ndarray:
    array = np.asarray(to_numpy(value), dtype=np.float32)
    if array.ndim != ndim or 0 in array.shape:
        raise ValueError(f"{func}: expected a non-empty {shape} array, got shape {array.shape}")
    return array


def check_tokens(size: int, tokens: Sequence[str], what: str, dim: str) -> None:
    if isinstance(tokens, str) or len(tokens) != size:
        got = "a string" if isinstance(tokens, str) else f"{len(tokens)}"
        raise ValueError(
            f"{dim} is {size} but {what} has {got} entries; pass one token per position"
        )


def display_token(token: str) -> str:
    """A token as a label: BPE/SentencePiece space markers removed, whitespace made visible."""
    text = str(token).replace("\u0120", "").replace("\u2581", "").replace("\u010a", "\\n")
    text = text.replace("\n", "\\n").replace("\t", "\\t").strip()
    return text or "\u2423"


def fit(text: str, font: Any, max_w: float) -> str:
    """`text`, or its longest prefix (at least one character) that fits `max_w` with "…"
    after it: found by bisection, as a long probe's header took a measure per character."""
    if font.getlength(text) <= max_w:
        return text
    short, long = 1, len(text)  # text[:short] + "…" is kept; text[:long] + "…" is too wide
    while long - short > 1:
        middle = (short + long) // 2
        if font.getlength(text[:middle] + "\u2026") <= max_w:
            short = middle
        else:
            long = middle
    return text[:short] + "\u2026"


def label_px(per_token: float) -> int:
    return int(min(LABEL_PX, max(9, per_token - 1)))


def label_width(tokens: list[str] | None, cjk_font: FontSpec) -> int:
    if not tokens:
        return 0
    widest = max(text_length(t, LABEL_PX, cjk_font) for t in tokens)
    return int(min(widest, MAX_LABEL_W)) + 8


def text_width(texts: list[str]) -> int:
    return int(max(text_length(t, LABEL_PX, None) for t in texts))


@lru_cache(maxsize=8192)
def text_length(text: str, size: int, cjk_font: FontSpec = AUTO) -> float:
    """`text`'s advance width in px, in the font `font_for` picks (`cjk_font=None`: Latin).
    Cached: the same labels and score values are measured at every event."""
    return font_for(text, size, cjk_font, warn=False).getlength(text)


def thin(pixels_per_item: float, needed: float) -> int:
    """Draw every k-th label so that labels `needed` px apart do not overlap."""
    return max(1, math.ceil(needed / max(pixels_per_item, 1e-9)))


def downsample(tiles: np.ndarray, factor: int) -> np.ndarray:
    """Average `[..., n, m]` over factor x factor blocks (the last block may be partial)."""
    *lead, n, m = tiles.shape
    n2, m2 = math.ceil(n / factor), math.ceil(m / factor)
    padded = np.full((*lead, n2 * factor, m2 * factor), np.nan, dtype=np.float32)
    padded[..., :n, :m] = tiles
    blocks = padded.reshape(*lead, n2, factor, m2, factor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks of empty panels
        return np.nanmean(blocks, axis=(-3, -1))


def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114

"""Attention heatmaps and score matrices as uint8 RGB arrays `[height, width, 3]`.

Pure functions, numpy + Pillow only, no I/O. Every image is built as one numpy array through a
viridis lookup table; Pillow only draws the text (token labels, ticks, titles), each label strip
once, then pasted where it is needed. Long inputs stay legible: labels are thinned to fit and
images never exceed `max_size` pixels a side (cells are averaged down beyond that).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from attnlog.render.fonts import AUTO, FontSpec, font_for
from attnlog.snapshot import to_numpy

__all__ = ["VIRIDIS", "colorize", "display_token", "render_layer", "render_matrix", "render_model"]

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
VIRIDIS = np.frombuffer(bytes.fromhex(_VIRIDIS_HEX), dtype=np.uint8).reshape(-1, 3)

_BG = 255
_INK = (20, 20, 20)
_NAN_RGB = (210, 210, 210)
_PAD = 10
_GAP = 6
_LABEL_PX = 11
_TICK_PX = 11
_TITLE_PX = 15
_MAX_CELL = 18
_MAX_LABEL_W = 90
_BAR_W = 14


def colorize(values: Any, vmin: float = 0.0, vmax: float = 1.0) -> np.ndarray:
    """Map values `[...]` through viridis to uint8 RGB `[..., 3]`; NaN/inf become light grey."""
    values = np.asarray(values, dtype=np.float32)
    span = vmax - vmin if vmax > vmin else 1.0
    scaled = (values - vmin) * (255.999 / span)
    finite = np.isfinite(scaled)
    idx = np.clip(np.where(finite, scaled, 0), 0, 255).astype(np.uint8)
    rgb = VIRIDIS[idx]
    if not finite.all():
        rgb[~finite] = _NAN_RGB
    return rgb


def render_layer(
    attn: Any,
    tokens: Sequence[str],
    key_tokens: Sequence[str] | None = None,
    *,
    title: str = "",
    labels: bool = True,
    max_size: int = 2048,
    cjk_font: FontSpec = AUTO,
) -> np.ndarray:
    """One layer's heads in a grid, each a token-labelled heatmap (rows query, columns key).

    Args:
        attn: `[H, n, m]` attention weights in [0, 1].
        tokens: the n query tokens.
        key_tokens: the m key tokens (cross-attention); defaults to `tokens`.
        title: drawn at the top.
        labels: draw token labels (thinned to fit when cells are small).
        max_size: largest width/height in pixels; cells are averaged down beyond it.
        cjk_font: path of a CJK font, "auto" to search the system, or None for none.

    Returns:
        uint8 RGB image `[height, width, 3]`.
    """
    attn = _as_float(attn, 3, "render_layer", "[H, n, m]")
    key_tokens = tokens if key_tokens is None else key_tokens
    _check_tokens(attn.shape[1], tokens, "tokens", "attn.shape[1] (queries)")
    _check_tokens(attn.shape[2], key_tokens, "key_tokens", "attn.shape[2] (keys)")
    heads, n, m = attn.shape
    cols = math.ceil(math.sqrt(heads))
    rows = math.ceil(heads / cols)
    tiles = np.full((rows * cols, n, m), np.nan, dtype=np.float32)
    tiles[:heads] = attn
    layout = _Layout(
        rows=rows,
        cols=cols,
        count=heads,
        panel_names=[f"H{h}" for h in range(heads)],
        tokens=[display_token(t) for t in tokens] if labels else None,
        key_tokens=[display_token(t) for t in key_tokens] if labels else None,
    )
    return _draw_grid(tiles.reshape(rows, cols, n, m), layout, title, max_size, cjk_font)


def render_model(
    attn: Any,
    tokens: Sequence[str],
    *,
    title: str = "",
    max_size: int = 2048,
    cjk_font: FontSpec = AUTO,
) -> np.ndarray:
    """All layers x heads in one grid: rows "L0..", columns "H0..", no per-cell token labels.

    Args:
        attn: `[L, H, n, n]` attention weights in [0, 1].
        tokens: the n tokens (checked against the shape; too dense to draw at this scale).
        title: drawn at the top.
        max_size: largest width/height in pixels; cells are averaged down beyond it.
        cjk_font: used for the title only; see `render_layer`.

    Returns:
        uint8 RGB image `[height, width, 3]`.
    """
    attn = _as_float(attn, 4, "render_model", "[L, H, n, n]")
    _check_tokens(attn.shape[2], tokens, "tokens", "attn.shape[2]")
    _check_tokens(attn.shape[3], tokens, "tokens", "attn.shape[3]")
    layers, heads = attn.shape[:2]
    layout = _Layout(
        rows=layers,
        cols=heads,
        count=layers * heads,
        row_names=[f"L{i}" for i in range(layers)],
        col_names=[f"H{h}" for h in range(heads)],
        max_cell=4,  # an overview: small cells keep the image (and its PNG encodes) cheap
    )
    return _draw_grid(attn, layout, title, max_size, cjk_font)


def render_matrix(
    matrix: Any,
    *,
    title: str = "",
    fmt: str = "{:.2f}",
    vmin: float | None = None,
    vmax: float | None = None,
    max_size: int = 2048,
    cjk_font: FontSpec = AUTO,
) -> np.ndarray:
    """A `[L, H]` score matrix: coloured cells with their values, NaN cells grey with "–".

    Args:
        matrix: `[L, H]` scores; NaN where undefined.
        title: drawn at the top.
        fmt: format of the value written in each cell.
        vmin, vmax: colour range; default [0, 1] when the scores lie in it, else their range.
        max_size: largest width/height in pixels; values are left out when cells get too small.
        cjk_font: used for the title only; see `render_layer`.

    Returns:
        uint8 RGB image `[height, width, 3]`.
    """
    matrix = _as_float(matrix, 2, "render_matrix", "[L, H]")
    vmin, vmax = _matrix_range(matrix, vmin, vmax)
    texts = np.array(
        [[fmt.format(v) if np.isfinite(v) else "\u2013" for v in row] for row in matrix.tolist()],
        dtype=object,
    )
    cell_w, cell_h, show_values = _matrix_cells(texts, title, max_size, cjk_font)
    rgb = colorize(matrix, vmin, vmax)
    cells = np.repeat(np.repeat(rgb, cell_h, axis=0), cell_w, axis=1)  # [L*ch, H*cw, 3]
    grid_h, grid_w = cells.shape[:2]

    # Margins: the title, "head" over the column ticks; the rotated "layer" beside the row ticks.
    layers, heads = matrix.shape
    tick_w = int(font_for("0", _LABEL_PX).getlength(f"{layers - 1}")) + 6
    top = _PAD + _title_height(title, cjk_font) + _LABEL_PX + 6 + _LABEL_PX + 4
    left = _PAD + _LABEL_PX + 6 + tick_w
    bar_h = min(max(grid_h, 80), 300)
    canvas = _canvas(
        left + grid_w + _GAP + _bar_width() + _PAD, top + max(grid_h, bar_h + _TICK_PX) + _PAD
    )
    canvas[top : top + grid_h, left : left + grid_w] = cells
    _draw_title(canvas, title, cjk_font)
    _draw_matrix_ticks(canvas, matrix.shape, (top, left), (cell_h, cell_w), tick_w)
    if show_values:
        _draw_cell_values(canvas, texts, rgb, (top, left), (cell_h, cell_w))
    _draw_colorbar(canvas, left + grid_w + _GAP, top, bar_h, vmin, vmax)
    return canvas


def _matrix_range(matrix: np.ndarray, vmin: float | None, vmax: float | None) -> tuple:
    """The colour range: [0, 1] when the scores lie in it (most patterns), else their range."""
    finite = matrix[np.isfinite(matrix)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if lo >= 0.0 and hi <= 1.0:
        lo, hi = 0.0, 1.0
    return (lo if vmin is None else vmin), (hi if vmax is None else vmax)


def _matrix_cells(texts: np.ndarray, title: str, max_size: int, cjk_font: FontSpec) -> tuple:
    """(cell width, cell height, values shown): cells fit their value text, or shrink without
    it until the matrix fits in `max_size` (40 px on each axis are for the ticks and captions)."""
    layers, heads = texts.shape
    text_w = max(font_for("0", _LABEL_PX).getlength(t) for t in texts.ravel())
    cell_w, cell_h = int(text_w) + 10, _LABEL_PX + 12
    avail_w = max_size - 2 * _PAD - 40 - _bar_width()
    avail_h = max_size - 2 * _PAD - 40 - _title_height(title, cjk_font)
    if cell_w * heads <= avail_w and cell_h * layers <= avail_h:
        return cell_w, cell_h, True
    side = max(1, min(avail_w // heads, avail_h // layers, cell_h))
    return side, side, False


def _draw_matrix_ticks(
    canvas: np.ndarray, shape: tuple, origin: tuple, cell: tuple, tick_w: int
) -> None:
    """Layer numbers left of the rows, head numbers above the columns (thinned to fit), and
    the two axis captions; `origin` is the grid's (top, left), `cell` its (height, width)."""
    (layers, heads), (top, left), (cell_h, cell_w) = shape, origin, cell
    font = font_for("0", _LABEL_PX)
    step = _thin(cell_h, _LABEL_PX + 2)
    items = [(left - 3, top + (i + 0.5) * cell_h, str(i), "r") for i in range(0, layers, step)]
    _paste_text(canvas, items, _LABEL_PX, x0=left - tick_w, width=tick_w)
    step = _thin(cell_w, font.getlength(f"{heads - 1}") + 4)
    items = [
        (left + (j + 0.5) * cell_w, top - _LABEL_PX // 2 - 3, str(j), "c")
        for j in range(0, heads, step)
    ]
    items.append((left + heads * cell_w / 2, top - _LABEL_PX - 12, "head", "c"))
    _paste_text(canvas, items, _LABEL_PX)
    _paste_rotated(canvas, "layer", _LABEL_PX, x=_PAD, y_center=top + layers * cell_h / 2)


def _draw_cell_values(
    canvas: np.ndarray, texts: np.ndarray, rgb: np.ndarray, origin: tuple, cell: tuple
) -> None:
    """Each cell's value, dark on bright cells and white on dark ones."""
    (top, left), (cell_h, cell_w) = origin, cell
    dark = _luminance(rgb) > 140
    for want_dark, color in ((True, _INK), (False, (255, 255, 255))):
        items = [
            (left + (j + 0.5) * cell_w, top + (i + 0.5) * cell_h, texts[i, j], "c")
            for i, j in zip(*np.nonzero(dark == want_dark))
        ]
        _paste_text(canvas, items, _LABEL_PX, color=color)


# ---- layout --------------------------------------------------------------------------------


class _Layout:
    """What a grid of heatmap panels carries around it."""

    def __init__(
        self,
        rows: int,
        cols: int,
        count: int,
        panel_names: list[str] | None = None,
        row_names: list[str] | None = None,
        col_names: list[str] | None = None,
        tokens: list[str] | None = None,
        key_tokens: list[str] | None = None,
        max_cell: int = _MAX_CELL,
    ) -> None:
        self.rows, self.cols, self.count = rows, cols, count
        self.panel_names, self.row_names, self.col_names = panel_names, row_names, col_names
        self.tokens, self.key_tokens, self.max_cell = tokens, key_tokens, max_cell


def _draw_grid(
    tiles: np.ndarray, layout: _Layout, title: str, max_size: int, cjk_font: FontSpec
) -> np.ndarray:
    """Draw `tiles` `[R, C, n, m]` as a panel grid with labels, title and colour bar."""
    g = _GridGeometry(tiles.shape, layout, title, max_size, cjk_font)
    if g.factor > 1:
        tiles = _downsample(tiles, g.factor)
    grid = _grid_pixels(tiles, layout.count, g)
    bar_h = min(max(grid.shape[0] - g.key_label_h - g.gap - g.name_h, 80), 300)
    height = max(grid.shape[0], g.name_h + bar_h + _TICK_PX)
    canvas = _canvas(g.left + grid.shape[1] + _GAP + _bar_width() + _PAD, g.top + height + _PAD)
    canvas[g.top : g.top + grid.shape[0], g.left : g.left + grid.shape[1]] = grid
    _draw_title(canvas, title, cjk_font)
    _draw_panel_labels(canvas, layout, g, tiles.shape[1], cjk_font)
    _draw_grid_axes(canvas, layout, g, grid.shape)
    _draw_colorbar(canvas, g.left + grid.shape[1] + _GAP, g.top + g.name_h, bar_h, 0.0, 1.0)
    return canvas


class _GridGeometry:
    """Where things go in a panel grid: the margins around it, and each panel's block (its
    name above, query labels left of the cells, key labels below) in canvas pixels."""

    def __init__(
        self, shape: tuple, layout: _Layout, title: str, max_size: int, cjk_font: FontSpec
    ) -> None:
        rows, cols, n, m = shape
        self.n, self.m = n, m  # tokens per panel side, before any downsampling
        labelled = layout.tokens is not None
        self.label_w = _label_width(layout.tokens, cjk_font) if labelled else 0
        self.key_label_h = _label_width(layout.key_tokens, cjk_font) if labelled else 0
        self.name_h = _LABEL_PX + 6 if layout.panel_names else 0
        self.col_h = _LABEL_PX + 6 if layout.col_names else 0
        self.axis = _LABEL_PX + 6 if layout.row_names else 0  # rotated "layer" / plain "head"
        self.gap = _GAP if labelled or layout.panel_names else 3
        row_w = _text_width(layout.row_names) + 8 if layout.row_names else 0
        self.top = _PAD + _title_height(title, cjk_font) + self.col_h + self.axis
        self.left = _PAD + self.axis + row_w
        # Pixels per token: square cells of `cell` px, or 1 px per `factor` tokens when too many.
        avail_w = (
            (max_size - self.left - _PAD - _GAP - _bar_width()) / cols - self.label_w - self.gap
        )
        avail_h = (max_size - self.top - _PAD) / rows - self.name_h - self.key_label_h - self.gap
        fit = min(avail_w / m, avail_h / n)
        self.cell = int(max(1, min(layout.max_cell, fit)))
        self.factor = 1 if fit >= 1 else math.ceil(1 / max(fit, 1e-9))
        self.per_token = self.cell / self.factor
        n2, m2 = math.ceil(n / self.factor), math.ceil(m / self.factor)
        self.panel_h, self.panel_w = n2 * self.cell, m2 * self.cell
        self.block_h = self.name_h + self.panel_h + self.key_label_h + self.gap
        self.block_w = self.label_w + self.panel_w + self.gap


def _grid_pixels(tiles: np.ndarray, count: int, g: _GridGeometry) -> np.ndarray:
    """The coloured panels laid out in their blocks, `[R * block_h, C * block_w, 3]`; blocks
    past `count` (the last row's unused places) stay background."""
    rows, cols = tiles.shape[:2]
    blocks = np.full((rows, g.block_h, cols, g.block_w, 3), _BG, dtype=np.uint8)
    rgb = colorize(tiles)  # [R, C, n2, m2, 3]
    rgb = np.repeat(np.repeat(rgb, g.cell, axis=2), g.cell, axis=3)
    rgb[np.arange(rows * cols).reshape(rows, cols) >= count] = _BG
    panel = (slice(g.name_h, g.name_h + g.panel_h), slice(g.label_w, g.label_w + g.panel_w))
    blocks[:, panel[0], :, panel[1]] = rgb.transpose(0, 2, 1, 3, 4)
    return blocks.reshape(rows * g.block_h, cols * g.block_w, 3)


def _draw_panel_labels(
    canvas: np.ndarray, layout: _Layout, g: _GridGeometry, cols: int, cjk_font: FontSpec
) -> None:
    """Each panel's name, and its query and key token labels (drawn once, pasted per panel)."""
    labelled = layout.tokens is not None
    if labelled:
        strip = _label_strip(layout.tokens, g.n, g.per_token, g.label_w, cjk_font)
        key_strip = np.rot90(
            _label_strip(layout.key_tokens, g.m, g.per_token, g.key_label_h, cjk_font)
        )
    for k in range(layout.count):
        r, c = divmod(k, cols)
        y, x = g.top + r * g.block_h, g.left + c * g.block_w
        if layout.panel_names:
            name = [(x + g.label_w, y + g.name_h / 2, layout.panel_names[k], "l")]
            _paste_text(canvas, name, _LABEL_PX)
        if labelled:
            _blend(canvas, strip, y + g.name_h - _LABEL_PX, x)
            _blend(canvas, key_strip, y + g.name_h + g.panel_h, x + g.label_w - _LABEL_PX)


def _draw_grid_axes(canvas: np.ndarray, layout: _Layout, g: _GridGeometry, grid_shape) -> None:
    """Row names (layers) with the rotated "layer" caption, column names (heads) under "head"."""
    rows, cols = grid_shape[0] // g.block_h, grid_shape[1] // g.block_w
    if layout.row_names:
        step = _thin(g.block_h, _LABEL_PX + 2)
        items = [
            (g.left - 4, g.top + (r + 0.5) * g.block_h - g.gap / 2, layout.row_names[r], "r")
            for r in range(0, rows, step)
        ]
        _paste_text(canvas, items, _LABEL_PX)
        _paste_rotated(canvas, "layer", _LABEL_PX, x=_PAD, y_center=g.top + grid_shape[0] / 2)
    if layout.col_names:
        step = _thin(g.block_w, _text_width(layout.col_names) + 4)
        items = [
            (
                g.left + (c + 0.5) * g.block_w - g.gap / 2,
                g.top - g.col_h / 2,
                layout.col_names[c],
                "c",
            )
            for c in range(0, cols, step)
        ]
        items.append((g.left + grid_shape[1] / 2, g.top - g.col_h - g.axis / 2, "head", "c"))
        _paste_text(canvas, items, _LABEL_PX)


def _label_strip(
    tokens: list[str], n: int, per_token: float, width: int, cjk_font: FontSpec
) -> np.ndarray:
    """Right-aligned labels, one per token row, thinned to fit: alpha mask `[rows, width]`.

    The mask has `_LABEL_PX` rows of margin above and below so edge labels are not clipped.
    """
    height = max(1, math.ceil(n * per_token)) + 2 * _LABEL_PX
    step = _thin(per_token, _LABEL_PX + 1)
    items = [
        (width - 3, _LABEL_PX + (i + 0.5) * per_token, tokens[i], "r") for i in range(0, n, step)
    ]
    return _text_mask((height, width), items, _label_px(per_token), cjk_font, width - 3)


# ---- drawing helpers -----------------------------------------------------------------------


def _canvas(width: int, height: int) -> np.ndarray:
    return np.full((int(height), int(width), 3), _BG, dtype=np.uint8)


def _text_mask(
    shape: tuple[int, int],
    items: list[tuple[float, float, str, str]],
    size: int,
    cjk_font: FontSpec = AUTO,
    max_w: float | None = None,
) -> np.ndarray:
    """Alpha mask `[h, w]` with each (x, y_center, text, align) drawn; align in l/c/r."""
    img = Image.new("L", (int(shape[1]), int(shape[0])), 0)
    draw = ImageDraw.Draw(img)
    for x, y, text, align in items:
        font = font_for(text, size, cjk_font)
        if max_w is not None:
            text = _fit(text, font, max_w)
        width = font.getlength(text)
        ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (size, 0)
        x0 = x - width if align == "r" else x - width / 2 if align == "c" else x
        draw.text((x0, y - (ascent + descent) / 2), text, fill=255, font=font)
    return np.asarray(img)


def _blend(canvas: np.ndarray, mask: np.ndarray, y: int, x: int, color=_INK) -> None:
    """Alpha-blend `color` into `canvas` where `mask` `[h, w]` is set, clipped to the canvas."""
    y, x = int(y), int(x)
    h = min(mask.shape[0], canvas.shape[0] - y)
    w = min(mask.shape[1], canvas.shape[1] - x)
    if h <= 0 or w <= 0:
        return
    ys, xs = np.nonzero(mask[:h, :w])  # text covers few pixels: blend only those
    if ys.size == 0:
        return
    alpha = mask[ys, xs, None].astype(np.float32) * (1.0 / 255.0)
    ys, xs = ys + y, xs + x
    ink = np.asarray(color, dtype=np.float32)
    canvas[ys, xs] = (canvas[ys, xs] * (1.0 - alpha) + ink * alpha + 0.5).astype(np.uint8)


def _paste_text(
    canvas: np.ndarray,
    items: list[tuple[float, float, str, str]],
    size: int,
    *,
    color=_INK,
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
    _blend(canvas, _text_mask((y1 - y0, width), local, size, cjk_font), y0, x0, color)


def _paste_rotated(canvas: np.ndarray, text: str, size: int, *, x: int, y_center: float) -> None:
    """`text` reading bottom to top, its left edge at `x`, centred on `y_center`."""
    font = font_for(text, size)
    w = int(font.getlength(text)) + 2
    mask = np.rot90(_text_mask((size + 6, w), [(1, (size + 6) / 2, text, "l")], size))
    _blend(canvas, mask, max(0, int(y_center - w / 2)), x)


def _draw_title(canvas: np.ndarray, title: str, cjk_font: FontSpec) -> None:
    """`title` at the top left, in a strip as tall as its font's ascent + descent (CJK fonts
    are taller than Latin ones: a fixed strip cut their glyphs)."""
    if title:
        height = _title_font_height(title, cjk_font)
        items = [(_PAD, height / 2 + 1, title, "l")]
        mask = _text_mask(
            (height + 2, canvas.shape[1]), items, _TITLE_PX, cjk_font, canvas.shape[1] - 2 * _PAD
        )
        _blend(canvas, mask, _PAD - 2, 0)


def _draw_colorbar(
    canvas: np.ndarray, x: int, y: int, height: int, vmin: float, vmax: float
) -> None:
    """Vertical viridis bar `height` px tall at (x, y) with vmin / middle / vmax ticks."""
    values = np.linspace(vmax, vmin, height, dtype=np.float32)
    bar = colorize(values, vmin, vmax)[:, None, :]
    canvas[y : y + height, x : x + _BAR_W] = bar
    canvas[y - 1 : y + height + 1, x - 1] = _INK  # frame, outside the bar
    canvas[y - 1 : y + height + 1, x + _BAR_W] = _INK
    canvas[y - 1, x : x + _BAR_W] = _INK
    canvas[y + height, x : x + _BAR_W] = _INK
    ticks = [(vmax, y), ((vmin + vmax) / 2, y + height / 2), (vmin, y + height - 1)]
    items = [(x + _BAR_W + 4, ty, f"{v:.3g}", "l") for v, ty in ticks]
    for _, ty in ticks:
        canvas[int(ty), x + _BAR_W : x + _BAR_W + 3] = _INK
    _paste_text(canvas, items, _TICK_PX)


def _bar_width() -> int:
    return _BAR_W + 4 + int(font_for("0", _TICK_PX).getlength("0.00")) + 6


def _title_font_height(title: str, cjk_font: FontSpec = AUTO) -> int:
    font = font_for(title, _TITLE_PX, cjk_font, warn=False)
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (_TITLE_PX, 0)
    return int(ascent + descent)


def _title_height(title: str, cjk_font: FontSpec = AUTO) -> int:
    """Rows the title takes above the content (0 without a title)."""
    return _title_font_height(title, cjk_font) + 6 if title else 0


# ---- small pure helpers --------------------------------------------------------------------


def _as_float(value: Any, ndim: int, func: str, shape: str) -> np.ndarray:
    array = np.asarray(to_numpy(value), dtype=np.float32)
    if array.ndim != ndim or 0 in array.shape:
        raise ValueError(f"{func}: expected a non-empty {shape} array, got shape {array.shape}")
    return array


def _check_tokens(size: int, tokens: Sequence[str], what: str, dim: str) -> None:
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


def _fit(text: str, font: Any, max_w: float) -> str:
    if font.getlength(text) <= max_w:
        return text
    while len(text) > 1 and font.getlength(text + "\u2026") > max_w:
        text = text[:-1]
    return text + "\u2026"


def _label_px(per_token: float) -> int:
    return int(min(_LABEL_PX, max(9, per_token - 1)))


def _label_width(tokens: list[str] | None, cjk_font: FontSpec) -> int:
    if not tokens:
        return 0
    widest = max(font_for(t, _LABEL_PX, cjk_font, warn=False).getlength(t) for t in tokens)
    return int(min(widest, _MAX_LABEL_W)) + 8


def _text_width(texts: list[str]) -> int:
    font = font_for("0", _LABEL_PX)
    return int(max(font.getlength(t) for t in texts))


def _thin(pixels_per_item: float, needed: float) -> int:
    """Draw every k-th label so that labels `needed` px apart do not overlap."""
    return max(1, math.ceil(needed / max(pixels_per_item, 1e-9)))


def _downsample(tiles: np.ndarray, factor: int) -> np.ndarray:
    """Average `[..., n, m]` over factor x factor blocks (the last block may be partial)."""
    *lead, n, m = tiles.shape
    n2, m2 = math.ceil(n / factor), math.ceil(m / factor)
    padded = np.full((*lead, n2 * factor, m2 * factor), np.nan, dtype=np.float32)
    padded[..., :n, :m] = tiles
    blocks = padded.reshape(*lead, n2, factor, m2, factor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks of empty panels
        return np.nanmean(blocks, axis=(-3, -1))


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114

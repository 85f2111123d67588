"""Attention heatmaps and score matrices as uint8 RGB arrays `[height, width, 3]`.

Pure functions, numpy + Pillow only, no I/O. Every image is built as one numpy array through a
viridis lookup table; Pillow only draws the text (token labels, ticks, titles), each label strip
once, then pasted where it is needed. Long inputs stay legible: labels are thinned to fit and
images never exceed `max_size` pixels a side (cells are averaged down beyond that).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from attnlog.render.draw import (
    BG,
    INK,
    LABEL_PX,
    PAD,
    TICK_PX,
    VIRIDIS,
    anchored,
    as_float,
    bar_width,
    blank_canvas,
    blend,
    blend_all,
    check_tokens,
    colorize,
    display_token,
    downsample,
    draw_colorbar,
    draw_title,
    glyphs,
    label_px,
    label_width,
    luminance,
    paste_rotated,
    paste_text,
    text_length,
    text_mask,
    text_width,
    thin,
    title_height,
)
from attnlog.render.fonts import AUTO, FontSpec, font_for

_GAP = 6
_MAX_CELL = 18

__all__ = ["VIRIDIS", "colorize", "display_token", "render_layer", "render_matrix", "render_model"]


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
    attn = as_float(attn, 3, "render_layer", "[H, n, m]")
    key_tokens = tokens if key_tokens is None else key_tokens
    check_tokens(attn.shape[1], tokens, "tokens", "attn.shape[1] (queries)")
    check_tokens(attn.shape[2], key_tokens, "key_tokens", "attn.shape[2] (keys)")
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
    attn = as_float(attn, 4, "render_model", "[L, H, n, n]")
    check_tokens(attn.shape[2], tokens, "tokens", "attn.shape[2]")
    check_tokens(attn.shape[3], tokens, "tokens", "attn.shape[3]")
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
    matrix = as_float(matrix, 2, "render_matrix", "[L, H]")
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
    tick_w = int(font_for("0", LABEL_PX).getlength(f"{layers - 1}")) + 6
    top = PAD + title_height(title, cjk_font) + LABEL_PX + 6 + LABEL_PX + 4
    left = PAD + LABEL_PX + 6 + tick_w
    bar_h = min(max(grid_h, 80), 300)
    canvas = blank_canvas(
        left + grid_w + _GAP + bar_width() + PAD, top + max(grid_h, bar_h + TICK_PX) + PAD
    )
    canvas[top : top + grid_h, left : left + grid_w] = cells
    draw_title(canvas, title, cjk_font)
    _draw_matrix_ticks(canvas, matrix.shape, (top, left), (cell_h, cell_w), tick_w)
    if show_values:
        _draw_cell_values(canvas, texts, rgb, (top, left), (cell_h, cell_w))
    draw_colorbar(canvas, left + grid_w + _GAP, top, bar_h, vmin, vmax)
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
    text_w = max(text_length(t, LABEL_PX, None) for t in texts.ravel())
    cell_w, cell_h = int(text_w) + 10, LABEL_PX + 12
    avail_w = max_size - 2 * PAD - 40 - bar_width()
    avail_h = max_size - 2 * PAD - 40 - title_height(title, cjk_font)
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
    font = font_for("0", LABEL_PX)
    step = thin(cell_h, LABEL_PX + 2)
    items = [(left - 3, top + (i + 0.5) * cell_h, str(i), "r") for i in range(0, layers, step)]
    paste_text(canvas, items, LABEL_PX, x0=left - tick_w, width=tick_w)
    step = thin(cell_w, font.getlength(f"{heads - 1}") + 4)
    items = [
        (left + (j + 0.5) * cell_w, top - LABEL_PX // 2 - 3, str(j), "c")
        for j in range(0, heads, step)
    ]
    items.append((left + heads * cell_w / 2, top - LABEL_PX - 12, "head", "c"))
    paste_text(canvas, items, LABEL_PX)
    paste_rotated(canvas, "layer", LABEL_PX, x=PAD, y_center=top + layers * cell_h / 2)


def _draw_cell_values(
    canvas: np.ndarray, texts: np.ndarray, rgb: np.ndarray, origin: tuple, cell: tuple
) -> None:
    """Each cell's value, dark on bright cells and white on dark ones."""
    (top, left), (cell_h, cell_w) = origin, cell
    dark = luminance(rgb) > 140
    pieces = []
    for (i, j), text in np.ndenumerate(texts):  # glyphs cached: values repeat across events
        mask = glyphs(text, LABEL_PX)
        y, x = anchored(mask.shape, (left + (j + 0.5) * cell_w, top + (i + 0.5) * cell_h), "mm")
        pieces.append((mask, y, x, INK if dark[i, j] else (255, 255, 255)))
    blend_all(canvas, pieces)


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
        tiles = downsample(tiles, g.factor)
    rows, cols = tiles.shape[:2]
    grid_shape = (rows * g.block_h, cols * g.block_w)
    bar_h = min(max(grid_shape[0] - g.key_label_h - g.gap - g.name_h, 80), 300)
    height = max(grid_shape[0], g.name_h + bar_h + TICK_PX)
    canvas = blank_canvas(g.left + grid_shape[1] + _GAP + bar_width() + PAD, g.top + height + PAD)
    grid = canvas[g.top : g.top + grid_shape[0], g.left : g.left + grid_shape[1]]
    _paint_panels(grid, tiles, layout.count, g)
    draw_title(canvas, title, cjk_font)
    _draw_panel_labels(canvas, layout, g, tiles.shape[1], cjk_font)
    _draw_grid_axes(canvas, layout, g, grid.shape)
    draw_colorbar(canvas, g.left + grid.shape[1] + _GAP, g.top + g.name_h, bar_h, 0.0, 1.0)
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
        self.label_w = label_width(layout.tokens, cjk_font) if labelled else 0
        self.key_label_h = label_width(layout.key_tokens, cjk_font) if labelled else 0
        self.name_h = LABEL_PX + 6 if layout.panel_names else 0
        self.col_h = LABEL_PX + 6 if layout.col_names else 0
        self.axis = LABEL_PX + 6 if layout.row_names else 0  # rotated "layer" / plain "head"
        self.gap = _GAP if labelled or layout.panel_names else 3
        row_w = text_width(layout.row_names) + 8 if layout.row_names else 0
        self.top = PAD + title_height(title, cjk_font) + self.col_h + self.axis
        self.left = PAD + self.axis + row_w
        # Pixels per token: square cells of `cell` px, or 1 px per `factor` tokens when too many.
        avail_w = (max_size - self.left - PAD - _GAP - bar_width()) / cols - self.label_w - self.gap
        avail_h = (max_size - self.top - PAD) / rows - self.name_h - self.key_label_h - self.gap
        fit = min(avail_w / m, avail_h / n)
        self.cell = int(max(1, min(layout.max_cell, fit)))
        self.factor = 1 if fit >= 1 else math.ceil(1 / max(fit, 1e-9))
        self.per_token = self.cell / self.factor
        n2, m2 = math.ceil(n / self.factor), math.ceil(m / self.factor)
        self.panel_h, self.panel_w = n2 * self.cell, m2 * self.cell
        self.block_h = self.name_h + self.panel_h + self.key_label_h + self.gap
        self.block_w = self.label_w + self.panel_w + self.gap


def _paint_panels(grid: np.ndarray, tiles: np.ndarray, count: int, g: _GridGeometry) -> None:
    """Colour each panel in its block of `grid` (a view of the canvas, background already),
    `[R * block_h, C * block_w, 3]`; blocks past `count` (the last row's unused places) stay
    background. In place: a separate grid image was a 1 MB allocation and copy an image."""
    rows, cols = tiles.shape[:2]
    blocks = grid.view()
    blocks.shape = (rows, g.block_h, cols, g.block_w, 3)  # still a view of the canvas (or raises)
    rgb = colorize(tiles)  # [R, C, n2, m2, 3]
    rgb = np.repeat(np.repeat(rgb, g.cell, axis=2), g.cell, axis=3)
    rgb[np.arange(rows * cols).reshape(rows, cols) >= count] = BG
    panel = (slice(g.name_h, g.name_h + g.panel_h), slice(g.label_w, g.label_w + g.panel_w))
    blocks[:, panel[0], :, panel[1]] = rgb.transpose(0, 2, 1, 3, 4)


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
            text = layout.panel_names[k]
            name = [(x + g.label_w, y + g.name_h / 2, text, "l")]
            # A strip as wide as the name needs, not the canvas: one small cached mask per name.
            width = g.label_w + int(text_length(text, LABEL_PX, cjk_font)) + 4
            paste_text(canvas, name, LABEL_PX, x0=x, width=min(width, canvas.shape[1] - x))
        if labelled:
            blend(canvas, strip, y + g.name_h - LABEL_PX, x)
            blend(canvas, key_strip, y + g.name_h + g.panel_h, x + g.label_w - LABEL_PX)


def _draw_grid_axes(canvas: np.ndarray, layout: _Layout, g: _GridGeometry, grid_shape) -> None:
    """Row names (layers) with the rotated "layer" caption, column names (heads) under "head"."""
    rows, cols = grid_shape[0] // g.block_h, grid_shape[1] // g.block_w
    if layout.row_names:
        step = thin(g.block_h, LABEL_PX + 2)
        items = [
            (g.left - 4, g.top + (r + 0.5) * g.block_h - g.gap / 2, layout.row_names[r], "r")
            for r in range(0, rows, step)
        ]
        paste_text(canvas, items, LABEL_PX)
        paste_rotated(canvas, "layer", LABEL_PX, x=PAD, y_center=g.top + grid_shape[0] / 2)
    if layout.col_names:
        step = thin(g.block_w, text_width(layout.col_names) + 4)
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
        paste_text(canvas, items, LABEL_PX)


def _label_strip(
    tokens: list[str], n: int, per_token: float, width: int, cjk_font: FontSpec
) -> np.ndarray:
    """Right-aligned labels, one per token row, thinned to fit: alpha mask `[rows, width]`.

    The mask has `LABEL_PX` rows of margin above and below so edge labels are not clipped.
    """
    height = max(1, math.ceil(n * per_token)) + 2 * LABEL_PX
    step = thin(per_token, LABEL_PX + 1)
    items = [
        (width - 3, LABEL_PX + (i + 0.5) * per_token, tokens[i], "r") for i in range(0, n, step)
    ]
    return text_mask((height, width), items, label_px(per_token), cjk_font, width - 3)

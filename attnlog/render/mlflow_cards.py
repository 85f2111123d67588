"""Square overview images drawn for the cards of MLflow's "Model metrics" tab.

MLflow 3.x shows each image key as a card about 225 px wide, drawn from a thumbnail it makes at
256 px on the longer side, in a square box; a click opens the full image. TensorBoard's heatmaps
(`heatmap.render_model`, `render_matrix`) are wide, with 11-15 px text: in a card their text
is 3-5 px, and most of the square is empty. These cards are square, `CARD_PX` a side, with text
of 22 px and more (11 px in the thumbnail), and say in their header what the card is about:

- `probe_card`: every layer x head of one probe (rows "L0..", columns head numbers), the tiles
  stretched to fill the square, the probe's text on top;
- `pattern_card`: one pattern's `[L, H]` scores, its top head outlined and named on top.

A probe card is drawn in indices of `draw.PALETTE` (viridis in 128 levels, the grey of NaN,
and 16 greys from ink to white for the text), so it is saved as a palette PNG as it is.

Pure functions: numpy and Pillow, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from attnlog.layout import tb_attention_tag, tb_pattern_tag
from attnlog.render.draw import (
    INK,
    PALETTE,
    PALETTE_GREY0,
    PALETTE_GREYS,
    PALETTE_LEVELS,
    PALETTE_NAN,
    anchored,
    fit,
    glyphs,
    stamp,
)
from attnlog.render.fonts import font_for
from attnlog.render.heatmap import colorize, display_token

if TYPE_CHECKING:
    from attnlog.patterns import ScoreTable
    from attnlog.snapshot import Snapshot

__all__ = ["CARD_PX", "covered", "pattern_card", "probe_card", "render_cards"]

CARD_PX = 512  # 2x MLflow's 256 px thumbnail: text scales by 1/2, the click preview stays sharp
_HEADER_PX = 26
_LABEL_PX = 22
_VALUE_PX = 14
_PAD = 8
_GAP = 2  # white between tiles
_MARK = (230, 30, 30)  # the outline of the top head

_WHITE = PALETTE_GREY0 + PALETTE_GREYS - 1


def probe_card(
    attention: np.ndarray, tokens: Sequence[str], step: int, special: Sequence[bool] | None = None
) -> np.ndarray:
    """All heads of one probe, `attention` `[L, H, n, n]` in [0, 1], as a square uint8 RGB card.

    Queries run down and keys across in each tile, as in TensorBoard's images. The header shows
    the probe's tokens, without the `special` ones ([CLS], [SEP]).
    """
    return PALETTE[_probe_card_indices(attention, tokens, step, special)]


def probe_card_image(
    attention: np.ndarray, tokens: Sequence[str], step: int, special: Sequence[bool] | None = None
) -> Image.Image:
    """`probe_card` as a Pillow palette ("P") image of `PALETTE`: what MLflow gets."""
    indices = _probe_card_indices(attention, tokens, step, special)
    image = Image.frombytes("P", (indices.shape[1], indices.shape[0]), indices.tobytes())
    image.putpalette(PALETTE.tobytes())
    return image


def _probe_card_indices(
    attention: np.ndarray, tokens: Sequence[str], step: int, special: Sequence[bool] | None
) -> np.ndarray:
    attention = np.asarray(attention, dtype=np.float32)
    layers, heads, rows, cols = attention.shape
    special = [False] * len(tokens) if special is None else list(special)
    text = " ".join(display_token(t) for t, s in zip(tokens, special) if not s)
    canvas, (top, left, cell_h, cell_w) = _frame(f"step {step} \u00b7 {text}", layers, heads)
    down = _pixel_map(top, cell_h, layers, rows)
    across = _pixel_map(left, cell_w, heads, cols)
    if down is not None and across is not None:  # every tile as large as its map: index once
        (ys, layer, row), (xs, head, col) = down, across
        levels = _levels(attention)
        canvas[np.ix_(ys, xs)] = levels[layer[:, None], head[None, :], row[:, None], col[None, :]]
        return canvas
    for layer, head in np.ndindex(layers, heads):  # a tile smaller than its map: block means
        y0, x0, y1, x1 = _cell(top, left, cell_h, cell_w, layer, head)
        canvas[y0:y1, x0:x1] = _levels(_resize(attention[layer, head], y1 - y0, x1 - x0))
    return canvas


def pattern_card(matrix: np.ndarray, step: int) -> np.ndarray:
    """One pattern's `[L, H]` scores as a square uint8 RGB card, its top head outlined.

    Colours span [0, 1] when the scores lie in it, else their own range; NaN is grey.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    layers, heads = matrix.shape
    finite = matrix[np.isfinite(matrix)]
    lo, hi = (0.0, 1.0) if finite.size == 0 else (float(finite.min()), float(finite.max()))
    if lo >= 0.0 and hi <= 1.0:
        lo, hi = 0.0, 1.0
    top_head = None
    header = f"step {step}"
    if finite.size:
        top_head = np.unravel_index(int(np.nanargmax(matrix)), matrix.shape)
        name = f"L{top_head[0]}H{top_head[1]}"
        header = f"step {step} \u00b7 top {name} = {matrix[top_head]:.2f}"
    indices, grid = _frame(header, layers, heads, bar=(lo, hi))
    canvas = PALETTE[indices]
    rgb = colorize(matrix, lo, hi)
    light = (0.2126 * rgb[..., 0] + 0.7152 * rgb[..., 1] + 0.0722 * rgb[..., 2]) > 140
    values = _fits_values(grid)
    for row, col in np.ndindex(layers, heads):
        y0, x0, y1, x1 = _cell(*grid, row, col)
        canvas[y0:y1, x0:x1] = rgb[row, col]
        if values:
            text = f"{matrix[row, col]:.2f}" if np.isfinite(matrix[row, col]) else "\u2013"
            ink = INK if light[row, col] else (255, 255, 255)
            stamp(canvas, text, _VALUE_PX, ((x0 + x1) / 2, (y0 + y1) / 2), "mm", ink)
    if top_head is not None:
        y0, x0, y1, x1 = _cell(*grid, *top_head)
        _outline(canvas, y0 - 2, x0 - 2, y1 + 2, x1 + 2, 4)
    return canvas


def render_cards(
    snapshot: Snapshot, table: ScoreTable, patterns: bool = True
) -> dict[str, np.ndarray | Image.Image]:
    """A card per probe (a palette image), and with `patterns` per pattern scored somewhere (an
    RGB array), under the TensorBoard image tags (`attention/<probe>/model`,
    `patterns/<pattern>`), so that both name an image alike."""
    from attnlog.words import unit_probe

    cards = {}
    for probe in snapshot.probes:
        shown = unit_probe(probe)  # pooled at capture: its blocks are the tokens
        cards[tb_attention_tag(shown.name)] = probe_card_image(
            shown.attention, shown.tokens, snapshot.step, shown.special
        )
    for pattern, matrix in table.scores.items() if patterns else ():
        if np.isfinite(matrix).any():
            cards[tb_pattern_tag(pattern)] = pattern_card(matrix, snapshot.step)
    return cards


def covered(tag: str) -> bool:
    """Whether the image TensorBoard logs under `tag` has its own card in MLflow (a probe's
    model image, a pattern's score matrix; not a layer's heads nor the word-level images).
    A pattern's matrix is a card only with `MLflowSink(pattern_cards=True)`, else not sent."""
    parts = tag.split("/")
    if parts[0] == "patterns":
        return len(parts) == 2
    return (
        len(parts) == 3
        and parts[0] == "attention"
        and parts[2] == "model"
        and not (parts[1].endswith("_words"))
    )


# ---- layout --------------------------------------------------------------------------------


def _frame(header: str, layers: int, heads: int, bar: tuple[float, float] | None = None):
    """A white square of `PALETTE` indices with the header, "L<l>" row labels and
    head-number column labels drawn; returns (canvas, (top, left, cell_h, cell_w)) of the grid's
    cells."""
    base, grid = _labelled(layers, heads, bar)
    canvas = base.copy()
    head_font = font_for(header, _HEADER_PX)
    _ink(canvas, fit(header, head_font, CARD_PX - 2 * _PAD), _HEADER_PX, (_PAD, _PAD), "lt")
    return canvas, grid


@lru_cache(maxsize=64)
def _labelled(layers: int, heads: int, bar: tuple[float, float] | None) -> tuple:
    """`_frame` without its header: the same for every card of a model, drawn once
    (read-only)."""
    canvas = np.full((CARD_PX, CARD_PX), _WHITE, dtype=np.uint8)
    label_font = font_for("L0", _LABEL_PX)
    top = _PAD + _HEADER_PX + 10 + _LABEL_PX + 6
    left = _PAD + int(label_font.getlength(f"L{layers - 1}")) + 8
    bottom = CARD_PX - _PAD - (_LABEL_PX + 24 if bar else 0)
    cell_h, cell_w = (bottom - top) / layers, (CARD_PX - _PAD - left) / heads
    every_row, every_col = _every(cell_h, _LABEL_PX), _every(cell_w, label_font.getlength("00"))
    for layer in range(0, layers, every_row):
        y = top + (layer + 0.5) * cell_h - _GAP / 2
        _ink(canvas, f"L{layer}", _LABEL_PX, (left - 8, y), "rm")
    for head in range(0, heads, every_col):
        x = left + (head + 0.5) * cell_w - _GAP / 2
        _ink(canvas, str(head), _LABEL_PX, (x, top - 6), "mb")
    if bar:
        _draw_bar(canvas, bar, left, bottom + 8)
    canvas.flags.writeable = False
    return canvas, (top, left, cell_h, cell_w)


def _ink(canvas: np.ndarray, text: str, size: int, at: tuple[float, float], anchor: str) -> None:
    """`text` in the card's greys (anti-aliased over white), placed as `draw.stamp` places it."""
    mask = glyphs(text, size)
    y, x = anchored(mask.shape, at, anchor)
    region = canvas[y : y + mask.shape[0], x : x + mask.shape[1]]
    mask = mask[: region.shape[0], : region.shape[1]]
    lightness = (255 - mask.astype(np.uint16)) * (PALETTE_GREYS - 1) // 255  # alpha 255: ink
    grey = (PALETTE_GREY0 + lightness).astype(np.uint8)
    np.minimum(region, grey, out=region)  # the darker where glyphs overlap (white is the last)


def _pixel_map(start: int, cell: float, count: int, n: int) -> tuple | None:
    """Along one axis of the grid: the pixels inside cells, the cell of each and the map row
    (or column) each shows, as `_cell` lays them out; None when a cell is narrower than `n`."""
    pixels, cells, within = [], [], []
    for k in range(count):
        a0, a1 = _span(start, cell, k)
        if a1 - a0 < n:
            return None
        pixels.append(np.arange(a0, a1))
        cells.append(np.full(a1 - a0, k))
        within.append(_blocks(n, a1 - a0))
    return np.concatenate(pixels), np.concatenate(cells), np.concatenate(within)


def _levels(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] as `PALETTE` indices: viridis levels, NaN and inf as `PALETTE_NAN`."""
    scaled = np.asarray(values, dtype=np.float32) * (PALETTE_LEVELS - 0.001)
    finite = np.isfinite(scaled)
    levels = np.clip(np.where(finite, scaled, 0), 0, PALETTE_LEVELS - 1).astype(np.uint8)
    levels[~finite] = PALETTE_NAN
    return levels


def _cell(top: int, left: int, cell_h: float, cell_w: float, row: int, col: int) -> tuple:
    """(y0, x0, y1, x1) of one cell, `_GAP` px of white after it."""
    (y0, y1), (x0, x1) = _span(top, cell_h, row), _span(left, cell_w, col)
    return y0, x0, y1, x1


def _span(start: int, cell: float, k: int) -> tuple[int, int]:
    """The first and past-the-last pixel of the `k`-th cell along one axis."""
    a0 = start + int(k * cell)
    return a0, max(a0 + 1, start + int((k + 1) * cell) - _GAP)


def _draw_bar(canvas: np.ndarray, span: tuple[float, float], left: int, y: int) -> None:
    """A horizontal colour bar under the grid, its ends labelled with the range."""
    lo, hi = span
    font = font_for("0", _LABEL_PX)
    lo_text, hi_text = f"{lo:.3g}", f"{hi:.3g}"
    x0 = left + int(font.getlength(lo_text)) + 10
    x1 = CARD_PX - _PAD - int(font.getlength(hi_text)) - 10
    canvas[y + 4 : y + _LABEL_PX - 4, x0:x1] = _levels(np.linspace(0.0, 1.0, x1 - x0))
    middle = y + _LABEL_PX / 2
    _ink(canvas, lo_text, _LABEL_PX, (left, middle), "lm")
    _ink(canvas, hi_text, _LABEL_PX, (CARD_PX - _PAD, middle), "rm")


def _fits_values(grid: tuple) -> bool:
    """Whether the cells are wide and tall enough for "0.00" at `_VALUE_PX`."""
    _, _, cell_h, cell_w = grid
    return font_for("0", _VALUE_PX).getlength("0.00") <= cell_w - 6 and cell_h >= _VALUE_PX + 4


def _outline(canvas: np.ndarray, y0: int, x0: int, y1: int, x1: int, width: int) -> None:
    """A `_MARK` frame `width` px thick, inside (y0, x0)-(y1, x1), clipped to the canvas."""
    y0, x0 = max(0, y0), max(0, x0)
    y1, x1 = min(canvas.shape[0], y1), min(canvas.shape[1], x1)
    canvas[y0 : y0 + width, x0:x1] = _MARK
    canvas[y1 - width : y1, x0:x1] = _MARK
    canvas[y0:y1, x0 : x0 + width] = _MARK
    canvas[y0:y1, x1 - width : x1] = _MARK


# ---- small helpers ---------------------------------------------------------------------------


def _every(pixels_per_item: float, needed: float) -> int:
    """Label every k-th row/column so that labels do not overlap."""
    return max(1, int(np.ceil((needed + 4) / max(pixels_per_item, 1e-6))))


@lru_cache(maxsize=256)
def _blocks(n: int, size: int) -> np.ndarray:
    """Which of `n` rows each of `size` >= n pixels shows: blocks as equal as they can be."""
    return np.arange(size) * n // size


def _resize(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """`values` `[n, m]` to `[height, width]`: blocks when enlarged, block means when shrunk."""
    image = Image.fromarray(np.ascontiguousarray(values, dtype=np.float32))
    return np.asarray(image.resize((width, height), Image.Resampling.BOX), dtype=np.float32)

"""`attnlog export`: figures for papers from a run's archive, as vector SVG or PNG at any dpi.

Three figures: one head's token-labelled heatmap, a layer's heads side by side, and a pattern's
layer x head score matrix. One layout (in points, 1/72 inch) is drawn by two small backends: SVG
(cells as `<rect>`, tokens as `<text>`, so the figure stays vector and its text searchable) and
Pillow (the same layout at `dpi / 72` pixels per point). Reads only the archive, offline.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np

from attnlog.render.heatmap import colorize, display_token
from attnlog.report import load
from attnlog.snapshot import ProbeAttention

__all__ = ["Panel", "export", "figure_png", "figure_svg"]

_FONT_FAMILY = "DejaVu Sans, Noto Sans CJK SC, Source Han Sans SC, sans-serif"
_LABEL = 8.0  # pt: token labels and ticks
_TITLE = 10.0  # pt: panel titles
_GAP = 14.0  # pt between panels
_MARGIN = 6.0
_BAR_W = 8.0
_NAN = (210, 210, 210)


@dataclass
class Panel:
    """One heatmap: `values` `[rows, cols]` with a label per row (left) and column (below)."""

    values: np.ndarray
    rows: list[str]
    cols: list[str]
    title: str = ""
    numbers: bool = False  # write each cell's value in it


def export(
    logdir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    step: int | None = None,
    probe: str | None = None,
    layer: int | None = None,
    head: int | None = None,
    pattern: str | None = None,
    dpi: int = 150,
    words: bool = False,
) -> Path:
    """Write one figure to `out` (`.svg` or `.png`, chosen by the suffix); returns the path.

    Args:
        step: a logged step (default: the last).
        probe: probe name (default: the first); unused with `pattern`.
        layer: the layer to draw (required unless `pattern` is given).
        head: one head of `layer`; all of the layer's heads when None.
        pattern: draw this pattern's layer x head score matrix instead.
        dpi: PNG resolution (SVG is vector).
        words: aggregate tokens to words first (`attnlog.words.word_probe`).

    Raises:
        FileNotFoundError: no archive in `logdir`.
        ValueError: an unknown step, probe, pattern, layer, head or output suffix, with the
            choices.
    """
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".svg", ".png"):
        raise ValueError(f"--out must end in .svg or .png, got {out.name!r}")
    if dpi < 10 or dpi > 2400:
        raise ValueError(f"dpi must be between 10 and 2400, got {dpi}")
    snapshot = load(logdir, step)  # the last readable step by default; damaged ones skipped
    scores = snapshot.scores
    if pattern is not None:
        panels, title = _pattern_panels(scores, pattern, snapshot.step)
    else:
        chosen = _probe(snapshot.probes, probe)
        panels, title = _attention_panels(chosen, layer, head, snapshot.step, words)
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".svg":
        out.write_text(figure_svg(panels, title), encoding="utf-8")
    else:
        from PIL import Image

        image = Image.fromarray(figure_png(panels, title, dpi))
        image.save(out, dpi=(dpi, dpi))
    return out


# ---- what to draw ----------------------------------------------------------------------------


def _probe(probes: Sequence[ProbeAttention], name: str | None) -> ProbeAttention:
    if not probes:
        raise ValueError("this step archived no probe; draw a score matrix with --pattern NAME")
    if name is None:
        return probes[0]
    for p in probes:
        if p.name == name:
            return p
    raise ValueError(f"no probe {name!r} at this step; probes: {[p.name for p in probes]}")


def _attention_panels(
    probe: ProbeAttention, layer: int | None, head: int | None, step: int, words: bool
) -> tuple[list[Panel], str]:
    from attnlog.words import unit_probe, word_probe

    probe = word_probe(probe) if words else unit_probe(probe)
    attn = np.asarray(probe.attention, dtype=np.float32)  # [L, H, n, n]
    layers, heads = attn.shape[:2]
    if layer is None or not 0 <= layer < layers:
        raise ValueError(f"pass --layer between 0 and {layers - 1} (or --pattern NAME)")
    if head is not None and not 0 <= head < heads:
        raise ValueError(f"--head must be between 0 and {heads - 1}, got {head}")
    tokens = [display_token(t) for t in probe.tokens]
    chosen = range(heads) if head is None else [head]
    panels = [Panel(attn[layer, h], tokens, tokens, f"layer {layer} head {h}") for h in chosen]
    return panels, f"{probe.name} · step {step}"


def _pattern_panels(
    scores: dict[str, np.ndarray], pattern: str, step: int
) -> tuple[list[Panel], str]:
    if pattern not in scores:
        raise ValueError(f"no pattern {pattern!r} in the archive; patterns: {sorted(scores)}")
    matrix = np.asarray(scores[pattern], dtype=np.float32)  # [L, H]
    rows = [str(i) for i in range(matrix.shape[0])]
    cols = [str(i) for i in range(matrix.shape[1])]
    return [Panel(matrix, rows, cols, "layer × head", numbers=True)], f"{pattern} · step {step}"


# ---- layout (points) -------------------------------------------------------------------------


def _measure(text: str, size: float) -> float:
    from attnlog.render.fonts import font_for

    return font_for(text, 100, warn=False).getlength(text) * size / 100


@dataclass
class _Box:
    x: float  # left of the cells
    y: float  # top of the cells
    cell: float
    panel: Panel


def _layout(panels: list[Panel], title: str) -> tuple[list[_Box], float, float, float]:
    """Cell boxes, figure width and height, and the colour bar's left edge (points)."""
    rows, cols = panels[0].values.shape
    biggest = max(rows, cols)
    cell = 14.0 if panels[0].numbers else max(2.0, min(14.0, 360.0 / biggest))
    if panels[0].numbers:
        cell = max(cell, _measure("0.00", _LABEL) + 4)
    row_w = max(_measure(t, _LABEL) for t in panels[0].rows) + 4
    col_h = max(_measure(t, _LABEL) for t in panels[0].cols) + 4
    per_row = max(1, math.ceil(math.sqrt(len(panels))))
    width = row_w + cols * cell
    height = _TITLE + 4 + rows * cell + col_h
    top = _MARGIN + (_TITLE + 8 if title else 0)
    boxes = []
    for k, panel in enumerate(panels):
        r, c = divmod(k, per_row)
        boxes.append(
            _Box(
                _MARGIN + c * (width + _GAP) + row_w,
                top + r * (height + _GAP) + _TITLE + 4,
                cell,
                panel,
            )
        )
    grid_cols = min(len(panels), per_row)
    grid_rows = math.ceil(len(panels) / per_row)
    bar_x = _MARGIN + grid_cols * (width + _GAP)
    fig_w = bar_x + _BAR_W + 4 + _measure("0.00", _LABEL) + _MARGIN
    fig_h = top + grid_rows * (height + _GAP) + _MARGIN
    return boxes, fig_w, fig_h, bar_x


def _range(panels: list[Panel]) -> tuple[float, float]:
    values = np.concatenate([p.values.ravel() for p in panels])
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    return (0.0, 1.0) if lo >= 0.0 and hi <= 1.0 else (lo, hi if hi > lo else lo + 1.0)


def _draw(canvas: _Svg | _Png, panels: list[Panel], title: str) -> None:
    """Draw the figure with `canvas.rect(x, y, w, h, rgb)` and
    `canvas.text(x, y, text, size, anchor, rotate, rgb)` (points; y is the text's middle)."""
    boxes, _, height, bar_x = _layout(panels, title)
    vmin, vmax = _range(panels)
    ink = (20, 20, 20)
    if title:
        canvas.text(_MARGIN, _MARGIN + _TITLE / 2 + 2, title, _TITLE + 1, "start", False, ink)
    for box in boxes:
        p, cell = box.panel, box.cell
        rows, cols = p.values.shape
        rgb = colorize(p.values, vmin, vmax)
        rgb[~np.isfinite(p.values)] = _NAN
        canvas.text(box.x, box.y - _TITLE / 2 - 2, p.title, _TITLE, "start", False, ink)
        for i in range(rows):
            for j in range(cols):
                canvas.rect(box.x + j * cell, box.y + i * cell, cell, cell, tuple(rgb[i, j]))
        step_r = max(1, math.ceil((_LABEL + 1) / cell))
        for i in range(0, rows, step_r):
            canvas.text(box.x - 3, box.y + (i + 0.5) * cell, p.rows[i], _LABEL, "end", False, ink)
        for j in range(0, cols, step_r):
            x = box.x + (j + 0.5) * cell
            canvas.text(x, box.y + rows * cell + 3, p.cols[j], _LABEL, "end", True, ink)
        if p.numbers:
            for i in range(rows):
                for j in range(cols):
                    v = p.values[i, j]
                    light = sum(rgb[i, j] * (0.299, 0.587, 0.114)) > 140
                    text = f"{v:.2f}" if np.isfinite(v) else "\u2013"
                    color = ink if light else (255, 255, 255)
                    cx, cy = box.x + (j + 0.5) * cell, box.y + (i + 0.5) * cell
                    canvas.text(cx, cy, text, _LABEL - 1, "middle", False, color)
    top = boxes[0].y
    bar_h = min(height - top - _MARGIN, 160.0)
    steps = 64
    for k in range(steps):
        value = vmax - (vmax - vmin) * (k + 0.5) / steps
        color = tuple(colorize([value], vmin, vmax)[0])
        canvas.rect(bar_x, top + k * bar_h / steps, _BAR_W, bar_h / steps + 0.05, color)
    for value, y in ((vmax, top), ((vmin + vmax) / 2, top + bar_h / 2), (vmin, top + bar_h)):
        canvas.text(bar_x + _BAR_W + 3, y, f"{value:.3g}", _LABEL, "start", False, ink)


# ---- backends --------------------------------------------------------------------------------


def _hex(rgb: Sequence[int]) -> str:
    r, g, b = (int(c) for c in rgb)
    return f"#{r:02x}{g:02x}{b:02x}"


# Characters XML 1.0 does not allow (C0 controls but tab/newline/return, lone surrogates,
# U+FFFE, U+FFFF): one in a `<text>` makes the whole SVG unreadable, and tokens can hold any.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _visible(text: str) -> str:
    """`text` with every character XML cannot hold shown as its escape (`\\x1b`, `\\ufffe`),
    so both backends draw the same label and the SVG stays valid XML."""
    return _NOT_XML.sub(
        lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text
    )


class _Svg:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def rect(self, x: float, y: float, w: float, h: float, rgb: Sequence[int]) -> None:
        fill = _hex(rgb)
        self.parts.append(
            f'<rect x="{x:.2f}" y="{y:.2f}" width="{w:.2f}" height="{h:.2f}" fill="{fill}"/>'
        )

    def text(
        self,
        x: float,
        y: float,
        text: str,
        size: float,
        anchor: str,
        rotate: bool,
        rgb: Sequence[int],
    ) -> None:
        fill = _hex(rgb)
        turn = f' transform="rotate(-90 {x:.2f} {y:.2f})"' if rotate else ""
        self.parts.append(
            f'<text x="{x:.2f}" y="{y:.2f}" font-size="{size:g}" text-anchor="{anchor}" '
            f'dominant-baseline="central" fill="{fill}"{turn}>{escape(_visible(text))}</text>'
        )


def figure_svg(panels: list[Panel], title: str = "") -> str:
    """The figure as an SVG document (points; tokens as `<text>`)."""
    _, width, height, _ = _layout(panels, title)
    svg = _Svg()
    _draw(svg, panels, title)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.1f}pt" height="{height:.1f}pt" '
        f'viewBox="0 0 {width:.2f} {height:.2f}" font-family="{_FONT_FAMILY}">\n'
        f"<title>{escape(_visible(title))}</title>\n"
        f'<rect width="100%" height="100%" fill="#ffffff"/>\n' + "\n".join(svg.parts) + "\n</svg>\n"
    )


class _Png:
    def __init__(self, width: float, height: float, scale: float) -> None:
        from PIL import Image, ImageDraw

        self.scale = scale
        self.image = Image.new(
            "RGB", (math.ceil(width * scale), math.ceil(height * scale)), "white"
        )
        self.draw = ImageDraw.Draw(self.image)

    def rect(self, x: float, y: float, w: float, h: float, rgb: Sequence[int]) -> None:
        s = self.scale
        box = [round(x * s), round(y * s), round((x + w) * s) - 1, round((y + h) * s) - 1]
        if box[2] >= box[0] and box[3] >= box[1]:
            self.draw.rectangle(box, fill=tuple(int(c) for c in rgb))

    def text(
        self,
        x: float,
        y: float,
        text: str,
        size: float,
        anchor: str,
        rotate: bool,
        rgb: Sequence[int],
    ) -> None:
        from PIL import Image, ImageDraw

        from attnlog.render.fonts import font_for

        s, text = self.scale, _visible(text)
        font = font_for(text, max(1, round(size * s)))
        width = font.getlength(text)
        ascent, descent = font.getmetrics()
        strip = Image.new("L", (max(1, math.ceil(width)), ascent + descent), 0)
        ImageDraw.Draw(strip).text((0, 0), text, fill=255, font=font)
        if rotate:
            strip = strip.rotate(90, expand=True)  # reads bottom to top, ends at (x, y)
            left, top = x * s - strip.width / 2, y * s
        else:
            shift = {"start": 0.0, "middle": width / 2, "end": width}[anchor]
            left, top = x * s - shift, y * s - strip.height / 2
        ink = Image.new("RGB", strip.size, tuple(int(c) for c in rgb))
        self.image.paste(ink, (round(left), round(top)), strip)


def figure_png(panels: list[Panel], title: str = "", dpi: int = 150) -> np.ndarray:
    """The figure as uint8 RGB `[height, width, 3]` at `dpi` (72 dpi = 1 pixel per point)."""
    _, width, height, _ = _layout(panels, title)
    png = _Png(width, height, dpi / 72)
    _draw(png, panels, title)
    return np.asarray(png.image)

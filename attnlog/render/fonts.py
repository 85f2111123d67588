"""Fonts for heatmap labels: DejaVu (or PIL's default) for Latin, Noto CJK when installed.

Lookups are cached per process. A token with CJK characters and no CJK font warns once per
process, with the fix, instead of silently drawing empty boxes ("tofu").
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from functools import cache, lru_cache
from pathlib import Path
from typing import Union

from PIL import ImageFont

from attnlog.notes import warn_once
from attnlog.text import has_cjk

__all__ = ["AUTO", "Font", "FontSpec", "cjk_font", "find_font", "font_for", "has_cjk", "latin_font"]

Font = Union[ImageFont.FreeTypeFont, ImageFont.ImageFont]  # noqa: UP007 (runtime alias, py3.10)
FontSpec = Union[str, "os.PathLike[str]", None]  # a path, None (no such font) or "auto"

AUTO = "auto"

_FONT_DIRS = (
    "/usr/share/fonts",
    "/usr/local/share/fonts",
    "~/.local/share/fonts",
    "~/.fonts",
    "/Library/Fonts",
    "/System/Library/Fonts",
    "C:/Windows/Fonts",
)
_LATIN_NAMES = ("DejaVuSans.ttf",)
_CJK_NAME = re.compile(
    r"(NotoSansCJK|NotoSerifCJK|NotoSans(SC|TC|JP|KR)|SourceHanSans|wqy-|DroidSansFallback"
    r"|msyh|simhei|simsun|PingFang|Hiragino)",
    re.IGNORECASE,
)


def _fc_match(pattern: str) -> str | None:
    fc = shutil.which("fc-match")
    if fc is None:
        return None
    try:
        out = subprocess.run(
            [fc, "-f", "%{file}", pattern], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    path = out.stdout.strip()
    return path if path and os.path.isfile(path) else None


def _search(accept) -> str | None:
    found = []
    for root in _FONT_DIRS:
        root = os.path.expanduser(root)
        if not os.path.isdir(root):
            continue
        for dirpath, _, files in os.walk(root):
            found += [os.path.join(dirpath, f) for f in files if accept(f)]
    # Regular weights and Sans first; the shortest name is usually the plain family member.
    return min(found, key=lambda p: ("Bold" in p, "Serif" in p, len(p))) if found else None


@cache
def find_font(kind: str) -> str | None:
    """Path of an installed font: `kind` "latin" (DejaVu Sans) or "cjk" (Noto Sans CJK, ...)."""
    if kind == "latin":
        path = _fc_match("DejaVu Sans")
        if path and Path(path).name in _LATIN_NAMES:
            return path
        return _search(lambda f: f in _LATIN_NAMES)
    if kind == "cjk":
        path = _fc_match("Noto Sans CJK SC") or _fc_match(":lang=zh")
        if path and _CJK_NAME.search(Path(path).name):
            return path
        return _search(
            lambda f: f.lower().endswith((".ttf", ".ttc", ".otf")) and _CJK_NAME.search(f)
        )
    raise ValueError(f"unknown font kind {kind!r}; use 'latin' or 'cjk'")


@lru_cache(maxsize=64)
def _load(path: str | None, size: int) -> Font:
    if path is None:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(path, size=size)


def latin_font(size: int) -> Font:
    """DejaVu Sans at `size` px, or PIL's default font when DejaVu is not installed."""
    return _load(find_font("latin"), size)


def cjk_font(size: int, spec: FontSpec = AUTO) -> Font | None:
    """A CJK-capable font: `spec` is a path, "auto" (search the system) or None (no CJK font)."""
    if spec is None:
        return None
    path = find_font("cjk") if spec == AUTO else os.fspath(spec)
    if path is None:
        return None
    if not os.path.isfile(path):
        raise ValueError(f"cjk_font {path!r} does not exist")
    return _load(path, size)


def font_for(text: str, size: int, spec: FontSpec = AUTO, *, warn: bool = True) -> Font:
    """The font that draws `text` with real glyphs; warns once per process when none can.

    `warn=False` is for measuring text only: the warning is kept for when it is drawn.
    """
    if has_cjk(text):
        font = cjk_font(size, spec)
        if font is not None:
            return font
        if warn:
            warn_once(
                "fonts/no-cjk-font",
                "attnlog: tokens contain CJK characters but no CJK font was found, so heatmap "
                "labels show empty boxes. Install one with `apt-get install fonts-noto-cjk` "
                "(any Noto/Source Han CJK font that fc-match finds works).",
                category=UserWarning,
                stacklevel=3,
            )
    return latin_font(size)

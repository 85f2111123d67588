"""Questions about token text that both sides ask: the heatmaps (which font draws it) and the
word grouping (which tokens jieba should join). Standard library only, so that the TensorBoard
plugin and the training process can ask them without importing PIL or the renderers.
"""

from __future__ import annotations

import re

__all__ = ["has_cjk"]

_CJK = re.compile(
    "[\u1100-\u11ff\u2e80-\u2fdf\u3000-\u30ff\u3100-\u31ff\u3200-\u33ff\u3400-\u4dbf"
    "\u4e00-\u9fff\ua960-\ua97f\uac00-\ud7af\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef"
    "\U00020000-\U0003134f]"
)


def has_cjk(text: str) -> bool:
    """True if `text` has Chinese, Japanese or Korean characters (full-width forms included)."""
    return _CJK.search(text) is not None

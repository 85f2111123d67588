"""One self-contained HTML page per logging event: a probe selector and one tab per view.

Per-view, per-probe pages repeated the same 160 kB of JavaScript and the same attention in the
head and model views. Here the libraries and bertviz's view scripts are inlined once, and each
probe's data once, in one `<script type="application/json">` escaped like `html._script_json`
(no token can end the script). The numbers are quantised for display: attention as one byte
(steps of 1/255, the opacity resolution of bertviz's lines), query/key vectors as one signed
byte with a scale per layer and head; base64, so 1.33 bytes a value. `static/page.js` decodes
each head on first use and feeds bertviz's own scripts, one view drawn at a time.

The page works from file://, and inside MLflow's artifact viewer (a sandboxed iframe with
scripts only): it loads nothing and uses no storage.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from attnlog.render import html
from attnlog.snapshot import ProbeAttention, quantise_vectors, to_numpy

__all__ = ["TAB_LABELS", "PageProbe", "assemble", "encode_probe", "utf8_size"]

TAB_LABELS = {
    "head": "Head",
    "model": "Model",
    "neuron": "Neuron",
    "head_words": "Head (words)",
    "model_words": "Model (words)",
}
_SCRIPTS = ("head_view.js", "model_view.js", "neuron_view.js")
# bertviz's scripts call requirejs(["jquery", "d3"], fn): d3 is a global, and of jQuery they use
# only $(selector | "<option />") with append/val/text/empty/on/change (static/jquery-lite.js,
# 1 kB instead of jQuery's 70 kB).
_REQUIRE = "function requirejs(deps, fn) { fn(attnlogJQuery, window.d3); }"
_STYLE = """
body { margin: 0; font-family: 'Helvetica Neue', Helvetica, Arial, sans-serif; }
#attnlog-bar { display: flex; flex-wrap: wrap; gap: 6px 14px; align-items: center;
  padding: 8px; border-bottom: 1px solid #ccc; background: #f6f6f6; }
#attnlog-tabs button { font: inherit; padding: 3px 10px; border: 1px solid #bbb;
  background: #fff; cursor: pointer; }
#attnlog-tabs button[aria-selected=true] { background: #333; color: #fff; }
#attnlog-notes { color: #8a4b00; font-size: 13px; }
#attnlog-stage { padding: 8px; }
#bertviz-attnlog > span > span { margin-right: 12px; }
"""


@dataclass
class PageProbe:
    """What the page shows of one probe: `shown` (maybe pooled), whether its neuron view keeps
    the query/key vectors, its word-level probe, and notes saying what was changed or left out."""

    shown: ProbeAttention
    qk: bool = True
    words: ProbeAttention | None = None
    notes: list[str] = field(default_factory=list)
    why_not: dict[str, str] = field(default_factory=dict)  # view -> why this probe lacks it


class _Compact:
    """Tensors `[L, H, rows, cols]` quantised to one byte a value, base64, referenced by index."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def add(self, array: np.ndarray) -> int:
        """Attention: bytes 0..255 for weights 0..1 (NaN and masked as 0)."""
        weights = np.nan_to_num(np.asarray(array, dtype=np.float32), nan=0.0)
        quantised = np.rint(np.clip(weights, 0.0, 1.0) * 255).astype(np.uint8)
        return self._item(quantised, "u8", 1 / 255)

    def add_vectors(self, array: np.ndarray) -> int:
        """Query/key vectors: signed bytes with one scale per layer and head."""
        values = np.nan_to_num(np.asarray(array, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        quantised, scale = quantise_vectors(values)  # as the archive stores them
        scales = [float(f"{s:.6g}") for s in scale.reshape(-1)]
        return self._item(quantised, "i8", scales)

    def _item(self, quantised: np.ndarray, dtype: str, scale: Any) -> int:
        data = base64.b64encode(np.ascontiguousarray(quantised).tobytes()).decode("ascii")
        self.items.append(
            {"shape": list(quantised.shape), "dtype": dtype, "scale": scale, "data": data}
        )
        return len(self.items) - 1


def encode_probe(part: PageProbe, views: Sequence[str]) -> str:
    """One probe's page data as script-safe JSON; its length is what it adds to the page."""
    probe = part.shown
    tensors = _Compact()
    first = len(tensors.items)
    _, entries, layers = html._attention_entries(probe, None, tensors)
    heads = int(np.shape(probe.attention)[1])
    data: dict[str, Any] = {
        "name": probe.name,
        "notes": part.notes,
        "why_not": part.why_not,
        "attention": entries,
        "layers": layers,
        "heads": heads,
        "neuron": None,
        "words": None,
    }
    if "neuron" in views and part.qk and probe.queries is not None and probe.keys is not None:
        attention, queries, keys, _ = html._neuron_inputs(probe, None)
        refs = (first, tensors.add_vectors(queries), tensors.add_vectors(keys))
        d = int(queries.shape[3])
        data["neuron"] = html._neuron_entries(probe, refs, d, html._sentence_b_start(probe))
        data["scaling"] = float(probe.scaling) if probe.scaling is not None else d**-0.5
        data["bidirectional"] = not probe.causal
    if part.words is not None and any(v.endswith("_words") for v in views):
        _, word_entries, word_layers = html._attention_entries(part.words, None, tensors)
        data["words"] = {"attention": word_entries, "layers": word_layers, "heads": heads}
    data["tensors"] = tensors.items
    return html._script_json(data)


def assemble(parts: Sequence[str], step: int, views: Sequence[str], notes: Sequence[str]) -> str:
    """The page around the probes' encoded data (`encode_probe`), in their order."""
    head = {
        "step": int(step),
        "views": list(views),
        "labels": [TAB_LABELS[v] for v in views],
        "notes": list(notes),
    }
    data = html._script_json(head)[:-1] + ',"probes":[' + ",".join(parts) + "]}"
    return shell(step, data)


def shell(step: int, data: str) -> str:
    """The document with `data` (script-safe JSON) in place; bytes outside the data are fixed."""
    libs = f"<script>{html._asset('d3.min.js')}</script>\n"
    views = "".join(
        f"attnlogViews[{json.dumps(name)}] = function (attnlogParams) {{\n"
        f"{html._view_js(name)}\n}};\n"
        for name in _SCRIPTS
    )
    title = f"attention &middot; step {int(step)}"  # ASCII: see html._script_json
    return (
        "<!doctype html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        f"<title>{title}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        "<div id='attnlog-bar'><label>Probe: <select id='attnlog-probe'></select></label>"
        "<span id='attnlog-tabs' role='tablist'></span><span id='attnlog-notes'></span></div>\n"
        "<div id='attnlog-stage'></div>\n"
        f"<script type='application/json' id='attnlog-data'>{data}</script>\n"
        f"{libs}<script>{html._asset('jquery-lite.js')}\n{_REQUIRE}\n"
        f"var attnlogViews = {{}};\n{views}</script>\n"
        f"<script>{html._asset('page.js')}</script>\n</body>\n</html>\n"
    )


def overhead(step: int, views: Sequence[str], notes: Sequence[str]) -> int:
    """Bytes of the page with no probe: libraries, scripts, markup."""
    return utf8_size(assemble([], step, views, notes))


def positions(probe: ProbeAttention) -> int:
    """Query positions of the probe's (self-)attention: what pooling shrinks."""
    return int(to_numpy(probe.attention).shape[-1])


def utf8_size(text: str) -> int:
    """Bytes of `text` in UTF-8, without a copy of a page that is ASCII (they all are)."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))

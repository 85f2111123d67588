"""bertviz head, model and neuron views as self-contained HTML pages that open offline.

Each page is one document with everything inline: a d3 5.16 subset, jQuery 3 (slim),
RequireJS 2.3 and bertviz 1.4.1's own view scripts (all vendored under `static/`, see its
README). The data is templated in exactly once, as JSON in a `<script type="application/json">`
with `<`, `>`, `&`, U+2028 and U+2029 escaped, so no token can end the script. Weights travel
as base64 float16 (3 significant digits, 2.7 bytes a weight instead of ~20 for bertviz's JSON);
a small loader turns them back into the nested arrays bertviz expects, one head at a time.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Sequence
from functools import cache
from importlib.resources import files
from typing import Any

import numpy as np

from attnlog.snapshot import ProbeAttention, to_numpy

__all__ = ["head_view", "model_view", "neuron_view"]

_DIV = "bertviz-attnlog"  # the root element id bertviz's scripts look up; fixed: one view a page
_LIBS = ("d3.min.js", "jquery.slim.min.js", "require.min.js")
_FONT = "font-family:'Helvetica Neue', Helvetica, Arial, sans-serif"
_PAIR_NAMES = (
    "All",
    "Sentence A -> Sentence A",
    "Sentence B -> Sentence B",
    "Sentence A -> Sentence B",
    "Sentence B -> Sentence A",
)
# Neuron view filter keys (bertviz's): (key, label, rows = query side, cols = key side).
_NEURON_FILTERS = (
    ("all", "All", "all", "all"),
    ("aa", "Sentence A -> Sentence A", "a", "a"),
    ("ab", "Sentence A -> Sentence B", "a", "b"),
    ("ba", "Sentence B -> Sentence A", "b", "a"),
    ("bb", "Sentence B -> Sentence B", "b", "b"),
)
_MAX_NEURON_VALUES = 32_000_000  # queries + keys (~85 MB of HTML); pass layers=[...] beyond

# Runs after the libraries, before a bertviz script: hands d3/jQuery to RequireJS and defines
# attnlogParams(), which decodes the float16 tensors lazily into bertviz's nested arrays.
_LOADER = """
define("d3", [], function () { return window.d3; });
define("jquery", [], function () { return window.jQuery; });
function attnlogParams() {
  var F16 = new Float32Array(65536);
  for (var h = 0; h < 65536; h++) {
    var e = (h >> 10) & 31, f = h & 1023;
    var v = e === 0 ? f * 5.960464477539063e-8
      : e === 31 ? (f ? NaN : Infinity) : (1 + f / 1024) * Math.pow(2, e - 15);
    F16[h] = h & 32768 ? -v : v;
  }
  var p = JSON.parse(document.getElementById("attnlog-params").textContent);
  var tensors = p.tensors.map(function (t) { return {shape: t.shape, b64: t.data, values: null}; });
  delete p.tensors;
  function values(t) {
    if (t.values === null) {
      var s = atob(t.b64), out = new Float32Array(s.length >> 1);
      for (var i = 0; i < out.length; i++) {
        out[i] = F16[s.charCodeAt(2 * i) | (s.charCodeAt(2 * i + 1) << 8)];
      }
      t.values = out;
      t.b64 = null;
    }
    return t.values;
  }
  function head(heads, t, l, h, rows, cols) {
    var cached = null;
    Object.defineProperty(heads, h, {enumerable: true, get: function () {
      if (cached === null) {
        var R = t.shape[2], C = t.shape[3], base = (l * t.shape[1] + h) * R * C, vals = values(t);
        cached = [];
        for (var r = rows[0]; r < rows[1]; r++) {
          cached.push(Array.prototype.slice.call(vals, base + r * C + cols[0], base + r * C + cols[1]));
        }
      }
      return cached;
    }});
  }
  function nested(ref) {
    var t = tensors[ref.tensor], layers = [];
    for (var l = 0; l < t.shape[0]; l++) {
      var heads = [];
      for (var h = 0; h < t.shape[1]; h++) head(heads, t, l, h, ref.rows, ref.cols);
      layers.push(heads);
    }
    return layers;
  }
  Object.keys(p.attention).forEach(function (k) {
    var d = p.attention[k];
    ["attn", "queries", "keys"].forEach(function (f) { if (d[f]) d[f] = nested(d[f]); });
  });
  return p;
}
"""


def head_view(probe: ProbeAttention, *, layers: Sequence[int] | None = None) -> str:
    """bertviz head view: one layer at a time, heads as coloured lines between tokens.

    Sentence pairs get bertviz's A/B filters; encoder-decoders the encoder, decoder and cross
    attention. `layers` limits the layers shown (all by default).

    Returns:
        A complete HTML document.
    """
    tensors, entries, layers = _attention_entries(probe, layers)
    params = {
        "attention": entries,
        "default_filter": "0",
        "root_div_id": _DIV,
        "layer": None,
        "heads": None,
        "include_layers": layers,
    }
    body = _controls(["Layer: <select id='layer'></select>"], _filter_options(entries))
    return _page("head view", probe, body, params, tensors, "head_view.js")


def model_view(
    probe: ProbeAttention,
    *,
    layers: Sequence[int] | None = None,
    display_mode: str = "dark",
) -> str:
    """bertviz model view: every layer x head as a thumbnail; `display_mode` "dark" or "light".

    Returns:
        A complete HTML document.
    """
    if display_mode not in ("dark", "light"):
        raise ValueError(f"display_mode must be 'dark' or 'light', got {display_mode!r}")
    tensors, entries, layers = _attention_entries(probe, layers)
    heads = list(range(to_numpy(probe.attention).shape[1]))
    params = {
        "attention": entries,
        "default_filter": "0",
        "display_mode": display_mode,
        "root_div_id": _DIV,
        "include_layers": layers,
        "include_heads": heads,
        "total_heads": len(heads),
    }
    body = _controls([], _filter_options(entries))
    return _page("model view", probe, body, params, tensors, "model_view.js")


def neuron_view(
    probe: ProbeAttention,
    *,
    layers: Sequence[int] | None = None,
    display_mode: str = "dark",
) -> str | None:
    """bertviz neuron view fed from the live model's query/key vectors; None without them.

    Dot products are shown as the model computes them: `q . k * probe.scaling` (1/sqrt(d) when
    the capture did not record a scaling). For encoder-decoders it shows the encoder. With
    `layers`, bertviz's layer dropdown numbers the chosen layers from 0.

    Raises:
        ValueError: if queries/keys do not match the attention, or exceed the size limit
            (pass fewer `layers`).

    Returns:
        A complete HTML document, or None when `probe.queries`/`probe.keys` are missing.
    """
    if probe.queries is None or probe.keys is None:
        return None
    if display_mode not in ("dark", "light"):
        raise ValueError(f"display_mode must be 'dark' or 'light', got {display_mode!r}")
    attention, queries, keys, layers = _neuron_inputs(probe, layers)
    d = int(queries.shape[3])
    scaling = float(probe.scaling) if probe.scaling is not None else d**-0.5
    tensors = _Tensors()
    refs = tensors.add(attention[layers]), tensors.add(queries[layers]), tensors.add(keys[layers])
    split = _sentence_b_start(probe)
    params = {
        "attention": _neuron_entries(probe, refs, d, split),
        "default_filter": "all",
        "root_div_id": _DIV,
        "bidirectional": not probe.causal,
        "display_mode": display_mode,
        "layer": None,
        "head": None,
        "scaling": scaling,
    }
    selects = [
        "<span class='dropdown-label'>Layer: </span><select id='layer'></select>",
        "<span class='dropdown-label'>Head: </span><select id='att_head'></select>",
    ]
    filter_options = [(key, label) for key, label, _, _ in _NEURON_FILTERS]
    body = _controls(selects, filter_options if split is not None else [], padding=True)
    return _page("neuron view", probe, body, params, tensors, "neuron_view.js")


def _neuron_inputs(
    probe: ProbeAttention, layers: Sequence[int] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Attention, queries and keys as numpy, and the chosen layers; fails before any encoding."""
    attention = to_numpy(probe.attention)
    queries, keys = to_numpy(probe.queries), to_numpy(probe.keys)
    num_layers, num_heads, n = _check_self(attention, probe.tokens, "attention", "tokens")
    for name, value in (("queries", queries), ("keys", keys)):
        if value.ndim != 4 or value.shape[:3] != (num_layers, num_heads, n):
            raise ValueError(
                f"{name} has shape {value.shape}; expected [L, H, n, d] = "
                f"[{num_layers}, {num_heads}, {n}, d] to match attention {attention.shape}"
            )
    if queries.shape[3] != keys.shape[3]:
        raise ValueError(f"queries {queries.shape} and keys {keys.shape} differ in head size")
    layers = _layers(layers, num_layers)
    values = 2 * len(layers) * num_heads * n * queries.shape[3]
    if values > _MAX_NEURON_VALUES:
        raise ValueError(
            f"neuron_view: {values:,} query/key values exceed the limit of "
            f"{_MAX_NEURON_VALUES:,}; pass layers=[...] to show fewer layers"
        )
    return attention, queries, keys, layers


def _neuron_entries(
    probe: ProbeAttention, refs: tuple[int, int, int], d: int, split: int | None
) -> dict[str, dict[str, Any]]:
    """bertviz's neuron `attention` dict: each filter slices the same three tensors, stored once."""
    attn_t, q_t, k_t = refs
    tokens = _pretty(probe.tokens)
    n = len(tokens)
    spans = {"all": (0, n)}
    filters = _NEURON_FILTERS[:1]
    if split is not None:
        spans.update(a=(0, split), b=(split, n))
        filters = _NEURON_FILTERS
    entries = {}
    for key, _, rows, cols in filters:
        (r0, r1), (c0, c1) = spans[rows], spans[cols]
        entries[key] = {
            "attn": _ref(attn_t, (r0, r1), (c0, c1)),
            "queries": _ref(q_t, (r0, r1), (0, d)),
            "keys": _ref(k_t, (c0, c1), (0, d)),
            "left_text": tokens[r0:r1],
            "right_text": tokens[c0:c1],
        }
    return entries


# ---- data --------------------------------------------------------------------------------


class _Tensors:
    """Float16 tensors `[L, H, rows, cols]`, base64-encoded once, referenced by index."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def add(self, array: np.ndarray) -> int:
        half = np.asarray(array)
        if half.dtype != np.float16 or not half.dtype.isnative:
            with np.errstate(over="ignore", invalid="ignore"):
                half = half.astype("<f2")
        if not np.isfinite(half).all():  # overflowed or masked values: keep the page valid
            half = np.nan_to_num(half, nan=0.0, posinf=65504.0, neginf=-65504.0)
        data = base64.b64encode(np.ascontiguousarray(half, dtype="<f2").tobytes()).decode("ascii")
        self.items.append({"shape": list(half.shape), "data": data})
        return len(self.items) - 1


def _ref(tensor: int, rows: tuple[int, int], cols: tuple[int, int]) -> dict[str, Any]:
    return {"tensor": tensor, "rows": list(rows), "cols": list(cols)}


def _attention_entries(
    probe: ProbeAttention, layers: Sequence[int] | None, tensors: Any = None
) -> tuple[Any, list[dict[str, Any]], list[int]]:
    """bertviz's `attn_data` list (head and model views), attention as references into
    `tensors` (a new `_Tensors` by default; the event page passes its compact store)."""
    attention = to_numpy(probe.attention)
    num_layers, _, n = _check_self(attention, probe.tokens, "attention", "tokens")
    layers = _layers(layers, num_layers)
    tensors = _Tensors() if tensors is None else tensors
    tokens = _pretty(probe.tokens)
    attn = tensors.add(attention[layers])
    if probe.decoder_tokens is not None:
        entries = [_entry("Encoder", attn, tokens, tokens)]
        m = len(probe.decoder_tokens)
        decoder_tokens = _pretty(probe.decoder_tokens)
        if probe.decoder_attention is not None:
            dec = to_numpy(probe.decoder_attention)
            _check_self(dec, probe.decoder_tokens, "decoder_attention", "decoder_tokens")
            _check_layers(dec, num_layers, "decoder_attention")
            entries.append(
                _entry("Decoder", tensors.add(dec[layers]), decoder_tokens, decoder_tokens)
            )
        if probe.cross_attention is not None:
            cross = to_numpy(probe.cross_attention)
            if cross.ndim != 4 or cross.shape[2:] != (m, n):
                raise ValueError(
                    f"cross_attention has shape {cross.shape}; expected [L, H, m, n] with "
                    f"m = {m} decoder tokens and n = {n} encoder tokens"
                )
            _check_layers(cross, num_layers, "cross_attention")
            entries.append(_entry("Cross", tensors.add(cross[layers]), decoder_tokens, tokens))
        return tensors, entries, layers
    split = _sentence_b_start(probe)
    if split is None:
        return tensors, [_entry(None, attn, tokens, tokens)], layers
    a, b = (0, split), (split, n)
    spans = [(None, None), (a, a), (b, b), (a, b), (b, a)]
    entries = []
    for name, (rows, cols) in zip(_PAIR_NAMES, spans):
        rows, cols = rows or (0, n), cols or (0, n)
        entries.append(
            _entry(name, attn, tokens[slice(*rows)], tokens[slice(*cols)], rows=rows, cols=cols)
        )
    return tensors, entries, layers


def _entry(
    name: str | None,
    tensor: int,
    left: list[str],
    right: list[str],
    rows: tuple[int, int] | None = None,
    cols: tuple[int, int] | None = None,
) -> dict[str, Any]:
    rows = rows or (0, len(left))
    cols = cols or (0, len(right))
    return {
        "name": name,
        "attn": _ref(tensor, rows, cols),
        "left_text": left,
        "right_text": right,
    }


def _filter_options(entries: list[dict[str, Any]]) -> list[tuple[Any, str]]:
    return [(i, str(e["name"])) for i, e in enumerate(entries)]


def _sentence_b_start(probe: ProbeAttention) -> int | None:
    """First position of sentence B (bertviz's `sentence_b_start`), None for single sentences."""
    if not probe.is_pair or probe.segment is None:
        return None
    segment = np.asarray(probe.segment).reshape(-1)
    if segment.shape[0] != len(probe.tokens):
        raise ValueError(
            f"segment has {segment.shape[0]} entries but there are {len(probe.tokens)} tokens"
        )
    starts = np.flatnonzero(segment == 1)
    return int(starts[0]) if starts.size and 0 < starts[0] < len(probe.tokens) else None


def _check_self(attn: np.ndarray, tokens: Sequence[str], name: str, what: str):
    if attn.ndim != 4 or attn.shape[2] != attn.shape[3] or 0 in attn.shape:
        raise ValueError(f"{name} must be [L, H, n, n], got shape {attn.shape}")
    if attn.shape[2] != len(tokens):
        raise ValueError(
            f"{name} covers {attn.shape[2]} positions but {what} has {len(tokens)} entries; "
            "trim padding so that there is one token per position"
        )
    return int(attn.shape[0]), int(attn.shape[1]), int(attn.shape[2])


def _check_layers(attn: np.ndarray, num_layers: int, name: str) -> None:
    if attn.shape[0] != num_layers:
        raise ValueError(f"{name} has {attn.shape[0]} layers, attention has {num_layers}")


def _layers(layers: Sequence[int] | None, num_layers: int) -> list[int]:
    if layers is None:
        return list(range(num_layers))
    chosen = [int(x) for x in layers]
    bad = [x for x in chosen if not 0 <= x < num_layers]
    if bad or not chosen:
        raise ValueError(
            f"layers {list(layers)!r} must be non-empty and within 0..{num_layers - 1}"
        )
    return chosen


def _pretty(tokens: Sequence[str]) -> list[str]:
    """bertviz's token clean-up: BPE/SentencePiece space markers shown as spaces."""
    return [
        str(t).replace("\u0120", " ").replace("\u2581", " ").replace("</w>", "") for t in tokens
    ]


# ---- page --------------------------------------------------------------------------------


def _script_json(value: Any) -> str:
    """JSON that is safe inside <script>: no `</script>`, `<!--`, or JS line separators.

    ASCII only (`\\u2026` for a pooled label's ellipsis, for CJK): one non-ASCII character
    made Python hold a 10 MB page at 2 or 4 bytes a character, twice over while it was written.
    """
    text = json.dumps(value, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return (
        text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    )  # U+2028 and U+2029, line ends to JavaScript, are escaped with the rest


def _controls(selects: list[str], filters: list[tuple[Any, str]], *, padding: bool = False) -> str:
    """The root div bertviz's scripts look for, with its dropdowns; filters are (value, label)."""
    parts = list(selects)
    if len(filters) > 1:
        options = "".join(
            f"<option value='{html.escape(str(v))}'>{html.escape(str(label))}</option>"
            for v, label in filters
        )
        parts.append(
            f"<span class='dropdown-label'>Attention: </span><select id='filter'>{options}</select>"
        )
    style = f"{_FONT};" + ("padding:8px;" if padding else "")
    return (
        f"<div id='{_DIV}' style=\"{style}\">\n<span style='user-select:none'>"
        + " ".join(parts)
        + "</span>\n<div id='vis'></div>\n</div>"
    )


def _page(
    view: str,
    probe: ProbeAttention,
    body: str,
    params: dict[str, Any],
    tensors: _Tensors,
    script: str,
) -> str:
    params = {**params, "tensors": tensors.items}
    libs = "".join(f"<script>{_asset(name)}</script>\n" for name in _LIBS)
    return (
        "<!doctype html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        f"<title>{html.escape(f'{probe.name} - {view}')}</title>\n</head>\n<body>\n"
        f"{body}\n"
        f"<script type='application/json' id='attnlog-params'>{_script_json(params)}</script>\n"
        f"{libs}<script>{_LOADER}</script>\n<script>{_view_js(script)}</script>\n"
        "</body>\n</html>\n"
    )


@cache
def _asset(name: str) -> str:
    text = files("attnlog.render").joinpath("static", name).read_text(encoding="utf-8")
    if re.search(r"</script|<!--", text, re.IGNORECASE):
        raise RuntimeError(f"attnlog/render/static/{name} cannot be inlined in a <script>")
    return text


_PARAMS_LINE = re.compile(r"^[ \t]*const params = (PYTHON_PARAMS;|window\.bertviz_params).*$", re.M)
_NEURON_DOT = "dotProduct / Math.sqrt(config.vectorSize)"


@cache
def _view_js(name: str) -> str:
    """A bertviz script (vendored without its CDN config) reading params from attnlogParams()."""
    js = _asset(name)
    js, params = _PARAMS_LINE.subn("    const params = attnlogParams();", js)
    if name == "neuron_view.js":
        # Show the model's own logits scale (probe.scaling), not bertviz's fixed 1/sqrt(d).
        dots = js.count(_NEURON_DOT)
        js = js.replace(_NEURON_DOT, "dotProduct * params.scaling")
    else:
        dots = 1
    if (params, dots) != (1, 1):
        raise RuntimeError(f"static/{name} is not the bertviz 1.4.1 script attnlog patches")
    return js

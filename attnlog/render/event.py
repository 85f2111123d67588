"""Everything one logging event shows, rendered on the worker thread (never in training).

Rendering goes probe by probe (`probe_images`, `probe_views`) so that the worker holds one
probe's images and pages at a time, not the whole event's; `render_images` and `render_views`
join them for callers that want everything at once. Names come from `attnlog.layout`.

Size guard: an HTML view carries every attention weight (about 2.7 bytes each), so a 512-token
probe of a 12 x 12 model would make a 100 MB page that freezes the browser. Each view is capped
at `MAX_HTML_BYTES` (10 MiB); a longer probe's head and model views show it pooled into blocks
of consecutive tokens (`attnlog.words.pool_probe`), its neuron view is left out, and one warning
says so. Raise the cap on purpose with `ATTNLOG_MAX_HTML_MB=100` or `max_bytes=`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from attnlog.layout import (
    DEFAULT_VIEWS,
    VIEWS,
    html_path,
    tb_attention_tag,
    tb_pattern_tag,
    warn_once,
)
from attnlog.patterns import ScoreTable
from attnlog.snapshot import ProbeAttention, Snapshot

__all__ = [
    "DEFAULT_VIEWS",
    "MAX_HTML_BYTES",
    "VIEWS",
    "max_html_bytes",
    "pattern_images",
    "probe_images",
    "probe_views",
    "render_images",
    "render_views",
]

MAX_HTML_BYTES = 10 * 2**20
_BYTES_PER_WEIGHT = 8 / 3  # float16, base64-encoded
_PAGE_BYTES = 300_000  # inlined d3/jQuery/RequireJS/bertviz (~160 kB) and markup, with room


def max_html_bytes() -> int:
    """The per-view cap: `ATTNLOG_MAX_HTML_MB` (MiB) when set, else `MAX_HTML_BYTES`.

    Raises:
        ValueError: the variable is not a positive number.
    """
    text = os.environ.get("ATTNLOG_MAX_HTML_MB")
    if text is None:
        return MAX_HTML_BYTES
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"ATTNLOG_MAX_HTML_MB={text!r} must be a positive number of MiB, e.g. 50")
    return int(value * 2**20)


def probe_images(
    probe: ProbeAttention,
    step: int,
    *,
    layers: bool = True,
    model: bool = True,
    words: bool = False,
) -> dict[str, np.ndarray]:
    """One probe's heatmaps: each layer's heads (token-labelled) and layers × heads.

    `words=True` adds the same between words, tagged as the probe `<name>_words`.
    """
    from attnlog.render import heatmap
    from attnlog.words import unit_probe, word_probe

    probe = unit_probe(probe)  # pooled at capture: its blocks are the tokens
    images: dict[str, np.ndarray] = {}
    for shown, name in (
        (probe, probe.name),
        *(((word_probe(probe), f"{probe.name}_words"),) if words else ()),
    ):
        attn = np.asarray(shown.attention, dtype=np.float32)  # [L, H, n, n]
        if layers:
            for layer in range(attn.shape[0]):
                images[tb_attention_tag(name, layer)] = heatmap.render_layer(
                    attn[layer], shown.tokens, title=f"{name} · layer {layer}"
                )
        if model:
            images[tb_attention_tag(name)] = heatmap.render_model(
                attn, shown.tokens, title=f"{name} · step {step}"
            )
    return images


def pattern_images(table: ScoreTable, step: int) -> dict[str, np.ndarray]:
    """One layer × head score matrix per pattern that is defined somewhere."""
    from attnlog.render import heatmap

    return {
        tb_pattern_tag(pattern): heatmap.render_matrix(matrix, title=f"{pattern} · step {step}")
        for pattern, matrix in table.scores.items()
        if np.isfinite(matrix).any()
    }


def probe_views(
    probe: ProbeAttention,
    step: int,
    views: Sequence[str] = DEFAULT_VIEWS,
    *,
    max_bytes: int | None = None,
) -> dict[str, str]:
    """bertviz views of one probe, keyed by their artifact path, each at most `max_bytes`
    (default `max_html_bytes()`); no neuron view without q/k or over the cap."""
    from attnlog.render import html
    from attnlog.words import unit_probe, word_probe

    unknown = sorted(set(views) - set(VIEWS))
    if unknown:
        raise ValueError(f"unknown views {unknown}; choose from {list(VIEWS)}")
    cap = max_html_bytes() if max_bytes is None else int(max_bytes)
    makers = {"head": html.head_view, "model": html.model_view, "neuron": html.neuron_view}
    probe = unit_probe(probe)
    shown = {False: _fit(probe, cap), True: None}
    files: dict[str, str] = {}
    for view in views:
        kind, words = view.removesuffix("_words"), view.endswith("_words")
        if words and shown[True] is None:
            shown[True] = _fit(word_probe(probe), cap)
        target = shown[words]
        if kind == "neuron" and (target is not probe or _estimate(probe, qk=True) > cap):
            if target is not None:
                _warn_cap(probe, _estimate(probe, qk=True), cap, "shown without the neuron view")
            continue  # query/key vectors cannot be pooled
        if target is None:
            continue
        page = makers[kind](target)
        if page is None:
            continue
        size = len(page.encode("utf-8"))
        if size > cap:
            _warn_cap(probe, size, cap, "left out")
            continue
        files[html_path(step, probe.name, f"{view}_view")] = page
    return files


def render_images(
    snapshot: Snapshot,
    table: ScoreTable,
    *,
    layers: bool = True,
    model: bool = True,
    words: bool = False,
) -> dict[str, np.ndarray]:
    """Every probe's heatmaps and every pattern's score matrix."""
    images: dict[str, np.ndarray] = {}
    for probe in snapshot.probes:
        images.update(probe_images(probe, snapshot.step, layers=layers, model=model, words=words))
    images.update(pattern_images(table, snapshot.step))
    return images


def render_views(
    snapshot: Snapshot, views: Sequence[str] = DEFAULT_VIEWS, *, max_bytes: int | None = None
) -> dict[str, str]:
    """bertviz head/model/neuron views of every probe, keyed by their artifact path."""
    files: dict[str, str] = {}
    for probe in snapshot.probes:
        files.update(probe_views(probe, snapshot.step, views, max_bytes=max_bytes))
    return files


# ---- size guard --------------------------------------------------------------------------------


def _estimate(probe: ProbeAttention, qk: bool = False) -> int:
    """Bytes of a head/model view of `probe` (a neuron view with `qk`): weights plus page."""
    weights = sum(
        int(np.prod(np.shape(a)))
        for a in (probe.attention, probe.decoder_attention, probe.cross_attention)
        if a is not None
    )
    if qk:
        weights += sum(
            int(np.prod(np.shape(a))) for a in (probe.queries, probe.keys) if a is not None
        )
    return int(_PAGE_BYTES + _BYTES_PER_WEIGHT * weights)


def _fit(probe: ProbeAttention, cap: int) -> ProbeAttention | None:
    """`probe` when its views fit in `cap` bytes, else pooled into as many blocks as fit
    (None when even that cannot fit, or for encoder-decoders, whose parts cannot be pooled)."""
    from attnlog.words import pool_probe

    size = _estimate(probe)
    if size <= cap:
        return probe
    layers, heads = np.shape(probe.attention)[:2]
    units = math.isqrt(max(0, int((cap - _PAGE_BYTES) / (_BYTES_PER_WEIGHT * layers * heads))))
    if probe.decoder_tokens is not None or units < 2:
        _warn_cap(probe, size, cap, "left out")
        return None
    pooled = pool_probe(probe, units)
    _warn_cap(probe, size, cap, f"pooled into {len(pooled.tokens)} blocks of tokens")
    return pooled


def _warn_cap(probe: ProbeAttention, size: int, cap: int, outcome: str) -> None:
    warn_once(
        f"html-cap/{probe.name}/{cap}",  # once per probe, not at every event
        f"attnlog: the HTML views of probe {probe.name!r} ({len(probe.tokens)} positions) would "
        f"take about {size / 2**20:.0f} MB, over the {cap / 2**20:.0f} MiB cap per view; they "
        f"are {outcome}. Raise the cap with the environment variable ATTNLOG_MAX_HTML_MB "
        "(e.g. ATTNLOG_MAX_HTML_MB=100), or use shorter probes. (Shown once per probe.)",
    )

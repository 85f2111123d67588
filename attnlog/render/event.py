"""Everything one logging event shows, rendered in the writer (never in training).

Images go probe by probe (`probe_images`) so that the writer holds one probe's images at a
time. The views of an event are one page (`event_views`, `attnlog.render.page`): every probe
and view, the scripts and each probe's attention written once. `"per_probe"` among the views
asks for the older pages instead, one per probe and view (`probe_views`, `render_views`).
Names come from `attnlog.layout`.

Size guard: a page carries every attention weight, so a 512-token probe of a 12 x 12 model
would make a page of 100 MB or more that freezes the browser. Each HTML file is capped at
`MAX_HTML_BYTES` (10 MiB). Over the cap, the event page leaves out the neuron view's query/key
vectors first, then pools the longest probes into blocks of consecutive tokens
(`attnlog.words.pool_probe`), then leaves out probes; the page and one warning say so. A
per-probe page is pooled, or its neuron view left out. Raise the cap on purpose with
`ATTNLOG_MAX_HTML_MB=100` or `max_bytes=`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from attnlog.layout import (
    DEFAULT_VIEWS,
    PER_PROBE,
    VIEWS,
    html_path,
    page_path,
    tb_attention_tag,
    tb_pattern_tag,
)
from attnlog.notes import warn_once
from attnlog.patterns import ScoreTable
from attnlog.render.page import utf8_size
from attnlog.settings import MAX_HTML_BYTES, max_html_bytes  # re-exported: the cap lives there
from attnlog.snapshot import ProbeAttention, Snapshot

__all__ = [
    "DEFAULT_VIEWS",
    "MAX_HTML_BYTES",
    "PER_PROBE",
    "VIEWS",
    "event_views",
    "max_html_bytes",
    "pattern_images",
    "probe_images",
    "probe_views",
    "render_images",
    "render_views",
]

_BYTES_PER_WEIGHT = 8 / 3  # float16, base64-encoded
_PAGE_BYTES = 300_000  # a per-probe page's d3/jQuery/RequireJS/bertviz (~160 kB), with room


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

    views = _checked(views)
    cap = max_html_bytes() if max_bytes is None else int(max_bytes)
    makers = {"head": html.head_view, "model": html.model_view, "neuron": html.neuron_view}
    probe = unit_probe(probe)
    shown = {False: _fit(probe, cap), True: None}
    files: dict[str, str] = {}
    for view in views:
        if view == PER_PROBE:
            continue
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
        size = utf8_size(page)
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
    """bertviz views of every probe, one page per probe and view, keyed by artifact path."""
    files: dict[str, str] = {}
    for probe in snapshot.probes:
        files.update(probe_views(probe, snapshot.step, views, max_bytes=max_bytes))
    return files


def event_views(
    snapshot: Snapshot,
    step: int,
    views: Sequence[str] = DEFAULT_VIEWS,
    *,
    max_bytes: int | None = None,
) -> dict[str, str]:
    """The event's HTML keyed by artifact path: one page at `page_path(step)`, a probe selector
    and a tab per view, at most `max_bytes` (default `max_html_bytes()`). With "per_probe"
    among `views`: one page per probe and view instead (`probe_views`)."""
    views = _checked(views)
    if PER_PROBE in views:
        files: dict[str, str] = {}
        for probe in snapshot.probes:
            files.update(probe_views(probe, step, views, max_bytes=max_bytes))
        return files
    if not views or not snapshot.probes:
        return {}
    cap = max_html_bytes() if max_bytes is None else int(max_bytes)
    page = _event_page(snapshot.probes, step, views, cap)
    if utf8_size(page) > cap:  # a cap below the scripts' own ~120 kB
        warn_once(f"html-cap/page/{cap}", f"attnlog: no page of views: {_mib(cap)} is too small")
        return {}
    return {page_path(step): page}


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


def _checked(views: Sequence[str]) -> tuple[str, ...]:
    views = (views,) if isinstance(views, str) else tuple(views)
    unknown = sorted(set(views) - set(VIEWS))
    if unknown:
        raise ValueError(f"unknown views {unknown}; choose from {list(VIEWS)}")
    return views


# ---- the event page under the cap --------------------------------------------------------------

_PAGE_BYTES_PER_VALUE = 4 / 3  # one byte a value, base64-encoded
_MIN_UNITS = 8  # a probe pooled below this many blocks is left out instead
_NO_WORDS = "word views show the self-attention of one sequence, not an encoder-decoder."


def _event_page(probes: Sequence[ProbeAttention], step: int, views: tuple[str, ...], cap: int):
    """The page, degraded until it fits `cap`: neuron q/k out, longest probes pooled, then
    probes left out; each step noted on the page and warned about once."""
    from attnlog.render import page
    from attnlog.words import unit_probe

    wanted = tuple(v for v in views if v != PER_PROBE)
    originals, parts, left_out = [], [], []
    for probe in map(unit_probe, probes):
        part = _page_probe(probe, wanted, cap)
        if part is None:
            left_out.append(probe.name)
        else:
            originals.append(probe)
            parts.append(part)
    encoded = [page.encode_probe(part, wanted) for part in parts]

    def notes() -> list[str]:
        names = ", ".join(left_out)
        return [f"Left out to stay under the {_mib(cap)} cap: {names}."] if left_out else []

    def over() -> int:
        size = sum(map(utf8_size, encoded))
        return size + page.overhead(step, wanted, notes()) - cap

    if over() > 0 and "neuron" in wanted:
        for i, part in enumerate(parts):
            if part.qk and part.shown.queries is not None:
                _drop_qk(part, f"left out to keep this page under the {_mib(cap)} cap")
                encoded[i] = page.encode_probe(part, wanted)
    while over() > 0 and parts:
        i = max(range(len(parts)), key=lambda j: page.positions(parts[j].shown))
        units = _units_to_fit(parts[i].shown, len(encoded[i]), over())
        if units < _MIN_UNITS or originals[i].decoder_tokens is not None:
            left_out.append(parts[i].shown.name)
            _warn_page(parts[i].shown, None, "left out of the page")
            del parts[i], encoded[i], originals[i]
            continue
        parts[i] = _pooled(originals[i], units, cap)
        encoded[i] = page.encode_probe(parts[i], wanted)
    return page.assemble(encoded, step, wanted, notes())


def _page_probe(probe: ProbeAttention, views: tuple[str, ...], cap: int):
    """A probe as the page first tries to show it: pooled only if its attention alone is over,
    None (left out) when that is an encoder-decoder's, whose parts cannot be pooled."""
    from attnlog.render import html, page
    from attnlog.words import word_probe

    weights = _values(probe.attention, probe.decoder_attention, probe.cross_attention)
    if _PAGE_BYTES_PER_VALUE * weights > cap and probe.decoder_tokens is not None:
        _warn_page(probe, None, "left out of the page")
        return None
    if _PAGE_BYTES_PER_VALUE * weights > cap:
        units = math.isqrt(
            int(cap / _PAGE_BYTES_PER_VALUE / _values(probe.attention[:, :, :1, :1]))
        )
        return _pooled(probe, max(units, 2), cap)
    part = page.PageProbe(shown=probe)
    if probe.queries is None or probe.keys is None:
        part.why_not["neuron"] = "no query/key vectors were captured (record_qk)."
    elif _PAGE_BYTES_PER_VALUE * (qk := _values(probe.queries, probe.keys)) > cap or (
        qk > html._MAX_NEURON_VALUES  # the neuron view's own limit
    ):
        _drop_qk(part, f"left out: alone they are over the {_mib(cap)} cap")
    if probe.decoder_tokens is not None:
        part.why_not.update(dict.fromkeys(("head_words", "model_words"), _NO_WORDS))
    elif any(v.endswith("_words") for v in views):
        part.words = word_probe(probe)
    return part


def _pooled(probe: ProbeAttention, units: int, cap: int):
    from attnlog.render import page
    from attnlog.words import pool_probe

    shown = pool_probe(probe, units)
    outcome = f"pooled into {len(shown.tokens)} blocks of tokens"
    _warn_page(probe, None, outcome)
    why = "the probe is pooled into blocks of tokens to fit the page (no per-token vectors)."
    return page.PageProbe(
        shown=shown,
        qk=False,
        notes=[f"{probe.name}: {outcome} to stay under the {_mib(cap)} cap."],
        why_not={"neuron": why, "head_words": why, "model_words": why},
    )


def _drop_qk(part, reason: str) -> None:
    part.qk = False
    part.why_not["neuron"] = f"its query/key vectors were {reason}."
    part.notes.append(f"{part.shown.name}: no neuron view (query/key vectors {reason}).")
    _warn_page(part.shown, None, "shown without its neuron view")


def _units_to_fit(probe: ProbeAttention, size: int, excess: int) -> int:
    """Blocks that shrink this probe's `size` bytes by `excess` (n^2 scaling, with room)."""
    n = len(probe.tokens)
    ratio = max(0.0, (size - excess) / size)
    return min(int(n * math.sqrt(ratio) * 0.95), int(n * 0.9))


def _values(*arrays) -> int:
    return sum(int(np.prod(np.shape(a))) for a in arrays if a is not None)


def _mib(cap: int) -> str:
    return f"{cap / 2**20:g} MiB"


def _warn_page(probe: ProbeAttention, size: int | None, outcome: str) -> None:
    about = f" (about {size / 2**20:.0f} MB)" if size else ""
    warn_once(
        f"html-cap/page/{probe.name}/{outcome.split()[0]}",  # once per probe and outcome
        f"attnlog: the event page{about} is over the HTML cap; probe {probe.name!r} "
        f"({len(probe.tokens)} positions) is {outcome}. Raise the cap with the environment "
        "variable ATTNLOG_MAX_HTML_MB (e.g. ATTNLOG_MAX_HTML_MB=100), or use shorter probes. "
        "(Shown once per probe.)",
    )

"""Everything one logging event shows, rendered on the worker thread (never in training).

Rendering goes probe by probe (`probe_images`, `probe_views`) so that the worker holds one
probe's images and pages at a time, not the whole event's; `render_images` and `render_views`
join them for callers that want everything at once. Names come from `attnlog.sinks.base`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from attnlog.patterns import ScoreTable
from attnlog.sinks.base import html_path, tb_attention_tag, tb_pattern_tag
from attnlog.snapshot import ProbeAttention, Snapshot

VIEWS = ("head", "model", "neuron")


def probe_images(
    probe: ProbeAttention, step: int, *, layers: bool = True, model: bool = True
) -> dict[str, np.ndarray]:
    """One probe's heatmaps: each layer's heads (token-labelled) and layers × heads."""
    from attnlog.render import heatmap

    attn = np.asarray(probe.attention, dtype=np.float32)  # [L, H, n, n]
    images: dict[str, np.ndarray] = {}
    if layers:
        for layer in range(attn.shape[0]):
            images[tb_attention_tag(probe.name, layer)] = heatmap.render_layer(
                attn[layer], probe.tokens, title=f"{probe.name} · layer {layer}"
            )
    if model:
        images[tb_attention_tag(probe.name)] = heatmap.render_model(
            attn, probe.tokens, title=f"{probe.name} · step {step}"
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


def probe_views(probe: ProbeAttention, step: int, views: Sequence[str] = VIEWS) -> dict[str, str]:
    """bertviz views of one probe, keyed by their artifact path (no neuron view without q/k)."""
    from attnlog.render import html

    makers = {"head": html.head_view, "model": html.model_view, "neuron": html.neuron_view}
    files: dict[str, str] = {}
    for view in views:
        page = makers[view](probe)
        if page is not None:
            files[html_path(step, probe.name, f"{view}_view")] = page
    return files


def render_images(
    snapshot: Snapshot, table: ScoreTable, *, layers: bool = True, model: bool = True
) -> dict[str, np.ndarray]:
    """Every probe's heatmaps and every pattern's score matrix."""
    images: dict[str, np.ndarray] = {}
    for probe in snapshot.probes:
        images.update(probe_images(probe, snapshot.step, layers=layers, model=model))
    images.update(pattern_images(table, snapshot.step))
    return images


def render_views(snapshot: Snapshot, views: Sequence[str] = VIEWS) -> dict[str, str]:
    """bertviz head/model/neuron views of every probe, keyed by their artifact path."""
    files: dict[str, str] = {}
    for probe in snapshot.probes:
        files.update(probe_views(probe, snapshot.step, views))
    return files

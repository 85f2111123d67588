"""Everything one logging event shows, rendered on the worker thread (never in training).

`render_images` and `render_views` turn a host snapshot and its score table into the images and
HTML files the sinks write, under the public names from `attnlog.sinks.base`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from attnlog.patterns import ScoreTable
from attnlog.sinks.base import html_path, tb_attention_tag, tb_pattern_tag
from attnlog.snapshot import Snapshot

VIEWS = ("head", "model", "neuron")


def render_images(
    snapshot: Snapshot, table: ScoreTable, *, layers: bool = True, model: bool = True
) -> dict[str, np.ndarray]:
    """Heatmaps per probe (each layer's heads, and layers × heads) and one matrix per pattern."""
    from attnlog.render import heatmap

    images: dict[str, np.ndarray] = {}
    for probe in snapshot.probes:
        attn = np.asarray(probe.attention, dtype=np.float32)  # [L, H, n, n]
        if layers:
            for layer in range(attn.shape[0]):
                images[tb_attention_tag(probe.name, layer)] = heatmap.render_layer(
                    attn[layer], probe.tokens, title=f"{probe.name} · layer {layer}"
                )
        if model:
            images[tb_attention_tag(probe.name)] = heatmap.render_model(
                attn, probe.tokens, title=f"{probe.name} · step {snapshot.step}"
            )
    for pattern, matrix in table.scores.items():
        if np.isfinite(matrix).any():
            images[tb_pattern_tag(pattern)] = heatmap.render_matrix(
                matrix, title=f"{pattern} · step {snapshot.step}"
            )
    return images


def render_views(snapshot: Snapshot, views: Sequence[str] = VIEWS) -> dict[str, str]:
    """bertviz head/model/neuron views per probe, keyed by their artifact path."""
    from attnlog.render import html

    makers = {"head": html.head_view, "model": html.model_view, "neuron": html.neuron_view}
    files: dict[str, str] = {}
    for probe in snapshot.probes:
        for view in views:
            page = makers[view](probe)
            if page is not None:  # the neuron view needs query/key vectors
                files[html_path(snapshot.step, probe.name, f"{view}_view")] = page
    return files

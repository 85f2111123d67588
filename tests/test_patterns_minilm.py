"""Pattern scores on the real pretrained all-MiniLM-L6-v2 (6 layers x 12 heads).

What the shipped model shows, computed once (all probes in one forward pass) and explained. The
numbers in the comments are the scores of this model on these probes (0-based L<layer>H<head>).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnlog.alerts import AlertTracker
from attnlog.capturing import capture
from attnlog.patterns import PatternContext, ScoreAccumulator, score

PROBES = [
    "She ate the strawberries, then the blueberries, and smiled.",
    ("The cat sat on the mat.", "The dog slept on the rug."),
    "Researchers in Amsterdam tokenized unbelievably long words yesterday.",
]


@pytest.fixture(scope="module")
def minilm_scores(minilm):
    model, tokenizer = minilm
    snapshot = capture(model, tokenizer, PROBES)
    return snapshot, score(snapshot)


def test_shape_and_probes(minilm_scores):
    snapshot, table = minilm_scores
    assert [p.is_pair for p in snapshot.probes] == [False, True, False]
    for name, value in table.scores.items():
        assert value.shape == (6, 12), name
        assert value.dtype == np.float32
    # Undefined stays NaN: no sentence pair in probe 0, no split word in probe 1.
    first, pair, _ = table.per_probe.values()
    assert np.isnan(first["same_sentence"]).all()
    assert np.isnan(pair["same_word"]).all()
    assert np.isfinite(table.scores["same_sentence"]).all()  # the pair probe defines it


def test_early_layers_hold_positional_heads(minilm_scores):
    _, table = minilm_scores
    s = table.scores
    # Voita et al. 2019 / Clark et al. 2019: positional heads sit in the lowest layers. MiniLM has
    # a near-perfect previous-token head, L0H2 (prev_token 0.99, positional 0.98) ...
    assert s["prev_token"][:3].max() > 0.9
    assert s["positional"][:3].max() > 0.9
    assert table.labels[0, 2] == "diagonal"
    # ... and a next-token head, L1H8 (~0.66), like bert-base's L2H0 (Vig pattern 1).
    assert s["next_token"][:3].max() > 0.5
    # Neither exists higher up: layers 3-5 spread attention by content, not position.
    assert s["prev_token"][3:].max() < 0.5 and s["next_token"][3:].max() < 0.5


def test_middle_layers_are_delimiter_heavy(minilm_scores):
    _, table = minilm_scores
    s = table.scores
    layer = {name: np.nanmean(s[name], axis=1) for name in ("delimiter", "cls", "sep", "broad")}
    # Clark et al.: middle layers park attention on special tokens as a "no-op". MiniLM's layers
    # 1-4 put 0.52-0.62 of it there (layer 0: 0.30), with vertical heads up to 0.86 (L4H5).
    assert layer["delimiter"][1:5].min() > layer["delimiter"][0]
    assert s["delimiter"][1:5].max() > 0.8
    assert (table.labels[1:5] == "vertical").sum() >= 10
    # Unlike bert-base (where [SEP] dominates layers 6-10), this distilled model's no-op is [CLS]:
    # in layers 1-4 the [CLS] mass is ~10x the [SEP] mass.
    assert (layer["cls"][1:5] > 5 * layer["sep"][1:5]).all()
    # Layer 0 mixes context broadly (mean broad 0.73) before the sharper layers 1-4 (0.46-0.57).
    assert layer["broad"][0] > layer["broad"][1:5].max()


def test_content_heads_and_stability(minilm_scores):
    snapshot, table = minilm_scores
    s = table.scores
    # Vig patterns 3/4: L2H9 sends half (0.50) of a repeated token's attention to its other occurrences,
    # across the sentence boundary too ("the" in sentence B -> "the" in sentence A).
    pair = table.per_probe[snapshot.probes[1].name]
    assert s["identical_token"].max() > 0.4
    assert pair["identical_token_other"].max() > 0.4
    # Word pieces: the previous-token head L0H2 also joins pieces of one word (0.61) ("straw" <-> "##berries").
    assert s["same_word"][:2].max() > 0.5
    # A healthy pretrained model: logits stay well below the growth alert (max ~37 in L0H2, the
    # sharp previous-token head), and a first logging event raises no alerts at all.
    assert np.nanmax(s["max_logit"]) < 50
    assert AlertTracker().update(table) == []


def test_scores_from_query_row_chunks_match_on_real_attention(minilm_scores):
    """What the streaming capture feeds (7 query rows at a time, with logits) gives score()."""
    snapshot, table = minilm_scores
    probes = snapshot.probes
    contexts = [PatternContext.from_probe(p) for p in probes]
    acc = ScoreAccumulator(contexts, None, 6, 12, "cpu", names=[p.name for p in probes])
    width = max(len(p) for p in probes)
    for layer in range(6):
        for start in range(0, width, 7):
            stop = min(start + 7, width)
            rows = torch.zeros(len(probes), 12, stop - start, width)
            logits = torch.full_like(rows, -torch.inf)
            for i, p in enumerate(probes):
                n = len(p)
                q, k = p.queries[layer, :, start:stop], p.keys[layer, :, :n]
                rows[i, :, : q.shape[1], :n] = p.attention[layer, :, start:stop]
                logits[i, :, : q.shape[1], :n] = q @ k.transpose(-1, -2) * p.scaling
            acc.add(layer, rows, row_start=start, logits=logits)
    chunked = acc.table(step=0)
    for name, want in table.scores.items():
        np.testing.assert_allclose(chunked.scores[name], want, atol=1e-5, equal_nan=True)
        for probe in table.per_probe:
            np.testing.assert_allclose(
                chunked.per_probe[probe][name], table.per_probe[probe][name], atol=1e-5,
                equal_nan=True,
            )  # fmt: skip
    assert np.isfinite(chunked.scores["max_logit"]).all()

"""Attention between words, or between blocks of tokens, instead of between tokens.

Clark et al. (2019, "What does BERT look at?") turn token attention into word attention by
summing over a word's pieces as keys (the attention a query pays to the word) and averaging over
them as queries (so each row still sums to 1). `aggregate` does that for any grouping of
positions into consecutive units; `word_probe` groups by words, `pool_probe` by equal blocks (the
size guard of the HTML views), and `unit_probe` turns a capture that was pooled already
(`ProbeAttention.spans`) into the same flat form. Each returns a `ProbeAttention` whose tokens are
the units, so every renderer (heatmaps, head/model views, export) draws it unchanged.

Word boundaries come from the tokenizer's word ids (`ProbeAttention.word_ids`; -1, special tokens,
stay units of their own). Chinese BERT tokenizers give every character its own word id; pass
`segmenter="jieba"` (`pip install 'attnlog[zh]'`) to join characters into words (北京 欢迎 你).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import numpy.typing as npt

from attnlog.probes import bare_token
from attnlog.snapshot import ProbeAttention
from attnlog.text import has_cjk

__all__ = ["aggregate", "pool_probe", "unit_probe", "word_probe", "word_units"]

Segmenter = Callable[[str], Sequence[str]]
WordKey = tuple[object, ...] | None  # what makes neighbouring tokens one word; None: alone
_ELLIPSIS = "\u2026"


def aggregate(attn: npt.ArrayLike, units: npt.ArrayLike) -> np.ndarray:
    """Attention between units: sum over a unit's positions as keys, mean over them as queries.

    Args:
        attn: `[..., n, n]` attention weights (rows sum to 1).
        units: `[n]` int, the unit of each position: consecutive positions share a unit, units
            numbered 0, 1, 2, ... from the left (as `word_units` returns them).

    Returns:
        `[..., g, g]` float32; rows still sum to 1. Costs O(n^2) per head (no n x g matmul).
    """
    attn = np.asarray(attn, dtype=np.float32)
    units = np.asarray(units, dtype=np.int64).reshape(-1)
    n = attn.shape[-1]
    if attn.ndim < 2 or attn.shape[-2] != n or units.shape[0] != n or n == 0:
        raise ValueError(
            f"aggregate: attention {attn.shape} must be [..., n, n] with one unit per position "
            f"(got {units.shape[0]} units)"
        )
    steps = np.diff(units)
    if units[0] != 0 or ((steps != 0) & (steps != 1)).any():
        raise ValueError("aggregate: units must be 0, 1, 2, ... over consecutive positions")
    starts = np.flatnonzero(np.r_[True, steps != 0])  # [g] first position of each unit
    counts = np.diff(np.r_[starts, n]).astype(np.float32)  # [g] positions per unit
    keys_summed = np.add.reduceat(attn, starts, axis=-1)  # [..., n, g]
    return np.add.reduceat(keys_summed, starts, axis=-2) / counts[:, None]


def word_units(
    probe: ProbeAttention, segmenter: str | Segmenter | None = None
) -> tuple[np.ndarray, list[str]]:
    """The word of each token, and each word's text.

    Tokens with the same word id in a row form a word; a word id of -1 (special tokens, or no
    word ids at all) is a unit of its own. `segmenter` ("jieba" or a callable str -> words)
    then joins runs of Chinese tokens into the words it finds.

    Returns:
        (`[n]` int unit per token, numbered in order; one label per unit).
    """
    tokens = [str(t) for t in probe.tokens]
    n = len(tokens)
    word_ids = _ints(probe.word_ids, n, -1)
    segment = _ints(probe.segment, n, 0)
    keys: list[WordKey] = [  # what makes two neighbouring tokens one word
        None if word_ids[i] < 0 else (int(segment[i]), int(word_ids[i])) for i in range(n)
    ]
    if segmenter == "auto":
        segmenter = "jieba" if _has_jieba() and any(map(has_cjk, tokens)) else None
    if segmenter is not None:
        keys = _segment_chinese(tokens, keys, _segmenter(segmenter))
    units = np.zeros(n, dtype=np.int64)
    for i in range(1, n):
        same = keys[i] is not None and keys[i] == keys[i - 1]
        units[i] = units[i - 1] + (0 if same else 1)
    return units, _labels(tokens, units)


def word_probe(probe: ProbeAttention, segmenter: str | Segmenter | None = "auto") -> ProbeAttention:
    """The probe with words as its tokens and word-to-word attention (see `word_units`).

    `segmenter="auto"` uses jieba for probes with Chinese tokens when it is installed
    (`attnlog[zh]`), the tokenizer's word ids otherwise; None always uses the word ids.

    Only self-attention is aggregated; query/key vectors and encoder-decoder parts are dropped.
    """
    probe = unit_probe(probe)
    units, labels = word_units(probe, segmenter)
    return _grouped(probe, units, labels, word_ids=np.arange(len(labels)))


def pool_probe(probe: ProbeAttention, max_units: int) -> ProbeAttention:
    """The probe pooled into at most `max_units` blocks of consecutive tokens (same convention
    as `aggregate`), labelled "first…last" token; the probe itself when it is short enough."""
    probe = unit_probe(probe)
    n = len(probe.tokens)
    if max_units < 1:
        raise ValueError(f"max_units must be at least 1, got {max_units}")
    if n <= max_units:
        return probe
    block = -(-n // max_units)  # ceil
    units = np.arange(n) // block
    return _grouped(probe, units, _span_labels(probe.tokens, units), word_ids=None)


def unit_probe(probe: ProbeAttention) -> ProbeAttention:
    """A capture pooled at capture time (`spans` set, attention `[L, H, m, m]`) as a flat probe
    whose m tokens are the block labels; any other probe unchanged."""
    spans = probe.spans
    if spans is None:
        return probe
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    starts = spans[:, 0]
    labels = probe.labels or [_span_label(probe.tokens[s:e]) for s, e in spans.tolist()]
    return _flat(probe, np.asarray(probe.attention), starts, list(labels), word_ids=None)


# ---- helpers ---------------------------------------------------------------------------------


def _grouped(
    probe: ProbeAttention, units: np.ndarray, labels: list[str], word_ids: np.ndarray | None
) -> ProbeAttention:
    starts = np.flatnonzero(np.r_[True, units[1:] != units[:-1]])  # first token of each unit
    return _flat(probe, aggregate(probe.attention, units), starts, labels, word_ids)


def _flat(
    probe: ProbeAttention, attention: np.ndarray, starts: np.ndarray, labels: list[str], word_ids
) -> ProbeAttention:
    """A ProbeAttention over units: per-token arrays taken at each unit's first token."""

    def first(value: npt.ArrayLike | None) -> np.ndarray | None:
        return None if value is None else np.asarray(value)[starts]

    changes: dict[str, object] = {
        "tokens": labels,
        "attention": attention,
        "special": first(probe.special),
        "punct": first(probe.punct),
        "segment": first(probe.segment),
        "token_ids": first(probe.token_ids),
        "word_ids": word_ids,
        "queries": None,
        "keys": None,
        "decoder_tokens": None,
        "decoder_attention": None,
        "cross_attention": None,
    }
    if probe.spans is not None:
        changes.update(spans=None, labels=None)
    return replace(probe, **changes)


def _ints(value: npt.ArrayLike | None, n: int, default: int) -> np.ndarray:
    if value is None:
        return np.full(n, default, dtype=np.int64)
    array = np.asarray(value, dtype=np.int64).reshape(-1)
    if array.shape[0] != n:
        raise ValueError(f"expected {n} entries, one per token, got {array.shape[0]}")
    return array


def _has_jieba() -> bool:
    import importlib.util

    return importlib.util.find_spec("jieba") is not None


def _segmenter(spec: str | Segmenter) -> Segmenter:
    if callable(spec):
        return spec
    if spec != "jieba":
        raise ValueError(f"segmenter must be 'jieba' or a callable str -> words, got {spec!r}")
    try:
        import jieba
    except ModuleNotFoundError as ex:
        raise ModuleNotFoundError(
            "segmenter='jieba' needs jieba; install it with `pip install 'attnlog[zh]'`"
        ) from ex
    jieba.setLogLevel(60)  # its "Building prefix dict" notice on first use
    return jieba.lcut


def _segment_chinese(tokens: list[str], keys: list[WordKey], segment: Segmenter) -> list[WordKey]:
    """Runs of non-special Chinese tokens re-keyed by the words `segment` finds in their text."""
    keys = list(keys)
    i = 0
    while i < len(tokens):
        if keys[i] is None or not has_cjk(tokens[i]):
            i += 1
            continue
        j = i
        while j < len(tokens) and keys[j] is not None and has_cjk(tokens[j]):
            j += 1
        texts = [bare_token(t) for t in tokens[i:j]]
        offsets = np.cumsum([0] + [len(t) for t in texts])  # char offset of each token
        ends = np.cumsum([len(w) for w in segment("".join(texts))])  # end of each word
        for k in range(i, j):
            word = int(np.searchsorted(ends, offsets[k - i], side="right"))
            keys[k] = ("zh", i, word)
        i = j
    return keys


def _labels(tokens: list[str], units: np.ndarray) -> list[str]:
    """Each unit's text: its pieces joined without their word-piece markers."""
    labels: list[str] = []
    for i, token in enumerate(tokens):
        piece = bare_token(token) or token
        if i and units[i] == units[i - 1]:
            labels[-1] += piece
        else:
            labels.append(piece)
    return labels


def _span_labels(tokens: Sequence[str], units: np.ndarray) -> list[str]:
    starts = np.flatnonzero(np.r_[True, units[1:] != units[:-1]])
    ends = np.r_[starts[1:], len(tokens)]
    return [_span_label(tokens[s:e]) for s, e in zip(starts.tolist(), ends.tolist())]


def _span_label(tokens: Sequence[str]) -> str:
    """ "first…last" (a block of blocks keeps the outer ends of their labels)."""
    tokens = [bare_token(str(t)) or str(t) for t in tokens]
    if len(tokens) == 1:
        return tokens[0]
    return f"{tokens[0].split(_ELLIPSIS)[0]}{_ELLIPSIS}{tokens[-1].split(_ELLIPSIS)[-1]}"

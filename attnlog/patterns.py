"""Pattern scores per (layer, head): the spec is PATTERNS.md (docs/patterns.md for users).

Every built-in score is a row-wise reduction over keys followed by a mean over eligible query
rows (`max_logit`: a max over logits), so scores are computed by a `ScoreAccumulator`:

    acc = ScoreAccumulator(contexts, patterns, num_layers, num_heads, device, names=None)
    acc.add(layer, probs, row_start=0, logits=None)  # probs [P, H, r, N]: rows of all probes
    acc.add_full(layer, probs, logits=None)          # probs [P, H, N, N]: a whole layer
    acc.add_layers(first_layer, probs, row_start=0, logits=None)  # [P, G, H, r, N]: G layers
    table = acc.table(step)                          # the one device->host copy
    acc.results()                                    # or: [P, K, L, H] on the device

It scores all probes in one padded batch (keys padded to the longest probe N), takes layers in
any order and query rows in any chunking with an exact result, and never synchronises before
`table`. `score(snapshot)` is built on it. The public pattern functions in `PATTERNS` keep the
single-probe form `fn(attn [L, H, n, n], ctx) -> [L, H]`; patterns added with `register_pattern`
have only that form, so they are computed from whole layers only (see `register_pattern`).

A score with no eligible query row is NaN ("undefined, not logged"), never 0. `label_heads`
turns scores into Kovaleva-style head labels; `rollout` and `head_redundancy` are cheap extras
over raw attention.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from attnlog.pattern_context import PatternContext

__all__ = [
    "LABEL_INPUTS",
    "PATTERNS",
    "PatternContext",
    "ScoreAccumulator",
    "ScoreTable",
    "head_redundancy",
    "label_heads",
    "merge_tables",
    "register_pattern",
    "rollout",
    "score",
]

PatternFn = Callable[[Any, PatternContext], torch.Tensor]
# fn(attn [L, H, n, n], ctx) -> [L, H] float32, NaN where undefined.


@dataclass
class ScoreTable:
    """Scores of one logging event, on the CPU.

    `scores[pattern]` is `[L, H]` float32, the mean over probes where the score is defined; NaN
    where it is undefined for every probe (never logged). `per_probe[probe][pattern]` is `[L, H]`.
    `labels` is `[L, H]` of head-label strings. `alerts` are human-readable lines raised at this
    event (each head/alert once per run).
    """

    step: int
    scores: dict[str, np.ndarray]
    per_probe: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    labels: np.ndarray | None = None
    alerts: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        """Plain JSON (NaN -> null, 5 decimals) for `scores.json`."""
        from attnlog.layout import json_matrix

        def clean(matrix: np.ndarray) -> list:
            return json_matrix(matrix, digits=5)

        return {
            "step": self.step,
            "scores": {k: clean(v) for k, v in self.scores.items()},
            "per_probe": {
                p: {k: clean(v) for k, v in d.items()} for p, d in self.per_probe.items()
            },
            "labels": None if self.labels is None else self.labels.tolist(),
            "alerts": list(self.alerts),
        }


def _row_mean(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean of values [..., m] over the rows [m] (bool) that are eligible; NaN with none."""
    total = torch.where(rows, values, 0.0).sum(-1)
    count = rows.sum(-1).to(values.dtype)
    return torch.where(count > 0, total / count.clamp_min(1), math.nan)


# -- row-wise engine --------------------------------------------------------------------------
# Every built-in score is a reduction over the keys of one query row followed by a mean over the
# eligible rows, so it can be fed a block of query rows at a time (streaming, long probes) and
# still be exact. All probes are scored together: their masks are padded to N keys once.


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor to `device` without a host sync (pinned, non-blocking on CUDA)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class _Probes:
    """Masks of P probes padded to N positions, `[P, N]` each, on one device."""

    @classmethod
    def of(cls, contexts: Sequence[PatternContext], device: Any) -> _Probes:
        """Built once per (contexts, device): a logger scores the same probes at every event."""
        if not contexts:
            raise ValueError("ScoreAccumulator needs at least one PatternContext")
        key = (tuple(map(id, contexts)), str(device))
        cache = contexts[0]._batches
        batch = cache.get(key)
        if batch is None or any(a is not b for a, b in zip(batch.contexts, contexts)):
            batch = cache[key] = cls(contexts, device)
        return batch

    def __init__(self, contexts: Sequence[PatternContext], device: Any) -> None:
        self.contexts = tuple(contexts)
        self.n = [c.n for c in contexts]
        self.N = max(self.n)
        self.device = torch.device(device) if device is not None else contexts[0].valid.device

        def stack(get: Callable[[PatternContext], Any], fill: Any, dtype: torch.dtype):
            src = contexts[0].valid.device
            out = torch.full((len(contexts), self.N), fill, dtype=dtype, device=src)
            for p, c in enumerate(contexts):
                value = get(c)
                if value is not None:
                    out[p, : c.n] = value.to(src, dtype)
            return _to_device(out, self.device)

        self.valid = stack(lambda c: c.valid, False, torch.bool)
        self.special = stack(lambda c: c.special, False, torch.bool)
        self.cls = stack(lambda c: c.cls, False, torch.bool)
        self.sep = stack(lambda c: c.sep, False, torch.bool)
        self.punct = stack(lambda c: c.punct, False, torch.bool)
        self.skip = stack(lambda c: c.special | c.punct | c.stop, True, torch.bool)
        self.segment = stack(lambda c: c.segment, -1, torch.long)
        self.token_ids = stack(lambda c: c.token_ids, -1, torch.long)
        self.word_ids = stack(lambda c: c.word_ids, -1, torch.long)
        flags = [(c.causal, c.has_pair, c.first_valid) for c in contexts]  # Python values
        self.causal = _to_device(torch.tensor([f[0] for f in flags]), self.device)
        self.has_pair = _to_device(torch.tensor([f[1] for f in flags]), self.device)
        self.first_valid = _to_device(torch.tensor([f[2] for f in flags]), self.device)
        self.any_causal = any(f[0] for f in flags)


# Row masks kept per accumulator (about 20 bytes per query-key pair of all probes: some bool
# [P, r, N] masks and one float32): at most a quarter of one layer's float32 attention (16 MiB
# at least, 256 MiB at most), so long probes never pay more than a fraction of a layer.
_ROWS_CACHE_BYTES = (1 << 24, 1 << 28)
_ROWS_BYTES_PER_ENTRY = 20


class _Rows:
    """Query rows `start .. start + r - 1` of every probe: masks `[P, r]` and `[P, r, N]`.

    Masks are built on first use and kept, so feeding the same rows layer after layer builds them
    once. Eligibility (which rows a score averages over) depends on the rows only.
    """

    def __init__(self, probes: _Probes, start: int, r: int) -> None:
        self.p, self.start, self.r = probes, start, r
        self.i = torch.arange(start, start + r, device=probes.device)  # [r] query positions
        self.j = torch.arange(probes.N, device=probes.device)  # [N] key positions
        self._memo: dict[str, torch.Tensor] = {}
        self._entropy_of: torch.Tensor | None = None  # the block `_entropy` belongs to
        self._entropy: torch.Tensor | None = None

    def rows(self, mask: torch.Tensor) -> torch.Tensor:
        """[P, N] per-position mask -> [P, r] for these query rows."""
        return mask[:, self.start : self.start + self.r]

    @cached_property
    def visible(self) -> torch.Tensor:
        """[P, r, N] bool: key j visible to query i; all False on padded query rows."""
        v = self.rows(self.p.valid)[:, :, None] & self.p.valid[:, None, :]
        later = self.j[None, :] > self.i[:, None]  # [r, N]
        return v & ~(later[None] & self.p.causal[:, None, None])

    @cached_property
    def query_rows(self) -> torch.Tensor:
        """[P, r] bool: Q*, the valid non-special queries."""
        return self.rows(self.p.valid) & ~self.rows(self.p.special)

    @cached_property
    def n_visible(self) -> torch.Tensor:
        return self.visible.sum(-1)  # [P, r]

    @cached_property
    def off_diagonal(self) -> torch.Tensor:
        return self.j[None, :] != self.i[:, None]  # [r, N]

    @cached_property
    def same_segment(self) -> torch.Tensor:
        return self.rows(self.p.segment)[:, :, None] == self.p.segment[:, None, :]  # [P, r, N]

    @cached_property
    def same_token(self) -> torch.Tensor:
        """[P, r, N]: key j holds the query's token id, visible, j != i."""
        ids = self.p.token_ids
        return (self.rows(ids)[:, :, None] == ids[:, None, :]) & self.visible & self.off_diagonal

    @cached_property
    def earlier_copy(self) -> torch.Tensor:
        """[P, r, N]: key j < i holds the query's token id (causal probes only)."""
        earlier = self.j[None, :] < self.i[:, None]
        return self.same_token & earlier & self.p.causal[:, None, None]

    @cached_property
    def after_earlier_copy(self) -> torch.Tensor:
        """[P, r, N]: key j + 1 where j < i is an earlier copy of the query's token (j + 1 <= i)."""
        copy = self.earlier_copy
        shifted = torch.zeros_like(copy)
        shifted[..., 1:] = copy[..., :-1]
        return shifted & self.visible

    def take(self, a: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """a[p, x, t, index[p, t]]: [P, X, r, N], index [P or 1, r] -> [P, X, r]."""
        P, X, r, _ = a.shape
        index = index.clamp(0, self.p.N - 1).expand(P, r)
        return a.gather(-1, index[:, None, :, None].expand(P, X, r, 1)).squeeze(-1)

    def key_visible(self, index: torch.Tensor) -> torch.Tensor:
        """visible[p, t, index[p, t]] -> [P, r]; False where index is outside 0..N-1."""
        inside = (index >= 0) & (index < self.p.N)
        clamped = index.clamp(0, self.p.N - 1).expand(self.visible.shape[:2])
        return self.visible.gather(-1, clamped[..., None]).squeeze(-1) & inside

    def eligible(self, name: str, fn: Callable[[_Rows], torch.Tensor]) -> torch.Tensor:
        """[P, r] bool: the rows pattern `name` averages over (built once per rows)."""
        return self.cached(f"eligible:{name}", fn)

    def cached(self, key: str, fn: Callable[[_Rows], torch.Tensor]) -> torch.Tensor:
        """fn(self), a mask of these rows, built once: every layer fed these rows reuses it."""
        if key not in self._memo:
            self._memo[key] = fn(self)
        return self._memo[key]

    def eligible_all(self, kernels: dict[str, tuple[Any, RowsFn]]) -> torch.Tensor:
        """[K, P, r] bool: `eligible` of every pattern, stacked (built once per rows)."""
        if "eligible_all" not in self._memo:
            stack = [self.eligible(name, fn) for name, (_, fn) in kernels.items()]
            self._memo["eligible_all"] = torch.stack(stack)
        return self._memo["eligible_all"]

    def counts(self, kernels: dict[str, tuple[Any, RowsFn]]) -> torch.Tensor:
        """[K, P] float32: eligible rows per pattern and probe (built once per rows)."""
        if "counts" not in self._memo:
            self._memo["counts"] = self.eligible_all(kernels).sum(-1).to(torch.float32)
        return self._memo["counts"]

    def entropy(self, a: torch.Tensor) -> torch.Tensor:
        """[P, X, r] row entropy in nats of the block being scored (shared by two patterns)."""
        if self._entropy_of is not a:
            self._entropy_of, self._entropy = a, _entropy(a)
        return self._entropy

    def prepare(self, probs: torch.Tensor) -> torch.Tensor:
        """[P, X, r, N] -> float32, rows renormalised over visible keys, padded rows zero.

        A row holding NaN comes out all NaN (its sum is NaN), which `positional` relies on.
        """
        a = torch.where(self.visible[:, None], probs.to(torch.float32), 0.0)
        return a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


RowValues = Callable[[torch.Tensor, _Rows], torch.Tensor]  # a [P, X, r, N] -> [P, X, r]
RowsFn = Callable[[_Rows], torch.Tensor]  # -> [P, r] bool, the eligible rows


def _mass_rows(keys: str) -> RowsFn:
    """Q* rows that see at least one of the probe's `keys` (a [P, N] mask of `_Probes`)."""
    return lambda rc: rc.query_rows & (rc.visible & getattr(rc.p, keys)[:, None, :]).any(-1)


def _mass(keys: str) -> RowValues:
    return lambda a, rc: (a * getattr(rc.p, keys)[:, None, None, :]).sum(-1)


def _rowwise(rows: RowsFn, values: RowValues | None = None) -> Callable[[RowValues], PatternFn]:
    """Built-in pattern from a row kernel: `values(a, rows) -> [P, X, r]`, `rows(rc) -> [P, r]`.

    The public function keeps the single-probe signature `fn(attn [L, H, n, n], ctx) -> [L, H]`
    (it runs a one-probe accumulator); `ScoreAccumulator` uses the row kernel directly.
    """

    def decorate(kernel: RowValues) -> PatternFn:
        def pattern(attn: Any, ctx: PatternContext) -> torch.Tensor:
            return _score_one(pattern, attn, ctx)

        functools.update_wrapper(pattern, kernel)
        pattern.row_kernel = (values or kernel, rows)  # type: ignore[attr-defined]
        return pattern

    return decorate


def _entropy(a: torch.Tensor) -> torch.Tensor:
    return torch.special.entr(a).sum(-1)  # [..., r], 0 log 0 = 0


@_rowwise(lambda rc: rc.query_rows & rc.key_visible(rc.i[None] - 1))
def prev_token(a: torch.Tensor, rc: _Rows) -> torch.Tensor:
    """A[i, i-1] over Q* rows whose previous token is visible."""
    return rc.take(a, rc.i[None] - 1)


@_rowwise(lambda rc: rc.query_rows & rc.key_visible(rc.i[None] + 1))
def next_token(a: torch.Tensor, rc: _Rows) -> torch.Tensor:
    """A[i, i+1] over Q* rows whose next token is visible (NaN for decoders)."""
    return rc.take(a, rc.i[None] + 1)


def _near(rc: _Rows) -> torch.Tensor:
    return rc.cached("near", lambda rc: (rc.i[:, None] - rc.j[None, :]).abs() == 1)  # [r, N]


@_rowwise(lambda rc: rc.query_rows & (_near(rc) & rc.visible).any(-1))
def positional(a: torch.Tensor, rc: _Rows) -> torch.Tensor:
    """Share of Q* rows whose strongest key is i-1 or i+1 (strictly: ties do not count)."""
    before, after = rc.i[None] - 1, rc.i[None] + 1
    near_max = torch.maximum(
        torch.where(before >= 0, rc.take(a, before), -1.0),
        torch.where(after < rc.p.N, rc.take(a, after), -1.0),
    )
    other_max = torch.where(_near(rc), -1.0, a).amax(-1)  # a NaN row stays NaN (see prepare)
    hit = (near_max > other_max).to(a.dtype)
    return torch.where(other_max.isnan(), math.nan, hit)  # NaN attention: undefined, not "no"


@_rowwise(_mass_rows("special"), _mass("special"))
def delimiter(a: torch.Tensor, rc: _Rows) -> torch.Tensor:
    """Attention mass on special tokens ([CLS], [SEP], BOS, EOS ...)."""


@_rowwise(_mass_rows("cls"), _mass("cls"))
def cls(a: torch.Tensor, rc: _Rows) -> torch.Tensor:
    """Attention mass on the [CLS]-like token (NaN for decoders)."""


@_rowwise(_mass_rows("sep"), _mass("sep"))
def sep(a: torch.Tensor, rc: _Rows) -> torch.Tensor:
    """Attention mass on segment-closing separators ([SEP], </s>)."""


@_rowwise(lambda rc: rc.query_rows & (rc.i[None, :] > rc.p.first_valid[:, None]))
def sink(a: torch.Tensor, rc: _Rows) -> torch.Tensor:
    """A[i, j0], j0 = first valid key, over Q* rows after it."""
    return rc.take(a, rc.p.first_valid[:, None])


@_rowwise(_mass_rows("punct"), _mass("punct"))
def punctuation(a: torch.Tensor, rc: _Rows) -> torch.Tensor:
    """Attention mass on punctuation (full-width CJK included)."""


@_rowwise(lambda rc: rc.n_visible >= 2)
def broad(a: torch.Tensor, rc: _Rows) -> torch.Tensor:
    """Normalised entropy H_i / log n_i over valid rows with n_i >= 2."""
    log_n = rc.cached("log_n", lambda rc: torch.log(rc.n_visible.clamp_min(2).float()))[:, None]
    return (rc.entropy(a) / log_n).clamp(0, 1)  # clamp: float noise on uniform rows


@_rowwise(lambda rc: rc.query_rows & (rc.visible & ~rc.p.special[:, None, :]).any(-1))
def confidence(a: torch.Tensor, rc: _Rows) -> torch.Tensor:
    """max_j A[i, j] over non-special keys, over Q* rows."""
    return (a * (~rc.p.special)[:, None, None, :].to(a.dtype)).amax(-1)


def _own_sentence(rc: _Rows) -> torch.Tensor:
    """[P, r, N] float: uniform over the visible non-special keys of the query's sentence."""

    def uniform(rc: _Rows) -> torch.Tensor:
        own = (rc.visible & rc.same_segment & ~rc.p.special[:, None, :]).float()
        return own / own.sum(-1, keepdim=True).clamp_min(1)

    return rc.cached("own_sentence", uniform)


@_rowwise(lambda rc: rc.query_rows & (_own_sentence(rc) > 0).any(-1))
def sentence_bow(a: torch.Tensor, rc: _Rows) -> torch.Tensor:
    """1 - total variation distance to uniform over the row's own-sentence visible words."""
    return 1 - 0.5 * (a - _own_sentence(rc)[:, None]).abs().sum(-1)


@_rowwise(lambda rc: rc.query_rows & (rc.p.has_pair & ~rc.p.causal)[:, None])
def same_sentence(a: torch.Tensor, rc: _Rows) -> torch.Tensor:
    """Attention mass inside the query's own sentence; two-sentence encoder probes only."""
    return (a * rc.same_segment[:, None]).sum(-1)


def _identical_keys(rc: _Rows, segment: str) -> torch.Tensor:
    def keys(rc: _Rows) -> torch.Tensor:
        match = rc.same_token & ~rc.p.skip[:, None, :]  # [P, r, N]
        if segment == "same":
            return match & rc.same_segment
        return match & ~rc.same_segment if segment == "other" else match

    return rc.cached(f"identical:{segment}", keys)


def _identical(segment: str) -> tuple[RowsFn, RowValues]:
    return (
        lambda rc: rc.query_rows & _identical_keys(rc, segment).any(-1),
        lambda a, rc: (a * _identical_keys(rc, segment)[:, None]).sum(-1),
    )


@_rowwise(*_identical("any"))
def identical_token(a: torch.Tensor, rc: _Rows) -> torch.Tensor:
    """Mass on other occurrences of the query's token (special, punct, stop-list keys skipped)."""


@_rowwise(*_identical("same"))
def identical_token_same(a: torch.Tensor, rc: _Rows) -> torch.Tensor:
    """`identical_token` restricted to keys in the query's own sentence."""


@_rowwise(*_identical("other"))
def identical_token_other(a: torch.Tensor, rc: _Rows) -> torch.Tensor:
    """`identical_token` restricted to keys in the other sentence."""


def _word_keys(rc: _Rows) -> torch.Tensor:
    def keys(rc: _Rows) -> torch.Tensor:
        w = rc.p.word_ids  # [P, N], -1 = none (all -1 without word ids: undefined)
        own = rc.rows(w)
        same = (own[:, :, None] == w[:, None, :]) & (own >= 0)[..., None]
        return same & rc.off_diagonal & rc.visible

    return rc.cached("word", keys)


@_rowwise(lambda rc: rc.query_rows & _word_keys(rc).any(-1))
def same_word(a: torch.Tensor, rc: _Rows) -> torch.Tensor:
    """Mass on the other pieces of the query's word (NaN without word ids)."""
    return (a * _word_keys(rc)[:, None]).sum(-1)


@_rowwise(lambda rc: rc.query_rows)
def entropy_nats(a: torch.Tensor, rc: _Rows) -> torch.Tensor:
    """Mean row entropy in nats over Q* rows."""
    return rc.entropy(a)


@_rowwise(lambda rc: rc.query_rows & rc.after_earlier_copy.any(-1))
def induction(a: torch.Tensor, rc: _Rows) -> torch.Tensor:
    """Prefix matching: mass on the tokens right after earlier copies of the query's token.

    Causal probes only; a perfect induction head scores 1 on the second half of a repeated
    random sequence, a uniform causal head about 1 / i.
    """
    return (a * rc.after_earlier_copy[:, None]).sum(-1)


@_rowwise(lambda rc: rc.query_rows & rc.earlier_copy.any(-1))
def duplicate_token(a: torch.Tensor, rc: _Rows) -> torch.Tensor:
    """Mass on earlier copies of the query's token (causal probes only).

    Unlike `identical_token` it ignores later copies and skips no key (punctuation, stop-list
    characters count): TransformerLens's "duplicate_token_head".
    """
    return (a * rc.earlier_copy[:, None]).sum(-1)


def max_logit(attn: Any, ctx: PatternContext) -> torch.Tensor:
    """max over visible (i, j) of (q_i . k_j) * scaling; NaN without captured q/k."""
    return _score_one(max_logit, attn, ctx)


max_logit.from_logits = True  # type: ignore[attr-defined]


# -- registry ---------------------------------------------------------------------------------

#: name -> fn(attn [L, H, n, n], ctx) -> [L, H]. Add entries with `register_pattern`.
PATTERNS: dict[str, PatternFn] = {
    fn.__name__: fn
    for fn in (
        prev_token,
        next_token,
        positional,
        delimiter,
        cls,
        sep,
        sink,
        punctuation,
        broad,
        confidence,
        sentence_bow,
        same_sentence,
        identical_token,
        identical_token_same,
        identical_token_other,
        same_word,
        induction,
        duplicate_token,
        entropy_nats,
        max_logit,
    )
}
_BUILTIN = frozenset(PATTERNS)
# How per-probe [L, H] values combine into `ScoreTable.scores`: NaN-ignoring mean or max.
_REDUCE: dict[str, str] = {"max_logit": "max"}


def register_pattern(
    name: str, fn: PatternFn, *, overwrite: bool = False, reduce: str = "mean"
) -> None:
    """Add a pattern to `PATTERNS` so `score` computes and the sinks log it.

    A registered pattern sees one probe's whole attention, so it is computed only where that
    exists: by `score()` on a snapshot, and by a `ScoreAccumulator` fed whole layers
    (`add_full`); a probe fed in row chunks (long probes) leaves it NaN, with a warning.

    Args:
        name: metric name, `[a-z0-9_]`, starting with a letter (it ends up in tag/metric names).
        fn: `fn(attn, ctx) -> [L, H]` tensor; `attn` [L, H, n, n] float32 with rows renormalised
            over visible keys, `ctx` a `PatternContext`. Must be pure; NaN where undefined.
        overwrite: replace an existing pattern (a built-in one only with a warning).
        reduce: how probes combine, "mean" or "max" (both ignore NaN).

    Raises:
        ValueError: bad name, taken name without `overwrite`, or unknown `reduce`.
        TypeError: `fn` is not callable.
    """
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(
            f"pattern name {name!r} must match [a-z][a-z0-9_]* (it is used in metric names)"
        )
    if not callable(fn):
        raise TypeError(f"pattern {name!r}: fn must be callable, got {type(fn).__name__}")
    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
    if name in PATTERNS and not overwrite:
        kind = "a built-in" if name in _BUILTIN else "an already registered"
        raise ValueError(f"{name!r} is {kind} pattern; pass overwrite=True to replace it")
    if name in _BUILTIN:
        warnings.warn(f"replacing the built-in pattern {name!r}", UserWarning, stacklevel=2)
    PATTERNS[name] = fn
    _REDUCE[name] = reduce


def _select(patterns: Iterable[str] | str | None) -> list[str]:
    if patterns is None:
        return list(PATTERNS)
    names = [patterns] if isinstance(patterns, str) else list(patterns)
    unknown = [p for p in names if p not in PATTERNS]
    if unknown:
        raise ValueError(f"unknown pattern(s) {unknown}; choose from {sorted(PATTERNS)}")
    return names


# -- the accumulator --------------------------------------------------------------------------


class ScoreAccumulator:
    """Scores of all probes, fed layer by layer and query-row chunk by chunk; one host sync at the end.

    Args:
        contexts: one `PatternContext` per probe (any device; masks are stacked once).
        patterns: names from `PATTERNS` (default: all).
        num_layers, num_heads: L and H of the model.
        device: where the attention comes from and the sums are kept.
        names: probe names for `ScoreTable.per_probe` (default p0, p1, ...).

    Feed it with `add` (a block of query rows of one layer) or `add_full` (all rows), in any order
    and any chunking: each built-in score is a sum over eligible rows divided by their count, so
    the result does not depend on how the rows were split. Patterns added with
    `register_pattern` need a probe's whole attention: they are computed from layers given to
    `add_full` (which are then kept until `table`) and are NaN when rows came in chunks.
    """

    def __init__(
        self,
        contexts: list[PatternContext],
        patterns: Sequence[str] | None,
        num_layers: int,
        num_heads: int,
        device: Any,
        *,
        names: Sequence[str] | None = None,
    ) -> None:
        self._setup(
            list(contexts),
            {n: PATTERNS[n] for n in _select(patterns)},
            num_layers,
            num_heads,
            device,
            names,
        )

    def _setup(self, contexts, fns: dict[str, PatternFn], num_layers, num_heads, device, names):
        self.contexts = contexts
        self.probes = _Probes.of(contexts, device)
        self.device = self.probes.device
        self.num_layers, self.num_heads = int(num_layers), int(num_heads)
        P, L, H = len(contexts), self.num_layers, self.num_heads
        if names is not None and len(names) != P:
            raise ValueError(f"got {len(names)} probe names for {P} contexts")
        self.names = _unique(names if names is not None else [f"p{i}" for i in range(P)])
        self.patterns = list(fns)
        self._rows_fns = {n: f.row_kernel for n, f in fns.items() if hasattr(f, "row_kernel")}
        self._logit_names = [n for n, f in fns.items() if getattr(f, "from_logits", False)]
        self._user = {
            n: f for n, f in fns.items() if n not in self._rows_fns and n not in self._logit_names
        }
        K = len(self._rows_fns)
        self._total = torch.zeros(K, P, L, H, device=self.device)
        self._count = torch.zeros(K, P, L, 1, device=self.device)  # eligible rows fed
        self._logit_max = torch.full((P, L, H), -math.inf, device=self.device)
        self._logit_seen = torch.zeros(L, dtype=torch.bool, device=self.device)
        self._full: dict[int, torch.Tensor] = {}  # layer -> prepared [P, H, N, N], user patterns
        self._user_scores: dict[str, torch.Tensor] = {}  # name -> [P, L, H], set by score()
        self._chunked = False
        self._rows: dict[tuple[int, int], _Rows] = {}
        self._rows_bytes = 0

    @property
    def N(self) -> int:
        """Key positions of the padded batch: the longest probe."""
        return self.probes.N

    def add(self, layer: int, probs: Any, row_start: int = 0, logits: Any = None) -> None:
        """Feed query rows `row_start .. row_start + r - 1` of one layer.

        Args:
            layer: 0-based layer index.
            probs: [P, H, r, N'] attention rows of all probes, keys padded to N' >= N (keys and
                rows past a probe's length are ignored). Any float dtype; not modified.
            row_start: position of the first row.
            logits: the same rows' pre-softmax logits (q.k * scaling), [P, H, r, N'], or None.
                `max_logit` is the max over visible (query, key) pairs of what was given; NaN
                for a layer that never got logits.
        """
        probs = torch.as_tensor(probs)
        if probs.ndim != 4:
            raise ValueError(f"probs has shape {tuple(probs.shape)}; expected [P, H, r, N]")
        logits = None if logits is None else torch.as_tensor(logits)[:, None]
        self.add_layers(layer, probs[:, None], row_start, logits)

    def add_full(self, layer: int, probs: Any, logits: Any = None) -> None:
        """Feed all rows of one layer: probs [P, H, N', N'] (see `add`)."""
        probs = torch.as_tensor(probs)
        if probs.ndim != 4 or probs.shape[-1] != probs.shape[-2]:
            raise ValueError(f"probs has shape {tuple(probs.shape)}; expected [P, H, N, N]")
        self.add(layer, probs, 0, logits)

    def add_layers(
        self, first_layer: int, probs: Any, row_start: int = 0, logits: Any = None
    ) -> None:
        """Feed the same query rows of G consecutive layers at once: fewer, larger kernels.

        Args:
            first_layer: the layer of `probs[:, 0]`.
            probs: [P, G, H, r, N'] (see `add`). On a GPU, scoring a short-probe event costs
                about one launch sequence per call, so buffering layers that fit in memory and
                feeding them together is several times cheaper than layer by layer.
            row_start, logits: as in `add` (logits [P, G, H, r, N']).
        """
        probs = torch.as_tensor(probs)
        if probs.ndim != 5:
            raise ValueError(f"probs has shape {tuple(probs.shape)}; expected [P, G, H, r, N]")
        full = row_start == 0 and probs.shape[3] >= self.N
        if self._user and not full:
            self._chunked = True
        self._add(first_layer, probs, row_start, logits)
        if self._user and full:
            for g in range(probs.shape[1]):
                self._full[first_layer + g] = self._last_prepared[:, g]

    def _add(self, layer: int, probs: torch.Tensor, row_start: int, logits: Any) -> None:
        """probs [P, G, H, r, N'] for layers layer .. layer + G - 1 (the same rows)."""
        P, G, H, r, width = probs.shape
        if len(self.contexts) != P or self.num_heads != H or width < self.N:
            raise ValueError(
                f"probs has shape {tuple(probs.shape)}; expected {len(self.contexts)} probes, "
                f"{self.num_heads} heads and at least {self.N} keys"
            )
        if layer < 0 or layer + G > self.num_layers:
            raise ValueError(f"layer {layer} is outside 0..{self.num_layers - 1}")
        if not 0 <= row_start < self.N:
            raise ValueError(f"row_start {row_start} is outside 0..{self.N - 1}")
        r = min(r, self.N - row_start)  # rows past the longest probe are padding
        rows = self._rows_of(row_start, r)
        probs = probs[:, :, :, :r, : self.N].to(self.device)
        a = rows.prepare(probs.reshape(P, G * H, r, self.N))
        self._last_prepared = a.view(P, G, H, r, self.N) if self._user else None
        span = slice(layer, layer + G)
        if self._rows_fns:
            values = torch.stack([v(a, rows) for v, _ in self._rows_fns.values()])  # [K, P, X, r]
            eligible = rows.eligible_all(self._rows_fns)  # [K, P, r]
            totals = torch.where(eligible[:, :, None], values, 0.0).sum(-1)  # [K, P, G * H]
            self._total[:, :, span] += totals.view(-1, P, G, H)
            self._count[:, :, span] += rows.counts(self._rows_fns)[:, :, None, None]
            rows._entropy_of = rows._entropy = None  # do not keep this block alive
        if logits is not None and self._logit_names:
            lg = torch.as_tensor(logits)[:, :, :, :r, : self.N].to(self.device, torch.float32)
            lg = torch.where(rows.visible[:, None, None], lg, -math.inf).amax((-2, -1))
            self._logit_max[:, span] = torch.maximum(self._logit_max[:, span], lg)
            self._logit_seen[span] = True

    def _rows_of(self, start: int, r: int) -> _Rows:
        """The masks of these rows: kept while they fit (`_ROWS_CACHE_BYTES`), so that every layer
        fed the same chunks reuses them (the first chunks that fit stay; later ones are rebuilt)."""
        rows = self._rows.get((start, r))
        if rows is None:
            rows = _Rows(self.probes, start, r)
            size = len(self.contexts) * r * self.N * _ROWS_BYTES_PER_ENTRY
            low, high = _ROWS_CACHE_BYTES
            budget = max(low, min(high, len(self.contexts) * self.num_heads * self.N**2))
            if self._rows_bytes + size <= budget:
                self._rows[(start, r)] = rows
                self._rows_bytes += size
        return rows

    def results(self) -> torch.Tensor:
        """[P, K, L, H] float32 per-probe scores on the device, in `patterns` order."""
        P, L, H = len(self.contexts), self.num_layers, self.num_heads
        mean = torch.where(
            self._count > 0, self._total / self._count.clamp_min(1), math.nan
        )  # [K, P, L, H]
        logit = torch.where(
            self._logit_seen[None, :, None] & (self._logit_max > -math.inf),
            self._logit_max,
            math.nan,
        )
        rows = list(self._rows_fns)
        out = []
        for name in self.patterns:
            if name in self._rows_fns:
                out.append(mean[rows.index(name)])
            elif name in self._logit_names:
                out.append(logit)
            else:
                out.append(self._user_result(name, P, L, H))
        return torch.stack(out, 1)

    def _user_result(self, name: str, P: int, L: int, H: int) -> torch.Tensor:
        if name in self._user_scores:
            return self._user_scores[name]
        if self._chunked or len(self._full) != L:
            if not getattr(self, "_warned_user", False):
                warnings.warn(
                    f"pattern {name!r} needs whole-layer attention (add_full for every layer); "
                    "it is NaN for this event",
                    UserWarning,
                    stacklevel=3,
                )
                self._warned_user = True
            return torch.full((P, L, H), math.nan, device=self.device)
        full = torch.stack([self._full[layer] for layer in range(L)], 1)  # [P, L, H, N, N]
        per_probe = []
        for p, ctx in enumerate(self.contexts):
            n = ctx.n
            per_probe.append(_call_user(name, self._user[name], full[p, :, :, :n, :n], ctx))
        return torch.stack(per_probe)

    def table(self, step: int) -> ScoreTable:
        """The ScoreTable of everything fed so far: the one device->host copy."""
        host = self.results().cpu().numpy()  # [P, K, L, H]
        return _table(host, self.patterns, self.names, self.contexts, step)


def _table(
    host: np.ndarray,
    patterns: Sequence[str],
    names: Sequence[str],
    contexts: Sequence[PatternContext],
    step: int,
) -> ScoreTable:
    """ScoreTable from per-probe scores host [P, K, L, H] (K = patterns, P = names/contexts)."""
    per_probe = {
        key: {n: host[p, k] for k, n in enumerate(patterns)} for p, key in enumerate(names)
    }
    scores = {n: _reduce(host[:, k], _REDUCE.get(n, "mean")) for k, n in enumerate(patterns)}
    labels = None
    if all(n in scores for n in _LABEL_INPUTS):
        chances = [
            c.same_sentence_chance for c in contexts if not math.isnan(c.same_sentence_chance)
        ]
        labels = label_heads(scores, chance=float(np.mean(chances)) if chances else None)
    return ScoreTable(step=step, scores=scores, per_probe=per_probe, labels=labels)


def _unique(names: Sequence[str]) -> list[str]:
    keys: list[str] = []
    for name in names:
        keys.append(name if name not in keys else f"{name}_{len(keys)}")
    return keys


def _call_user(name: str, fn: PatternFn, attn: torch.Tensor, ctx: PatternContext) -> torch.Tensor:
    """A registered pattern on one probe's prepared attention [L, H, n, n] -> [L, H]."""
    ctx = ctx.to(attn.device)
    ctx._prepared = attn
    out = torch.as_tensor(fn(attn, ctx))
    if out.shape != attn.shape[:2]:
        raise ValueError(
            f"pattern {name!r} returned shape {tuple(out.shape)}; expected {tuple(attn.shape[:2])}"
        )
    return out.to(attn.device, torch.float32)


# -- scoring whole probes ---------------------------------------------------------------------

# Elements of one padded attention block scored at once: bounds score()'s extra memory
# (a few float32 temporaries of this size) whatever the probe length.
_BLOCK_ELEMENTS = 1 << 24


def _check_attention(attn: Any, n: int) -> torch.Tensor:
    a = torch.as_tensor(attn)
    if a.ndim != 4 or a.shape[-1] != n or a.shape[-2] != n:
        raise ValueError(f"attention has shape {tuple(a.shape)}; expected [L, H, {n}, {n}]")
    return a


def _padded_qk(contexts: Sequence[PatternContext], N: int, device: Any):
    """Queries, keys [P, L, H, N, d] (NaN for probes without them) and scaling [P], or None."""
    have = [c for c in contexts if c.queries is not None and c.keys is not None]
    if not have:
        return None
    L, H, _, d = have[0].queries.shape
    q = torch.full((len(contexts), L, H, N, d), math.nan, device=device)
    k = torch.full_like(q, math.nan)
    scale = torch.ones(len(contexts), device=device)
    for p, c in enumerate(contexts):
        if c.queries is None or c.keys is None:
            continue
        cq, ck = c.queries.to(device, torch.float32), c.keys.to(device, torch.float32)
        if cq.shape[:2] != (L, H) or ck.shape != cq.shape or cq.shape[-1] != d:
            raise ValueError(
                f"queries {tuple(cq.shape)} / keys {tuple(ck.shape)} do not match attention "
                f"[{L}, {H}, {c.n}, {c.n}]"
            )
        q[p, :, :, : c.n], k[p, :, :, : c.n] = cq, ck
        scale[p] = c.scaling if c.scaling is not None else d**-0.5
    return q, k, scale


def _feed(acc: ScoreAccumulator, attentions: Sequence[torch.Tensor]) -> None:
    """Feed whole probes' attention ([L, H, n_p, n_p] each) in blocks of `_BLOCK_ELEMENTS`."""
    P, L, H, N = len(attentions), acc.num_layers, acc.num_heads, acc.N
    qk = _padded_qk(acc.contexts, N, acc.device) if acc._logit_names else None
    per_layer = P * H * N * N
    group = max(1, _BLOCK_ELEMENTS // per_layer)
    rows = N if per_layer <= _BLOCK_ELEMENTS else max(1, _BLOCK_ELEMENTS // (P * H * N))
    for l0 in range(0, L, group):
        g = min(group, L - l0)
        for r0 in range(0, N, rows):
            r = min(rows, N - r0)
            block = torch.zeros(P, g, H, r, N, dtype=attentions[0].dtype, device=acc.device)
            for p, attn in enumerate(attentions):
                n = attn.shape[-1]
                block[p, :, :, : max(0, min(r, n - r0)), :n] = attn[l0 : l0 + g, :, r0 : r0 + r]
            logits = None
            if qk is not None:
                q, k, scale = qk
                logits = q[:, l0 : l0 + g, :, r0 : r0 + r] @ k[:, l0 : l0 + g].transpose(-1, -2)
                logits = logits * scale[:, None, None, None, None]
            acc._add(l0, block, r0, logits)


def _score_one(fn: PatternFn, attn: Any, ctx: PatternContext) -> torch.Tensor:
    """A built-in pattern on one probe: [L, H, n, n] -> [L, H] on the attention's device."""
    a = _check_attention(attn, ctx.n)
    acc = ScoreAccumulator.__new__(ScoreAccumulator)
    acc._setup([ctx], {fn.__name__: fn}, a.shape[0], a.shape[1], a.device, None)
    _feed(acc, [a])
    return acc.results()[0, 0]


def _probes_of(source: Any) -> tuple[list[Any], int | None]:
    if hasattr(source, "probes") and hasattr(source, "step"):  # Snapshot
        return list(source.probes), int(source.step)
    if hasattr(source, "attention"):  # one ProbeAttention
        return [source], None
    probes = list(source)
    if not probes or not all(hasattr(p, "attention") for p in probes):
        raise ValueError("score() needs a Snapshot, a ProbeAttention or a non-empty list of them")
    return probes, None


def _reduce(stack: np.ndarray, how: str) -> np.ndarray:
    """[P, L, H] -> [L, H], ignoring NaN; NaN where every probe is NaN."""
    ok = ~np.isnan(stack)
    count = ok.sum(0)
    if how == "max":
        out = np.where(ok, stack, -np.inf).max(0)
    else:
        out = np.where(ok, stack, 0.0).sum(0) / np.maximum(count, 1)
    return np.where(count > 0, out, np.nan).astype(np.float32)


def score(
    snapshot_or_probes: Any, patterns: Iterable[str] | str | None = None, *, step: int | None = None
) -> ScoreTable:
    """Every selected pattern for every probe, combined over probes.

    All probes are scored in one padded batch by a `ScoreAccumulator`, layers (or, for long
    probes, blocks of query rows) at a time; `max_logit` comes from the probes' q/k.

    Args:
        snapshot_or_probes: a `Snapshot`, a `ProbeAttention` or a list of them (torch or numpy).
        patterns: names from `PATTERNS` (default: all).
        step: training step (default: the snapshot's, else 0).

    Returns:
        ScoreTable with numpy float32 [L, H] per pattern: `per_probe` per probe, `scores` the
        NaN-ignoring mean over probes (`max_logit`: the max), `labels` when the scores that
        `label_heads` needs were selected.

    Raises:
        ValueError: unknown pattern names, bad shapes, or a pattern returning a wrong shape.
    """
    names = _select(patterns)
    probes, snap_step = _probes_of(snapshot_or_probes)
    step = step if step is not None else (snap_step or 0)
    contexts = [PatternContext.from_probe(p) for p in probes]  # tiny CPU work before any kernel
    attentions = [_check_attention(p.attention, c.n) for p, c in zip(probes, contexts)]
    if len({a.shape[:2] for a in attentions}) > 1:
        raise ValueError("probes have different numbers of layers/heads; score them separately")
    L, H = attentions[0].shape[:2]
    device = attentions[0].device
    fns = {n: PATTERNS[n] for n in names}
    builtin = {
        n: f for n, f in fns.items() if hasattr(f, "row_kernel") or hasattr(f, "from_logits")
    }
    per_probe: list[list[torch.Tensor]] = [[] for _ in probes]  # [K] x [L, H] per probe
    for group in _length_groups([c.n for c in contexts], device):
        if not builtin:
            break
        acc = ScoreAccumulator.__new__(ScoreAccumulator)
        acc._setup([contexts[i] for i in group], builtin, L, H, device, None)
        _feed(acc, [attentions[i] for i in group])
        for i, result in zip(group, acc.results()):  # [K_builtin, L, H]
            per_probe[i] = list(result)
    results = []
    for i, (attn, ctx) in enumerate(zip(attentions, contexts)):
        done = dict(zip(builtin, per_probe[i]))
        prepared = None
        for name in names:  # registered patterns see each probe's whole attention
            if name not in done:
                prepared = ctx.prepare(attn.to(device)) if prepared is None else prepared
                done[name] = _call_user(name, fns[name], prepared, ctx)
        results.append(torch.stack([done[n] for n in names]))
    host = torch.stack(results).cpu().numpy()  # [P, K, L, H]: the one device->host copy
    return _table(host, names, _unique([p.name for p in probes]), contexts, step)


def merge_tables(
    tables: Sequence[ScoreTable], step: int, contexts: Sequence[PatternContext] = ()
) -> ScoreTable:
    """One table from tables of disjoint probe sets (e.g. several forward batches).

    Per-probe scores side by side; `scores` and `labels` combined over all probes exactly as one
    accumulator over all of them would. `contexts` (all probes') give the labels' same-sentence
    chance level.
    """
    if not tables:
        raise ValueError("merge_tables needs at least one ScoreTable")
    patterns = list(tables[0].scores)
    names = [name for t in tables for name in t.per_probe]
    host = np.asarray(  # [P, K, L, H]
        [[t.per_probe[name][k] for k in patterns] for t in tables for name in t.per_probe],
        dtype=np.float32,
    )
    return _table(host, patterns, names, contexts, step)


def _length_groups(lengths: Sequence[int], device: Any) -> list[list[int]]:
    """Indices of the probes that `score()` pads into one batch.

    On an accelerator, all of them: kernel launches dominate, so one batch is cheapest. On the
    CPU arithmetic dominates, so probes of similar length go together: padding a group adds at
    most half of its probes' own attention (a 40-token induction probe padded with 12-token
    sentences would cost ~5x).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    if torch.device(device).type != "cpu":
        return [order]
    groups: list[list[int]] = []
    area = 0
    for i in order:  # ascending: each new probe is its group's longest
        n2 = lengths[i] ** 2
        if groups and n2 * (len(groups[-1]) + 1) <= 1.5 * (area + n2):
            groups[-1].append(i)
            area += n2
        else:
            groups.append([i])
            area = n2
    return groups


# -- head labels ------------------------------------------------------------------------------

_LABEL_INPUTS = ("delimiter", "sink", "prev_token", "next_token", "same_sentence", "broad")
LABEL_INPUTS = _LABEL_INPUTS  # public: the scores `label_heads` reads (used by attnlog.report)


def label_heads(
    scores: dict[str, np.ndarray],
    *,
    vertical: float = 0.6,
    diagonal: float = 0.5,
    broad: float = 0.9,
    block_margin: float = 0.25,
    chance: float | None = None,
) -> np.ndarray:
    """Kovaleva-style label per head from its scores (PATTERNS.md, "Head labels").

    `vertical` (delimiter or sink >= vertical), `diagonal` (prev_token + next_token >= diagonal),
    both -> `vertical+diagonal`; else `block` (same_sentence >= chance + block_margin), `broad`
    (broad >= broad), else `heterogeneous`. Missing or NaN scores never match.

    Args:
        scores: name -> [L, H] array (a `ScoreTable.scores`).
        chance: same_sentence of a head that ignores sentences (share of same-sentence keys);
            default 0.5, a balanced pair.

    Returns:
        [L, H] array of label strings.
    """
    shape = next(iter(scores.values())).shape if scores else None
    if shape is None or len(shape) != 2:
        raise ValueError("label_heads needs at least one [L, H] score")

    def get(name: str) -> np.ndarray:
        return np.asarray(scores.get(name, np.full(shape, np.nan)), dtype=np.float64)

    with np.errstate(invalid="ignore"):
        is_vertical = (get("delimiter") >= vertical) | (get("sink") >= vertical)
        near = np.nan_to_num(get("prev_token")) + np.nan_to_num(get("next_token"))
        is_diagonal = near >= diagonal
        is_block = get("same_sentence") >= (0.5 if chance is None else chance) + block_margin
        is_broad = get("broad") >= broad
    labels = np.full(shape, "heterogeneous", dtype=object)
    labels[is_broad] = "broad"
    labels[is_block] = "block"
    labels[is_vertical] = "vertical"
    labels[is_diagonal] = "diagonal"
    labels[is_vertical & is_diagonal] = "vertical+diagonal"
    return labels.astype(str)


# -- extras -----------------------------------------------------------------------------------


def _normalised(attn: Any, valid: Any) -> torch.Tensor:
    a = torch.as_tensor(attn)
    if a.ndim != 4 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"attention has shape {tuple(a.shape)}; expected [L, H, n, n]")
    n = a.shape[-1]
    keep = (
        torch.ones(n, dtype=torch.bool)
        if valid is None
        else torch.as_tensor(valid, dtype=torch.bool)
    )
    if keep.shape != (n,):
        raise ValueError(f"valid has shape {tuple(keep.shape)}; expected ({n},)")
    keep = keep.to(a.device)
    a = torch.where(keep[:, None] & keep[None, :], a.to(torch.float32), 0.0)
    return a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def rollout(attn: Any, *, valid: Any = None) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): how much each input token feeds each position.

    Per layer `0.5 * A + 0.5 * I` with A averaged over heads, rows renormalised, then multiplied
    from the first layer up: R = A_L' ... A_1'.

    Args:
        attn: [L, H, n, n] attention.
        valid: optional [n] bool, not padding (padded rows come out as identity rows).

    Returns:
        [n, n] float32 on the attention's device; row i sums to 1.
    """
    a = _normalised(attn, valid).mean(1)  # [L, n, n]
    eye = torch.eye(a.shape[-1], device=a.device)
    a = 0.5 * a + 0.5 * eye
    a = a / a.sum(-1, keepdim=True)
    result = eye
    for layer in a:  # a loop over layers: each step needs the previous one
        result = layer @ result
    return result


def head_redundancy(attn: Any, *, valid: Any = None) -> torch.Tensor:
    """Per-layer head redundancy: 1 - mean pairwise Jensen-Shannon divergence (base 2).

    1 = every head of the layer attends identically; 0 = heads attend to disjoint keys.
    JS is averaged over the valid query rows and over all pairs of distinct heads.

    Args:
        attn: [L, H, n, n] attention.
        valid: optional [n] bool, not padding.

    Returns:
        [L] float32 (NaN for single-head layers).
    """
    a = _normalised(attn, valid)
    _, heads, n, _ = a.shape
    rows = a.sum(-1)[0, 0] > 0  # [n] valid query rows
    out = []
    for layer in a:  # [H, n, n]; a loop over layers keeps memory at H^2 n^2
        p, q = layer[:, None], layer[None, :]  # [H, 1, n, n], [1, H, n, n]
        m = 0.5 * (p + q)
        h_pq = torch.special.entr(m).sum(-1)  # [H, H, n]
        h_p = torch.special.entr(layer).sum(-1)  # [H, n]
        js = (h_pq - 0.5 * (h_p[:, None] + h_p[None, :])) / math.log(2)
        pairs = ~torch.eye(heads, dtype=torch.bool, device=a.device)
        per_pair = _row_mean(js, rows)  # [H, H]
        out.append(
            1 - per_pair[pairs].mean() if heads > 1 else torch.tensor(math.nan, device=a.device)
        )
    return torch.stack(out).float()

"""The built-in patterns: one row kernel each (see `attnlog.patterns.rows`).

A built-in pattern is a function `fn(attn [L, H, n, n], ctx) -> [L, H]` (the form users write
with `register_pattern`) that carries its row kernel as `fn.row_kernel = (values, rows)`:
`values(a, rows) -> [P, X, r]` per query row and `rows(rc) -> [P, r]`, the rows it averages
over. `ScoreAccumulator` uses the kernel directly; calling the function scores one probe.
The spec of every score is docs/patterns.md.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from attnlog.patterns.accumulator import score_one
from attnlog.patterns.registry import PatternFn, add_builtin
from attnlog.patterns.rows import Rows, RowsFn, RowValues

if TYPE_CHECKING:
    import numpy as np

    from attnlog.patterns.context import PatternContext

__all__ = [
    "broad",
    "cls",
    "confidence",
    "delimiter",
    "duplicate_token",
    "entropy_nats",
    "identical_token",
    "identical_token_other",
    "identical_token_same",
    "induction",
    "max_logit",
    "next_token",
    "positional",
    "prev_token",
    "punctuation",
    "same_sentence",
    "same_word",
    "sentence_bow",
    "sep",
    "sink",
]


def _mass_rows(keys: str) -> RowsFn:
    """Q* rows that see at least one of the probe's `keys` (a [P, N] mask of `Probes`)."""
    return lambda rc: rc.query_rows & (rc.visible & getattr(rc.p, keys)[:, None, :]).any(-1)


def _mass(keys: str) -> RowValues:
    return lambda a, rc: (a * getattr(rc.p, keys)[:, None, None, :]).sum(-1)


def _rowwise(rows: RowsFn, values: RowValues | None = None) -> Callable[[RowValues], PatternFn]:
    """Built-in pattern from a row kernel: `values(a, rows) -> [P, X, r]`, `rows(rc) -> [P, r]`.

    The public function keeps the single-probe signature `fn(attn [L, H, n, n], ctx) -> [L, H]`
    (it runs a one-probe accumulator); `ScoreAccumulator` uses the row kernel directly.
    """

    def decorate(kernel: RowValues) -> PatternFn:
        def pattern(attn: torch.Tensor | np.ndarray, ctx: PatternContext) -> torch.Tensor:
            return score_one(pattern, attn, ctx)

        functools.update_wrapper(pattern, kernel)
        pattern.row_kernel = (values or kernel, rows)  # type: ignore[attr-defined]
        return pattern

    return decorate


@_rowwise(lambda rc: rc.query_rows & rc.key_visible(rc.i[None] - 1))
def prev_token(a: torch.Tensor, rc: Rows) -> torch.Tensor:
    """A[i, i-1] over Q* rows whose previous token is visible."""
    return rc.take(a, rc.i[None] - 1)


@_rowwise(lambda rc: rc.query_rows & rc.key_visible(rc.i[None] + 1))
def next_token(a: torch.Tensor, rc: Rows) -> torch.Tensor:
    """A[i, i+1] over Q* rows whose next token is visible (NaN for decoders)."""
    return rc.take(a, rc.i[None] + 1)


def _near(rc: Rows) -> torch.Tensor:
    return rc.cached("near", lambda rc: (rc.i[:, None] - rc.j[None, :]).abs() == 1)  # [r, N]


@_rowwise(lambda rc: rc.query_rows & (_near(rc) & rc.visible).any(-1))
def positional(a: torch.Tensor, rc: Rows) -> torch.Tensor:
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
def delimiter(a: torch.Tensor, rc: Rows) -> torch.Tensor:
    """Attention mass on special tokens ([CLS], [SEP], BOS, EOS ...)."""


@_rowwise(_mass_rows("cls"), _mass("cls"))
def cls(a: torch.Tensor, rc: Rows) -> torch.Tensor:
    """Attention mass on the [CLS]-like token (NaN for decoders)."""


@_rowwise(_mass_rows("sep"), _mass("sep"))
def sep(a: torch.Tensor, rc: Rows) -> torch.Tensor:
    """Attention mass on segment-closing separators ([SEP], </s>)."""


@_rowwise(lambda rc: rc.query_rows & (rc.i[None, :] > rc.p.first_valid[:, None]))
def sink(a: torch.Tensor, rc: Rows) -> torch.Tensor:
    """A[i, j0], j0 = first valid key, over Q* rows after it."""
    return rc.take(a, rc.p.first_valid[:, None])


@_rowwise(_mass_rows("punct"), _mass("punct"))
def punctuation(a: torch.Tensor, rc: Rows) -> torch.Tensor:
    """Attention mass on punctuation (full-width CJK included)."""


@_rowwise(lambda rc: rc.n_visible >= 2)
def broad(a: torch.Tensor, rc: Rows) -> torch.Tensor:
    """Normalised entropy H_i / log n_i over valid rows with n_i >= 2."""
    log_n = rc.cached("log_n", lambda rc: torch.log(rc.n_visible.clamp_min(2).float()))[:, None]
    return (rc.entropy(a) / log_n).clamp(0, 1)  # clamp: float noise on uniform rows


@_rowwise(lambda rc: rc.query_rows & (rc.visible & ~rc.p.special[:, None, :]).any(-1))
def confidence(a: torch.Tensor, rc: Rows) -> torch.Tensor:
    """max_j A[i, j] over non-special keys, over Q* rows."""
    return (a * (~rc.p.special)[:, None, None, :].to(a.dtype)).amax(-1)


def _own_sentence(rc: Rows) -> torch.Tensor:
    """[P, r, N] float: uniform over the visible non-special keys of the query's sentence."""

    def uniform(rc: Rows) -> torch.Tensor:
        own = (rc.visible & rc.same_segment & ~rc.p.special[:, None, :]).float()
        return own / own.sum(-1, keepdim=True).clamp_min(1)

    return rc.cached("own_sentence", uniform)


@_rowwise(lambda rc: rc.query_rows & (_own_sentence(rc) > 0).any(-1))
def sentence_bow(a: torch.Tensor, rc: Rows) -> torch.Tensor:
    """1 - total variation distance to uniform over the row's own-sentence visible words."""
    return 1 - 0.5 * (a - _own_sentence(rc)[:, None]).abs().sum(-1)


@_rowwise(lambda rc: rc.query_rows & (rc.p.has_pair & ~rc.p.causal)[:, None])
def same_sentence(a: torch.Tensor, rc: Rows) -> torch.Tensor:
    """Attention mass inside the query's own sentence; two-sentence encoder probes only."""
    return (a * rc.same_segment[:, None]).sum(-1)


def _identical_keys(rc: Rows, segment: str) -> torch.Tensor:
    def keys(rc: Rows) -> torch.Tensor:
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
def identical_token(a: torch.Tensor, rc: Rows) -> torch.Tensor:
    """Mass on other occurrences of the query's token (special, punct, stop-list keys skipped)."""


@_rowwise(*_identical("same"))
def identical_token_same(a: torch.Tensor, rc: Rows) -> torch.Tensor:
    """`identical_token` restricted to keys in the query's own sentence."""


@_rowwise(*_identical("other"))
def identical_token_other(a: torch.Tensor, rc: Rows) -> torch.Tensor:
    """`identical_token` restricted to keys in the other sentence."""


def _word_keys(rc: Rows) -> torch.Tensor:
    def keys(rc: Rows) -> torch.Tensor:
        w = rc.p.word_ids  # [P, N], -1 = none (all -1 without word ids: undefined)
        own = rc.rows(w)
        same = (own[:, :, None] == w[:, None, :]) & (own >= 0)[..., None]
        return same & rc.off_diagonal & rc.visible

    return rc.cached("word", keys)


@_rowwise(lambda rc: rc.query_rows & _word_keys(rc).any(-1))
def same_word(a: torch.Tensor, rc: Rows) -> torch.Tensor:
    """Mass on the other pieces of the query's word (NaN without word ids)."""
    return (a * _word_keys(rc)[:, None]).sum(-1)


@_rowwise(lambda rc: rc.query_rows)
def entropy_nats(a: torch.Tensor, rc: Rows) -> torch.Tensor:
    """Mean row entropy in nats over Q* rows."""
    return rc.entropy(a)


@_rowwise(lambda rc: rc.query_rows & rc.after_earlier_copy.any(-1))
def induction(a: torch.Tensor, rc: Rows) -> torch.Tensor:
    """Prefix matching: mass on the tokens right after earlier copies of the query's token.

    Causal probes only; a perfect induction head scores 1 on the second half of a repeated
    random sequence, a uniform causal head about 1 / i.
    """
    return (a * rc.after_earlier_copy[:, None]).sum(-1)


@_rowwise(lambda rc: rc.query_rows & rc.earlier_copy.any(-1))
def duplicate_token(a: torch.Tensor, rc: Rows) -> torch.Tensor:
    """Mass on earlier copies of the query's token (causal probes only).

    Unlike `identical_token` it ignores later copies and skips no key (punctuation, stop-list
    characters count): TransformerLens's "duplicate_token_head".
    """
    return (a * rc.earlier_copy[:, None]).sum(-1)


def max_logit(attn: torch.Tensor | np.ndarray, ctx: PatternContext) -> torch.Tensor:
    """max over visible (i, j) of (q_i . k_j) * scaling; NaN without captured q/k."""
    return score_one(max_logit, attn, ctx)


max_logit.from_logits = True  # type: ignore[attr-defined]


for _fn in (
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
):
    add_builtin(_fn)
add_builtin(max_logit, reduce="max")

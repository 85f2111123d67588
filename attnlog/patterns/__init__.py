"""Pattern scores per (layer, head); the spec of every score is docs/patterns.md.

Every built-in score is a row-wise reduction over keys followed by a mean over eligible query
rows (`max_logit`: a max over logits), so all of them are computed by a `ScoreAccumulator` that
takes layers and query rows in any order and chunking. `score(snapshot)` is built on it. The
pattern functions in `PATTERNS` keep the single-probe form `fn(attn [L, H, n, n], ctx) -> [L, H]`;
patterns added with `register_pattern` have only that form, so they are computed from whole
layers only. A score with no eligible query row is NaN ("undefined, not logged"), never 0;
`label_heads` turns scores into Kovaleva-style head labels.

The package, by seam:

- `context`: `PatternContext`, one probe's masks;
- `rows`: the row engine, masks of all probes and of a block of their query rows;
- `kernels`: the built-in patterns, one row kernel each;
- `registry`: `PATTERNS` and `register_pattern`;
- `accumulator`: `ScoreAccumulator`, which feeds attention blocks to the kernels;
- `scoring`: `score()` of whole probes;
- `table`: `ScoreTable` and `merge_tables`;
- `labels`: `label_heads`.
"""

from __future__ import annotations

from attnlog.patterns.accumulator import ScoreAccumulator
from attnlog.patterns.context import PatternContext
from attnlog.patterns.kernels import (
    broad,
    cls,
    confidence,
    delimiter,
    duplicate_token,
    entropy_nats,
    identical_token,
    identical_token_other,
    identical_token_same,
    induction,
    max_logit,
    next_token,
    positional,
    prev_token,
    punctuation,
    same_sentence,
    same_word,
    sentence_bow,
    sep,
    sink,
)
from attnlog.patterns.labels import LABEL_INPUTS, label_heads
from attnlog.patterns.registry import PATTERNS, PatternFn, register_pattern
from attnlog.patterns.scoring import score
from attnlog.patterns.table import ScoreTable, merge_tables

__all__ = [
    "LABEL_INPUTS",
    "PATTERNS",
    "PatternContext",
    "PatternFn",
    "ScoreAccumulator",
    "ScoreTable",
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
    "label_heads",
    "max_logit",
    "merge_tables",
    "next_token",
    "positional",
    "prev_token",
    "punctuation",
    "register_pattern",
    "same_sentence",
    "same_word",
    "score",
    "sentence_bow",
    "sep",
    "sink",
]

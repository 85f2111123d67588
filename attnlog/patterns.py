"""Pattern scores per (layer, head): the spec is PATTERNS.md (docs/patterns.md for users).

Every pattern is a pure function `fn(attn, ctx) -> [L, H]`: `attn` is one probe's attention
`[L, H, n, n]` (queries x keys) and `ctx` a `PatternContext` of masks. Kernels are vectorised over
heads and tokens, run on the tensors' device in float32 and never modify their inputs. A score with
no eligible query row is NaN ("undefined, not logged"), never 0.

`score(snapshot)` runs every registered pattern over every probe and returns a `ScoreTable`
(numpy, on the CPU: one device sync per call). `label_heads` turns scores into Kovaleva-style head
labels; `rollout` and `head_redundancy` are cheap extras over raw attention.
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

from attnlog.probes import bare_token, is_punctuation

__all__ = [
    "PATTERNS",
    "PatternContext",
    "ScoreTable",
    "head_redundancy",
    "label_heads",
    "register_pattern",
    "rollout",
    "score",
]


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
        """Plain JSON (NaN -> null) for `scores.json`."""

        def clean(matrix: np.ndarray) -> list:
            return [
                [None if not np.isfinite(v) else round(float(v), 5) for v in row] for row in matrix
            ]

        return {
            "step": self.step,
            "scores": {k: clean(v) for k, v in self.scores.items()},
            "per_probe": {
                p: {k: clean(v) for k, v in d.items()} for p, d in self.per_probe.items()
            },
            "labels": None if self.labels is None else self.labels.tolist(),
            "alerts": list(self.alerts),
        }


# -- context ----------------------------------------------------------------------------------

# Token strings that mark a [CLS]-like summary token or a segment-closing separator. Position
# rules come first (see `PatternContext.create`); these catch tokenizers that put them elsewhere.
CLS_TOKENS = frozenset({"[CLS]", "<cls>"})
SEP_TOKENS = frozenset({"[SEP]", "</s>", "<sep>", "<eos>", "<|endoftext|>", "<|eot_id|>"})

# Chinese function characters: identical-token attention to them says nothing about the pattern.
IDENTICAL_TOKEN_STOPLIST = frozenset("的了是在和与及或也就都之其着过地得把被这那一个不有")


def _looks_special(token: str) -> bool:
    return bool(re.fullmatch(r"\[[A-Z]+\]|<\|?[^<>\s]+\|?>", token))


@dataclass
class PatternContext:
    """Masks of one probe, on the attention's device. Build with `from_probe` or `create`.

    Attributes:
        valid: [n] bool, not padding.
        special: [n] bool, [CLS]/[SEP]/BOS/EOS/PAD and added special tokens.
        cls: [n] bool, the [CLS]-like token(s).
        sep: [n] bool, special tokens that close a segment.
        punct: [n] bool, punctuation (full-width CJK included).
        stop: [n] bool, keys skipped by `identical_token` (stop-list characters).
        segment: [n] long, sentence A = 0, B = 1.
        token_ids: [n] long.
        word_ids: [n] long (-1 = none) or None when the tokenizer has no word ids.
        causal: decoder self-attention.
        has_pair: two sentences among the valid tokens.
        queries, keys: [L, H, n, d] or None; `scaling` multiplies q.k (default 1/sqrt(d)).
    """

    valid: torch.Tensor
    special: torch.Tensor
    cls: torch.Tensor
    sep: torch.Tensor
    punct: torch.Tensor
    stop: torch.Tensor
    segment: torch.Tensor
    token_ids: torch.Tensor
    word_ids: torch.Tensor | None = None
    causal: bool = False
    has_pair: bool = False
    first_valid: int = 0
    same_sentence_chance: float = math.nan
    queries: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    scaling: float | None = None
    _prepared: Any = field(default=None, init=False, repr=False)

    @classmethod
    def create(
        cls,
        n: int,
        *,
        tokens: Sequence[str] | None = None,
        special: Any = None,
        punct: Any = None,
        segment: Any = None,
        token_ids: Any = None,
        word_ids: Any = None,
        valid: Any = None,
        causal: bool = False,
        is_pair: bool = False,
        queries: Any = None,
        keys: Any = None,
        scaling: float | None = None,
        device: Any = None,
    ) -> PatternContext:
        """Build a context for an `n`-token probe; missing masks are derived from `tokens`.

        cls = the first valid token when it is special and the model is not causal, plus special
        tokens spelled like CLS_TOKENS. sep = the other special tokens (never the first valid one)
        that close a segment: the last valid token, the last token before a segment change, or a
        token spelled like SEP_TOKENS ([SEP], </s>). Masks are tiny: they are derived on the CPU
        and moved to `device` once, so kernels never synchronise.
        """
        if tokens is not None and len(tokens) != n:
            raise ValueError(f"got {len(tokens)} tokens for a probe of {n} positions")

        def mask(value: Any, default: Any, dtype: torch.dtype, name: str) -> torch.Tensor:
            if value is None:
                value = default
            t = torch.as_tensor(np.asarray(value.cpu() if torch.is_tensor(value) else value))
            if t.shape != (n,):
                raise ValueError(f"{name} has shape {tuple(t.shape)}; expected ({n},)")
            return t.to(dtype)

        bare = [bare_token(t) for t in tokens] if tokens is not None else None
        valid_t = mask(valid, np.ones(n, bool), torch.bool, "valid")
        if not bool(valid_t.any()):
            raise ValueError("the probe has no valid (non-padding) token")
        default_special = [_looks_special(t) for t in tokens] if tokens else np.zeros(n, bool)
        special_t = mask(special, default_special, torch.bool, "special")
        if punct is None and tokens is not None:
            punct = [is_punctuation(t) for t in tokens]
        punct_t = mask(punct, np.zeros(n, bool), torch.bool, "punct") & ~special_t
        if token_ids is None and tokens is not None:
            ids: dict[str, int] = {}
            token_ids = [ids.setdefault(t, len(ids)) for t in tokens]
        ids_t = mask(token_ids, np.arange(n), torch.long, "token_ids")
        words_t = None if word_ids is None else mask(word_ids, None, torch.long, "word_ids")
        stop = [t in IDENTICAL_TOKEN_STOPLIST for t in bare] if bare else np.zeros(n, bool)
        stop_t = mask(stop, None, torch.bool, "stop")
        segment_t = mask(segment, np.zeros(n, int), torch.long, "segment")

        pos = torch.arange(n)
        first = int(valid_t.nonzero()[0, 0])
        named_cls = torch.tensor([t in CLS_TOKENS for t in tokens] if tokens else [False] * n)
        named_sep = torch.tensor([t in SEP_TOKENS for t in tokens] if tokens else [False] * n)
        cls_t = special_t & valid_t & (((pos == first) & (not causal)) | named_cls)
        if is_pair and segment_t[valid_t].unique().numel() < 2:
            # No token types (RoBERTa-style): sentence B starts after the last separator of a run.
            closes = special_t & named_sep & valid_t & (pos != first)
            ends = closes & ~torch.cat([closes[1:], torch.tensor([False])])
            segment_t = torch.cumsum(ends.long(), 0) - ends.long()
        # Segment boundary after position j, looking at the next *valid* token (padding skipped).
        vpos = valid_t.nonzero()[:, 0]
        seg_v = segment_t[vpos]
        boundary = torch.zeros(n, dtype=torch.bool)
        boundary[vpos] = torch.cat([seg_v[1:] != seg_v[:-1], torch.tensor([True])])
        sep_t = special_t & valid_t & ~cls_t & (pos != first) & (boundary | named_sep)
        has_pair = seg_v.unique().numel() >= 2

        ctx = cls(
            valid=valid_t,
            special=special_t,
            cls=cls_t,
            sep=sep_t,
            punct=punct_t,
            stop=stop_t,
            segment=segment_t,
            token_ids=ids_t,
            word_ids=words_t,
            causal=bool(causal),
            has_pair=bool(has_pair),
            first_valid=first,
            scaling=scaling,
        )
        if has_pair and not causal:
            rows = ctx.query_rows
            same = (ctx.visible & ctx.same_segment).sum(-1) / ctx.visible.sum(-1).clamp_min(1)
            ctx.same_sentence_chance = float(same[rows].mean()) if bool(rows.any()) else math.nan
        for name, value in (("queries", queries), ("keys", keys)):
            if value is not None:
                value = torch.as_tensor(value)
                if value.ndim != 4 or value.shape[2] != n:
                    raise ValueError(
                        f"{name} has shape {tuple(value.shape)}; expected [L, H, {n}, d]"
                    )
        if (queries is None) != (keys is None):
            queries = keys = None  # one without the other gives no logits
        ctx.queries = None if queries is None else torch.as_tensor(queries)
        ctx.keys = None if keys is None else torch.as_tensor(keys)
        return ctx.to(device) if device is not None else ctx

    @classmethod
    def from_probe(cls, probe: Any, *, valid: Any = None) -> PatternContext:
        """Context of a `ProbeAttention` (torch or numpy arrays), on its attention's device."""
        attn = probe.attention
        device = attn.device if torch.is_tensor(attn) else "cpu"
        return cls.create(
            int(attn.shape[-1]),
            tokens=probe.tokens,
            special=probe.special,
            punct=probe.punct,
            segment=probe.segment,
            token_ids=probe.token_ids,
            word_ids=probe.word_ids,
            valid=valid,
            causal=probe.causal,
            is_pair=probe.is_pair,
            queries=probe.queries,
            keys=probe.keys,
            scaling=probe.scaling,
            device=device,
        )

    def to(self, device: Any) -> PatternContext:
        """Masks moved to `device` (q/k stay where they are until `max_logit` needs them)."""
        moved = PatternContext(
            **{
                name: getattr(self, name).to(device) if name in _MASKS else getattr(self, name)
                for name in self.__dataclass_fields__
                if name != "_prepared"
            }
        )
        if moved.word_ids is not None:
            moved.word_ids = moved.word_ids.to(device)
        return moved

    @property
    def n(self) -> int:
        return int(self.valid.shape[0])

    @cached_property
    def visible(self) -> torch.Tensor:
        """[n, n] bool: key j visible to query i; all False on padded query rows."""
        v = self.valid[:, None] & self.valid[None, :]
        if self.causal:
            v = v & torch.ones_like(v).tril()
        return v

    @cached_property
    def query_rows(self) -> torch.Tensor:
        """[n] bool: Q*, the valid non-special queries."""
        return self.valid & ~self.special

    @cached_property
    def same_segment(self) -> torch.Tensor:
        """[n, n] bool: query and key in the same sentence."""
        return self.segment[:, None] == self.segment[None, :]

    @cached_property
    def off_diagonal(self) -> torch.Tensor:
        """[n, n] bool: j != i."""
        return ~torch.eye(self.n, dtype=torch.bool, device=self.valid.device)

    def prepare(self, attn: Any) -> torch.Tensor:
        """Attention in float32, rows renormalised over visible keys, padded query rows zeroed.

        Args:
            attn: [L, H, n, n] attention (torch or numpy, any float dtype). Not modified.

        Returns:
            [L, H, n, n] float32 on the device of `attn`. Idempotent: passing the result back
            returns it unchanged, so patterns may call it on what `score` hands them.
        """
        if attn is self._prepared:
            return attn
        a = torch.as_tensor(attn)
        if a.ndim != 4 or a.shape[-1] != self.n or a.shape[-2] != self.n:
            raise ValueError(
                f"attention has shape {tuple(a.shape)}; expected [L, H, {self.n}, {self.n}]"
            )
        a = torch.where(self.visible, a.to(torch.float32), 0.0)
        a = a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        self._prepared = a
        return a


_MASKS = ("valid", "special", "cls", "sep", "punct", "stop", "segment", "token_ids")


# -- kernels ----------------------------------------------------------------------------------

PatternFn = Callable[[Any, PatternContext], torch.Tensor]
# Each takes `a` ([L, H, n, n], prepared) and the context; returns [L, H] float32.


def _row_mean(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean of values [L, H, m] over the rows [m] (bool) that are eligible; NaN with none."""
    total = torch.where(rows, values, 0.0).sum(-1)
    count = rows.sum(-1).to(values.dtype)
    return torch.where(count > 0, total / count.clamp_min(1), math.nan)


def _undefined(a: torch.Tensor) -> torch.Tensor:
    return torch.full(a.shape[:2], math.nan, device=a.device)


def _mass(a: torch.Tensor, ctx: PatternContext, keys: torch.Tensor) -> torch.Tensor:
    """Mean attention mass on `keys` [n] over Q* rows that see at least one such key."""
    rows = ctx.query_rows & (ctx.visible & keys).any(-1)
    return _row_mean(a @ keys.to(a.dtype), rows)


def _entropy(a: torch.Tensor) -> torch.Tensor:
    return torch.special.entr(a).sum(-1)  # [L, H, n], 0 log 0 = 0


def _identical(a: torch.Tensor, ctx: PatternContext, segment: torch.Tensor | None) -> torch.Tensor:
    skip = ctx.special | ctx.punct | ctx.stop
    match = (ctx.token_ids[:, None] == ctx.token_ids[None, :]) & ctx.visible & ctx.off_diagonal
    match = match & ~skip[None, :]
    if segment is not None:
        match = match & segment
    rows = ctx.query_rows & match.any(-1)
    return _row_mean((a * match).sum(-1), rows)


def _pattern(kernel: Callable[[torch.Tensor, PatternContext], torch.Tensor]) -> PatternFn:
    """Public pattern from a kernel: accepts raw or prepared attention and a context."""

    @functools.wraps(kernel)
    def pattern(attn: Any, ctx: PatternContext) -> torch.Tensor:
        return kernel(ctx.prepare(attn), ctx)

    return pattern


@_pattern
def prev_token(a: torch.Tensor, ctx: PatternContext) -> torch.Tensor:
    """A[i, i-1] over Q* rows whose previous token is visible. [L, H, n, n] -> [L, H]."""
    rows = ctx.query_rows[1:] & ctx.visible.diagonal(-1)
    return _row_mean(a.diagonal(-1, -2, -1), rows)


@_pattern
def next_token(a: torch.Tensor, ctx: PatternContext) -> torch.Tensor:
    """A[i, i+1] over Q* rows whose next token is visible (NaN for decoders)."""
    rows = ctx.query_rows[:-1] & ctx.visible.diagonal(1)
    return _row_mean(a.diagonal(1, -2, -1), rows)


@_pattern
def positional(a: torch.Tensor, ctx: PatternContext) -> torch.Tensor:
    """Share of Q* rows whose strongest key is i-1 or i+1 (strictly: ties do not count)."""
    pos = torch.arange(ctx.n, device=a.device)
    near = (pos[:, None] - pos[None, :]).abs() == 1  # [n, n]
    near_max = torch.where(near, a, -1.0).amax(-1)
    other_max = torch.where(near, -1.0, a).amax(-1)
    rows = ctx.query_rows & (near & ctx.visible).any(-1)
    hit = (near_max > other_max).to(a.dtype)
    hit = torch.where(a.isnan().any(-1), math.nan, hit)  # NaN attention: undefined, not "no"
    return _row_mean(hit, rows)


@_pattern
def delimiter(a: torch.Tensor, ctx: PatternContext) -> torch.Tensor:
    """Attention mass on special tokens ([CLS], [SEP], BOS, EOS ...)."""
    return _mass(a, ctx, ctx.special)


@_pattern
def cls(a: torch.Tensor, ctx: PatternContext) -> torch.Tensor:
    """Attention mass on the [CLS]-like token (NaN for decoders)."""
    return _mass(a, ctx, ctx.cls)


@_pattern
def sep(a: torch.Tensor, ctx: PatternContext) -> torch.Tensor:
    """Attention mass on segment-closing separators ([SEP], </s>)."""
    return _mass(a, ctx, ctx.sep)


@_pattern
def sink(a: torch.Tensor, ctx: PatternContext) -> torch.Tensor:
    """A[i, j0], j0 = first valid key, over Q* rows after it."""
    rows = ctx.query_rows & (torch.arange(ctx.n, device=a.device) > ctx.first_valid)
    return _row_mean(a[..., ctx.first_valid], rows)


@_pattern
def punctuation(a: torch.Tensor, ctx: PatternContext) -> torch.Tensor:
    """Attention mass on punctuation (full-width CJK included)."""
    return _mass(a, ctx, ctx.punct)


@_pattern
def broad(a: torch.Tensor, ctx: PatternContext) -> torch.Tensor:
    """Normalised entropy H_i / log n_i over valid rows with n_i >= 2."""
    n_i = ctx.visible.sum(-1)
    ratio = _entropy(a) / torch.log(n_i.clamp_min(2).to(a.dtype))
    ratio = ratio.clamp(0, 1)  # float noise on uniform rows
    return _row_mean(ratio, n_i >= 2)


@_pattern
def confidence(a: torch.Tensor, ctx: PatternContext) -> torch.Tensor:
    """max_j A[i, j] over non-special keys, over Q* rows."""
    keys = ~ctx.special
    rows = ctx.query_rows & (ctx.visible & keys).any(-1)
    return _row_mean((a * keys.to(a.dtype)).amax(-1), rows)


@_pattern
def sentence_bow(a: torch.Tensor, ctx: PatternContext) -> torch.Tensor:
    """1 - total variation distance to uniform over the row's own-sentence visible words."""
    own = ctx.visible & ctx.same_segment & ~ctx.special[None, :]  # [n, n]
    count = own.sum(-1)
    uniform = own.to(a.dtype) / count.clamp_min(1)[:, None].to(a.dtype)
    return _row_mean(1 - 0.5 * (a - uniform).abs().sum(-1), ctx.query_rows & (count > 0))


@_pattern
def same_sentence(a: torch.Tensor, ctx: PatternContext) -> torch.Tensor:
    """Attention mass inside the query's own sentence; two-sentence encoder probes only."""
    if ctx.causal or not ctx.has_pair:
        return _undefined(a)
    return _row_mean((a * ctx.same_segment).sum(-1), ctx.query_rows)


@_pattern
def identical_token(a: torch.Tensor, ctx: PatternContext) -> torch.Tensor:
    """Mass on other occurrences of the query's token (special, punct, stop-list keys skipped)."""
    return _identical(a, ctx, None)


@_pattern
def identical_token_same(a: torch.Tensor, ctx: PatternContext) -> torch.Tensor:
    """`identical_token` restricted to keys in the query's own sentence."""
    return _identical(a, ctx, ctx.same_segment)


@_pattern
def identical_token_other(a: torch.Tensor, ctx: PatternContext) -> torch.Tensor:
    """`identical_token` restricted to keys in the other sentence."""
    return _identical(a, ctx, ~ctx.same_segment)


@_pattern
def same_word(a: torch.Tensor, ctx: PatternContext) -> torch.Tensor:
    """Mass on the other pieces of the query's word (NaN without word ids)."""
    if ctx.word_ids is None:
        return _undefined(a)
    w = ctx.word_ids
    match = (w[:, None] == w[None, :]) & (w >= 0)[:, None] & ctx.off_diagonal & ctx.visible
    return _row_mean((a * match).sum(-1), ctx.query_rows & match.any(-1))


@_pattern
def entropy_nats(a: torch.Tensor, ctx: PatternContext) -> torch.Tensor:
    """Mean row entropy in nats over Q* rows."""
    return _row_mean(_entropy(a), ctx.query_rows)


@_pattern
def max_logit(a: torch.Tensor, ctx: PatternContext) -> torch.Tensor:
    """max over visible (i, j) of (q_i . k_j) * scaling; NaN without captured q/k."""
    if ctx.queries is None or ctx.keys is None:
        return _undefined(a)
    q = ctx.queries.to(a.device, torch.float32)
    k = ctx.keys.to(a.device, torch.float32)
    if q.shape[:2] != a.shape[:2] or k.shape != q.shape:
        raise ValueError(
            f"queries {tuple(q.shape)} / keys {tuple(k.shape)} do not match attention {tuple(a.shape)}"
        )
    scaling = ctx.scaling if ctx.scaling is not None else q.shape[-1] ** -0.5
    logits = (q @ k.transpose(-1, -2)) * scaling  # [L, H, n, n]
    return torch.where(ctx.visible, logits, -math.inf).amax((-2, -1))


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


# -- scoring ----------------------------------------------------------------------------------


def _select(patterns: Iterable[str] | str | None) -> list[str]:
    if patterns is None:
        return list(PATTERNS)
    names = [patterns] if isinstance(patterns, str) else list(patterns)
    unknown = [p for p in names if p not in PATTERNS]
    if unknown:
        raise ValueError(f"unknown pattern(s) {unknown}; choose from {sorted(PATTERNS)}")
    return names


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
    keys, results = [], []
    for probe, ctx in zip(probes, contexts):
        a = ctx.prepare(probe.attention)
        rows = []
        for name in names:
            out = torch.as_tensor(PATTERNS[name](a, ctx))
            if out.shape != a.shape[:2]:
                raise ValueError(
                    f"pattern {name!r} returned shape {tuple(out.shape)}; expected {tuple(a.shape[:2])}"
                )
            rows.append(out.to(a.device, torch.float32))
        results.append(torch.stack(rows))  # [K, L, H]
        key = probe.name if probe.name not in keys else f"{probe.name}_{len(keys)}"
        keys.append(key)
    if len({r.shape for r in results}) > 1:
        raise ValueError("probes have different numbers of layers/heads; score them separately")
    host = torch.stack(results).cpu().numpy()  # [P, K, L, H]: the one device sync
    per_probe = {k: {n: host[p, i] for i, n in enumerate(names)} for p, k in enumerate(keys)}
    scores = {n: _reduce(host[:, i], _REDUCE.get(n, "mean")) for i, n in enumerate(names)}
    labels = None
    if all(n in scores for n in _LABEL_INPUTS):
        chances = [
            c.same_sentence_chance for c in contexts if not math.isnan(c.same_sentence_chance)
        ]
        labels = label_heads(scores, chance=float(np.mean(chances)) if chances else None)
    return ScoreTable(step=step, scores=scores, per_probe=per_probe, labels=labels)


# -- head labels ------------------------------------------------------------------------------

_LABEL_INPUTS = ("delimiter", "sink", "prev_token", "next_token", "same_sentence", "broad")


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

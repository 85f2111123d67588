"""The per-probe masks that pattern scores select rows and keys with (`PatternContext`).

Built once per probe on the CPU from its tokens and the tokenizer's masks, then moved to the
attention's device once: scoring never synchronises on them. `attnlog.patterns` exports
`PatternContext`, the name users see when they write their own patterns.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import torch

from attnlog.probes import bare_token, is_punctuation

if TYPE_CHECKING:
    from attnlog.snapshot import ProbeAttention

__all__ = ["CLS_TOKENS", "IDENTICAL_TOKEN_STOPLIST", "SEP_TOKENS", "Device", "PatternContext"]

Device = torch.device | str | None  # where masks and scores live (None: where they are)

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
    _prepared: torch.Tensor | None = field(default=None, init=False, repr=False)
    _batches: dict = field(default_factory=dict, init=False, repr=False)  # see rows.Probes.of

    @classmethod
    def create(
        cls,
        n: int,
        *,
        tokens: Sequence[str] | None = None,
        special: npt.ArrayLike | None = None,
        punct: npt.ArrayLike | None = None,
        segment: npt.ArrayLike | None = None,
        token_ids: npt.ArrayLike | None = None,
        word_ids: npt.ArrayLike | None = None,
        valid: npt.ArrayLike | None = None,
        causal: bool = False,
        is_pair: bool = False,
        queries: npt.ArrayLike | None = None,
        keys: npt.ArrayLike | None = None,
        scaling: float | None = None,
        device: Device = None,
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
        masks = _token_masks(n, tokens, valid, special, punct, token_ids, word_ids, segment)
        roles = _roles(masks, tokens, causal=bool(causal), is_pair=is_pair)
        ctx = cls(**masks, **roles, causal=bool(causal), scaling=scaling)
        if ctx.has_pair and not causal:
            ctx.same_sentence_chance = _same_sentence_chance(ctx)
        ctx.queries, ctx.keys = _queries_keys(queries, keys, n)
        return ctx.to(device) if device is not None else ctx

    @classmethod
    def from_probe(
        cls, probe: ProbeAttention, *, valid: npt.ArrayLike | None = None
    ) -> PatternContext:
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

    def to(self, device: Device) -> PatternContext:
        """Masks moved to `device` (q/k stay where they are until `max_logit` needs them)."""
        moved = PatternContext(
            **{
                name: getattr(self, name).to(device) if name in _MASKS else getattr(self, name)
                for name in self.__dataclass_fields__
                if name not in ("_prepared", "_batches")
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

    def prepare(self, attn: npt.ArrayLike) -> torch.Tensor:
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


def _vector(
    value: npt.ArrayLike | None,
    default: npt.ArrayLike | None,
    dtype: torch.dtype,
    name: str,
    n: int,
) -> torch.Tensor:
    """One [n] CPU mask from a list, numpy array or tensor (`default` when None)."""
    value = default if value is None else value
    t = torch.as_tensor(np.asarray(value.cpu() if torch.is_tensor(value) else value))
    if t.shape != (n,):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected ({n},)")
    return t.to(dtype)


def _token_masks(n, tokens, valid, special, punct, token_ids, word_ids, segment) -> dict:
    """The per-token masks, given or derived from the token strings."""
    valid_t = _vector(valid, np.ones(n, bool), torch.bool, "valid", n)
    if not bool(valid_t.any()):
        raise ValueError("the probe has no valid (non-padding) token")
    looks_special = [_looks_special(t) for t in tokens] if tokens else np.zeros(n, bool)
    special_t = _vector(special, looks_special, torch.bool, "special", n)
    if punct is None and tokens is not None:
        punct = [is_punctuation(t) for t in tokens]
    if token_ids is None and tokens is not None:
        ids: dict[str, int] = {}
        token_ids = [ids.setdefault(t, len(ids)) for t in tokens]
    stop = [bare_token(t) in IDENTICAL_TOKEN_STOPLIST for t in tokens] if tokens else None
    return {
        "valid": valid_t,
        "special": special_t,
        "punct": _vector(punct, np.zeros(n, bool), torch.bool, "punct", n) & ~special_t,
        "stop": _vector(stop, np.zeros(n, bool), torch.bool, "stop", n),
        "segment": _vector(segment, np.zeros(n, int), torch.long, "segment", n),
        "token_ids": _vector(token_ids, np.arange(n), torch.long, "token_ids", n),
        "word_ids": None
        if word_ids is None
        else _vector(word_ids, None, torch.long, "word_ids", n),
    }


def _roles(masks: dict, tokens: Sequence[str] | None, *, causal: bool, is_pair: bool) -> dict:
    """cls, sep, the sentence of each token, the first valid position, whether it is a pair.

    Updates `masks["segment"]` for pairs without token types (RoBERTa): sentence B starts after
    the last separator of a run.
    """
    valid, special, segment = masks["valid"], masks["special"], masks["segment"]
    n = valid.shape[0]
    pos = torch.arange(n)
    first = int(valid.nonzero()[0, 0])
    named_cls = torch.tensor([t in CLS_TOKENS for t in tokens] if tokens else [False] * n)
    named_sep = torch.tensor([t in SEP_TOKENS for t in tokens] if tokens else [False] * n)
    cls_t = special & valid & (((pos == first) & (not causal)) | named_cls)
    if is_pair and segment[valid].unique().numel() < 2:
        closes = special & named_sep & valid & (pos != first)
        ends = closes & ~torch.cat([closes[1:], torch.tensor([False])])
        masks["segment"] = segment = torch.cumsum(ends.long(), 0) - ends.long()
    # Segment boundary after position j, looking at the next *valid* token (padding skipped).
    vpos = valid.nonzero()[:, 0]
    seg_v = segment[vpos]
    boundary = torch.zeros(n, dtype=torch.bool)
    boundary[vpos] = torch.cat([seg_v[1:] != seg_v[:-1], torch.tensor([True])])
    sep_t = special & valid & ~cls_t & (pos != first) & (boundary | named_sep)
    return {
        "cls": cls_t,
        "sep": sep_t,
        "first_valid": first,
        "has_pair": bool(seg_v.unique().numel() >= 2),
    }


def _same_sentence_chance(ctx: PatternContext) -> float:
    """`same_sentence` of a head that ignores sentences: the share of same-sentence keys."""
    rows = ctx.query_rows
    same = (ctx.visible & ctx.same_segment).sum(-1) / ctx.visible.sum(-1).clamp_min(1)
    return float(same[rows].mean()) if bool(rows.any()) else math.nan


def _queries_keys(
    queries: npt.ArrayLike | None, keys: npt.ArrayLike | None, n: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Checked [L, H, n, d] q and k as tensors, or (None, None) unless both are given."""
    for name, value in (("queries", queries), ("keys", keys)):
        if value is not None:
            shape = tuple(torch.as_tensor(value).shape)
            if len(shape) != 4 or shape[2] != n:
                raise ValueError(f"{name} has shape {shape}; expected [L, H, {n}, d]")
    if queries is None or keys is None:
        return None, None  # one without the other gives no logits
    return torch.as_tensor(queries), torch.as_tensor(keys)

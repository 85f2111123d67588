"""The row engine: masks of all probes padded to one batch, and of a block of their query rows.

Every built-in score is a reduction over the keys of one query row followed by a mean over the
eligible rows, so it can be fed a block of query rows at a time (streaming, long probes) and
still be exact. All probes are scored together: their masks are padded to N keys once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property

import torch

from attnlog.patterns.context import Device, PatternContext

__all__ = ["Probes", "RowValues", "Rows", "RowsFn", "row_entropy"]


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor to `device` without a host sync (pinned, non-blocking on CUDA)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class Probes:
    """Masks of P probes padded to N positions, `[P, N]` each, on one device."""

    @classmethod
    def of(cls, contexts: Sequence[PatternContext], device: Device) -> Probes:
        """Built once per (contexts, device): a logger scores the same probes at every event."""
        if not contexts:
            raise ValueError("ScoreAccumulator needs at least one PatternContext")
        key = (tuple(map(id, contexts)), str(device))
        cache = contexts[0]._batches
        batch = cache.get(key)
        if batch is None or any(a is not b for a, b in zip(batch.contexts, contexts)):
            batch = cache[key] = cls(contexts, device)
        return batch

    def __init__(self, contexts: Sequence[PatternContext], device: Device) -> None:
        self.contexts = tuple(contexts)
        self.n = [c.n for c in contexts]
        self.N = max(self.n)
        self.device = torch.device(device) if device is not None else contexts[0].valid.device

        def stack(get: Callable[[PatternContext], torch.Tensor | None], fill: int, dtype):
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


class Rows:
    """Query rows `start .. start + r - 1` of every probe: masks `[P, r]` and `[P, r, N]`.

    Masks are built on first use and kept, so feeding the same rows layer after layer builds them
    once. Eligibility (which rows a score averages over) depends on the rows only.
    """

    def __init__(self, probes: Probes, start: int, r: int) -> None:
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

    def eligible(self, name: str, fn: Callable[[Rows], torch.Tensor]) -> torch.Tensor:
        """[P, r] bool: the rows pattern `name` averages over (built once per rows)."""
        return self.cached(f"eligible:{name}", fn)

    def cached(self, key: str, fn: Callable[[Rows], torch.Tensor]) -> torch.Tensor:
        """fn(self), a mask of these rows, built once: every layer fed these rows reuses it."""
        if key not in self._memo:
            self._memo[key] = fn(self)
        return self._memo[key]

    def eligible_all(self, kernels: dict[str, tuple[RowValues, RowsFn]]) -> torch.Tensor:
        """[K, P, r] bool: `eligible` of every pattern, stacked (built once per rows)."""
        if "eligible_all" not in self._memo:
            stack = [self.eligible(name, fn) for name, (_, fn) in kernels.items()]
            self._memo["eligible_all"] = torch.stack(stack)
        return self._memo["eligible_all"]

    def counts(self, kernels: dict[str, tuple[RowValues, RowsFn]]) -> torch.Tensor:
        """[K, P] float32: eligible rows per pattern and probe (built once per rows)."""
        if "counts" not in self._memo:
            self._memo["counts"] = self.eligible_all(kernels).sum(-1).to(torch.float32)
        return self._memo["counts"]

    def entropy(self, a: torch.Tensor) -> torch.Tensor:
        """[P, X, r] row entropy in nats of the block being scored (shared by two patterns)."""
        if self._entropy_of is not a:
            self._entropy_of, self._entropy = a, row_entropy(a)
        return self._entropy

    def forget_block(self) -> None:
        """Drop the entropy of the last block: the rows outlive it, the block must not."""
        self._entropy_of = self._entropy = None

    def prepare(self, probs: torch.Tensor) -> torch.Tensor:
        """[P, X, r, N] -> float32, rows renormalised over visible keys, padded rows zero.

        A row holding NaN comes out all NaN (its sum is NaN), which `positional` relies on.
        """
        a = torch.where(self.visible[:, None], probs.to(torch.float32), 0.0)
        return a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


RowValues = Callable[[torch.Tensor, Rows], torch.Tensor]  # a [P, X, r, N] -> [P, X, r]
RowsFn = Callable[[Rows], torch.Tensor]  # -> [P, r] bool, the eligible rows


def row_entropy(a: torch.Tensor) -> torch.Tensor:
    """[..., r, N] -> [..., r] entropy in nats of each row; 0 log 0 = 0."""
    return torch.special.entr(a).sum(-1)

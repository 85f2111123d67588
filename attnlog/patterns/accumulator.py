"""`ScoreAccumulator`: scores of all probes, fed layer by layer and query rows at a time.

    acc = ScoreAccumulator(contexts, patterns, num_layers, num_heads, device, names=None)
    acc.add(layer, probs, row_start=0, logits=None)  # probs [P, H, r, N]: rows of all probes
    acc.add_full(layer, probs, logits=None)          # probs [P, H, N, N]: a whole layer
    acc.add_layers(first_layer, probs, row_start=0, logits=None)  # [P, G, H, r, N]: G layers
    acc.add_probes(attentions)                       # whole probes, [L, H, n_p, n_p] each
    table = acc.table(step)                          # the one device->host copy
    acc.results()                                    # or: [P, K, L, H] on the device

It scores all probes in one padded batch (keys padded to the longest probe N), takes layers in
any order and query rows in any chunking with an exact result, and never synchronises before
`table`. A score with no eligible query row is NaN ("undefined, not logged"), never 0.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from attnlog.patterns.context import Device, PatternContext
from attnlog.patterns.registry import PATTERNS, PatternFn, select
from attnlog.patterns.rows import Probes, Rows
from attnlog.patterns.table import ScoreTable, build_table, unique_names

__all__ = ["ScoreAccumulator", "call_user", "check_attention", "score_one"]

Array = torch.Tensor | np.ndarray

# Row masks kept per accumulator (about 20 bytes per query-key pair of all probes: some bool
# [P, r, N] masks and one float32): at most a quarter of one layer's float32 attention (16 MiB
# at least, 256 MiB at most), so long probes never pay more than a fraction of a layer.
_ROWS_CACHE_BYTES = (1 << 24, 1 << 28)
_ROWS_BYTES_PER_ENTRY = 20


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
        device: Device,
        *,
        names: Sequence[str] | None = None,
    ) -> None:
        self._setup(list(contexts), {n: PATTERNS[n] for n in select(patterns)}, names, device)
        self._shape(num_layers, num_heads)

    @classmethod
    def of_functions(
        cls,
        contexts: Sequence[PatternContext],
        fns: dict[str, PatternFn],
        num_layers: int,
        num_heads: int,
        device: Device,
    ) -> ScoreAccumulator:
        """An accumulator of these pattern functions, named but not looked up in `PATTERNS`."""
        acc = cls.__new__(cls)
        acc._setup(list(contexts), fns, None, device)
        acc._shape(num_layers, num_heads)
        return acc

    def _setup(
        self,
        contexts: list[PatternContext],
        fns: dict[str, PatternFn],
        names: Sequence[str] | None,
        device: Device,
    ) -> None:
        """The probes' masks on `device`, and which patterns take rows, logits or whole layers."""
        self.contexts = contexts
        self.probes = Probes.of(contexts, device)
        self.device = self.probes.device
        P = len(contexts)
        if names is not None and len(names) != P:
            raise ValueError(f"got {len(names)} probe names for {P} contexts")
        self.names = unique_names(names if names is not None else [f"p{i}" for i in range(P)])
        self.patterns = list(fns)
        self._rows_fns = {n: f.row_kernel for n, f in fns.items() if hasattr(f, "row_kernel")}
        self._logit_names = [n for n, f in fns.items() if getattr(f, "from_logits", False)]
        self._user = {
            n: f for n, f in fns.items() if n not in self._rows_fns and n not in self._logit_names
        }
        self._rows: dict[tuple[int, int], Rows] = {}
        self._rows_bytes = 0
        self._last_prepared: torch.Tensor | None = None  # [P, G, H, r, N] of the last block
        self._warned_user = False

    def _shape(self, num_layers: int, num_heads: int) -> None:
        """The running sums: per pattern, probe, layer and head."""
        self.num_layers, self.num_heads = int(num_layers), int(num_heads)
        K, P, L, H = len(self._rows_fns), len(self.contexts), self.num_layers, self.num_heads
        self._total = torch.zeros(K, P, L, H, device=self.device)
        self._count = torch.zeros(K, P, L, 1, device=self.device)  # eligible rows fed
        self._logit_max = torch.full((P, L, H), -math.inf, device=self.device)
        self._logit_seen = torch.zeros(L, dtype=torch.bool, device=self.device)
        self._full: dict[int, torch.Tensor] = {}  # layer -> prepared [P, H, N, N], user patterns
        self._chunked = False

    @property
    def N(self) -> int:
        """Key positions of the padded batch: the longest probe."""
        return self.probes.N

    def add(
        self, layer: int, probs: Array, row_start: int = 0, logits: Array | None = None
    ) -> None:
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

    def add_full(self, layer: int, probs: Array, logits: Array | None = None) -> None:
        """Feed all rows of one layer: probs [P, H, N', N'] (see `add`)."""
        probs = torch.as_tensor(probs)
        if probs.ndim != 4 or probs.shape[-1] != probs.shape[-2]:
            raise ValueError(f"probs has shape {tuple(probs.shape)}; expected [P, H, N, N]")
        self.add(layer, probs, 0, logits)

    def add_layers(
        self, first_layer: int, probs: Array, row_start: int = 0, logits: Array | None = None
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

    def add_probes(self, attentions: Sequence[torch.Tensor]) -> None:
        """Feed whole probes' attention ([L, H, n_p, n_p] each, in `contexts` order), in blocks of
        `_BLOCK_ELEMENTS` so that memory stays bounded whatever the probe length."""
        P, L, H, N = len(attentions), self.num_layers, self.num_heads, self.N
        qk = _padded_qk(self.contexts, N, self.device) if self._logit_names else None
        per_layer = P * H * N * N
        group = max(1, _BLOCK_ELEMENTS // per_layer)
        rows = N if per_layer <= _BLOCK_ELEMENTS else max(1, _BLOCK_ELEMENTS // (P * H * N))
        for l0 in range(0, L, group):
            g = min(group, L - l0)
            for r0 in range(0, N, rows):
                r = min(rows, N - r0)
                block = torch.zeros(P, g, H, r, N, dtype=attentions[0].dtype, device=self.device)
                for p, attn in enumerate(attentions):
                    n = attn.shape[-1]
                    block[p, :, :, : max(0, min(r, n - r0)), :n] = attn[l0 : l0 + g, :, r0 : r0 + r]
                logits = None
                if qk is not None:
                    q, k, scale = qk
                    logits = q[:, l0 : l0 + g, :, r0 : r0 + r] @ k[:, l0 : l0 + g].transpose(-1, -2)
                    logits = logits * scale[:, None, None, None, None]
                self._add(l0, block, r0, logits)

    def _add(self, layer: int, probs: torch.Tensor, row_start: int, logits: Array | None) -> None:
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
            rows.forget_block()
        if logits is not None and self._logit_names:
            lg = torch.as_tensor(logits)[:, :, :, :r, : self.N].to(self.device, torch.float32)
            lg = torch.where(rows.visible[:, None, None], lg, -math.inf).amax((-2, -1))
            self._logit_max[:, span] = torch.maximum(self._logit_max[:, span], lg)
            self._logit_seen[span] = True

    def _rows_of(self, start: int, r: int) -> Rows:
        """The masks of these rows: kept while they fit (`_ROWS_CACHE_BYTES`), so that every layer
        fed the same chunks reuses them (the first chunks that fit stay; later ones are rebuilt)."""
        rows = self._rows.get((start, r))
        if rows is None:
            rows = Rows(self.probes, start, r)
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
        if self._chunked or len(self._full) != L:
            if not self._warned_user:
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
            per_probe.append(call_user(name, self._user[name], full[p, :, :, :n, :n], ctx))
        return torch.stack(per_probe)

    def table(self, step: int) -> ScoreTable:
        """The ScoreTable of everything fed so far: the one device->host copy."""
        host = self.results().cpu().numpy()  # [P, K, L, H]
        return build_table(host, self.patterns, self.names, self.contexts, step)


def call_user(name: str, fn: PatternFn, attn: torch.Tensor, ctx: PatternContext) -> torch.Tensor:
    """A registered pattern on one probe's prepared attention [L, H, n, n] -> [L, H]."""
    ctx = ctx.to(attn.device)
    ctx._prepared = attn
    out = torch.as_tensor(fn(attn, ctx))
    if out.shape != attn.shape[:2]:
        raise ValueError(
            f"pattern {name!r} returned shape {tuple(out.shape)}; expected {tuple(attn.shape[:2])}"
        )
    return out.to(attn.device, torch.float32)


# Elements of one padded attention block scored at once: bounds score()'s extra memory
# (a few float32 temporaries of this size) whatever the probe length.
_BLOCK_ELEMENTS = 1 << 24


def check_attention(attn: Array, n: int) -> torch.Tensor:
    a = torch.as_tensor(attn)
    if a.ndim != 4 or a.shape[-1] != n or a.shape[-2] != n:
        raise ValueError(f"attention has shape {tuple(a.shape)}; expected [L, H, {n}, {n}]")
    return a


def _padded_qk(contexts: Sequence[PatternContext], N: int, device: Device):
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


def score_one(fn: PatternFn, attn: Array, ctx: PatternContext) -> torch.Tensor:
    """A built-in pattern on one probe: [L, H, n, n] -> [L, H] on the attention's device."""
    a = check_attention(attn, ctx.n)
    acc = ScoreAccumulator.of_functions([ctx], {fn.__name__: fn}, a.shape[0], a.shape[1], a.device)
    acc.add_probes([a])
    return acc.results()[0, 0]

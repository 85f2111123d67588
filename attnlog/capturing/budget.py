"""What one event stores, planned to fit `archive_mb`.

The archive holds, per probe, float16 copies of: whole attention `[L, H, n, n]` and query/key
vectors `[L, H, n, d]` each (probes up to `full_attention_limit` tokens), or pooled attention
`[L, H, m, m]` (longer probes). Probe lengths are known once the probes are encoded, so the plan
is made at construction, in this order until the whole event fits:

1. probes kept whole stay whole while their attention fits (the longest are pooled first),
   leaving each pooled probe room for at least `MIN_POOLED` blocks per axis;
2. query/key vectors are kept for the probes, in order, whose vectors still fit (the neuron
   view needs them, nothing else does);
3. pooled maps shrink (below `pooled_size`) to what is left.

Each reduction is said once, with the option that lifts it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from attnlog.capturing.models import text_config
from attnlog.capturing.options import CaptureOptions

__all__ = ["MIN_POOLED", "Storage", "plan_storage"]

#: Fewest blocks per axis a pooled map is squeezed to before whole probes are pooled too.
MIN_POOLED = 32


@dataclass(frozen=True)
class Storage:
    """full_limit: probes up to this many tokens keep whole attention; pooled_size: blocks per
    axis of the others; qk: indices of the probes that keep query/key vectors."""

    full_limit: int
    pooled_size: int
    qk: frozenset[int]
    notes: tuple[str, ...] = ()


def plan_storage(lengths: Sequence[int], config: Any, options: CaptureOptions) -> Storage:
    """The storage of an event of probes of `lengths` tokens, within `options.archive_mb`."""
    limit, size = options.full_attention_limit, options.pooled_size
    every = frozenset(range(len(lengths))) if options.record_qk else frozenset()
    shape = _shape(config)
    if shape is None:  # not a config we can read: nothing to plan with
        return Storage(limit, size, every)
    layers, heads, dim = shape
    unit = 2 * layers * heads  # float16 bytes of one element of every layer and head
    budget = options.archive_mb * 2**20
    whole = _whole_limit(lengths, limit, unit, budget)
    kept = [n for n in lengths if n <= whole]
    long = [n for n in lengths if n > whole]
    used = unit * sum(n * n for n in kept)
    floor = unit * sum(min(n, MIN_POOLED) ** 2 for n in long)
    qk = []
    for i in sorted(every):
        cost = unit * 2 * lengths[i] * dim
        if lengths[i] <= whole and used + floor + cost <= budget:
            qk.append(i)
            used += cost
    if long:
        size = max(1, min(size, int(((budget - used) / (unit * len(long))) ** 0.5)))
    return Storage(whole, size, frozenset(qk), _notes(options, whole, len(qk), len(kept)))


def _whole_limit(lengths: Sequence[int], limit: int, unit: int, budget: float) -> int:
    """The full-attention limit lowered until whole probes and the pooled ones' floor fit."""
    for n in sorted({n for n in lengths if n <= limit}, reverse=True):
        whole = unit * sum(m * m for m in lengths if m <= limit)
        floor = unit * sum(min(m, MIN_POOLED) ** 2 for m in lengths if m > limit)
        if whole + floor <= budget:
            break
        limit = n - 1
    return limit


def _notes(options: CaptureOptions, whole: int, kept_qk: int, kept_whole: int) -> tuple:
    notes = []
    mb = options.archive_mb
    if whole < options.full_attention_limit:
        notes.append(
            f"probes of more than {whole} tokens keep their attention pooled (not whole) so that "
            f"one event fits archive_mb={mb:g}; raise archive_mb to keep them whole"
        )
    if options.record_qk and kept_qk < kept_whole:
        notes.append(
            f"query/key vectors are kept for {kept_qk} of {kept_whole} probes (the neuron view "
            f"of the others is left out) so that one event fits archive_mb={mb:g}; raise "
            "archive_mb to keep them all, or pass record_qk=False"
        )
    return tuple(notes)


def _shape(config: Any) -> tuple[int, int, int] | None:
    """(layers, heads, head dimension) of the language model, None when the config lacks them."""
    text = text_config(config)
    layers = getattr(text, "num_hidden_layers", None)
    heads = getattr(text, "num_attention_heads", None)
    if not (isinstance(layers, int) and isinstance(heads, int)):
        return None
    dim = getattr(text, "head_dim", None)
    if not isinstance(dim, int):
        hidden = getattr(text, "hidden_size", None)
        dim = hidden // heads if isinstance(hidden, int) else 64
    return layers, heads, dim

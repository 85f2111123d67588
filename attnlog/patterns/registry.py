"""The pattern registry: name -> pattern function, and how each combines over probes.

The built-in kernels (`attnlog.patterns.kernels`) add themselves here when the package is
imported; users add theirs with `register_pattern`. Scoring looks names up here only.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

    from attnlog.patterns.context import PatternContext

__all__ = ["PATTERNS", "PatternFn", "REDUCE", "add_builtin", "register_pattern", "select"]

# fn(attn [L, H, n, n], ctx) -> [L, H] float32, NaN where undefined.
PatternFn = Callable[["torch.Tensor | np.ndarray", "PatternContext"], "torch.Tensor"]

#: name -> fn(attn [L, H, n, n], ctx) -> [L, H]. Add entries with `register_pattern`.
PATTERNS: dict[str, PatternFn] = {}
# How per-probe [L, H] values combine into `ScoreTable.scores`: NaN-ignoring mean or max.
REDUCE: dict[str, str] = {}
_BUILTIN: set[str] = set()


def add_builtin(fn: PatternFn, reduce: str = "mean") -> PatternFn:
    """Register one of attnlog's own patterns under its function name (`register_pattern` warns
    before replacing it)."""
    PATTERNS[fn.__name__] = fn
    REDUCE[fn.__name__] = reduce
    _BUILTIN.add(fn.__name__)
    return fn


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
    REDUCE[name] = reduce


def select(patterns: Iterable[str] | str | None) -> list[str]:
    """The names to score (all by default); unknown names fail with the choices."""
    if patterns is None:
        return list(PATTERNS)
    names = [patterns] if isinstance(patterns, str) else list(patterns)
    unknown = [p for p in names if p not in PATTERNS]
    if unknown:
        raise ValueError(f"unknown pattern(s) {unknown}; choose from {sorted(PATTERNS)}")
    return names

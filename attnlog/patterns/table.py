"""The scores of one logging event on the host (`ScoreTable`), and how tables are built and merged.

Per-probe scores `[P, K, L, H]` come from one device->host copy; the table keeps them per probe
and combines them over probes (NaN-ignoring mean, or max for `max_logit`) for the sinks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from attnlog.layout import json_matrix
from attnlog.patterns.labels import LABEL_INPUTS, label_heads
from attnlog.patterns.registry import REDUCE

if TYPE_CHECKING:
    from attnlog.patterns.context import PatternContext

__all__ = ["ScoreTable", "build_table", "merge_tables", "unique_names"]


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
        """Plain JSON (NaN -> null) for `scores.json`: `scores` exact as float32 (what
        `attnlog compare` reads of an MLflow run, alike to the archive's), the rest 5 decimals."""

        def clean(matrix: np.ndarray) -> list:
            return json_matrix(matrix, digits=5)

        def exact(matrix: np.ndarray) -> list:
            # 9 significant digits read back as the same float32 (the float64 `repr` took 17)
            rows = json_matrix(np.asarray(matrix, dtype=np.float32))
            return [[None if v is None else float(f"{v:.9g}") for v in row] for row in rows]

        return {
            "step": self.step,
            "scores": {k: exact(v) for k, v in self.scores.items()},
            "per_probe": {
                p: {k: clean(v) for k, v in d.items()} for p, d in self.per_probe.items()
            },
            "labels": None if self.labels is None else self.labels.tolist(),
            "alerts": list(self.alerts),
        }


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
    return build_table(host, patterns, names, contexts, step)


def build_table(
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
    scores = {n: _reduce(host[:, k], REDUCE.get(n, "mean")) for k, n in enumerate(patterns)}
    labels = None
    if all(n in scores for n in LABEL_INPUTS):
        chances = [
            c.same_sentence_chance for c in contexts if not math.isnan(c.same_sentence_chance)
        ]
        labels = label_heads(scores, chance=float(np.mean(chances)) if chances else None)
    return ScoreTable(step=step, scores=scores, per_probe=per_probe, labels=labels)


def unique_names(names: Sequence[str]) -> list[str]:
    """Probe names made distinct (a repeated name gets its position appended)."""
    keys: list[str] = []
    for name in names:
        keys.append(name if name not in keys else f"{name}_{len(keys)}")
    return keys


def _reduce(stack: np.ndarray, how: str) -> np.ndarray:
    """[P, L, H] -> [L, H], ignoring NaN; NaN where every probe is NaN."""
    ok = ~np.isnan(stack)
    count = ok.sum(0)
    if how == "max":
        out = np.where(ok, stack, -np.inf).max(0)
    else:
        out = np.where(ok, stack, 0.0).sum(0) / np.maximum(count, 1)
    return np.where(count > 0, out, np.nan).astype(np.float32)

"""A few run-level numbers per event, for the charts a user opens first.

A run logs one metric per (pattern, layer, head), over a thousand for a small model, and none of
them says which heads moved. These summaries do, from two score tables: the run's first logged
one and the current one. Pure numpy, no I/O: the sinks name and send them.

- `changed_heads`: heads whose score on some pattern in [0, 1] moved by at least
  `CHANGE_THRESHOLD` since the first table;
- `max_change`: the largest such move of any head on any of those patterns;
- `mean_entropy`: the mean over heads of `entropy_nats` (when it was scored);
- per pattern, the top head: its score (`top_score`) and its name (`top_head`, "L2H9").
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from attnlog.patterns import ScoreTable

__all__ = [
    "CHANGE_THRESHOLD",
    "UNBOUNDED",
    "Change",
    "Summary",
    "SummaryTracker",
    "describe_change",
    "summarize",
]

# A move of 0.1 of the attention (in a score in [0, 1]) is well above probe-to-probe noise of a
# head that did not change, and small enough to catch heads that start to specialise.
CHANGE_THRESHOLD = 0.1
# Scores not in [0, 1] (nats, logits): not comparable with the others, so never a "change".
UNBOUNDED = frozenset({"entropy_nats", "max_logit"})


@dataclass(frozen=True)
class Change:
    """The head that moved most: `pattern` at `head` ("L2H9") went from `before` to `after`."""

    pattern: str
    head: str
    before: float
    after: float


@dataclass
class Summary:
    """What `summarize` found; `metrics()` gives the numbers under their short names."""

    changed_heads: int
    max_change: float
    mean_entropy: float | None
    top_head: dict[str, str] = field(default_factory=dict)
    top_score: dict[str, float] = field(default_factory=dict)
    most_changed: Change | None = None

    def metrics(self) -> dict[str, float]:
        """`changed_heads`, `max_change`, `mean_entropy`, `top.<pattern>`: name -> value."""
        out = {"changed_heads": float(self.changed_heads), "max_change": self.max_change}
        if self.mean_entropy is not None:
            out["mean_entropy"] = self.mean_entropy
        out.update({f"top.{p}": v for p, v in self.top_score.items()})
        return out


def head_name(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def summarize(first: ScoreTable, current: ScoreTable) -> Summary:
    """Compare `current` with the run's `first` table (the same table at the first event).

    Heads or patterns missing from one of them, and NaN scores, count as unchanged.
    """
    moved = None  # [L, H] bool: heads that changed on some pattern
    best: tuple[float, Change | None] = (0.0, None)
    for pattern, now in current.scores.items():
        then = first.scores.get(pattern)
        if pattern in UNBOUNDED or then is None or np.shape(then) != np.shape(now):
            continue
        delta = np.abs(np.asarray(now, np.float64) - np.asarray(then, np.float64))
        delta = np.where(np.isfinite(delta), delta, 0.0)
        big = delta >= CHANGE_THRESHOLD
        moved = big if moved is None or moved.shape != big.shape else moved | big
        layer, head = np.unravel_index(int(np.argmax(delta)), delta.shape)
        if delta[layer, head] > best[0]:
            change = Change(
                pattern, head_name(layer, head), float(then[layer, head]), float(now[layer, head])
            )
            best = (float(delta[layer, head]), change)
    top_head, top_score = _top_heads(current)
    return Summary(
        changed_heads=0 if moved is None else int(moved.sum()),
        max_change=best[0],
        mean_entropy=_mean(current.scores.get("entropy_nats")),
        top_head=top_head,
        top_score=top_score,
        most_changed=best[1],
    )


def _top_heads(table: ScoreTable) -> tuple[dict[str, str], dict[str, float]]:
    names: dict[str, str] = {}
    scores: dict[str, float] = {}
    for pattern, matrix in table.scores.items():
        values = np.asarray(matrix, np.float64)
        if not np.isfinite(values).any():
            continue
        layer, head = np.unravel_index(int(np.nanargmax(values)), values.shape)
        names[pattern] = head_name(layer, head)
        scores[pattern] = float(values[layer, head])
    return names, scores


def _mean(matrix: np.ndarray | None) -> float | None:
    if matrix is None or not np.isfinite(matrix).any():
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(np.asarray(matrix, np.float64)))


class SummaryTracker:
    """Keeps a run's first score table and summarizes every later one against it (per sink:
    a resumed run starts again from its first event in this process)."""

    def __init__(self) -> None:
        self.first: ScoreTable | None = None

    def update(self, table: ScoreTable) -> Summary:
        if self.first is None:
            self.first = table
        return summarize(self.first, table)


def describe_change(change: Change | None) -> str:
    """One line naming the head that moved most, e.g. "identical_token_other L2H9 0.77 -> 0.99"."""
    if change is None:
        return "no head changed yet"
    return f"{change.pattern} {change.head} {change.before:.2f} -> {change.after:.2f}"

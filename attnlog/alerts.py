"""Alerts over training: attention entropy collapse, logit growth and dead heads.

`AlertTracker.update(table)` compares a `ScoreTable` with the previous logging event and returns
one human-readable line per new alert; it also emits them as an `AttentionAlert` warning. The
logger puts the lines into `table.alerts`, which the sinks write as TensorBoard text and MLflow
tags. Each (kind, layer, head) alerts once per run, so a collapsed head does not flood the logs.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from attnlog.patterns import ScoreTable

__all__ = ["AlertTracker", "AttentionAlert"]


class AttentionAlert(UserWarning):
    """Category of attnlog's training alerts (filter it with `warnings.filterwarnings`)."""


class AlertTracker:
    """Watches `broad`, `max_logit`, `sink` and `delimiter` between logging events.

    Collapse and death describe a change, so the first event is only a baseline: a pretrained
    model's sharp positional heads (broad ~0) or pure [CLS] heads are not alerted. Logit growth
    above the threshold is alerted from the first event: a large logit is a risk whatever its
    origin.

    Args:
        collapse: entropy collapse (Zhai et al. 2023) when a head's `broad` falls below this from
            at or above it, or to less than half of its value at the previous event.
        logit: logit growth (Dehghani et al. 2023) when a head's `max_logit` exceeds this, or at
            least doubles (from a positive value) since the previous event.
        logit_floor: doubling counts only when the new `max_logit` is at least this: tiny logits
            (0.1 -> 0.2) double by noise and are harmless; healthy pretrained heads sit at 1-40.
        death: head death when its `sink` or `delimiter` rises to this from below: the head now
            attends only to one token. Reported, not an error.
    """

    def __init__(
        self,
        collapse: float = 0.1,
        logit: float = 50.0,
        death: float = 0.95,
        logit_floor: float = 10.0,
    ):
        thresholds = (("collapse", collapse), ("logit", logit), ("death", death),
                      ("logit_floor", logit_floor))  # fmt: skip
        for name, value in thresholds:
            if not np.isfinite(value):
                raise ValueError(f"{name} threshold must be a finite number, got {value!r}")
        self.collapse = collapse
        self.logit = logit
        self.death = death
        self.logit_floor = logit_floor
        self._previous: dict[str, np.ndarray] = {}  # broad / max_logit of the last event
        self._fired: set[tuple[str, int, int]] = set()

    def update(self, table: ScoreTable) -> list[str]:
        """New alert lines for this event (also warned as `AttentionAlert`)."""
        lines: list[str] = []
        with np.errstate(invalid="ignore"):
            broad, was = self._track(table, "broad")
            if broad is not None:
                hit = ((broad < self.collapse) & (was >= self.collapse)) | (broad < 0.5 * was)
                lines += self._report(table, "entropy collapse", hit, "broad", broad, was)
            logit, was = self._track(table, "max_logit")
            if logit is not None:
                doubled = (was > 0) & (logit >= 2 * was) & (logit >= self.logit_floor)
                hit = (logit > self.logit) | doubled
                lines += self._report(table, "logit growth", hit, "max_logit", logit, was)
            for name in ("sink", "delimiter"):
                value, was = self._track(table, name)
                if value is not None:
                    hit = (value >= self.death) & (was < self.death)
                    lines += self._report(table, "head death", hit, name, value, was)
        if lines:
            warnings.warn("\n".join(lines), AttentionAlert, stacklevel=2)
        return lines

    def _track(self, table: ScoreTable, name: str) -> tuple[np.ndarray | None, np.ndarray]:
        """(current, previous) for `name`; previous is NaN where unknown. Stores current."""
        if name not in table.scores:
            return None, np.empty(0)
        now = np.asarray(table.scores[name], dtype=np.float64)
        before = self._previous.get(name)
        if before is None or before.shape != now.shape:
            before = np.full(now.shape, np.nan)
        self._previous[name] = now.copy()
        return now, before

    def _report(
        self,
        table: ScoreTable,
        kind: str,
        hit: np.ndarray,
        name: str,
        now: np.ndarray,
        was: np.ndarray,
    ) -> list[str]:
        lines = []
        for layer, head in zip(*np.nonzero(hit)):
            key = (kind, int(layer), int(head))
            if key in self._fired:
                continue
            self._fired.add(key)
            detail = f"{name} {now[layer, head]:.3g}"
            if was is not None and np.isfinite(was[layer, head]):
                detail += f" (was {was[layer, head]:.3g})"
            lines.append(f"step {table.step}: {kind} in L{layer}H{head}: {detail}")
        return lines

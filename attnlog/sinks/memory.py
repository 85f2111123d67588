"""A sink that keeps every call in memory: for tests, and for looking at what the logger sends."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from attnlog.sinks.base import Sink

__all__ = ["Call", "MemorySink"]

if TYPE_CHECKING:
    import numpy as np

    from attnlog.patterns import ScoreTable
    from attnlog.snapshot import Snapshot


@dataclass
class Call:
    """One recorded sink call: the method name and its arguments (mappings copied)."""

    method: str
    args: dict[str, Any] = field(default_factory=dict)


class MemorySink(Sink):
    """Records every call in `calls`, in order. Never raises, never writes anywhere.

    Example:
        >>> sink = MemorySink()
        >>> sink.log_html({"attention/step_00000003/p/head_view.html": "<html>"}, step=3)
        >>> sink.of("log_html")[0].args["step"]
        3
    """

    name = "memory"

    def __init__(self, logdir: Any = None) -> None:
        # `logdir` is accepted (and ignored) so the logger can build every sink the same way.
        self.calls: list[Call] = []
        self.flushes = 0
        self.closed = False

    def of(self, method: str) -> list[Call]:
        """The recorded calls of one method, in order."""
        return [c for c in self.calls if c.method == method]

    def steps(self, method: str) -> list[int]:
        """The steps one method was called with, in order."""
        return [c.args["step"] for c in self.of(method)]

    def _record(self, method: str, **args: Any) -> None:
        self.calls.append(Call(method, args))

    def log_settings(self, settings: Mapping[str, str]) -> None:
        self._record("log_settings", settings=dict(settings))

    def log_scores(self, table: ScoreTable, step: int) -> None:
        self._record("log_scores", table=table, step=step)

    def log_images(self, images: Mapping[str, np.ndarray], step: int) -> None:
        self._record("log_images", images=dict(images), step=step)

    def log_html(self, files: Mapping[str, str], step: int) -> None:
        self._record("log_html", files=dict(files), step=step)

    def log_archive(self, snapshot: Snapshot, table: ScoreTable, step: int) -> None:
        self._record("log_archive", snapshot=snapshot, table=table, step=step)

    def flush(self) -> None:
        self.flushes += 1

    def close(self) -> None:
        self.closed = True

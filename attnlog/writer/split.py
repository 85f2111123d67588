"""Named sinks in the writer process, `Sink` objects on a thread: one writer for the logger.

A `Sink` object cannot be rebuilt in another process, and it should not take the other sinks
with it: each writer renders for its own sinks, and the logger sees one writer.
"""

from __future__ import annotations

import time

from attnlog.writer.events import Event
from attnlog.writer.outbox import ThreadWriter
from attnlog.writer.process import ProcessWriter

__all__ = ["SplitWriter"]


class SplitWriter:
    """A `ProcessWriter` and a `ThreadWriter`, fed the same events."""

    def __init__(self, process: ProcessWriter, thread: ThreadWriter) -> None:
        self.process = process
        self.thread = thread
        self._writers = (process, thread)
        thread.missing = process.missing  # one append-only list: the logger reads it by position

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def missing(self) -> list[int]:
        return self.process.missing

    def submit(self, event: Event) -> None:
        for writer in self._writers:
            writer.submit(event)

    def flush(self, timeout: float | None = None) -> bool:
        """Both flushed within `timeout` seconds in all."""
        deadline = None if timeout is None else time.monotonic() + timeout
        done = True
        for writer in self._writers:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done = writer.flush(left) and done
        return done

    def close(self, timeout: float | None = None) -> bool:
        """Both closed; each gives up after `timeout` seconds without progress."""
        return all([writer.close(timeout) for writer in self._writers])

    def unwritten(self) -> list[int]:
        return sorted({*self.process.unwritten(), *self.thread.unwritten()})

    def take_failure(self) -> BaseException | None:
        failures = [writer.take_failure() for writer in self._writers]
        return next((f for f in failures if f is not None), None)

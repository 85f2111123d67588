"""The training process's side of a writer: a bounded outbox, and the thread writer.

`log()` puts an event in the outbox and returns; a writer (a thread here, or the feeder of the
writer process) takes it from there. flush and close requests queue behind the events before them.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from attnlog.writer.events import Event, EventWriter

__all__ = ["Marker", "Outbox", "ThreadWriter", "Writer"]

Report = Callable[[str, str], None]


@dataclass
class Marker:
    """flush or close, queued behind the events before it; `done` is set once they are written."""

    kind: str
    done: threading.Event = field(default_factory=threading.Event)


class Outbox:
    """Events waiting for the writer. Full: the oldest waiting event is dropped (never a marker)."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: deque[Event | Marker] = deque()
        self._cond = threading.Condition()

    def put(self, item: Event | Marker) -> Event | None:
        """Queue `item`; returns the event dropped to make room, if any."""
        dropped = None
        with self._cond:
            if isinstance(item, Event):
                events = [i for i in self._items if isinstance(i, Event)]
                if len(events) >= self.maxsize:
                    dropped = events[0]
                    self._items.remove(dropped)
            self._items.append(item)
            self._cond.notify()
        return dropped

    def get(self) -> Event | Marker:
        with self._cond:
            while not self._items:
                self._cond.wait()
            return self._items.popleft()

    def steps(self) -> list[int]:
        with self._cond:
            return [i.step for i in self._items if isinstance(i, Event)]


class Writer:
    """What the logger needs from either writer: submit, flush, close, and what is unwritten."""

    def __init__(self, queue_size: int, stats: Counter[str], report: Report) -> None:
        self.stats = stats
        self.report = report
        self._outbox = Outbox(queue_size)
        self._closed = False
        self.progress = 0  # events and requests done so far: close() waits while it grows

    def submit(self, event: Event) -> Event | None:
        """Queue an event (never blocks); returns the event dropped to make room, if any."""
        self._ensure_started()
        return self._outbox.put(event)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far is written and the sinks flushed.

        False when `timeout` (seconds) ran out first. No thread is left behind waiting: the
        flush request stays in the queue and is done when the writer gets to it.
        """
        if not self._started():
            return True
        marker = Marker("flush")
        self._outbox.put(marker)
        return marker.done.wait(timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Write what is queued and close the sinks; False when the writer stalled.

        It waits while events keep being written, and gives up after `timeout` seconds in
        which none was (a hung sink), so a slow but working writer on a busy machine finishes.
        Then the writer is abandoned (a process is killed) and the steps left unwritten are
        reported.
        """
        if self._closed:
            return True
        self._closed = True
        if not self._started() and not self._needs_close():
            return True
        self._ensure_started()
        marker = Marker("close")
        self._outbox.put(marker)
        seen = self.progress
        while not marker.done.wait(timeout):
            if timeout is not None and self.progress == seen:
                break
            seen = self.progress  # a busy machine slows the writer: wait while it moves
        else:
            return True
        left = self.unwritten()
        self._abandon()
        self.report(
            "close",
            f"closing did not finish: nothing was written for {timeout:g} s (a sink hangs?); "
            f"left unwritten: steps {left}",
        )
        return False

    def unwritten(self) -> list[int]:
        """Steps handed over and not written yet."""
        return self._outbox.steps()

    def take_failure(self) -> BaseException | None:
        """strict mode: the writer's first error since the last call."""
        return None

    def _started(self) -> bool:
        raise NotImplementedError

    def _ensure_started(self) -> None:
        raise NotImplementedError

    def _needs_close(self) -> bool:
        """Whether close() before any event still has sinks to close."""
        return False

    def _abandon(self) -> None:
        """close() timed out: stop waiting for the writer."""


class ThreadWriter(Writer):
    """An `EventWriter` on a background thread of the training process (at nice +10 on Linux).

    Its sinks are built by the caller, in the training process, so `Sink` objects work as they
    are; the cost is the GIL the thread holds while it renders and writes.
    """

    def __init__(
        self, writer: EventWriter, queue_size: int, stats: Counter[str], report: Report
    ) -> None:
        super().__init__(queue_size, stats, report)
        self.writer = writer
        self._thread: threading.Thread | None = None
        self._current: int | None = None  # the step being written

    def _started(self) -> bool:
        return self._thread is not None

    def _ensure_started(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="attnlog-worker", daemon=True)
            self._thread.start()

    def _needs_close(self) -> bool:
        return bool(self.writer.sinks)

    def unwritten(self) -> list[int]:
        current = [] if self._current is None else [self._current]
        return current + self._outbox.steps()

    def take_failure(self) -> BaseException | None:
        return self.writer.take_failure()

    def _work(self) -> None:
        _lower_thread_priority()
        writer = self.writer
        while True:
            item = self._outbox.get()
            if isinstance(item, Event):
                self._current = item.step
                writer.contained("writer", writer.write, item)
                self._current = None
                self.progress += 1
                continue
            writer.contained("writer", writer.close if item.kind == "close" else writer.flush)
            item.done.set()
            if item.kind == "close":
                return


def _lower_thread_priority() -> None:
    """Linux nice values are per thread: +10 for the calling thread only."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not allowed
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)

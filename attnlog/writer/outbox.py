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
from typing import Any

from attnlog.writer.contain import cause
from attnlog.writer.events import Event, EventWriter
from attnlog.writer.spill import Spill, Spilled

__all__ = ["Marker", "Outbox", "ThreadWriter", "Writer"]

Report = Callable[[str, str], None]


@dataclass
class Marker:
    """flush or close, queued behind the events before it; `done` is set once they are written."""

    kind: str
    done: threading.Event = field(default_factory=threading.Event)


class Outbox:
    """Events waiting for the writer, in order: up to `maxsize` in memory, the newer ones on disk.

    `put` never blocks and never writes: a background thread moves the newest in-memory events
    to `spill` while more than `maxsize` wait, and `get` reads them back in turn. An event that
    cannot be spilled (past the disk bound, or an unwritable folder) is dropped and passed to
    `on_dropped(step, why)`.
    """

    def __init__(self, maxsize: int, spill: Spill, on_dropped: Callable[[int, str], None]) -> None:
        self.maxsize = maxsize
        self.spill = spill
        self.on_dropped = on_dropped
        self._items: deque[Event | Marker | Spilled] = deque()
        self._memory = 0  # events held in memory
        self._cond = threading.Condition()
        self._spiller: threading.Thread | None = None
        self._closed = False

    def close(self) -> None:
        """The writer is done: the spilling thread ends."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def put(self, item: Event | Marker) -> None:
        with self._cond:
            self._items.append(item)
            if isinstance(item, Event):
                self._memory += 1
                if self._memory > self.maxsize and self._spiller is None:
                    self._spiller = threading.Thread(
                        target=self._spill_forever, name="attnlog-spill", daemon=True
                    )
                    self._spiller.start()
            self._cond.notify_all()

    def get(self) -> Event | Marker:
        """The oldest item (an event read back from disk when it waited there)."""
        while True:
            with self._cond:
                while not self._items:
                    self._cond.wait()
                item = self._items.popleft()
                if isinstance(item, Event):
                    self._memory -= 1
            if not isinstance(item, Spilled):
                return item
            try:
                return self.spill.read(item)
            except Exception as ex:  # a damaged or removed file: that event is gone
                self.on_dropped(item.step, f"reading it back from {item.path} failed: {cause(ex)}")

    def steps(self) -> list[int]:
        with self._cond:
            return [i.step for i in self._items if not isinstance(i, Marker)]

    def _spill_forever(self) -> None:
        while True:
            with self._cond:
                while self._memory <= self.maxsize and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                event = next(i for i in reversed(self._items) if isinstance(i, Event))
            try:
                spilled, why = self.spill.write(event), "the outbox on disk is full"
            except Exception as ex:
                spilled, why = None, f"writing it to {self.spill.folder} failed: {cause(ex)}"
            with self._cond:  # dropped under the lock: counted before a later flush is done
                index = next((n for n, i in enumerate(self._items) if i is event), None)
                if index is not None:
                    self._memory -= 1
                    if spilled is None:
                        del self._items[index]
                        self.on_dropped(event.step, why)
                    else:
                        self._items[index] = spilled
            if index is None and spilled is not None:  # taken meanwhile: sent from memory
                self.spill.discard(spilled)


class Writer:
    """What the logger needs from either writer: submit, flush, close, and what is unwritten.

    Every event handed over is written, or counted in `stats["lost"]` with its step in
    `missing` (`stats["dropped"]` too when the outbox on disk was full).
    """

    def __init__(self, queue_size: int, spill: Spill, stats: Counter[str], report: Report) -> None:
        self.stats = stats
        self.report = report
        self.missing: list[int] = []  # steps handed over and never written
        self._outbox = Outbox(queue_size, spill, self._dropped)
        self._closed = False
        self._abandoned = False  # close() gave up: what is left was counted lost there
        self.progress = 0  # events and requests done so far: close() waits while it grows

    def submit(self, event: Event) -> None:
        """Queue an event; never blocks, never writes."""
        self._ensure_started()
        self._outbox.put(event)

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
        Then the writer is abandoned (a process is killed), and the steps left unwritten are
        counted lost and reported.
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
            self._outbox.close()
            self._outbox.spill.remove()
            return True
        self._outbox.close()
        left = self.unwritten()
        self._abandoned = True
        self._abandon()
        for step in left:
            self.lose(step)
        self.report(
            "close",
            f"closing did not finish: nothing was written for {timeout:g} s (a sink hangs?); "
            f"left unwritten: steps {left}",
        )
        return False

    def lose(self, step: int) -> None:
        """Count an event handed over and never written."""
        self.stats["lost"] += 1
        self.missing.append(step)

    def _dropped(self, step: int, why: str) -> None:
        self.stats["dropped"] += 1
        self.lose(step)
        self.report(
            "dropped",
            f"dropped the event of step {step}: {why} (the writer fell behind; raise spill_mb, "
            "or log less often or with fewer views)",
        )

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
        self,
        writer: EventWriter,
        queue_size: int,
        spill: Spill,
        stats: Counter[str],
        report: Report,
    ) -> None:
        super().__init__(queue_size, spill, stats, report)
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
                _on_own_thread(writer.contained, "writer", writer.write, item)
                self._current = None
                self.progress += 1
                continue
            writer.contained("writer", writer.close if item.kind == "close" else writer.flush)
            item.done.set()
            if item.kind == "close":
                return


def _on_own_thread(function: Callable[..., Any], *args: Any) -> None:
    """Run `function` on a thread that ends with it, at the calling thread's nice value.

    Torch's OpenMP runtime (libgomp) keeps a team of threads for each thread that ran a
    parallel op. While a second team exists it stops spinning between parallel regions, and
    every CPU training step ran about 23 % slower for as long as the thread writer lived
    (MiniLM, 2 cores). A team goes with the thread that made it.
    """
    thread = threading.Thread(target=function, args=args, name="attnlog-event", daemon=True)
    thread.start()
    thread.join()


def _lower_thread_priority() -> None:
    """Linux nice values are per thread: +10 for the calling thread only."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not allowed
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)

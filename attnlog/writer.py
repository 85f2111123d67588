"""The writer: renders logging events and writes them to the sinks, away from the training loop.

The training process only measures (probe pass, scores on the device, one device→host copy) and
hands an `Event` to one of two writers, which do the rest with the same `EventWriter`:

- `ProcessWriter` (the default): a child process, `python -m attnlog.writer`. Rendering, PNG
  encoding, protobufs, JSON and tracking clients hold the GIL for about a second per event; in
  another process they cannot slow a training loop that is mostly Python launching kernels.
  It is started with `subprocess`, not `multiprocessing`: fork after CUDA initialisation is
  unsafe, and spawn re-imports the user's `__main__`, which re-runs a training script that has
  no `if __name__ == "__main__"` guard. It starts in the background at the first event.
- `ThreadWriter`: a thread of the training process, for `Sink` objects that cannot be rebuilt in
  another process, or when the user asks for it (`writer="thread"`).

Transport: length-prefixed pickle frames (protocol 5, numpy arrays as out-of-band buffers, so
an event is never copied into one big bytes object) on the child's stdin; acknowledgements come
back the same way on its stdout (the child moves its own prints to stderr). Pipes rather than a
socket: nothing to bind, no port, no authentication key, and the child sees end-of-file when
the training process dies, even by SIGKILL, so it writes what it holds, closes the sinks and
exits instead of lingering.

Failures: a writer process that dies is restarted (at most `MAX_RESTARTS` times; the cause is
reported once) and the events it had not acknowledged are sent again; an event sent twice and
still not written, and every event after the last restart failed, is counted in
`stats["lost"]`. `flush(timeout)` and `close(timeout)` never wait longer than asked and say
which steps were left unwritten.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

log = logging.getLogger("attnlog")

__all__ = ["Event", "EventWriter", "ProcessWriter", "ThreadWriter", "WriterConfig"]

MAX_RESTARTS = 3  # a writer that keeps dying is given up on, not restarted forever
MAX_ATTEMPTS = 2  # an event is sent at most twice: one that kills every writer is counted lost


@dataclass
class Event:
    """One logging event, as the training process hands it over.

    `snapshot` is a host `Snapshot` (numpy); `table` the `ScoreTable` scored on the device, or
    None when the writer should score (a model on the CPU: the training process pays only the
    forward).
    """

    step: int
    snapshot: Any
    table: Any = None


@dataclass
class WriterConfig:
    """What a writer needs to build its sinks and render, sent to the child as its first frame.

    `sinks` are `(name, options)` pairs built with `sink_factory(name)(logdir=..., **options)`;
    `factories` holds user-registered factories (pickled by reference, so their module must be
    importable in the child); `sys_path` lets the child import them.
    """

    sinks: list[tuple[str, dict[str, Any]]]
    logdir: str
    patterns: list[str] | None = None
    views: tuple[str, ...] = ()
    layer_images: bool = False
    alerts: bool = True
    settings: dict[str, str] | None = None  # logged once, with the first event
    strict: bool = False
    factories: bytes = b""  # pickled {name: factory}, loaded once `sys_path` is in place
    sys_path: list[str] = field(default_factory=list)


# ---- the work: render and write one event ---------------------------------------------------


class EventWriter:
    """Scores (when the training process did not), raises alerts, renders, writes to sinks.

    Every failure is contained: counted in `stats["errors.<stage or sink>"]` and passed once per
    key to `report(key, message)`; with `strict` the first error is kept in `failure` instead.
    """

    def __init__(
        self,
        sinks: Sequence[Any],
        config: WriterConfig,
        *,
        report: Callable[[str, str], None],
        stats: Counter | None = None,
    ) -> None:
        self.sinks = list(sinks)
        self.config = config
        self.report = report
        self.stats: Counter[str] = Counter() if stats is None else stats
        self.failure: BaseException | None = None
        self._alerts = None
        if config.alerts:
            from attnlog.alerts import AlertTracker

            self._alerts = AlertTracker()
        self._settings = config.settings

    @classmethod
    def from_config(cls, config: WriterConfig, **kwargs: Any) -> EventWriter:
        """Build the named sinks; one that cannot be built is reported and left out."""
        from attnlog.sinks.base import SINKS

        writer = cls([], config, **kwargs)
        if config.factories:
            SINKS.update(writer.contained("registry", pickle.loads, config.factories) or {})
        for name, options in config.sinks:
            sink = writer.contained(name, _build, name, options, config.logdir)
            if sink is not None:
                writer.sinks.append(sink)
        return writer

    def write(self, event: Event) -> None:
        from attnlog.render.event import event_views, pattern_images, probe_images

        step, snapshot = event.step, event.snapshot
        table = event.table
        if table is None:  # probes kept whole: scored here, off the training process
            table = self.contained("score", _score, snapshot, self.config.patterns, step)
            if table is None:
                return
        if self._alerts is not None:
            table.alerts = self.contained("alerts", self._alerts.update, table) or []
        if self._settings:
            settings, self._settings = self._settings, None
            self.to_sinks("log_settings", settings)
        self.to_sinks("log_scores", table, step)
        words = any(view.endswith("_words") for view in self.config.views)
        for probe in snapshot.probes:  # one probe's images in memory at a time
            layers = self.config.layer_images
            images = self.contained("render", probe_images, probe, step, layers=layers, words=words)
            if images:
                self.to_sinks("log_images", images, step)
        files = self.contained("render", event_views, snapshot, step, self.config.views)
        if files:  # one page per event, every probe and view
            self.to_sinks("log_html", files, step)
        images = self.contained("render", pattern_images, table, step)
        if images:
            self.to_sinks("log_images", images, step)
        self.to_sinks("log_archive", snapshot, table, step)

    def flush(self) -> None:
        self.to_sinks("flush")

    def close(self) -> None:
        self.to_sinks("flush")
        self.to_sinks("close")

    def to_sinks(self, method: str, *args: Any) -> None:
        for sink in self.sinks:
            self.contained(sink.name, getattr(sink, method), *args, method=method)

    def contained(self, what: str, fn: Callable, *args: Any, method: str | None = None, **kw):
        """Run fn; on error count it in `stats["errors.<what>"]` and report the first per `what`.

        `what` is a stage ("render", "score") or a sink name: a broken sink is reported once,
        not once per method, and is tried again at the next event (a full disk may clear).
        """
        try:
            return fn(*args, **kw)
        except Exception as ex:
            self.stats[f"errors.{what}"] += 1
            if self.config.strict:
                self.failure = self.failure or ex
                return None
            doing = f"{what}.{method}" if method else what
            self.report(what, f"{doing} failed: {cause(ex)}")
            return None


def _build(name: str, options: Mapping[str, Any], logdir: str) -> Any:
    from attnlog.sinks.base import sink_factory

    return sink_factory(name)(**{"logdir": logdir, **options})


def _score(snapshot: Any, patterns: Sequence[str] | None, step: int) -> Any:
    import numpy as np

    from attnlog.patterns import score

    return score(snapshot.to_host(np.float32), patterns, step=step)  # the host copy is fp16


def cause(ex: BaseException) -> str:
    return f"{type(ex).__name__}: {ex}"


# ---- the training process's side: a bounded outbox -----------------------------------------


@dataclass
class _Marker:
    """flush or close, queued behind the events before it; `done` is set once they are written."""

    kind: str
    done: threading.Event = field(default_factory=threading.Event)


class _Outbox:
    """Events waiting for the writer. Full: the oldest waiting event is dropped (never a marker)."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: deque = deque()
        self._cond = threading.Condition()

    def put(self, item: Any) -> Event | None:
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

    def get(self) -> Any:
        with self._cond:
            while not self._items:
                self._cond.wait()
            return self._items.popleft()

    def steps(self) -> list[int]:
        with self._cond:
            return [i.step for i in self._items if isinstance(i, Event)]


class _Writer:
    """What the logger needs from either writer: submit, flush, close, and what is unwritten."""

    def __init__(self, queue_size: int, stats: Counter, report: Callable[[str, str], None]):
        self.stats = stats
        self.report = report
        self._outbox = _Outbox(queue_size)
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
        marker = _Marker("flush")
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
        marker = _Marker("close")
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


class ThreadWriter(_Writer):
    """An `EventWriter` on a background thread of the training process (at nice +10 on Linux).

    Its sinks are built by the caller, in the training process, so `Sink` objects work as they
    are; the cost is the GIL the thread holds while it renders and writes.
    """

    def __init__(self, writer: EventWriter, queue_size: int, stats: Counter, report) -> None:
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
        failure, self.writer.failure = self.writer.failure, None
        return failure

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


class ProcessWriter(_Writer):
    """An `EventWriter` in a child process, `python -m attnlog.writer`, fed by a thread here.

    The feeder thread pickles and writes frames; a reader thread per child takes the
    acknowledgements (with the child's counts and reports) and restarts a child that died.
    Lock order: `_pipe` (writing to the child, replacing it) before `_books` (the pending map).
    """

    def __init__(self, config: WriterConfig, queue_size: int, stats: Counter, report) -> None:
        super().__init__(queue_size, stats, report)
        self.config = config
        self._feeder: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None
        self._pipe = threading.Lock()
        self._books = threading.Lock()
        self._pending: OrderedDict[int, _Sent] = OrderedDict()  # sent, not acknowledged
        self._seq = 0
        self._restarts = 0
        self._gave_up = False
        self._acked_any = False
        self._failure: BaseException | None = None  # strict: the child's first error

    @property
    def pid(self) -> int | None:
        """The writer process's id (None before the first event)."""
        proc = self._proc
        return None if proc is None else proc.pid

    def _started(self) -> bool:
        return self._feeder is not None

    def _ensure_started(self) -> None:
        if self._feeder is None:  # the child starts on the feeder thread: Popen costs ms
            self._feeder = threading.Thread(target=self._feed, name="attnlog-feeder", daemon=True)
            self._feeder.start()

    def unwritten(self) -> list[int]:
        with self._books:
            sent = [s.step for s in self._pending.values() if s.step is not None]
        return sent + self._outbox.steps()

    def take_failure(self) -> BaseException | None:
        failure, self._failure = self._failure, None
        return failure

    # -- feeder thread -------------------------------------------------------------------------

    def _feed(self) -> None:
        with self._pipe:
            self._spawn()
        while True:
            item = self._outbox.get()
            with self._pipe:
                self._seq += 1
                if isinstance(item, Event):
                    sent = _Sent(item.step, encode(("event", self._seq, item)))
                else:
                    sent = _Sent(None, encode((item.kind, self._seq)), item)
                if self._gave_up:
                    self._lose(sent)
                else:
                    with self._books:
                        self._pending[self._seq] = sent
                    self._send(sent)
            if isinstance(item, _Marker) and item.kind == "close":
                return

    def _send(self, sent: _Sent) -> None:
        """Write one frame (`_pipe` held). A dead child is noticed by its reader, which resends."""
        sent.attempts += 1
        _write_frame(self._proc.stdin, sent.frame)

    def _spawn(self) -> None:
        """Start a child and send it the configuration (`_pipe` held); give up if it cannot be."""
        try:
            self._start_child()
        except Exception as ex:  # no executable, no file descriptors, no memory: say so once
            self._gave_up = True
            self._lose_pending(lambda sent: True)
            self.report("writer.start", f"starting the writer process failed: {cause(ex)}; "
                        "events are counted in stats['lost'] (writer='thread' avoids it)")  # fmt: skip

    def _start_child(self) -> None:
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        env.setdefault("OMP_NUM_THREADS", "1")  # the writer must not compete for the cores
        proc = subprocess.Popen(
            [sys.executable, "-m", "attnlog.writer"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self._proc = proc
        config = self.config
        if self._acked_any and config.settings:  # an earlier child logged them already
            config = WriterConfig(**{**config.__dict__, "settings": None})
        _write_frame(proc.stdin, encode(("config", config)))
        threading.Thread(
            target=self._read, args=(proc,), name="attnlog-writer-acks", daemon=True
        ).start()

    # -- reader thread -------------------------------------------------------------------------

    def _read(self, proc: subprocess.Popen) -> None:
        try:
            while True:
                message = receive(proc.stdout)
                if message is None:
                    break
                self._acknowledged(*message)
        except Exception as ex:  # a torn frame: the child died mid-write
            log.debug("attnlog: reading the writer's acknowledgements failed: %s", cause(ex))
        finally:
            self._child_gone(proc)

    def _acknowledged(self, seq: int, stats: dict, reports: list, failure: str | None) -> None:
        self.stats.update(stats)
        for key, message in reports:
            self.report(key, message)
        if failure and self._failure is None:
            self._failure = RuntimeError(f"attnlog writer: {failure}")
        with self._books:
            sent = self._pending.pop(seq, None)
            self._acked_any = True
        self.progress += 1
        if sent is not None and sent.marker is not None:
            sent.marker.done.set()

    def _child_gone(self, proc: subprocess.Popen) -> None:
        """A child exited: after close that is the end; otherwise restart it and resend."""
        code = proc.wait()
        with self._pipe:
            if proc is not self._proc or self._gave_up:
                return
            with self._books:
                pending = list(self._pending.items())
            if not pending and (self._closed or code == 0):
                return
            self.stats["writer_restarts"] += 1
            self._restarts += 1
            how = _describe_exit(code)
            if self._restarts > MAX_RESTARTS:
                self._gave_up = True
                self._lose_pending(lambda sent: True)
                self.report(
                    "writer.gone",
                    f"the writer process {how}, {self._restarts} times; gave up on it: the "
                    "events it held and every later event are counted in stats['lost']",
                )
                return
            self.report(
                "writer.restart",
                f"the writer process {how}; restarted it and resent the events it held",
            )
            self._lose_pending(lambda sent: sent.attempts >= MAX_ATTEMPTS)
            self._spawn()
            with self._books:
                resend = list(self._pending.values())
            for sent in resend:
                self._send(sent)

    def _lose_pending(self, which: Callable[[_Sent], bool]) -> None:
        with self._books:
            lost = [seq for seq, sent in self._pending.items() if which(sent)]
            for seq in lost:
                self._lose(self._pending.pop(seq))

    def _lose(self, sent: _Sent) -> None:
        if sent.step is not None:
            self.stats["lost"] += 1
        if sent.marker is not None:
            sent.marker.done.set()

    def _abandon(self) -> None:
        """close() timed out: stop the child (it may hang in a sink forever), restart nothing."""
        self._gave_up = True
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    def close(self, timeout: float | None = None) -> bool:
        done = super().close(timeout)
        proc = self._proc
        if proc is not None:
            with contextlib.suppress(OSError, ValueError):
                proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        return done


def _write_frame(stream: IO[bytes], frame: list) -> None:
    try:
        for part in frame:
            stream.write(part)
        stream.flush()
    except (OSError, ValueError):  # a broken pipe, or closed after a kill: the reader resends
        pass


@dataclass
class _Sent:
    step: int | None  # None for a marker
    frame: list
    marker: _Marker | None = None
    attempts: int = 0


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _lower_thread_priority() -> None:
    """Linux nice values are per thread: +10 for the calling thread only."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not allowed
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


# ---- frames ------------------------------------------------------------------------------------

_HEADER = struct.Struct("!QI")  # pickle length, number of out-of-band buffers
_LENGTH = struct.Struct("!Q")


def encode(obj: Any) -> list:
    """One frame: header, buffer lengths, the pickle, then each buffer (numpy data, not copied)."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    head = _HEADER.pack(len(data), len(raws)) + b"".join(_LENGTH.pack(r.nbytes) for r in raws)
    return [head, data, *raws]


def receive(stream: IO[bytes]) -> Any:
    """Read one frame from `stream`; None at a clean end of file."""
    head = _read_exact(stream, _HEADER.size, eof_ok=True)
    if head is None:
        return None
    size, count = _HEADER.unpack(head)
    lengths = [_LENGTH.unpack(_read_exact(stream, _LENGTH.size))[0] for _ in range(count)]
    data = _read_exact(stream, size)
    buffers = [_read_exact(stream, n) for n in lengths]
    return pickle.loads(data, buffers=buffers)


def _read_exact(stream: IO[bytes], size: int, eof_ok: bool = False) -> bytearray | None:
    out = bytearray(size)
    view = memoryview(out)
    got = 0
    while got < size:
        n = stream.readinto(view[got:])
        if not n:
            if eof_ok and got == 0:
                return None
            raise EOFError(f"frame cut short after {got} of {size} bytes")
        got += n
    return out


# ---- the child process -----------------------------------------------------------------------


def main() -> int:
    """`python -m attnlog.writer`: frames in on stdin, acknowledgements out on stdout."""
    acks = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # prints of sinks and libraries go to stderr, never into the frames
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops training; we finish writing
    with contextlib.suppress(AttributeError, OSError):
        os.nice(10)
    frames = os.fdopen(0, "rb")
    first = receive(frames)
    if first is None:
        return 0
    _, config = first
    sys.path.extend(p for p in config.sys_path if p not in sys.path)
    _one_thread()
    reports: list[tuple[str, str]] = []
    reported: set[str] = set()

    def report(key: str, message: str) -> None:
        if key not in reported:
            reported.add(key)
            reports.append((key, message))

    writer = EventWriter.from_config(config, report=report)
    sent_stats: Counter[str] = Counter()
    cpu_before = time.process_time()
    while True:
        try:
            message = receive(frames)
        except EOFError:  # the training process died mid-frame
            message = None
        if message is None:  # the training process is gone: write what we have, then stop
            writer.close()
            return 0
        kind, seq, *rest = message
        if kind == "event":
            writer.write(rest[0])
        elif kind == "flush":
            writer.flush()
        else:
            writer.close()
        cpu = time.process_time()
        writer.stats["writer_cpu_ms"] += round((cpu - cpu_before) * 1000)
        cpu_before = cpu
        delta = writer.stats - sent_stats
        sent_stats = Counter(writer.stats)
        failure, writer.failure = writer.failure, None
        _write_frame(acks, encode((seq, dict(delta), reports[:], failure and cause(failure))))
        reports.clear()
        if kind == "close":
            return 0


def _one_thread() -> None:
    """Scoring and rendering on one core: the training process keeps the others."""
    with contextlib.suppress(Exception):
        import torch

        torch.set_num_threads(1)


if __name__ == "__main__":
    sys.exit(main())

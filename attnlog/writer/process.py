"""The process writer: an `EventWriter` in a child process, fed frames over pipes.

The child is `python -m attnlog.writer`, started with `subprocess`, not `multiprocessing`: fork
after CUDA initialisation is unsafe, and spawn re-imports the user's `__main__`, which re-runs a
training script that has no `if __name__ == "__main__"` guard. It starts in the background at the
first event.

Transport: frames (`attnlog.writer.frames`) on the child's stdin; acknowledgements come back the
same way on its stdout (the child moves its own prints to stderr). Pipes rather than a socket:
nothing to bind, no port, no authentication key, and the child sees end-of-file when the training
process dies, even by SIGKILL, so it writes what it holds, closes the sinks and exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from attnlog.writer.contain import cause
from attnlog.writer.events import Event, WriterConfig
from attnlog.writer.frames import Frame, encode, receive, write_frame
from attnlog.writer.outbox import Marker, Report, Writer
from attnlog.writer.spill import Spill

__all__ = ["MAX_KILLS", "MAX_RESTARTS", "ProcessWriter", "prestart"]

log = logging.getLogger("attnlog")

MAX_RESTARTS = 3  # deaths in a row, with no event written between them: then it is given up on
MAX_KILLS = 2  # an event being written when the writer died twice is set aside, not resent

# `python -m attnlog.writer` would put the working folder first on sys.path, where a user's
# `secrets.py` shadows the standard library. `-c` puts "" there, removed before any import
# (`-P` does that too, but only from Python 3.11); the training process's sys.path follows at
# the end, once the configuration arrives, so the writer imports what training imports.
_BOOT = (
    "import sys; sys.path[:1] = [p for p in sys.path[:1] if p]; "
    "from attnlog.writer.child import main; sys.exit(main())"
)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")  # the writer must not compete for the cores
    return env


def _spawn_child() -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", _BOOT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        env=_child_env(),
    )  # fmt: skip


# One spare writer process, started early by `prestart` (the Trainer callback does when the
# Trainer is built): it imports what the sinks need while the Trainer sets up, and the first
# writer takes it. On 2 busy cores its start-up (torch, MLflow: 3-5 s of CPU) was the largest
# part of a short run's cost. Unused, it exits when this process does (its stdin closes).
SPARE_IDLE_S = 600.0  # a spare not taken by then stops
_spare: subprocess.Popen[bytes] | None = None
_spare_stderr: tuple[int, int] | None = None  # the stderr it inherited
_spare_lock = threading.Lock()

# What the writer imports for each sink, besides scoring and rendering.
_WARM_MODULES = {
    "tensorboard": ["attnlog.sinks.tensorboard", "torch.utils.tensorboard"],
    "mlflow": ["attnlog.sinks.mlflow", "attnlog.render.mlflow_cards", "mlflow.tracking"],
}
_DATABASES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow's database stores
_WARM_ALWAYS = ["torch", "attnlog.patterns", "attnlog.render.event", "attnlog.sinks.archive"]


def prestart(sinks: list[str]) -> None:
    """Start the spare writer process now, importing what `sinks` (names) will need. Safe to call
    again: one spare at a time. Any failure is left for the first event to meet and report."""
    global _spare, _spare_stderr
    modules = [*_WARM_ALWAYS, *(m for name in sinks for m in _WARM_MODULES.get(name, []))]
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if "mlflow" in sinks and uri.split(":", 1)[0].split("+", 1)[0] in _DATABASES:
        modules.append("mlflow.store.tracking.sqlalchemy_store")  # a second of CPU by itself
    with _spare_lock:
        if _spare is not None and _spare.poll() is None:
            return
        try:
            proc = _spawn_child()
            write_frame(proc.stdin, encode(("warm", modules)))
        except Exception as ex:
            log.debug("attnlog: could not start a spare writer process: %s", cause(ex))
            return
        _spare, _spare_stderr = proc, _stderr_file()
    retire = threading.Timer(SPARE_IDLE_S, _retire, args=(proc,))
    retire.daemon = True
    retire.start()


def _retire(proc: subprocess.Popen[bytes]) -> None:
    """A spare nobody took (a Trainer built and never trained) stops, not to idle on ~0.5 GiB."""
    global _spare, _spare_stderr
    with _spare_lock:
        if _spare is not proc:
            return  # taken, or replaced
        _spare, _spare_stderr = None, None
    _stop(proc)


def _take_spare() -> subprocess.Popen[bytes] | None:
    """The spare, unless it died or this process's stderr now goes elsewhere (the spare would
    write its messages to the old one): then it is stopped and a new child is started."""
    global _spare, _spare_stderr
    with _spare_lock:
        proc, _spare = _spare, None
        stderr, _spare_stderr = _spare_stderr, None
    if proc is None or proc.poll() is not None:
        return None  # none, or it died (or was killed) while waiting
    if stderr != _stderr_file():
        _stop(proc)
        return None
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a spare: it sees end-of-file where its configuration would come, and exits."""
    with contextlib.suppress(OSError):
        proc.stdin.close()


def _stderr_file() -> tuple[int, int] | None:
    """What file descriptor 2 is now (device, inode), as a child would inherit it."""
    try:
        info = os.fstat(2)
    except OSError:
        return None
    return info.st_dev, info.st_ino


@dataclass
class _Sent:
    step: int | None  # None for a marker
    frame: Frame
    event: Event | None = None
    marker: Marker | None = None
    kills: int = 0  # writers that died while this was the oldest unacknowledged frame


class ProcessWriter(Writer):
    """An `EventWriter` in a child process, `python -m attnlog.writer`, fed by a thread here.

    The feeder thread pickles and writes frames; a reader thread per child takes the
    acknowledgements (with the child's counts and reports) and restarts a child that died.
    Lock order: `_pipe` (writing to the child, replacing it) before `_books` (the pending map).
    """

    def __init__(
        self,
        config: WriterConfig,
        queue_size: int,
        spill: Spill,
        stats: Counter[str],
        report: Report,
    ) -> None:
        super().__init__(queue_size, spill, stats, report)
        self.config = config
        self._feeder: threading.Thread | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._pipe = threading.Lock()
        self._books = threading.Lock()
        self._pending: OrderedDict[int, _Sent] = OrderedDict()  # sent, not acknowledged
        self._seq = 0
        self._restarts = 0  # in a row: reset by every acknowledgement
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
                    sent = _Sent(item.step, encode(("event", self._seq, item)), event=item)
                else:
                    sent = _Sent(None, encode((item.kind, self._seq)), marker=item)
                if self._gave_up:
                    self._lose(sent)
                else:
                    with self._books:
                        self._pending[self._seq] = sent
                    self._send(sent)
            if isinstance(item, Marker) and item.kind == "close":
                return

    def _send(self, sent: _Sent) -> None:
        """Write one frame (`_pipe` held). A dead child is noticed by its reader, which resends."""
        write_frame(self._proc.stdin, sent.frame)

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
        spare = _take_spare()
        proc = spare or _spawn_child()
        self._proc = proc
        config = self.config
        if self._acked_any and config.settings:  # an earlier child logged them already
            config = WriterConfig(**{**config.__dict__, "settings": None})
        if spare is not None:  # started earlier: it gets this process's environment as of now
            config = WriterConfig(**{**config.__dict__, "environ": _child_env()})
        write_frame(proc.stdin, encode(("config", config)))
        threading.Thread(
            target=self._read, args=(proc,), name="attnlog-writer-acks", daemon=True
        ).start()

    # -- reader thread -------------------------------------------------------------------------

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            while True:
                message = receive(proc.stdout)
                if message is None:
                    break
                if message[0] == "resume":
                    self._resume(message[1])
                else:
                    self._acknowledged(*message[1:])
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
            self._restarts = 0
        self.progress += 1
        if sent is not None and sent.marker is not None:
            sent.marker.done.set()

    def _child_gone(self, proc: subprocess.Popen[bytes]) -> None:
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
                    f"the writer process {how}, {self._restarts} times in a row; gave up on it: "
                    "the events it held and every later event are counted in stats['lost']",
                )
                return
            self.report(
                "writer.restart",
                f"the writer process {how}; restarted it and resent the events it held",
            )
            if pending:
                self._blame(pending[0][0], how)
            self._spawn()
            with self._books:
                resend = list(self._pending.values())
            for sent in resend:
                self._send(sent)

    def _blame(self, seq: int, how: str) -> None:
        """The oldest unacknowledged frame was being written when the writer died: the second
        time, its event is set aside (to a file, named in the warning) instead of resent."""
        with self._books:
            sent = self._pending[seq]
            sent.kills += 1
            if sent.kills < MAX_KILLS:
                return
            del self._pending[seq]
        self._lose(sent)
        if sent.event is None:
            return
        try:
            where = f"set aside in {self._outbox.spill.set_aside(sent.event)}"
        except Exception as ex:
            where = f"could not be set aside ({cause(ex)})"
        self.stats["set_aside"] += 1
        self.report(
            f"writer.kill.{sent.step}",
            f"the writer process {how} twice while writing the event of step {sent.step}; "
            f"that event is {where}, counted in stats['lost'], and the run goes on",
        )

    def _resume(self, options: dict[str, dict]) -> None:
        """What a restarted writer needs to go on where this one is (the MLflow run it made)."""
        with self._books:
            self.config.sinks = [
                (name, {**opts, **options.get(name, {})}) for name, opts in self.config.sinks
            ]

    def _lose_pending(self, which: Callable[[_Sent], bool]) -> None:
        with self._books:
            lost = [seq for seq, sent in self._pending.items() if which(sent)]
            for seq in lost:
                self._lose(self._pending.pop(seq))

    def _lose(self, sent: _Sent) -> None:
        if sent.step is not None and not self._abandoned:
            self.lose(sent.step)
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


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"

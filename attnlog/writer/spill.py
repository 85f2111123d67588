"""Events that wait on disk: the outbox's overflow, and events set aside.

When more events wait than the outbox keeps in memory, the newest are written here (under the
logdir) and read back in order when the writer gets to them, so a slow writer costs disk space,
not events. Past `max_bytes` an event is dropped (counted and named). An event that killed the
writer process twice is set aside in `set-aside/` beside the spool: the run goes on, and the
file keeps the event for whoever investigates.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from attnlog.writer.events import Event
from attnlog.writer.frames import Frame, encode, frame_size, receive

__all__ = ["DEFAULT_SPILL_MB", "Spill", "Spilled", "spill_root"]

DEFAULT_SPILL_MB = 1024.0


def spill_root(logdir: str | os.PathLike) -> Path:
    """`<logdir>/attnlog-outbox`: overflow per training process, and the set-aside events."""
    return Path(logdir) / "attnlog-outbox"


@dataclass
class Spilled:
    """An event of the outbox that waits on disk."""

    step: int
    path: Path
    size: int


class Spill:
    """One writer's overflow folder, `<root>/<pid>-<name>/`, created at the first spill."""

    def __init__(self, root: Path, max_bytes: int, name: str = "writer") -> None:
        self.root = root
        self.folder = root / f"{os.getpid()}-{name}"
        self.max_bytes = max_bytes
        self.bytes = 0
        self._names = itertools.count()

    def write(self, event: Event) -> Spilled | None:
        """Write `event` to disk; None when it does not fit under `max_bytes`.

        Raises:
            OSError: the folder cannot be written (the caller drops the event and says why).
        """
        frame = encode(event)
        size = frame_size(frame)
        if self.bytes + size > self.max_bytes:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{next(self._names):08d}-step_{event.step:08d}.frame"
        _write_file(path, frame)
        self.bytes += size
        return Spilled(event.step, path, size)

    def read(self, spilled: Spilled) -> Event:
        """The event back from disk; its file is removed (raises OSError, EOFError on damage)."""
        try:
            with open(spilled.path, "rb") as stream:
                return receive(stream)
        finally:
            self.discard(spilled)

    def discard(self, spilled: Spilled) -> None:
        self.bytes -= spilled.size
        with contextlib.suppress(OSError):
            spilled.path.unlink()

    def remove(self) -> None:
        """Remove the folder once nothing waits in it (and the root, when it is empty)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.root.rmdir()

    def set_aside(self, event: Event) -> Path:
        """Keep an event that kills the writer in `<root>/set-aside/`; returns its file
        (`attnlog.writer.frames.receive` reads it back)."""
        folder = self.root / "set-aside"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step_{event.step:08d}-{os.getpid()}-{next(self._names)}.frame"
        _write_file(path, encode(event))
        return path


def _write_file(path: Path, frame: Frame) -> None:
    partial = path.with_suffix(".partial")
    with open(partial, "wb") as stream:
        for part in frame:
            stream.write(part)
    os.replace(partial, path)

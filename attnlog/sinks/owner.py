"""One training per logdir: the training that logs to a logdir first owns its archive.

Two trainings pointed at one logdir would both write step 0, 10, ... into one archive, each
overwriting the other's step files, with neither noticing. So the logger claims the archive
when it is built (`claim`), and a second training is refused there, with a message naming the
first. The claim is `<logdir>/plugins/attnlog/training.lock`: the owner's pid, host and process
start time. It is given up at close (`release`), and it is stale once that process has died (or
its pid was reused), so a crashed run never blocks the next one.

Light on purpose (no numpy): the training process imports it when it builds the logger.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from attnlog.layout import plugin_dir

__all__ = ["OWNER", "LogdirInUseError", "check_owner", "claim", "release"]

OWNER = "training.lock"


class LogdirInUseError(RuntimeError):
    """Another training, still running, writes to this logdir's archive."""


def claim(logdir: str | os.PathLike) -> None:
    """Make this process the owner of the archive in `logdir` (again, if it already is).

    Raises:
        LogdirInUseError: another live process owns it.
    """
    folder = plugin_dir(logdir)
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder / OWNER) as fd:
        owner = _parse(os.pread(fd, 1 << 16, 0))
        if owner and owner.get("pid") != os.getpid() and _alive(owner):
            raise LogdirInUseError(_message(logdir, owner))
        data = json.dumps(_me()).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)


def release(logdir: str | os.PathLike) -> None:
    """Give up this process's claim (nothing when another process holds it, or none does)."""
    path = plugin_dir(logdir) / OWNER
    if not path.is_file():
        return
    with _locked(path) as fd:
        owner = _parse(os.pread(fd, 1 << 16, 0))
        if owner and owner.get("pid") == os.getpid():
            os.ftruncate(fd, 0)  # emptied, not removed: a process may wait on its lock


def check_owner(logdir: str | os.PathLike, allowed: Iterable[int]) -> None:
    """Raise when a live process other than `allowed` owns the archive (an archive sink passes
    its own pid and its parent's: the training a writer process serves).

    Raises:
        LogdirInUseError: naming the owner and the fix.
    """
    try:
        owner = _parse((plugin_dir(logdir) / OWNER).read_bytes())
    except OSError:
        return
    if owner and owner.get("pid") not in set(allowed) and _alive(owner):
        raise LogdirInUseError(_message(logdir, owner))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[int]:
    """The file, open and exclusively locked (fcntl.flock; without it, on Windows, unlocked)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        with contextlib.suppress(ImportError):
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # closing releases the lock


def _parse(data: bytes) -> dict[str, Any] | None:
    """The owner recorded in the lock, or None (empty: released; torn or hand-edited: none)."""
    try:
        owner = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(owner, dict) or not isinstance(owner.get("pid"), int):
        return None
    return owner


def _me() -> dict[str, Any]:
    pid = os.getpid()
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return {"pid": pid, "host": socket.gethostname(), "start": _start_time(pid), "since": since}


def _alive(owner: dict[str, Any]) -> bool:
    """Whether the owner still runs. On another host we cannot tell: it counts as running."""
    if owner.get("host") != socket.gethostname():
        return True
    pid = owner["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    except OSError:  # an absurd pid
        return False
    started = _start_time(pid)
    return owner.get("start") is None or started is None or started == owner["start"]


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (Linux), so that a reused pid is told apart."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        return int(text.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _message(logdir: str | os.PathLike, owner: dict[str, Any]) -> str:
    lock = plugin_dir(logdir) / OWNER
    return (
        f"attnlog: another training (pid {owner['pid']} on {owner.get('host', '?')}, since "
        f"{owner.get('since', '?')}) is logging to {Path(logdir)}; two trainings in one logdir "
        "overwrite each other's archived steps. Give this run its own logdir (for example "
        f"logdir={str(Path(logdir) / 'run2')!r}), or start it once the other has finished. If no "
        f"training is logging there any more, delete {lock}."
    )

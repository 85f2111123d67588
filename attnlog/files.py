"""Opening the files a run folder names: regular files only, so a reader never hangs.

A run folder may be shared or copied from elsewhere. A FIFO there blocks `open()` until some
process writes to it, and a device (`/dev/zero`, a terminal) may never end; both would hang the
reader (`attnlog report`, the Attention tab) for good. So readers open with `O_NONBLOCK`, which
makes opening a FIFO return at once, and refuse whatever the opened descriptor is not a regular
file. Symbolic links are followed: the file they end at is what is checked.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

__all__ = ["NotARegularFile", "check_regular", "open_regular", "read_regular"]

_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # POSIX only; Windows has no FIFOs in folders


class NotARegularFile(OSError):
    """A path a reader was given is a FIFO, a device, a socket or a folder."""


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """`open(path, "rb")` that never blocks on a FIFO or reads a device.

    Raises:
        NotARegularFile: `path` is not a regular file (nothing was read from it).
        OSError: as `open` (missing, no permission).
    """
    fd = os.open(path, os.O_RDONLY | _NONBLOCK | getattr(os, "O_BINARY", 0))
    try:
        _require_regular(path, os.fstat(fd).st_mode)
        if _NONBLOCK:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike) -> bytes:
    """The bytes of a regular file (see `open_regular`)."""
    with open_regular(path) as fh:
        return fh.read()


def check_regular(path: str | os.PathLike) -> None:
    """Raise `NotARegularFile` unless `path` is a regular file now; for paths that another
    library opens by name (MLflow's `log_artifact`)."""
    _require_regular(path, os.stat(path).st_mode)


def _require_regular(path: str | os.PathLike, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    kinds = [
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ]
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    raise NotARegularFile(f"{os.fspath(path)} is {kind}; attnlog reads only regular files")

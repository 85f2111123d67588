"""What a spool entry may do, and one sender at a time.

A spool folder lives in the logdir, which may be shared (a team's folder, a copied run), so an
entry is not trusted: it may send only the files `Spool.add` wrote for it, exactly where it wrote
them (`<entry>.files/artifacts/<artifact path>`, `<entry>.files/images/NNNN.png`), as regular
files once symbolic links are followed, and only to artifact paths inside the run. Anything else
is refused (`RefusedEntry`) and set aside, never sent. `hold` keeps two `attnlog sync`s from
sending one spool at once: both would start a run, and each would delete entries the other was
sending.
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from attnlog.files import NotARegularFile, check_regular

__all__ = ["CorruptEntry", "RefusedEntry", "SpoolBusy", "check_entry_files", "hold", "spooled_file"]

LOCK = "sync.lock"
_IMAGE_FILE = re.compile(r"images/[0-9]{4,}\.png")


class CorruptEntry(ValueError):
    """A spool entry that cannot be read; it is set aside, never retried."""


class RefusedEntry(CorruptEntry):
    """A spool entry that names a file not spooled with it, or an artifact path outside the run."""


class SpoolBusy(RuntimeError):
    """Another `sync` is sending this spool now."""


def check_entry_files(path: Path, event: dict[str, Any]) -> None:
    """Refuse an entry that names any file but those `Spool.add` wrote for it, or that would
    write an artifact outside the run (`..`, an absolute path); checked before any part of it
    is sent.

    Raises:
        RefusedEntry: with what the entry named and what it may name.
        CorruptEntry: a file spooled with it is missing.
    """
    parts = [*event["artifacts"], *event["images"]]
    if not all(isinstance(part, dict) for part in parts):
        raise CorruptEntry(f"{path.name}: an artifact or image is not an object")
    _check_names(path, event)
    for part in parts:
        if "file" in part:
            spooled_file(path.parent, part["file"])


def _check_names(path: Path, event: dict[str, Any]) -> None:
    own = f"{path.stem}.files/"
    for art in event["artifacts"]:
        target = art.get("path")
        if not _inside_run(target):
            raise RefusedEntry(
                f"{path.name}: artifact path {str(target)[:200]!r} is not a relative path inside "
                "the run; refused"
            )
        if "file" in art and art["file"] != f"{own}artifacts/{target}":
            raise RefusedEntry(
                f"{path.name}: artifact file {str(art['file'])[:200]!r} is not the one spooled "
                f"with the entry ({own}artifacts/{target}); refused"
            )
    for img in event["images"]:
        name = img.get("file")
        if name is None:
            continue
        if not (
            isinstance(name, str)
            and name.startswith(own)
            and _IMAGE_FILE.fullmatch(name[len(own) :])
        ):
            raise RefusedEntry(
                f"{path.name}: image file {str(name)[:200]!r} is not one spooled with the entry "
                f"({own}images/NNNN.png); refused"
            )


def _inside_run(value: object) -> bool:
    return (
        isinstance(value, str)
        and value == posixpath.normpath(value)
        and not value.startswith(("/", "../"))
        and value not in (".", "..")
        and "\\" not in value
        and "\0" not in value
    )


def spooled_file(folder: Path, rel: str) -> Path:
    """The file `rel` (as `check_entry_files` let it through) of its entry's own `.files`
    folder, symbolic links followed.

    Raises:
        RefusedEntry: a link leads out of the entry's folder, or it is not a regular file (a
            FIFO would hang the send, a device would never end).
        CorruptEntry: it is missing.
    """
    own = folder.resolve() / rel.split("/", 1)[0]  # itself a link elsewhere: refused below
    local = (folder / rel).resolve()
    if not local.is_relative_to(own):
        raise RefusedEntry(f"spooled file {rel!r} leads out of {own} (to {local}); refused")
    try:
        check_regular(local)
    except NotARegularFile as exc:
        raise RefusedEntry(f"spooled file {rel!r}: {exc}; refused") from None
    except OSError as exc:
        raise CorruptEntry(f"spooled file {rel!r} cannot be read: {exc}") from None
    return local


@contextmanager
def hold(folder: Path) -> Iterator[None]:
    """Hold the spool in `folder` for one sender until the block ends.

    Raises:
        SpoolBusy: another process holds it (its pid in the message).
    """
    folder.mkdir(parents=True, exist_ok=True)
    with _open_lock(folder / LOCK) as fh:
        if not _try_lock(fh.fileno()):
            holder = fh.read(20).decode("ascii", "replace").strip() or "unknown"
            raise SpoolBusy(
                f"another sender (pid {holder}: an `attnlog sync`, or a training's MLflow sink) "
                f"is sending {folder} now; run it again once that one has finished"
            )
        fh.truncate()
        fh.write(str(os.getpid()).encode())
        fh.flush()
        yield  # the lock goes with the file's closing


def _open_lock(path: Path) -> BinaryIO:
    """The lock file, never through a link (a planted `sync.lock` -> ~/.bashrc must not be
    truncated) and never a FIFO or device."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:  # ELOOP: a link
        raise NotARegularFile(f"{path} cannot be the sync lock: {exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotARegularFile(f"{path} is not a regular file; remove it and sync again")
    return os.fdopen(fd, "r+b")


def _try_lock(fd: int) -> bool:
    """An exclusive lock on `fd` without waiting; False when another process holds it."""
    try:
        import fcntl
    except ModuleNotFoundError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True

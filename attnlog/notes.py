"""Say a thing once per process: `warn_once(key, message)`.

Readers poll the same damaged files, the writer renders the same long probe at every event, and
the training loop meets the same condition at every step: a message that would repeat is said
the first time its key is seen and never again. One set of keys for all of attnlog (thread-safe:
the writer thread and the training loop both say things), so a test resets it in one place
(`forget`). Standard library only: the training process and the readers both import it.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Hashable

__all__ = ["first_time", "forget", "warn_once"]

log = logging.getLogger("attnlog")

_said: set[Hashable] = set()
_lock = threading.Lock()


def first_time(key: Hashable) -> bool:
    """True the first time `key` is seen in this process, False ever after."""
    with _lock:
        if key in _said:
            return False
        _said.add(key)
        return True


def forget(key: Hashable | None = None) -> None:
    """Let `key` (every key when None) be said again: for tests, which check the first time."""
    with _lock:
        if key is None:
            _said.clear()
        else:
            _said.discard(key)


def warn_once(
    key: Hashable,
    message: str,
    *,
    cause: BaseException | None = None,
    category: type[Warning] | None = None,
    logger: logging.Logger | None = None,
    level: int = logging.WARNING,
    stacklevel: int = 2,
) -> bool:
    """Say `message` the first time `key` is seen; return whether it was said now.

    Args:
        key: what makes two calls "the same thing" (a path, a (path, mtime), a name).
        message: what happened and, where there is one, the fix.
        cause: the exception behind it: its type and text end the message.
        category: also raise the message as this warning (users filter warnings, not logs);
            then it is logged only when `logger` is given.
        logger: where to log it (default: the "attnlog" logger), at `level`.
        stacklevel: as in `warnings.warn`, counted from the caller of `warn_once`.
    """
    if not first_time(key):
        return False
    if cause is not None:
        message = f"{message}: {type(cause).__name__}: {cause}"
    if category is not None:
        warnings.warn(message, category, stacklevel=stacklevel + 1)
    if category is None or logger is not None:
        (logger or log).log(level, message)
    return True

"""Error containment: one policy for the training process and the writer.

Logging must never crash training: a failure after construction is counted in
`stats["errors.<what>"]` and reported once per `what` with its cause. Under `strict` (tests) the
first error is kept in `failure`, and raised at once when `raise_strict` (the caller's own thread)
or later by whoever collects it (a writer thread or process cannot raise into training).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["Containment", "cause"]

T = TypeVar("T")


def cause(ex: BaseException) -> str:
    return f"{type(ex).__name__}: {ex}"


class Containment:
    """Runs functions so that their exceptions are counted and reported, never raised.

    Args:
        stats: where `errors.<what>` is counted.
        report: `report(key, message)`, which says each key once.
        strict: keep (or raise) the first error instead of reporting it.
        raise_strict: with `strict`, raise it in the calling thread.
    """

    def __init__(
        self,
        stats: Counter[str],
        report: Callable[[str, str], None],
        *,
        strict: bool = False,
        raise_strict: bool = False,
    ) -> None:
        self.stats = stats
        self.report = report
        self.strict = strict
        self.raise_strict = raise_strict
        self.failure: BaseException | None = None

    def __call__(
        self, what: str, fn: Callable[..., T], *args: Any, method: str | None = None, **kw: Any
    ) -> T | None:
        """`fn(*args, **kw)`, or None when it raised.

        `what` is a stage ("render", "score") or a sink name: a broken sink is reported once,
        not once per `method`, and is tried again at the next event (a full disk may clear).
        """
        try:
            return fn(*args, **kw)
        except Exception as ex:
            self.stats[f"errors.{what}"] += 1
            if self.strict:
                if self.raise_strict:
                    raise
                self.failure = self.failure or ex
                return None
            doing = f"{what}.{method}" if method else what
            self.report(what, f"{doing} failed: {cause(ex)}")
            return None

    def take_failure(self) -> BaseException | None:
        """strict: the first error since the last call."""
        failure, self.failure = self.failure, None
        return failure

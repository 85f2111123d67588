"""Check AttentionLogger options when a callback is built, before any model exists.

A typo (`viewz=...`) or an unknown view should fail on the line that builds the callback, not
minutes later at `on_train_begin`, after the model and the data have loaded. Keyword names are
read from the signatures of `AttentionLogger` and `Capturer` (which gets its capture options),
so a new logger option is accepted here without a second list to keep in step.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from typing import Any

__all__ = ["check_options"]

# Arguments the callbacks fill in themselves (from the Trainer), so a user never passes them.
SET_BY_CALLBACK = frozenset(
    {"self", "model", "tokenizer", "probes", "sinks", "logdir", "is_main_process"}
)


def check_options(
    options: Mapping[str, Any], sinks: Any = None, callback: str = "AttentionLoggerCallback"
) -> None:
    """Raise for options AttentionLogger would refuse, judged without a model.

    Checks the keyword names, `views`, `patterns`, and the sink names in `sinks` and
    `sink_options`.

    Raises:
        TypeError: an unknown keyword (with the closest known name).
        ValueError: an unknown view, pattern or sink name.
    """
    accepted = accepted_options()
    for name in options:
        if name not in accepted:
            close = difflib.get_close_matches(name, accepted, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise TypeError(
                f"{callback} got an unknown option {name!r}; {hint}"
                f"options: {', '.join(sorted(accepted))}"
            )
    if "views" in options:
        _check_views(options["views"])
    if options.get("patterns") is not None:
        _check_patterns(options["patterns"])
    names = [sinks] if isinstance(sinks, str) else list(sinks or [])
    names += list(options.get("sink_options") or {})
    for name in names:
        if isinstance(name, str):  # Sink instances are the user's own
            _check_sink(name)


def accepted_options() -> set[str]:
    """Keyword names AttentionLogger takes, its capture options included."""
    from attnlog.capture import Capturer
    from attnlog.logger import AttentionLogger

    names: set[str] = set()
    for fn in (AttentionLogger.__init__, Capturer.__init__):
        for param in inspect.signature(fn).parameters.values():
            if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
                names.add(param.name)
    return names - SET_BY_CALLBACK


def _check_views(views: Any) -> None:
    from attnlog.render.event import VIEWS

    views = [views] if isinstance(views, str) else list(views)
    unknown = sorted(set(views) - set(VIEWS))
    if unknown:
        raise ValueError(f"unknown views {unknown}; choose from {list(VIEWS)}")


def _check_patterns(patterns: Any) -> None:
    from attnlog.patterns import PATTERNS

    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    unknown = sorted(set(patterns) - set(PATTERNS))
    if unknown:
        raise ValueError(f"unknown patterns {unknown}; choose from {', '.join(sorted(PATTERNS))}")


def _check_sink(name: str) -> None:
    from attnlog.sinks.base import sink_factory

    sink_factory(name)  # ValueError naming the choices

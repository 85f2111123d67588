"""Check AttentionLogger options when a callback is built, before any model exists.

A typo (`viewz=...`) or an unknown view should fail on the line that builds the callback, not
minutes later at `on_train_begin`, after the model and the data have loaded. Keyword names are
read from the signatures of `AttentionLogger` and `Capturer` (which gets its capture options),
so a new logger option is accepted here without a second list to keep in step; values are
checked by the logger's own `check_options`.
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

    Checks the keyword names here, then `views`, `patterns`, sink names and `sink_options` with
    `attnlog.logger.check_options` (the logger's own checks).

    Raises:
        TypeError: an unknown keyword (with the closest known name).
        ValueError, ModuleNotFoundError: an unknown view, pattern or sink, or a sink whose
            package is not installed.
    """
    from attnlog import logger

    accepted = accepted_options()
    for name in options:
        if name not in accepted:
            close = difflib.get_close_matches(name, accepted, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise TypeError(
                f"{callback} got an unknown option {name!r}; {hint}"
                f"options: {', '.join(sorted(accepted))}"
            )
    logger.check_options(dict(options), sinks)


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

"""Check AttentionLogger options when a callback is built, before any model exists.

A typo (`viewz=...`) or a bad value (`batch_size=0`, an unknown view) should fail on the line
that builds the callback, not minutes later at `on_train_begin`, after the model and the data
have loaded. Capture options are checked by building the one options object the capturer uses
(`CaptureOptions`); the logger's own options by the logger's `check_options`.
"""

from __future__ import annotations

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

    Raises:
        TypeError: an unknown keyword (with the closest known name), or a capture option of the
            wrong type.
        ValueError, ModuleNotFoundError: a bad capture option value, an unknown view, pattern
            or sink, a sink whose package is not installed, or a bad `ATTNLOG_*` setting.
    """
    from attnlog import logger, settings
    from attnlog.capturing.options import CaptureOptions, unknown_option

    own = logger_options()
    accepted = own | set(CaptureOptions.names())
    for name in options:
        if name not in accepted:
            raise TypeError(unknown_option(callback, name, accepted))
    CaptureOptions.create({k: v for k, v in options.items() if k not in own}, callback)
    logger.check_options(dict(options), sinks)
    settings.check_environment()


def accepted_options() -> set[str]:
    """Keyword names AttentionLogger takes, its capture options included."""
    from attnlog.capturing.options import CaptureOptions

    return logger_options() | set(CaptureOptions.names())


def logger_options() -> set[str]:
    """AttentionLogger's own keyword names (not its capture options), minus those the
    callbacks fill in."""
    from attnlog.logger import AttentionLogger

    params = inspect.signature(AttentionLogger.__init__).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in params if p.kind in kinds} - SET_BY_CALLBACK

"""Settings read from the environment, checked when a logger is built.

A bad value must fail where the logger is configured, with the fix in the message, not at every
event later (where errors are contained and only counted). Kept apart from rendering so that the
training process can check them without importing it.
"""

from __future__ import annotations

import math
import os

__all__ = ["MAX_HTML_BYTES", "check_environment", "max_html_bytes"]

#: Default cap of one HTML file (the event page, or a per-probe page), in bytes
#: (`ATTNLOG_MAX_HTML_MB` overrides it).
MAX_HTML_BYTES = 10 * 2**20


def max_html_bytes() -> int:
    """The cap per HTML file: `ATTNLOG_MAX_HTML_MB` (MiB) when set, else `MAX_HTML_BYTES`.

    Raises:
        ValueError: the variable is not a positive, finite number.
    """
    text = os.environ.get("ATTNLOG_MAX_HTML_MB")
    if text is None:
        return MAX_HTML_BYTES
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or not math.isfinite(value):
        raise ValueError(
            f"ATTNLOG_MAX_HTML_MB={text!r} must be a positive number of MiB, e.g. 50 "
            "(or unset it for the default of 10)"
        )
    return int(value * 2**20)


def check_environment() -> None:
    """Raise ValueError for any bad `ATTNLOG_*` setting; called when a logger is built."""
    max_html_bytes()
